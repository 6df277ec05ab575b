//! Zone lifecycle without restarting the bridge: the simulated zone is shut down and started
//! again 100 times (RAM zeroed, IRQs dropped, a new guest that resets and re-initialises the
//! device), with I/O in every cycle. The bridge is not told of the restart: the new guest's
//! device reset is what it sees. Every block written by an earlier cycle must still read
//! back after each restart, one restart happens with 32 requests outstanding, and neither
//! the bridge nor its backend may gain open fds from cycle to cycle.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;

use common::*;
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus};
use hvisor_vhost_tests::harness::{children_running, Rng, SimBridge};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
const CYCLES: u64 = 100;
/// The cycle that restarts the zone with requests outstanding.
const RESTART_IN_FLIGHT: u64 = 50;
/// Requests outstanding at that restart, on blocks no cycle checks.
const IN_FLIGHT: u64 = 32;
const SCRATCH_BLOCK: u64 = 4096;
/// Cycles before the fd and RSS baseline is taken: allocations that happen once settle.
const WARM_CYCLES: u64 = 10;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// The data of block `n`: different for every block, and never all zeros (a zeroed
/// image must not pass for a written one).
fn pattern(n: u64) -> Vec<u8> {
    let mut data = vec![0u8; 4096];
    Rng::new(0x11fe_0000 + n).fill(&mut data);
    data
}

/// The backend process of the one device.
fn backend(sb: &SimBridge) -> u32 {
    let pids = children_running(sb.bridge.pid(), "vhost-user-blk");
    assert_eq!(pids.len(), 1, "one backend: {pids:?}");
    pids[0]
}

/// Sends `signal` to `pid` and waits until none of its threads is in a state other than
/// `state` or running: kill(2) returns before a thread on another CPU has stopped.
fn freeze(pid: u32, signal: i32, state: char) {
    // SAFETY: kill(2) on a process this test's bridge started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, signal) }, 0);
    let settled = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .all(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                let now = stat
                    .rsplit_once(") ")
                    .and_then(|(_, rest)| rest.chars().next());
                match state {
                    'T' => matches!(now, Some('T' | 't')),
                    _ => !matches!(now, Some('T' | 't')),
                }
            })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !settled() {
        assert!(
            std::time::Instant::now() < deadline,
            "backend {pid}: not {state}"
        );
        std::thread::yield_now();
    }
}

#[derive(Clone, Copy)]
struct Usage {
    bridge_fds: usize,
    bridge_rss: u64,
    backend_fds: usize,
    backend_rss: u64,
}

fn usage(sb: &SimBridge) -> Usage {
    let (bridge, backend) = (sb.bridge.pid(), backend(sb));
    Usage {
        bridge_fds: open_fds(bridge),
        bridge_rss: rss_kib(bridge),
        backend_fds: open_fds(backend),
        backend_rss: rss_kib(backend),
    }
}

#[test]
fn hundred_zone_restarts_keep_data_and_leak_no_fds() {
    let dir = dir_with_images("lifecycle", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    let first_backend = {
        // The backend starts with the bridge; the first access waits for both.
        let g = Guest::new(&sb, 1, 0, IRQ);
        g.blk(BLK, 0x10_0000, &BlkOptions::default());
        backend(&sb)
    };
    let mut baseline = None;
    let mut back = vec![0u8; 4096];
    for cycle in 0..CYCLES {
        sb.sim.restart_zone(1).unwrap();
        let g = Guest::new(&sb, 1, 0, IRQ);
        let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
        assert_eq!(
            blk.write(cycle * 8, &pattern(cycle)).unwrap(),
            BlkStatus::Ok,
            "cycle {cycle}"
        );
        // This cycle's block and every earlier one, through the device and in the image.
        for n in 0..=cycle {
            assert_eq!(blk.read(n * 8, &mut back).unwrap(), BlkStatus::Ok);
            assert!(
                back == pattern(n),
                "cycle {cycle}: block {n} through the device"
            );
            image.read_exact_at(&mut back, n * 4096).unwrap();
            assert!(back == pattern(n), "cycle {cycle}: block {n} in the image");
        }
        if cycle == RESTART_IN_FLIGHT {
            // The zone dies with requests outstanding (the backend, frozen, has not looked
            // at them); the backend then wakes up to rings in RAM that reads as zeros, and
            // the next cycle's guest finds the device still running and resets it.
            let pid = backend(&sb);
            freeze(pid, libc::SIGSTOP, 'T');
            for i in 0..IN_FLIGHT {
                blk.submit_write((SCRATCH_BLOCK + i) * 8, &pattern(SCRATCH_BLOCK + i))
                    .unwrap();
            }
            sb.sim.restart_zone(1).unwrap();
            freeze(pid, libc::SIGCONT, 'S');
            continue;
        }
        if cycle == WARM_CYCLES - 1 {
            baseline = Some(usage(&sb));
        }
    }
    let before = baseline.unwrap();
    let after = usage(&sb);
    eprintln!(
        "bridge: {} -> {} fds, {} -> {} KiB RSS; backend: {} -> {} fds, {} -> {} KiB RSS \
         (after {WARM_CYCLES} cycles -> after {CYCLES}); {} lost interrupts",
        before.bridge_fds,
        after.bridge_fds,
        before.bridge_rss,
        after.bridge_rss,
        before.backend_fds,
        after.backend_fds,
        before.backend_rss,
        after.backend_rss,
        sb.lost_interrupts()
    );
    assert_eq!(backend(&sb), first_backend, "the backend never restarted");
    // The backend never saw the requests of the zone that died: they must not land later.
    for n in SCRATCH_BLOCK..SCRATCH_BLOCK + IN_FLIGHT {
        image.read_exact_at(&mut back, n * 4096).unwrap();
        assert!(
            back == vec![0u8; 4096],
            "block {n} of a dead zone's request was written"
        );
    }
    assert_eq!(
        after.bridge_fds, before.bridge_fds,
        "the bridge's open fds grew across zone restarts"
    );
    assert_eq!(
        after.backend_fds, before.backend_fds,
        "the backend's open fds grew across zone restarts"
    );
}
