//! The hvisor-side contract, hardened: the lost-wakeup window under stress, hvisor's limit
//! of 7 distinct pending IRQs per zone, a `src_cpu` beyond MAX_CPUS, and SIGHUP.

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::{DeviceReq, SimOptions, SimOrdering, SimWakeup};
use hvisor_vhost_tests::driver::mmio::{reg, MAGIC_VALUE};
use hvisor_vhost_tests::driver::{BlkOptions, MmioBus};
use hvisor_vhost_tests::harness::{Rng, SimBridge, Vcpu};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

/// Waits (bounded) until the bridge's log has a line containing `needle`.
fn wait_for_log(path: &std::path::Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} in:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The bridge's exit statistics line (`stopping: ...`), and its count of guard wakeups:
/// sleeps that ended by the guard timeout and found requests pending.
fn guard_wakeups(log_path: &std::path::Path) -> (String, u64) {
    let log = std::fs::read_to_string(log_path).unwrap();
    let stats = log
        .lines()
        .find(|l| l.contains("stopping:"))
        .expect("bridge stats line")
        .to_string();
    let count = stats
        .split(',')
        .find_map(|part| part.trim().strip_suffix(" guard wakeups"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no guard wakeup count in {stats:?}"));
    (stats, count)
}

/// A bridge that never spins (`--spin-us 0`) with the guard timeout given, serving one blk
/// device over a simulator with `options`; returns it and the path of its log.
fn never_spinning_bridge(
    tag: &str,
    options: SimOptions,
    guard_timeout_ms: &str,
) -> (SimBridge, std::path::PathBuf) {
    let dir = dir_with_images(tag, &["disk.img"]);
    let log_path = dir.path().join("bridge.log");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start_with_options(
        Arc::clone(&dir),
        &cfg,
        &["--spin-us", "0", "--guard-timeout-ms", guard_timeout_ms],
        Some(File::create(&log_path).unwrap()),
        options,
    );
    (sb, log_path)
}

/// Waits (bounded) until `asleep` says the bridge sleeps as the test needs, then reads the
/// magic value once; returns how long that read took.
fn read_once_asleep(vcpu: &Vcpu, asleep: impl Fn() -> bool) -> Duration {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !asleep() {
        assert!(Instant::now() < deadline, "the bridge never went to sleep");
        std::hint::spin_loop();
    }
    let t = Instant::now();
    assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
    t.elapsed()
}

/// Held by each wakeup stress test for its whole run: run side by side, the other's spinning
/// vCPUs can stall a vCPU of this one for a whole guard timeout, and a request that lands as
/// a sleep times out is a guard wakeup no lost wakeup explains.
static STRESS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Requests per vCPU of the wakeup stress tests (1 M in all by default).
fn wakeup_requests_per_cpu() -> u64 {
    std::env::var("HVV_WAKEUP_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000)
}

/// Two vCPUs issue 1 M register reads in bursts with idle gaps, against a bridge that never
/// spins (`--spin-us 0`), so nearly every burst starts while the bridge is asleep and must be
/// woken. The simulator plays a *corrected* hvisor here (`fenced`: a StoreLoad fence between
/// publishing a request and reading `need_wakeup`), so with the bridge's half of the
/// handshake no wakeup may be lost: the bridge must never need its guard timeout to find
/// pending requests. (Stock hvisor has no such fence; see the next test.)
#[test]
fn one_million_requests_across_sleeps_without_a_lost_wakeup_when_fenced() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let options = SimOptions {
        ordering: SimOrdering::Fenced,
        ..SimOptions::default()
    };
    let (mut sb, log_path) = never_spinning_bridge("wakeup", options, "1000");
    let total = AtomicU64::new(0);
    let slowest = AtomicU64::new(0);
    let per_cpu = wakeup_requests_per_cpu();
    std::thread::scope(|s| {
        for cpu in 0..2u64 {
            let (sb, total, slowest) = (&sb, &total, &slowest);
            s.spawn(move || {
                let vcpu = sb.vcpu(1, cpu);
                let mut rng = Rng::new(cpu + 1);
                let mut done = 0;
                while done < per_cpu {
                    let burst = 1 + rng.below(64);
                    for _ in 0..burst {
                        let t = Instant::now();
                        assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
                        slowest.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    }
                    done += burst;
                    // Idle long enough for the bridge to go to sleep between bursts.
                    let idle = Instant::now() + Duration::from_micros(rng.below(100));
                    while Instant::now() < idle {
                        std::hint::spin_loop();
                    }
                }
                total.fetch_add(done, Ordering::Relaxed);
            });
        }
    });
    assert!(sb.bridge.terminate().success());
    let (stats, guard) = guard_wakeups(&log_path);
    eprintln!(
        "{} requests, slowest {} us; bridge: {stats}; simulator: {:?}",
        total.load(Ordering::Relaxed),
        slowest.load(Ordering::Relaxed),
        sb.sim.stats()
    );
    assert_eq!(guard, 0, "a wakeup was lost: {stats}");
    assert!(
        sb.sim.stats().wakeups > 1000,
        "the bridge really slept between bursts"
    );
    assert!(
        slowest.load(Ordering::Relaxed) < 1_000_000,
        "an access stalled up to the guard timeout"
    );
}

/// Older hvisor.ko modules (hvisor-tool 7e55b1b) wake the daemon with signal 10, which is
/// also SIGUSR1, the bridge's "log the status" signal. Each wakeup must reach the ring: read
/// as a status request instead, every request costs a status table in the log, and the
/// request waits for the guard timeout. One vCPU issues requests only while the bridge is
/// asleep (so each needs a signal), against a fenced simulator that never loses a wakeup.
#[test]
fn signal_wakeups_reach_the_ring_and_are_not_status_requests() {
    const REQUESTS: u64 = 2000;
    let options = SimOptions {
        ordering: SimOrdering::Fenced,
        wakeup: SimWakeup::Signal,
        ..SimOptions::default()
    };
    let (mut sb, log_path) = never_spinning_bridge("signal-wakeup", options, "1000");
    let vcpu = sb.vcpu(1, 0);
    // The first access also waits for the bridge to come up.
    assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
    let mut slowest = Duration::ZERO;
    for _ in 1..REQUESTS {
        slowest = slowest.max(read_once_asleep(&vcpu, || sb.sim.wakeup_armed()));
    }
    assert!(sb.bridge.terminate().success());
    let (stats, guard) = guard_wakeups(&log_path);
    let sim = sb.sim.stats();
    eprintln!("{REQUESTS} requests, slowest {slowest:?}; bridge: {stats}; simulator: {sim:?}");
    assert!(sim.wakeups >= REQUESTS / 2, "the bridge slept: {sim:?}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let dumps = log.lines().filter(|l| l.contains("status: ")).count();
    assert_eq!(dumps, 0, "wakeup signals were read as status requests");
    assert_eq!(guard, 0, "a wakeup signal did not reach the ring: {stats}");
    assert!(
        slowest < Duration::from_secs(1),
        "an access waited for the guard timeout"
    );
}

/// Stock hvisor has no StoreLoad fence between publishing a request (`req_rear`) and reading
/// `need_wakeup`, so its load may return a stale 0 while the bridge has gone to sleep: no
/// wakeup is sent, and only the bridge's guard timeout (`--guard-timeout-ms`, 20 ms here)
/// finds the request. This test makes the simulator lose every 1000th such wakeup
/// (`lose-wakeup-every`), exactly the outcome the missing fence allows, and checks that the
/// guard recovers each one and that the bridge counts each one.
///
/// Counting exactly: the simulator counts a lost wakeup when a request found `need_wakeup`
/// set and sent nothing; the bridge counts a guard wakeup when a sleep ended by the timeout
/// and found requests pending. The test rules out what would make the counts differ:
/// - another vCPU's wakeup rescuing a lost one: a single vCPU makes synchronous accesses,
///   so while its request waits nothing else is published;
/// - a loss the missing fence produces by itself, which the simulator cannot see: before
///   each request the vCPU waits until the bridge has set `need_wakeup`, so the request's
///   own `need_wakeup` load cannot miss it;
/// - a lost wakeup the bridge never slept on: it set the flag, and the request landed
///   before its re-check of the ring, which saw it. Before a request whose wakeup will be
///   lost, the vCPU also waits until the bridge's event loop is blocked in `epoll_wait`,
///   which it enters only after that re-check.
///
/// What remains is a request landing just as a 20 ms sleep with nothing pending times out
/// (a guard wakeup with no lost wakeup): it needs the vCPU to stall for the whole sleep.
#[test]
fn every_lost_wakeup_is_recovered_by_the_guard_and_counted() {
    let _alone = STRESS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    const LOSE_EVERY: u32 = 1000;
    let options = SimOptions {
        ordering: SimOrdering::Hvisor,
        lose_wakeup_every: LOSE_EVERY,
        ..SimOptions::default()
    };
    let (mut sb, log_path) = never_spinning_bridge("lost-wakeup", options, "20");
    let total = 2 * wakeup_requests_per_cpu();
    let vcpu = sb.vcpu(1, 0);
    // The first access also waits for the bridge to come up.
    assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
    let bridge = sb.bridge.pid();
    let mut slowest = Duration::ZERO;
    for _ in 1..total {
        // Requests that found `need_wakeup` set so far; the next one will, and the
        // simulator loses every LOSE_EVERYth such wakeup.
        let stats = sb.sim.stats();
        let loses = (stats.wakeups + stats.wakeups_lost + 1).is_multiple_of(LOSE_EVERY.into());
        let asleep = || sb.sim.wakeup_armed() && (!loses || blocked_in_epoll_wait(bridge));
        slowest = slowest.max(read_once_asleep(&vcpu, asleep));
    }
    assert!(sb.bridge.terminate().success());
    let (stats, guard) = guard_wakeups(&log_path);
    let sim = sb.sim.stats();
    eprintln!("{total} requests, slowest {slowest:?}; bridge: {stats}; simulator: {sim:?}");
    assert!(
        sim.wakeups_lost >= total / u64::from(LOSE_EVERY) / 2,
        "the simulator lost wakeups as asked: {sim:?}"
    );
    assert_eq!(
        guard, sim.wakeups_lost,
        "every lost wakeup, and only those, ended a sleep by the guard timeout: {stats}"
    );
}

/// True when the main thread of process `pid` (the bridge's event loop) is asleep in
/// `epoll_wait`: the bridge's only blocking wait there is its sleep.
fn blocked_in_epoll_wait(pid: u32) -> bool {
    let task = format!("/proc/{pid}/task/{pid}");
    let sleeping = std::fs::read_to_string(format!("{task}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, s)| s.starts_with('S'))
    });
    let syscall = std::fs::read_to_string(format!("{task}/syscall")).unwrap_or_default();
    let nr: Option<i64> = syscall
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok());
    #[cfg(target_arch = "x86_64")]
    let epoll = [libc::SYS_epoll_wait, libc::SYS_epoll_pwait];
    #[cfg(not(target_arch = "x86_64"))]
    let epoll = [libc::SYS_epoll_pwait];
    sleeping && nr.is_some_and(|nr| epoll.contains(&nr))
}

/// Seven devices in one zone (the most the config accepts: hvisor keeps at most
/// `MAX_DEVS - 1` distinct pending virtio IRQs per CPU) all complete a request while the guest
/// acknowledges nothing: all seven interrupts arrive and hvisor's limit is never exceeded.
/// An eighth device in the zone is refused when the config is read.
#[test]
fn never_more_than_seven_pending_irqs_per_zone() {
    const DEVICES: u64 = 7;
    let images: Vec<String> = (0..DEVICES).map(|i| format!("d{i}.img")).collect();
    let names: Vec<&str> = images.iter().map(String::as_str).collect();
    let dir = dir_with_images("irqlimit", &names);
    let entries: Vec<String> = (0..DEVICES)
        .map(|i| {
            blk_entry(
                0xa000000 + i * 0x200,
                48 + i as u32,
                &images[i as usize],
                "",
            )
        })
        .collect();
    let mut eight = entries.clone();
    std::fs::write(dir.path().join("d7.img"), []).unwrap();
    eight.push(blk_entry(0xa000000 + 7 * 0x200, 55, "d7.img", ""));
    let refused =
        hvisor_bridge::config::Config::parse(&config(&[zone(1, &eight, None)]), dir.path())
            .expect_err("eight device IRQs in one zone");
    assert_eq!(
        (refused.zone.as_deref(), refused.field.as_str()),
        (Some("1"), "devices")
    );
    let sb = SimBridge::start(dir, &config(&[zone(1, &entries, None)]), &[]);
    let guests: Vec<Guest> = (0..DEVICES as u32)
        .map(|i| Guest::new(&sb, 1, 0, 48 + i))
        .collect();
    let mut drivers: Vec<_> = guests
        .iter()
        .enumerate()
        .map(|(i, g)| {
            g.blk(
                0xa000000 + i as u64 * 0x200,
                0x10_0000 + i as u64 * 0x40_0000,
                &BlkOptions::default(),
            )
        })
        .collect();
    for blk in &mut drivers {
        blk.submit_write(0, &[1u8; 512]).unwrap();
    }
    // Every device has completed (its VRING bit is set) before the limit is checked.
    for (i, blk) in drivers.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while blk.device().interrupt_status() & 1 == 0 {
            assert!(Instant::now() < deadline, "device {i} never completed");
            std::thread::yield_now();
        }
    }
    let delivered: Vec<u32> = (48..48 + DEVICES as u32)
        .filter(|irq| sb.sim.wait_irq(1, *irq, Duration::from_secs(10)))
        .collect();
    assert_eq!(delivered.len(), 7, "every interrupt arrived: {delivered:?}");
    let stats = sb.sim.stats();
    assert_eq!(stats.pending_limit_violations, 0, "{stats:?}");
}

/// hvisor indexes `cfg_flags` by physical CPU; a request naming CPU 40 must not make the
/// bridge write outside the array, and the bridge goes on serving.
#[test]
fn src_cpu_beyond_max_cpus_is_rejected_safely() {
    let dir = dir_with_images("badcpu", &["disk.img"]);
    let sb = SimBridge::start(
        dir,
        &config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]),
        &[],
    );
    let vcpu = sb.vcpu(1, 0);
    assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
    let hsm = sb.sim.hsm();
    let page = hsm.bridge();
    let flags_before: Vec<u64> = (0..32).map(|c| page.cfg_flag(c)).collect();
    for cpu in [32u64, 40, u64::MAX] {
        let req = DeviceReq {
            src_cpu: cpu,
            address: BLK,
            size: 4,
            src_zone: 1,
            ..DeviceReq::default()
        };
        assert!(page.push_request(&req));
    }
    // A normal access after them is answered, so the bad ones were consumed first.
    assert_eq!(vcpu.read(BLK + reg::DEVICE_ID, 4), 2);
    let flags_after: Vec<u64> = (0..32).map(|c| page.cfg_flag(c)).collect();
    assert_eq!(
        flags_after[1..],
        flags_before[1..],
        "no other CPU's reply slot moved"
    );
    assert_eq!(
        flags_after[0],
        flags_before[0] + 1,
        "only CPU 0's own read was answered"
    );
}

/// SIGHUP re-reads the config, reports what would change, and the bridge keeps serving.
#[test]
fn sighup_reports_config_changes_and_keeps_serving() {
    let dir = dir_with_images("sighup", &["disk.img", "more.img"]);
    let log_path = dir.path().join("bridge.log");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let mut sb = SimBridge::start_with(
        Arc::clone(&dir),
        &cfg,
        &[],
        Some(File::create(&log_path).unwrap()),
    );
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    sb.bridge.signal(libc::SIGHUP);
    wait_for_log(&log_path, "unchanged");
    let grown = config(&[zone(
        1,
        &[
            blk_entry(BLK, IRQ, "disk.img", ""),
            blk_entry(0xa003e00, 79, "more.img", ""),
        ],
        None,
    )]);
    std::fs::write(dir.path().join("virtio_cfg.json"), grown).unwrap();
    sb.bridge.signal(libc::SIGHUP);
    let log = wait_for_log(&log_path, "restart the bridge to apply");
    assert!(log.contains("would add zone 1 blk@0xa003e00"), "{log}");
    let data = vec![0x77u8; 4096];
    assert_eq!(
        blk.write(8, &data).unwrap(),
        hvisor_vhost_tests::driver::BlkStatus::Ok
    );
    let mut back = vec![0u8; 4096];
    blk.read(8, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(sb.bridge.terminate().success());
}
