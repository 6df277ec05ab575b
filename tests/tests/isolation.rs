//! What the bridge lets reach its backends, and whom it lets serve it: the fds a spawned
//! backend inherits, the runtime directory its socket lives in, and the process at the other
//! end of every vhost-user socket.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use hvisor_vhost_tests::harness::{bin_path, children_running, Process, TempDir};

const BLK0: u64 = 0xa003c00;
const BLK1: u64 = 0xa003e00;

/// The bridge with stdin, stdout and stderr only, whatever the test inherited: any other fd
/// a backend has came from the bridge.
fn start_rig(dir: Arc<TempDir>, config_json: &str, extra_args: &[&str]) -> PidFileRig {
    PidFileRig::start(dir, config_json, extra_args, |cmd| {
        // SAFETY: close_range only changes fd flags; it is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                let all_but_stdio = libc::syscall(
                    libc::SYS_close_range,
                    3u32,
                    u32::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                );
                if all_but_stdio != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    })
}

fn two_disks(tag: &str) -> (Arc<TempDir>, String) {
    let dir = dir_with_images(tag, &["d0.img", "d1.img"]);
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(BLK0, 78, "d0.img", ""),
            blk_entry(BLK1, 79, "d1.img", ""),
        ],
        None,
    )]);
    (dir, cfg)
}

/// The second backend is spawned after the first device negotiated (its kick and call
/// eventfds exist), a respawned one after the event loop exists, and every one after the
/// HSM's fds arrived: none of them may reach a backend, which gets stdin, stdout and stderr.
#[test]
fn a_spawned_or_respawned_backend_inherits_no_fd_of_the_bridge() {
    let (dir, cfg) = two_disks("iso-fds");
    let d = dir.path().display();
    // Spawn number n (the bridge spawns one at a time) writes `fds.n`: what `ls` inherited
    // through the shell, which passes on every fd it got, and the directory `ls` reads; and
    // `pid.n`. Then the real backend takes over the same pid.
    let wrapper = script(
        dir.path(),
        "blk-wrapper.sh",
        &format!(
            "n=$(ls {d} | grep -c '^fds\\.[0-9]*$')\n\
             echo $$ > {d}/pid.$n\n\
             ls -l /proc/self/fd > {d}/fds.$n.tmp && mv {d}/fds.$n.tmp {d}/fds.$n\n\
             exec {} \"$@\"\n",
            bin_path("vhost-user-blk").display()
        ),
    );
    let rig = start_rig(
        dir.clone(),
        &cfg,
        &["--blk-backend", wrapper.to_str().unwrap()],
    );
    assert!(rig.wait_ready(), "the bridge did not start:\n{}", rig.log());
    // The bridge respawns a backend that dies.
    let pid: i32 = std::fs::read_to_string(dir.path().join("pid.1"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill(2) only sends a signal.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(
        wait_for_file(&dir.path().join("fds.2"), rig.bridge.pid()),
        "the bridge exited instead of respawning:\n{}",
        rig.log()
    );
    for n in 0..3 {
        let listing = std::fs::read_to_string(dir.path().join(format!("fds.{n}"))).unwrap();
        let leaked: Vec<&str> = listing
            .lines()
            .filter_map(|line| line.split_once(" -> "))
            .filter(|(name, target)| {
                let fd: u32 = name.rsplit(' ').next().unwrap().parse().unwrap();
                // ls's own handle on the directory it lists.
                fd > 2 && !(target.starts_with("/proc/") && target.ends_with("/fd"))
            })
            .map(|(_, target)| target)
            .collect();
        assert!(
            leaked.is_empty(),
            "spawn {n} inherited {leaked:?}:\n{listing}"
        );
    }
}

fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Runs our `vhost-user-blk` as `nobody` on `dir/ext/blk.sock`, the image and the directory
/// given to that user; returns the process and the socket.
fn backend_of_nobody(dir: &Path) -> (Process, PathBuf) {
    const NOBODY: u32 = 65534;
    let ext = dir.join("ext");
    std::fs::create_dir(&ext).unwrap();
    let image = dir.join("d0.img");
    for path in [&ext, &image] {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path; chown touches no memory of ours.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) }, 0);
    }
    let socket = ext.join("blk.sock");
    let mut cmd = std::process::Command::new(bin_path("vhost-user-blk"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--image")
        .arg(&image)
        .uid(NOBODY)
        .gid(NOBODY);
    (Process::spawn("vhost-user-blk", &mut cmd), socket)
}

fn external_disk(socket: &Path) -> String {
    config(&[zone(
        1,
        &[format!(
            r#"{{"type":"blk","addr":"{BLK0:#x}","len":"0x200","irq":78,"socket":"{}","status":"enable"}}"#,
            socket.display()
        )],
        None,
    )])
}

/// The bridge hands every backend guest memory (on hvisor, `/dev/hvisor`): an external
/// backend of a user it was not told to trust is refused before it gets anything.
#[test]
fn an_external_backend_of_an_untrusted_user_is_refused() {
    if euid() != 0 {
        eprintln!("skipped: running a backend as another user needs root");
        return;
    }
    let dir = dir_with_images("iso-uid", &["d0.img"]);
    let (_backend, socket) = backend_of_nobody(dir.path());
    let cfg = external_disk(&socket);
    let mut rig = start_rig(dir.clone(), &cfg, &[]);
    assert!(!rig.wait_ready(), "the bridge served nobody's backend");
    let status = rig
        .bridge
        .wait_timeout(PROCESS_WAIT)
        .expect("bridge exited");
    assert_eq!(status.code(), Some(1));
    let log = rig.log();
    assert!(
        log.contains("of uid 65534, which may not serve the bridge (allowed: 0;"),
        "{log}"
    );
    assert!(!log.contains("SET_MEM_TABLE"), "{log}");
}

/// ... and served once it is trusted.
#[test]
fn an_external_backend_of_a_user_given_with_backend_uid_serves() {
    if euid() != 0 {
        eprintln!("skipped: running a backend as another user needs root");
        return;
    }
    let dir = dir_with_images("iso-uid-ok", &["d0.img"]);
    let (_backend, socket) = backend_of_nobody(dir.path());
    let cfg = external_disk(&socket);
    let mut rig = start_rig(dir.clone(), &cfg, &["--backend-uid", "65534"]);
    assert!(rig.wait_ready(), "the bridge did not start:\n{}", rig.log());
    assert!(rig.bridge.terminate().success());
}

/// A spawned backend's socket must be served by the very process the bridge started; a
/// wrapper that runs the backend as its child instead of exec'ing it is refused, and what
/// it started is stopped with it.
#[test]
fn a_spawned_backend_served_by_another_process_is_refused() {
    let dir = dir_with_images("iso-pid", &["d0.img"]);
    let d = dir.path().display();
    let wrapper = script(
        dir.path(),
        "blk-wrapper.sh",
        &format!(
            "{} \"$@\" &\necho $! > {d}/child.pid\nwait\n",
            bin_path("vhost-user-blk").display()
        ),
    );
    let cfg = config(&[zone(1, &[blk_entry(BLK0, 78, "d0.img", "")], None)]);
    let mut rig = start_rig(
        dir.clone(),
        &cfg,
        &["--blk-backend", wrapper.to_str().unwrap()],
    );
    assert!(!rig.wait_ready(), "the bridge served its backend's child");
    let status = rig
        .bridge
        .wait_timeout(PROCESS_WAIT)
        .expect("bridge exited");
    assert_eq!(status.code(), Some(1));
    let log = rig.log();
    assert!(
        log.contains("not by the backend the bridge started")
            && log.contains("a wrapper program must exec the backend"),
        "{log}"
    );
    let child: u32 = std::fs::read_to_string(dir.path().join("child.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The child was started before the bridge exited; a pidfd of it, if it still exists,
    // says when it goes.
    if std::path::Path::new(&format!("/proc/{child}")).exists() {
        let exited = pidfd(child);
        assert_eq!(
            poll_in(&[std::os::fd::AsRawFd::as_raw_fd(&exited)], PROCESS_WAIT),
            vec![0],
            "the wrapper's child outlived the bridge"
        );
    }
}

/// `--backend-user`: the spawned backend runs as that user, with its primary group and no
/// other, in a private runtime directory that user owns, and still ends with the bridge.
#[test]
fn spawned_backends_run_as_the_backend_user() {
    if euid() != 0 {
        eprintln!("skipped: changing a backend's user needs root");
        return;
    }
    let dir = dir_with_images("iso-user", &["d0.img"]);
    let image = dir.path().join("d0.img");
    let c = std::ffi::CString::new(image.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; chown touches no memory of ours.
    assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
    let cfg = config(&[zone(1, &[blk_entry(BLK0, 78, "d0.img", "")], None)]);
    let rig = start_rig(dir.clone(), &cfg, &["--backend-user", "nobody"]);
    assert!(rig.wait_ready(), "the bridge did not start:\n{}", rig.log());
    let backends = children_running(rig.bridge.pid(), "vhost-user-blk");
    assert_eq!(backends.len(), 1, "{backends:?}");
    let status = std::fs::read_to_string(format!("/proc/{}/status", backends[0])).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65534"; 4]);
    assert_eq!(field("Gid:"), ["65534"; 4]);
    assert!(field("Groups:").is_empty(), "{status}");
    let run = std::fs::symlink_metadata(dir.path().join("run")).unwrap();
    assert_eq!((run.uid(), run.mode() & 0o7777), (65534, 0o700));
    // The parent-death signal survives the change of user (it is set after it): the
    // backend does not outlive a killed bridge.
    let exited = pidfd(backends[0]);
    rig.bridge.signal(libc::SIGKILL);
    assert_eq!(
        poll_in(&[std::os::fd::AsRawFd::as_raw_fd(&exited)], PROCESS_WAIT),
        vec![0],
        "the backend outlived the killed bridge"
    );
}

/// Our backends run under their seccomp filter (see `vhost_user_frontdoor::seccomp`) from
/// their first instructions on, where seccompiler supports the architecture.
#[test]
fn spawned_backends_run_under_seccomp() {
    if !matches!(std::env::consts::ARCH, "x86_64" | "aarch64" | "riscv64") {
        eprintln!("skipped: seccompiler has no filter for this architecture");
        return;
    }
    let (dir, cfg) = two_disks("iso-seccomp");
    let rig = start_rig(dir, &cfg, &[]);
    assert!(rig.wait_ready(), "the bridge did not start:\n{}", rig.log());
    let backends = children_running(rig.bridge.pid(), "vhost-user-blk");
    assert_eq!(backends.len(), 2, "{backends:?}");
    for pid in backends {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        // 2: SECCOMP_MODE_FILTER.
        assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
    }
}
