//! The bridge as a process on a board: its readiness file (`--pid-file`), and what happens
//! to the backends it spawned when the bridge's process group gets a signal (Ctrl-C,
//! `kill %1`, a service manager) or the bridge itself is killed.

mod common;

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_bridge::config::Config;
use hvisor_hsm::{ProviderServer, SimHypervisor};
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator};
use hvisor_vhost_tests::harness::{bridge_command, sim_zones, Irq, Process, Ram, TempDir, Vcpu};

const BLK0: u64 = 0xa003c00;
const BLK1: u64 = 0xa003e00;
const IRQ0: u32 = 78;
const IRQ1: u32 = 79;
/// Upper bound on any wait below; the events normally come within milliseconds.
const WAIT: Duration = Duration::from_secs(20);

/// A bridge process on a simulated hypervisor, started in its own process group (as a shell
/// job or a service is) when `own_group`.
struct Rig {
    sim: Arc<SimHypervisor>,
    bridge: Process,
    pid_file: PathBuf,
    dir: Arc<TempDir>,
    _server: ProviderServer,
}

impl Rig {
    fn start(dir: Arc<TempDir>, config_json: &str, extra_args: &[&str], own_group: bool) -> Rig {
        let config_path = dir.path().join("virtio_cfg.json");
        std::fs::write(&config_path, config_json).unwrap();
        let config = Config::from_file(&config_path).unwrap();
        let sim = SimHypervisor::new(sim_zones(&config)).unwrap();
        let socket = dir.path().join("hsm.sock");
        let server = sim.serve(&socket).unwrap();
        let pid_file = dir.path().join("bridge.pid");
        let mut cmd = bridge_command(&config_path, &socket, dir.path(), extra_args);
        cmd.arg("--pid-file").arg(&pid_file).args(extra_args);
        if own_group {
            cmd.process_group(0);
        }
        // The bridge's log (and its backends'), for the tests that read it.
        let log = std::fs::File::create(dir.path().join("bridge.log")).unwrap();
        cmd.env("RUST_LOG", "info").stderr(log);
        let bridge = Process::spawn("hvisor-vhost-bridge", &mut cmd);
        Rig {
            sim,
            bridge,
            pid_file,
            dir,
            _server: server,
        }
    }

    /// Waits for the pid file; false if the bridge exited first.
    fn wait_ready(&self) -> bool {
        wait_for_file(&self.pid_file, self.bridge.pid())
    }

    /// The bridge's log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }

    /// The live `vhost-user-blk` processes serving this rig's sockets, whoever their parent.
    fn backends(&self) -> Vec<u32> {
        backends_serving(&self.dir.path().join("run"))
    }
}

/// Waits until every process of `pids` has exited; returns those still running at the
/// deadline.
fn wait_all_exit(pids: &[u32], timeout: Duration) -> Vec<u32> {
    let fds: Vec<(u32, OwnedFd)> = pids.iter().map(|&p| (p, pidfd(p))).collect();
    let deadline = Instant::now() + timeout;
    let mut left: Vec<&(u32, OwnedFd)> = fds.iter().collect();
    while !left.is_empty() {
        let wait = deadline.saturating_duration_since(Instant::now());
        let raw: Vec<i32> = left.iter().map(|(_, fd)| fd.as_raw_fd()).collect();
        let ready = poll_in(&raw, wait);
        if ready.is_empty() {
            break;
        }
        left = left
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !ready.contains(i))
            .map(|(_, p)| p)
            .collect();
    }
    left.iter().map(|(pid, _)| *pid).collect()
}

/// Live (not zombie) `vhost-user-blk` processes whose command line names `run_dir`.
fn backends_serving(run_dir: &Path) -> Vec<u32> {
    let needle = run_dir.display().to_string();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).into_owned();
        // The program itself, not the bridge (whose arguments name both).
        let program = cmdline.split('\0').next().unwrap_or_default();
        if !program.ends_with("vhost-user-blk") || !cmdline.contains(&needle) {
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
        {
            pids.push(pid);
        }
    }
    pids
}

/// The process group of `pid`.
fn process_group(pid: u32) -> libc::pid_t {
    // SAFETY: getpgid only reads the kernel's record of `pid`.
    let group = unsafe { libc::getpgid(pid as libc::pid_t) };
    assert!(
        group > 0,
        "getpgid({pid}): {}",
        std::io::Error::last_os_error()
    );
    group
}

fn two_disks() -> (Arc<TempDir>, String) {
    let dir = dir_with_images("bridgeproc", &["d0.img", "d1.img"]);
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(BLK0, IRQ0, "d0.img", ""),
            blk_entry(BLK1, IRQ1, "d1.img", ""),
        ],
        None,
    )]);
    (dir, cfg)
}

/// One verified write and read-back on the device at `base`.
fn verified_io(rig: &Rig, base: u64, irq: u32, offset: u64) {
    let vcpu = Vcpu(rig.sim.vcpu(1, 0));
    let ram = Ram(rig.sim.ram(1));
    let line = Irq::new(&rig.sim, 1, irq);
    let mut alloc = GuestAllocator::new(RAM_BASE + offset, 0x100_0000);
    let mut blk =
        BlkDriver::new(&vcpu, base, &ram, &line, &mut alloc, &BlkOptions::default()).unwrap();
    let data = vec![0x5a; 4096];
    assert_eq!(blk.write(8, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; 4096];
    assert_eq!(blk.read(8, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
    assert_eq!(line.lost_interrupts(), 0, "an interrupt was lost");
}

#[test]
fn pid_file_appears_once_every_device_serves_and_goes_at_exit() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let text = std::fs::read_to_string(&rig.pid_file).unwrap();
    assert_eq!(text.trim(), rig.bridge.pid().to_string());
    // Ready means both backends run and both devices answer at once.
    assert_eq!(rig.backends().len(), 2, "{:?}", rig.backends());
    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    verified_io(&rig, BLK1, IRQ1, 0x200_0000);
    assert!(rig.bridge.terminate().success());
    assert!(!rig.pid_file.exists(), "the pid file outlived the bridge");
}

#[test]
fn no_pid_file_when_a_device_cannot_be_served() {
    // An external backend that never listens: the bridge gives up and must never have
    // said it was ready.
    let dir = dir_with_images("bridgeproc-nobackend", &[]);
    let socket = dir.path().join("absent.sock");
    let entry = format!(
        r#"{{"type":"blk","addr":"{BLK0:#x}","len":"0x200","irq":{IRQ0},"socket":"{}","status":"enable"}}"#,
        socket.display()
    );
    let cfg = config(&[zone(1, &[entry], None)]);
    let mut rig = Rig::start(dir, &cfg, &["--connect-timeout-s", "1"], false);
    assert!(!rig.wait_ready(), "pid file written without a backend");
    let status = rig.bridge.wait_timeout(WAIT).expect("bridge exited");
    assert!(!status.success());
    assert!(!rig.pid_file.exists());
}

#[test]
fn sigint_to_the_process_group_stops_the_bridge_and_every_backend() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], true);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    let backends = rig.backends();
    assert_eq!(backends.len(), 2, "{backends:?}");
    // A signal to the bridge's group must not reach the backends: the bridge stops them
    // itself, and would restart one the signal had killed.
    let group = rig.bridge.pid() as libc::pid_t;
    for &pid in &backends {
        assert_ne!(
            process_group(pid),
            group,
            "backend {pid} is in the bridge's group"
        );
    }
    // Ctrl-C in a shell: SIGINT to every process of the bridge's group.
    // SAFETY: kill(2) on the process group of our own child; no memory is touched.
    assert_eq!(unsafe { libc::kill(-group, libc::SIGINT) }, 0);
    let status = rig.bridge.wait_timeout(WAIT).expect("bridge exited");
    assert!(status.success(), "bridge: {status}");
    // The bridge stops its backends before it exits, so none may be left now, neither the
    // originals nor a replacement.
    assert_eq!(
        rig.backends(),
        Vec::<u32>::new(),
        "backends outlived the bridge"
    );
    assert!(!rig.pid_file.exists());
}

#[test]
fn a_backend_lost_together_with_a_stop_signal_is_not_restarted() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], true);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let backends = rig.backends();
    assert_eq!(backends.len(), 2, "{backends:?}");
    // Freeze the bridge, then lose a backend and send the stop signal: when it runs again,
    // the hang-up and the signal are ready together, the hang-up first.
    rig.bridge.signal(libc::SIGSTOP);
    // SAFETY: kill(2) on a backend of this rig; no memory is touched.
    let killed = unsafe { libc::kill(backends[0] as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);
    assert!(wait_all_exit(&backends[..1], WAIT).is_empty());
    rig.bridge.signal(libc::SIGTERM);
    rig.bridge.signal(libc::SIGCONT);
    let status = rig.bridge.wait_timeout(WAIT).expect("bridge exited");
    let log = rig.log();
    let left = rig.backends();
    for &pid in &left {
        // SAFETY: kill(2) on a backend this rig started; no memory is touched.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(status.success(), "bridge: {status}\n{log}");
    assert_eq!(
        left,
        Vec::<u32>::new(),
        "backends outlived the bridge\n{log}"
    );
    assert!(
        !log.contains("restarting it"),
        "a backend was restarted while stopping\n{log}"
    );
}

#[test]
fn backends_exit_when_the_bridge_is_killed() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], true);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let backends = rig.backends();
    assert_eq!(backends.len(), 2, "{backends:?}");
    rig.bridge.signal(libc::SIGKILL);
    rig.bridge.wait_timeout(WAIT).expect("bridge exited");
    let left = wait_all_exit(&backends, WAIT);
    for &pid in &left {
        // SAFETY: kill(2) on a backend this test started; no memory is touched.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    }
    assert!(
        left.is_empty(),
        "backends {left:?} outlived a killed bridge"
    );
}
