//! Backend crashes at chosen points, not random ones: `vhost-user-blk` is frozen with SIGSTOP
//! while 32 requests are outstanding (completed inside its interrupt-coalescing window and
//! not yet signalled, or not even looked at), then killed with SIGKILL. The restored backend
//! must complete or replay every request, the guest must get an interrupt for each
//! completion (no lost interrupt: a Linux guest does not poll), and every block written must
//! read back and be in the image. Also: a second crash while the first is being recovered,
//! and a guest that resets its device while the backend is down.

mod common;

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, DriverError, GuestMemory};
use hvisor_vhost_tests::harness::{bin_path, children_running, Irq, Ram, Rng, SimBridge, Vcpu};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
/// Requests outstanding when the backend is frozen.
const DEPTH: u64 = 32;
/// Past 128 completions the backend probes whether waiting for the next kick pays; a guest
/// that submits as soon as a request completes keeps it waiting from then on.
const WARM_UP: u64 = 150;
/// Blocks of the warm-up; the tests' own blocks start here.
const FIRST_BLOCK: u64 = 1024;

type Blk<'a> = BlkDriver<'a, Vcpu, Ram, Irq>;

/// `vhost-user-blk` with the longest coalescing window, for the bridge to spawn. Once the
/// test creates `gate` (a FIFO), a new backend waits until the test writes a line to it:
/// this holds the backend down for as long as the test needs.
fn gated_backend(dir: &Path) -> (PathBuf, PathBuf) {
    let path = dir.join("vhost-user-blk-gated");
    let gate = dir.join("gate");
    let script = format!(
        "#!/bin/sh\nif [ -p '{gate}' ]; then read _ < '{gate}'; fi\nexec '{bin}' --coalesce-us 10000 \"$@\"\n",
        gate = gate.display(),
        bin = bin_path("vhost-user-blk").display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    (path, gate)
}

fn start(tag: &str) -> (SimBridge, PathBuf) {
    let dir = dir_with_images(tag, &["disk.img"]);
    let (backend, gate) = gated_backend(dir.path());
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let log = File::create(dir.path().join("bridge.log")).unwrap();
    let sb = SimBridge::start_with(
        dir,
        &cfg,
        &["--blk-backend", backend.to_str().unwrap()],
        Some(log),
    );
    (sb, gate)
}

/// Waits until the log of the bridge and its backends has `count` lines with `needle`.
fn wait_log(sb: &SimBridge, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(sb.dir.path().join("bridge.log")).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not {count} of {needle:?} in:\n{text}"
        );
        std::thread::yield_now();
    }
}

fn options() -> BlkOptions {
    BlkOptions {
        slots: 160,
        max_transfer: 4096,
        timeout: Duration::from_secs(10),
        ..BlkOptions::default()
    }
}

/// The one live backend process, other than `not`; waits (bounded) for it to appear.
fn backend(sb: &SimBridge, not: &[u32]) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pids: Vec<u32> = children_running(sb.bridge.pid(), "vhost-user-blk")
            .into_iter()
            .filter(|p| !not.contains(p))
            .collect();
        // The wrapper is a shell until it execs: wait for the backend itself.
        let exec = pids.iter().copied().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "vhost-user-blk")
        });
        if let Some(pid) = exec {
            return pid;
        }
        if Instant::now() >= deadline {
            let log = std::fs::read_to_string(sb.dir.path().join("bridge.log"));
            panic!(
                "no new backend: {pids:?}; log:\n{}",
                log.unwrap_or_default()
            );
        }
        std::thread::yield_now();
    }
}

/// SIGSTOP, and waits until every thread of `pid` has stopped: kill(2) returns before a
/// thread running on another CPU is actually stopped.
fn freeze(pid: u32) {
    signal(pid, libc::SIGSTOP);
    let deadline = Instant::now() + Duration::from_secs(10);
    let stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(") ")
                    .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
            })
    };
    while !stopped() {
        assert!(Instant::now() < deadline, "backend {pid} does not stop");
        std::thread::yield_now();
    }
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a process this test's bridge started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
}

/// The used index of queue 0 in guest RAM (the driver takes nothing).
fn used_idx(g: &Guest, blk: &Blk<'_>) -> u16 {
    let mut idx = [0u8; 2];
    g.ram
        .read(blk.queue(0).unwrap().memory().device + 2, &mut idx);
    u16::from_le_bytes(idx)
}

/// Waits until the device has published a used entry for every available request.
fn wait_all_used(g: &Guest, blk: &Blk<'_>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while used_idx(g, blk) != blk.queue(0).unwrap().avail_idx() {
        assert!(Instant::now() < deadline, "the backend completes nothing");
        std::thread::yield_now();
    }
}

/// The data the tests write to `block`.
fn pattern(block: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    Rng::new(0xb10c_0000 + block).fill(&mut data);
    data
}

/// Gets the backend waiting for kicks before it signals, then takes every completion
/// through its interrupt, so that none is pending when a test starts.
fn warm_up(g: &Guest, blk: &mut Blk<'_>) {
    for n in 0..WARM_UP {
        blk.submit_write(n * 8, &pattern(n)).unwrap();
        wait_all_used(g, blk);
    }
    take(blk, WARM_UP as usize);
    assert_eq!(
        blk.complete(Duration::from_millis(50)),
        Err(DriverError::Timeout)
    );
}

/// Takes `count` completions; each must be OK.
fn take(blk: &mut Blk<'_>, count: usize) {
    let mut done = 0;
    while done < count {
        for completion in blk.complete(options().timeout).unwrap() {
            assert_eq!(completion.status, BlkStatus::Ok, "{completion:?}");
            done += 1;
        }
    }
    assert_eq!(done, count);
}

/// Every block in `blocks` reads back with its pattern, through the device and in the image.
fn verify(sb: &SimBridge, blk: &mut Blk<'_>, blocks: impl Iterator<Item = u64> + Clone) {
    let mut back = vec![0u8; 4096];
    for n in blocks.clone() {
        assert_eq!(blk.read(n * 8, &mut back).unwrap(), BlkStatus::Ok);
        assert!(back == pattern(n), "block {n} through the device");
    }
    assert_eq!(blk.flush().unwrap(), BlkStatus::Ok);
    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    for n in blocks {
        image.read_exact_at(&mut back, n * 4096).unwrap();
        assert!(back == pattern(n), "block {n} in the image");
    }
}

/// Submits one write per block of `blocks`.
fn submit(blk: &mut Blk<'_>, blocks: std::ops::Range<u64>) {
    for n in blocks {
        blk.submit_write(n * 8, &pattern(n)).unwrap();
    }
}

/// 32 requests complete inside the backend's coalescing window; it is frozen before it
/// signals them and then killed. The restored backend finds nothing new to do: only the
/// bridge's interrupt after the restore tells the guest about the 32 completions.
#[test]
fn completions_of_a_backend_frozen_in_its_coalescing_window_then_killed_get_an_interrupt() {
    let (sb, _gate) = start("crash-window");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    warm_up(&g, &mut blk);
    let delivered = sb.sim.stats().irqs_delivered;
    let first = backend(&sb, &[]);

    let blocks = FIRST_BLOCK..FIRST_BLOCK + DEPTH;
    submit(&mut blk, blocks.clone());
    wait_all_used(&g, &blk);
    freeze(first);
    assert_eq!(
        sb.sim.stats().irqs_delivered,
        delivered,
        "the backend signalled before it was frozen: it did not wait out its window"
    );
    signal(first, libc::SIGKILL);

    take(&mut blk, DEPTH as usize);
    assert_eq!(
        blk.lost_interrupts(),
        0,
        "completions of the killed backend came without an interrupt"
    );
    assert_ne!(backend(&sb, &[first]), first);
    verify(&sb, &mut blk, blocks);
}

/// 16 requests complete inside the coalescing window, the backend is frozen, and 32 more are
/// made available (and kicked) while it is frozen: they are in flight for certain. After the
/// kill the restored backend must run the 32 from the guest's used index.
#[test]
fn requests_in_flight_on_a_frozen_backend_are_replayed_after_a_kill() {
    let (sb, _gate) = start("crash-replay");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    warm_up(&g, &mut blk);
    let first = backend(&sb, &[]);

    let done = FIRST_BLOCK..FIRST_BLOCK + 16;
    let in_flight = done.end..done.end + DEPTH;
    submit(&mut blk, done.clone());
    wait_all_used(&g, &blk);
    freeze(first);
    let used = used_idx(&g, &blk);
    submit(&mut blk, in_flight.clone());
    assert_eq!(
        blk.queue(0).unwrap().avail_idx().wrapping_sub(used),
        DEPTH as u16
    );
    assert_eq!(
        used_idx(&g, &blk),
        used,
        "a frozen backend completes nothing"
    );
    signal(first, libc::SIGKILL);

    take(&mut blk, 16 + DEPTH as usize);
    assert_eq!(blk.lost_interrupts(), 0);
    verify(&sb, &mut blk, done.start..in_flight.end);
}

/// The backend dies with 32 requests in flight, and its replacement is killed as soon as it
/// runs, before it serves its socket. The third backend must run all 32.
#[test]
fn a_second_crash_during_recovery_loses_nothing() {
    let (sb, _gate) = start("crash-twice");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    let first = backend(&sb, &[]);
    freeze(first);
    let blocks = FIRST_BLOCK..FIRST_BLOCK + DEPTH;
    submit(&mut blk, blocks.clone());
    signal(first, libc::SIGKILL);
    let second = backend(&sb, &[first]);
    signal(second, libc::SIGKILL);
    let third = backend(&sb, &[first, second]);

    take(&mut blk, DEPTH as usize);
    assert_eq!(blk.lost_interrupts(), 0);
    verify(&sb, &mut blk, blocks);
    assert_eq!(backend(&sb, &[first, second]), third);
}

/// The backend dies with 32 requests in flight, and its replacement dies as soon as the
/// bridge has connected to it: while the bridge renegotiates and restarts its vrings, or
/// right after. The third backend must run all 32.
#[test]
fn a_backend_killed_while_the_bridge_restores_it_is_restored_again() {
    let (sb, _gate) = start("crash-restore");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    let first = backend(&sb, &[]);
    freeze(first);
    let blocks = FIRST_BLOCK..FIRST_BLOCK + DEPTH;
    submit(&mut blk, blocks.clone());
    signal(first, libc::SIGKILL);
    let second = backend(&sb, &[first]);
    wait_log(&sb, "Frontend connected", 2);
    signal(second, libc::SIGKILL);
    let third = backend(&sb, &[first, second]);

    take(&mut blk, DEPTH as usize);
    assert_eq!(blk.lost_interrupts(), 0);
    verify(&sb, &mut blk, blocks);
    assert_eq!(backend(&sb, &[first, second]), third);
    let log = std::fs::read_to_string(sb.dir.path().join("bridge.log")).unwrap();
    for line in log
        .lines()
        .filter(|l| l.contains("restor") || l.contains("hung up"))
    {
        eprintln!("{line}");
    }
}

/// The backend dies with requests in flight and is held down (its restart waits on a FIFO)
/// while the guest resets its device and initialises it again. Once the backend is let
/// back, the new driver's I/O works, with its interrupts, and the old driver's requests
/// (dropped by the reset) do not come back.
#[test]
fn a_guest_reset_while_the_backend_is_down_then_io_works() {
    let (sb, gate) = start("crash-reset");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let first = backend(&sb, &[]);
    {
        let mut blk = g.blk(BLK, 0x10_0000, &options());
        freeze(first);
        submit(&mut blk, FIRST_BLOCK..FIRST_BLOCK + DEPTH);
        make_fifo(&gate);
        signal(first, libc::SIGKILL);
        // The bridge has noticed once its restart is held at the gate.
        wait_for_gate(&sb, &[first]);
    }
    // A new driver: Status=0 and a full initialisation while no backend runs.
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    let used_after_reset = used_idx(&g, &blk);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&gate)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"go\n"))
        .expect("open the gate");
    std::fs::remove_file(&gate).unwrap();
    let second = backend(&sb, &[first]);

    let blocks = FIRST_BLOCK + DEPTH..FIRST_BLOCK + 2 * DEPTH;
    submit(&mut blk, blocks.clone());
    take(&mut blk, DEPTH as usize);
    assert_eq!(
        used_idx(&g, &blk),
        used_after_reset.wrapping_add(DEPTH as u16),
        "only the new driver's requests completed"
    );
    assert_eq!(blk.lost_interrupts(), 0);
    verify(&sb, &mut blk, blocks);
    assert_eq!(backend(&sb, &[first]), second);
}

fn make_fifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo(3) with a NUL-terminated path; no memory of ours is written.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Waits until the bridge's restart of the backend is a wrapper shell blocked at the gate.
fn wait_for_gate(sb: &SimBridge, not: &[u32]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !children_running(sb.bridge.pid(), "vhost-user-blk")
        .iter()
        .any(|pid| !not.contains(pid))
    {
        assert!(Instant::now() < deadline, "the bridge restarts nothing");
        std::thread::yield_now();
    }
}
