//! Shared set-up for the end-to-end tests: configs, and a guest that owns its accessors.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisor_bridge::config::Config;
use hvisor_hsm::{ProviderServer, SimHypervisor};
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, GuestAllocator};
use hvisor_vhost_tests::harness::{
    bridge_command, sim_zones, Irq, Process, Ram, SimBridge, TempDir, Vcpu,
};

/// Zone RAM used by every test zone: 64 MiB at 0x5000_0000.
pub const RAM_BASE: u64 = 0x5000_0000;
pub const RAM_SIZE: u64 = 0x400_0000;
/// Image size of the test disks.
pub const DISK_SIZE: u64 = 96 << 20;

/// A blk device entry of a config.
pub fn blk_entry(addr: u64, irq: u32, img: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"blk","addr":"{addr:#x}","len":"0x200","irq":{irq},"img":"{img}","status":"enable"{extra}}}"#
    )
}

/// A zone with the test RAM region and the given device entries.
pub fn zone(id: u32, devices: &[String], windows: Option<&str>) -> String {
    let windows = windows
        .map(|w| format!(r#","virtio_windows":{w}"#))
        .unwrap_or_default();
    format!(
        r#"{{"id":{id},"memory_region":[{{"zone0_ipa":"{:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],"devices":[{}]{windows}}}"#,
        RAM_BASE + u64::from(id) * 0x1000_0000,
        devices.join(",")
    )
}

/// A whole config.
pub fn config(zones: &[String]) -> String {
    format!(r#"{{"zones":[{}]}}"#, zones.join(","))
}

/// A fresh scratch dir with a sparse image per name.
pub fn dir_with_images(tag: &str, images: &[&str]) -> Arc<TempDir> {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = Arc::new(TempDir::new(tag));
    for name in images {
        hvisor_vhost_tests::harness::make_image(&dir.path().join(name), DISK_SIZE);
    }
    dir
}

/// The accessors a guest of one device uses: a vCPU, RAM and the device's IRQ line.
pub struct Guest {
    pub vcpu: Vcpu,
    pub ram: Ram,
    pub irq: Irq,
}

impl Guest {
    pub fn new(sb: &SimBridge, zone: u32, cpu: u64, irq: u32) -> Guest {
        Guest {
            vcpu: sb.vcpu(zone, cpu),
            ram: sb.ram(zone),
            irq: sb.irq(zone, irq),
        }
    }

    /// A blk driver on `base`, with rings and buffers from `[RAM_BASE + offset, +32 MiB)`.
    pub fn blk(
        &self,
        base: u64,
        offset: u64,
        options: &BlkOptions,
    ) -> BlkDriver<'_, Vcpu, Ram, Irq> {
        let mut alloc = GuestAllocator::new(RAM_BASE + offset, 0x200_0000);
        BlkDriver::new(&self.vcpu, base, &self.ram, &self.irq, &mut alloc, options)
            .unwrap_or_else(|e| panic!("blk init at {base:#x}: {e}"))
    }
}

/// Upper bound on waits for a process event; they normally come within milliseconds.
pub const PROCESS_WAIT: Duration = Duration::from_secs(20);

/// `pidfd_open(pid)`: readable once the process has exited, child or not.
pub fn pidfd(pid: u32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Polls `fds` for input; returns the indices that are ready, empty on timeout.
pub fn poll_in(fds: &[i32], timeout: Duration) -> Vec<usize> {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `polls` is a valid array of pollfd of the given length.
    let n = unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as libc::nfds_t, ms) };
    assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
    (0..polls.len())
        .filter(|&i| polls[i].revents != 0)
        .collect()
}

/// Waits (inotify on the directory) until `path` exists; false if `pid` exits first.
pub fn wait_for_file(path: &Path, pid: u32) -> bool {
    // SAFETY: inotify_init1 returns a new fd or -1.
    let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    assert!(inotify >= 0);
    // SAFETY: a fresh fd nothing else owns.
    let inotify = unsafe { OwnedFd::from_raw_fd(inotify) };
    let dir =
        std::ffi::CString::new(path.parent().unwrap().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid fd and a NUL-terminated path.
    let watch = unsafe {
        libc::inotify_add_watch(
            inotify.as_raw_fd(),
            dir.as_ptr(),
            libc::IN_CREATE | libc::IN_MOVED_TO,
        )
    };
    assert!(watch >= 0);
    let exited = pidfd(pid);
    let deadline = Instant::now() + PROCESS_WAIT;
    loop {
        // After arming the watch: a file created before is seen here, one created later
        // wakes the poll.
        if path.exists() {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let ready = poll_in(&[inotify.as_raw_fd(), exited.as_raw_fd()], left);
        if ready.contains(&1) {
            return path.exists();
        }
        assert!(!ready.is_empty(), "{} did not appear", path.display());
        let mut buf = [0u8; 4096];
        // SAFETY: reading into a local buffer of its own length.
        unsafe { libc::read(inotify.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    }
}

/// Writes a block of random data at a random sector, reads it back and checks it; returns
/// the round trip.
pub fn verified_io(
    blk: &mut hvisor_vhost_tests::driver::BlkDriver<'_, Vcpu, Ram, Irq>,
    rng: &mut hvisor_vhost_tests::harness::Rng,
    what: &str,
) -> Duration {
    use hvisor_vhost_tests::driver::BlkStatus;
    let started = Instant::now();
    let sector = rng.below(4096) * 8;
    let mut block = vec![0u8; 4096];
    rng.fill(&mut block);
    assert_eq!(
        blk.write(sector, &block).unwrap(),
        BlkStatus::Ok,
        "{what}: write"
    );
    let mut back = vec![0u8; 4096];
    assert_eq!(
        blk.read(sector, &mut back).unwrap(),
        BlkStatus::Ok,
        "{what}: read"
    );
    assert!(
        back == block,
        "{what}: sector {sector} reads back different data"
    );
    started.elapsed()
}

/// An executable shell script `name` in `dir` with `body`.
pub fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A bridge process on a simulated hypervisor, started with `--pid-file`, its log (and its
/// backends') in `bridge.log`: for tests of the process itself (readiness, signals, what it
/// hands its backends).
pub struct PidFileRig {
    pub sim: Arc<SimHypervisor>,
    pub bridge: Process,
    pub pid_file: PathBuf,
    pub dir: Arc<TempDir>,
    _server: ProviderServer,
}

impl PidFileRig {
    /// Starts the bridge on `config_json`; `customize` adjusts its command first (process
    /// group, environment, inherited fds).
    pub fn start(
        dir: Arc<TempDir>,
        config_json: &str,
        extra_args: &[&str],
        customize: impl FnOnce(&mut Command),
    ) -> PidFileRig {
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
        customize(&mut cmd);
        let bridge = Process::spawn("hvisor-vhost-bridge", &mut cmd);
        PidFileRig {
            sim,
            bridge,
            pid_file,
            dir,
            _server: server,
        }
    }

    /// Waits for the pid file; false if the bridge exited first.
    pub fn wait_ready(&self) -> bool {
        wait_for_file(&self.pid_file, self.bridge.pid())
    }

    /// The bridge's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bridge.log")).unwrap_or_default()
    }
}
