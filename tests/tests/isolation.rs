//! What the bridge lets reach its backends, and whom it lets serve it: the fds a spawned
//! backend inherits, the runtime directory its socket lives in, and the process at the other
//! end of every vhost-user socket.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use hvisor_bridge::config::Config;
use hvisor_hsm::{ProviderServer, SimHypervisor};
use hvisor_vhost_tests::harness::{bin_path, bridge_command, sim_zones, Process, TempDir};

const BLK0: u64 = 0xa003c00;
const BLK1: u64 = 0xa003e00;

/// A bridge process on a simulated hypervisor, its log in `bridge.log`.
struct Rig {
    bridge: Process,
    pid_file: PathBuf,
    dir: Arc<TempDir>,
    _sim: Arc<SimHypervisor>,
    _server: ProviderServer,
}

impl Rig {
    fn start(dir: Arc<TempDir>, config_json: &str, extra_args: &[&str]) -> Rig {
        let config_path = dir.path().join("virtio_cfg.json");
        std::fs::write(&config_path, config_json).unwrap();
        let config = Config::from_file(&config_path).unwrap();
        let sim = SimHypervisor::new(sim_zones(&config)).unwrap();
        let socket = dir.path().join("hsm.sock");
        let server = sim.serve(&socket).unwrap();
        let pid_file = dir.path().join("bridge.pid");
        let mut cmd = bridge_command(&config_path, &socket, dir.path(), extra_args);
        cmd.arg("--pid-file").arg(&pid_file).args(extra_args);
        let log = std::fs::File::create(dir.path().join("bridge.log")).unwrap();
        cmd.env("RUST_LOG", "info").stderr(log);
        // The bridge starts with stdin, stdout and stderr only, whatever the test inherited:
        // any other fd a backend has came from the bridge.
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
        let bridge = Process::spawn("hvisor-vhost-bridge", &mut cmd);
        Rig {
            bridge,
            pid_file,
            dir,
            _sim: sim,
            _server: server,
        }
    }

    /// Waits for the pid file; false if the bridge exited first.
    fn wait_ready(&self) -> bool {
        wait_for_file(&self.pid_file, self.bridge.pid())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }
}

/// An executable shell script at `dir/name`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
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
    let rig = Rig::start(
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
