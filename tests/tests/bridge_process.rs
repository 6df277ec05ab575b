//! The bridge as a process on a board: its readiness file (`--pid-file`), and what happens
//! to the backends it spawned when the bridge's process group gets a signal (Ctrl-C,
//! `kill %1`, a service manager) or the bridge itself is killed.

mod common;

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_bridge::status::DeviceState;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator};
use hvisor_vhost_tests::harness::{bin_path, bridge_status, Irq, Ram, TempDir, Vcpu};

const BLK0: u64 = 0xa003c00;
const BLK1: u64 = 0xa003e00;
const IRQ0: u32 = 78;
const IRQ1: u32 = 79;
/// Upper bound on any wait below; the events normally come within milliseconds.
const WAIT: Duration = Duration::from_secs(20);

/// A bridge process on a simulated hypervisor, started in its own process group (as a shell
/// job or a service is) when `own_group`.
struct Rig(PidFileRig);

impl std::ops::Deref for Rig {
    type Target = PidFileRig;
    fn deref(&self) -> &PidFileRig {
        &self.0
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut PidFileRig {
        &mut self.0
    }
}

impl Rig {
    fn start(dir: Arc<TempDir>, config_json: &str, extra_args: &[&str], own_group: bool) -> Rig {
        Rig::start_with_env(dir, config_json, extra_args, own_group, &[])
    }

    /// [`Rig::start`] with `env` added to the bridge's environment.
    fn start_with_env(
        dir: Arc<TempDir>,
        config_json: &str,
        extra_args: &[&str],
        own_group: bool,
        env: &[(&str, &OsStr)],
    ) -> Rig {
        Rig(PidFileRig::start(dir, config_json, extra_args, |cmd| {
            if own_group {
                cmd.process_group(0);
            }
            cmd.envs(env.iter().copied());
        }))
    }

    /// The live `vhost-user-blk` processes serving this rig's sockets, whoever their parent.
    fn backends(&self) -> Vec<u32> {
        backends_serving(&self.dir.path().join("run"))
    }
}

/// Waits (inotify on the file) until the rig's log has a line for which `matches` is true;
/// returns it, or fails at the deadline with the log.
fn wait_for_log_line(rig: &Rig, matches: impl Fn(&str) -> bool) -> String {
    let path = rig.dir.path().join("bridge.log");
    // SAFETY: inotify_init1 returns a new fd or -1.
    let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    assert!(inotify >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let inotify = unsafe { OwnedFd::from_raw_fd(inotify) };
    let file = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid fd and a NUL-terminated path.
    let watch =
        unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), file.as_ptr(), libc::IN_MODIFY) };
    assert!(watch >= 0);
    let deadline = Instant::now() + WAIT;
    loop {
        // After arming the watch: what was written before is read here, later writes wake
        // the poll.
        let log = rig.log();
        if let Some(line) = log.lines().find(|l| matches(l)) {
            return line.to_owned();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !poll_in(&[inotify.as_raw_fd()], left).is_empty(),
            "no such line in the log:\n{log}"
        );
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a local buffer of its own length.
        unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
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

/// A datagram socket standing in for systemd's notification socket, and the environment that
/// names it.
fn notify_socket(dir: &TempDir) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    (socket, path)
}

#[test]
fn systemd_is_told_ready_once_every_device_serves() {
    let (dir, cfg) = two_disks();
    let (socket, path) = notify_socket(&dir);
    let mut rig = Rig::start_with_env(
        dir,
        &cfg,
        &[],
        false,
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    let exited = pidfd(rig.bridge.pid());
    let ready = poll_in(&[socket.as_raw_fd(), exited.as_raw_fd()], WAIT);
    assert_eq!(
        ready,
        [0],
        "no notification before exit or timeout: {}",
        rig.log()
    );
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    let message = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(message.starts_with("READY=1\n"), "{message:?}");
    assert!(
        message.contains("STATUS=serving 2 devices\n"),
        "{message:?}"
    );
    // Sent at the moment the pid file says ready, not before: both devices answer at once.
    assert!(rig.pid_file.exists(), "READY=1 before the pid file");
    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    verified_io(&rig, BLK1, IRQ1, 0x200_0000);
    assert!(rig.bridge.terminate().success());
    // One READY=1 per start.
    assert_eq!(
        socket.recv(&mut buf).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
}

#[test]
fn backend_lines_carry_zone_device_and_pid() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let backends = rig.backends();
    assert_eq!(backends.len(), 2, "{backends:?}");
    for (addr, disk) in [(BLK0, "d0.img"), (BLK1, "d1.img")] {
        let prefix = format!("zone 1 blk@{addr:#x} vhost-user-blk pid ");
        let line = wait_for_log_line(&rig, |l| {
            l.contains(&prefix) && l.contains("vhost_user_blk: Serving") && l.contains(disk)
        });
        let pid: u32 = line
            .split_once(&prefix)
            .and_then(|(_, rest)| rest.split_once(':'))
            .and_then(|(pid, _)| pid.parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line:?}"));
        assert!(backends.contains(&pid), "{line:?}: not one of {backends:?}");
    }
    assert!(rig.bridge.terminate().success());
}

#[test]
fn log_level_reaches_the_bridge_and_its_backends() {
    // The rig's RUST_LOG says info; --log-level overrides it for the backends too.
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &["--log-level", "debug"], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    wait_for_log_line(&rig, |l| {
        l.contains(" DEBUG ") && l.contains("service manager notified: false")
    });
    wait_for_log_line(&rig, |l| {
        l.contains(" DEBUG ")
            && l.contains(&format!("zone 1 blk@{BLK0:#x} vhost-user-blk pid "))
            && l.contains("vhost_user_frontdoor: Vhost-user daemon connected")
    });
    assert!(rig.bridge.terminate().success());
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
    let (socket, path) = notify_socket(&dir);
    let mut rig = Rig::start_with_env(
        dir,
        &cfg,
        &["--connect-timeout-s", "1"],
        false,
        &[("NOTIFY_SOCKET", path.as_os_str())],
    );
    assert!(!rig.wait_ready(), "pid file written without a backend");
    let status = rig.bridge.wait_timeout(WAIT).expect("bridge exited");
    assert!(!status.success());
    assert!(!rig.pid_file.exists());
    // Nor did it tell systemd it was ready.
    let mut buf = [0u8; 64];
    assert_eq!(
        socket.recv(&mut buf).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::WouldBlock)
    );
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

/// VIRTIO_F_VERSION_1, which every driver of a virtio-mmio v2 device acknowledges.
const VERSION_1: u64 = 1 << 32;

#[test]
fn status_reports_devices_features_and_counters_of_a_running_bridge() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let before = bridge_status(rig.dir.path());
    assert_eq!(before.pid, rig.bridge.pid());
    assert_eq!(before.zones, [1]);
    let backends = rig.backends();
    assert_eq!(before.devices.len(), 2, "{before:?}");
    for (dev, (base, irq)) in before.devices.iter().zip([(BLK0, IRQ0), (BLK1, IRQ1)]) {
        assert_eq!(
            (dev.zone, dev.base, dev.irq, dev.device_id),
            (1, base, irq, 2)
        );
        assert_eq!(dev.label, format!("zone1/blk@{base:#x}"));
        assert_eq!(dev.state, DeviceState::Running);
        let pid = dev.backend_pid.expect("a spawned backend has a pid");
        assert!(backends.contains(&pid), "{pid} is not one of {backends:?}");
        // No driver yet: nothing negotiated, every queue at its maximum size, none ready.
        assert_eq!(dev.features, 0);
        assert!(!dev.queues.is_empty());
        assert!(dev.queues.iter().all(|q| q.size > 0 && !q.ready), "{dev:?}");
    }

    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    let after = bridge_status(rig.dir.path());
    let (blk0, blk1) = (&after.devices[0], &after.devices[1]);
    assert_ne!(blk0.features & VERSION_1, 0, "{blk0:?}");
    assert!(blk0.queues[0].ready, "{blk0:?}");
    assert_eq!(blk1.features, 0, "the idle device negotiated nothing");
    // The I/O's notifies were answered by blk0's backend, and only those are blk0's.
    assert!(blk0.notify_to_call.count > 0, "{blk0:?}");
    assert_eq!(blk1.notify_to_call.count, 0, "{blk1:?}");
    let (c0, c1) = (&before.counters, &after.counters);
    assert!(c1.requests > c0.requests, "{c0:?} -> {c1:?}");
    assert!(c1.interrupts > c0.interrupts, "{c0:?} -> {c1:?}");
    assert_eq!(c1.reconnects, 0);
    assert_eq!(
        c1.notify_to_call.count - c0.notify_to_call.count,
        blk0.notify_to_call.count,
        "{c0:?} -> {c1:?}"
    );

    // The table names every device and its state.
    let out = std::process::Command::new(bin_path("hvisor-vhost-bridge"))
        .args(["status", "--socket"])
        .arg(rig.dir.path().join("run/status.sock"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for dev in &after.devices {
        let line = table
            .lines()
            .find(|l| l.starts_with(&dev.label))
            .unwrap_or_else(|| panic!("no line for {} in\n{table}", dev.label));
        assert!(line.contains(" running "), "{line}");
    }
    // The guest is idle: the request count stands still between the two queries.
    assert!(
        table.contains(&format!("requests {} ", c1.requests)),
        "{table}"
    );
    assert!(rig.bridge.terminate().success());
    assert!(
        !rig.dir.path().join("run/status.sock").exists(),
        "the status socket outlived the bridge"
    );
}

#[test]
fn sigusr1_logs_the_status_and_the_bridge_goes_on() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    rig.bridge.signal(libc::SIGUSR1);
    for base in [BLK0, BLK1] {
        let label = format!("status: zone1/blk@{base:#x}");
        let line = wait_for_log_line(&rig, |l| l.contains(&label));
        assert!(line.contains(" running "), "{line}");
    }
    wait_for_log_line(&rig, |l| l.contains("status: requests "));
    // Still serving.
    verified_io(&rig, BLK1, IRQ1, 0x200_0000);
    assert!(rig.bridge.terminate().success());
}

#[test]
fn sigusr1_to_vhost_user_blk_logs_its_queue_counters() {
    let (dir, cfg) = two_disks();
    let mut rig = Rig::start(dir, &cfg, &[], false);
    assert!(rig.wait_ready(), "the bridge exited before it was ready");
    let status = bridge_status(rig.dir.path());
    let pid = status.devices[0].backend_pid.expect("a spawned backend");
    verified_io(&rig, BLK0, IRQ0, 0x10_0000);
    // SAFETY: kill(2) on a backend of the bridge this test started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR1) }, 0);
    // One 4 KiB write and one 4 KiB read, and nothing failed.
    let prefix = format!("vhost-user-blk pid {pid}: ");
    let line = wait_for_log_line(&rig, |l| l.contains(&prefix) && l.contains("queue 0: "));
    assert!(
        line.ends_with(" 4096 bytes read, 4096 bytes written, 0 errors"),
        "{line}"
    );
    assert!(rig.bridge.terminate().success());
}
