//! The hvisor-side contract, hardened: the lost-wakeup window under stress, hvisor's limit
//! of 7 distinct pending IRQs per zone, a `src_cpu` beyond MAX_CPUS, and SIGHUP.

mod common;

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::DeviceReq;
use hvisor_vhost_tests::driver::mmio::{reg, MAGIC_VALUE};
use hvisor_vhost_tests::driver::{BlkOptions, MmioBus};
use hvisor_vhost_tests::harness::{Rng, SimBridge};

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

/// Two vCPUs issue 1 M register reads in bursts with idle gaps, against a bridge that never
/// spins (`--spin-us 0`), so nearly every burst starts while the bridge is asleep and must be
/// woken. No access may wait as long as the guard timeout, and the bridge must never need
/// the guard to find pending requests.
#[test]
fn one_million_requests_across_sleeps_without_a_lost_wakeup() {
    let dir = dir_with_images("wakeup", &["disk.img"]);
    let log_path = dir.path().join("bridge.log");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let mut sb = SimBridge::start_with(
        Arc::clone(&dir),
        &cfg,
        &["--spin-us", "0", "--guard-timeout-ms", "1000"],
        Some(File::create(&log_path).unwrap()),
    );
    let total = AtomicU64::new(0);
    let slowest = AtomicU64::new(0);
    let per_cpu: u64 = std::env::var("HVV_WAKEUP_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500_000);
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
    let log = std::fs::read_to_string(&log_path).unwrap();
    let stats = log
        .lines()
        .find(|l| l.contains("stopping:"))
        .expect("bridge stats line");
    eprintln!(
        "{} requests, slowest {} us; bridge: {stats}; simulator: {:?}",
        total.load(Ordering::Relaxed),
        slowest.load(Ordering::Relaxed),
        sb.sim.stats()
    );
    assert!(
        stats.contains(" 0 guard wakeups"),
        "a wakeup was lost: {stats}"
    );
    assert!(
        sb.sim.stats().wakeups > 1000,
        "the bridge really slept between bursts"
    );
    assert!(
        slowest.load(Ordering::Relaxed) < 1_000_000,
        "an access stalled up to the guard timeout"
    );
}

/// Eight devices in one zone all complete a request while the guest acknowledges nothing:
/// at most 7 lines are ever asserted (hvisor panics beyond that), the eighth device's
/// interrupt waits, and arrives as soon as the guest takes and acknowledges another one.
#[test]
fn never_more_than_seven_pending_irqs_per_zone() {
    let images: Vec<String> = (0..8).map(|i| format!("d{i}.img")).collect();
    let names: Vec<&str> = images.iter().map(String::as_str).collect();
    let dir = dir_with_images("irqlimit", &names);
    let entries: Vec<String> = (0..8u64)
        .map(|i| {
            blk_entry(
                0xa000000 + i * 0x200,
                48 + i as u32,
                &images[i as usize],
                "",
            )
        })
        .collect();
    let sb = SimBridge::start(dir, &config(&[zone(1, &entries, None)]), &[]);
    let guests: Vec<Guest> = (0..8).map(|i| Guest::new(&sb, 1, 0, 48 + i)).collect();
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
    // The bridge has decided on every injection by now; let the simulated hypervisor's
    // result-ring drain catch up with what was pushed.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.sim.stats().irqs_delivered < 7 {
        assert!(
            Instant::now() < deadline,
            "interrupts not delivered: {:?}",
            sb.sim.stats()
        );
        std::thread::yield_now();
    }
    let stats = sb.sim.stats();
    assert_eq!(stats.pending_limit_violations, 0, "{stats:?}");
    assert_eq!(
        stats.max_pending_irqs, 7,
        "seven lines asserted, the eighth waits: {stats:?}"
    );
    let delivered: Vec<u32> = (48..56)
        .filter(|irq| sb.sim.wait_irq(1, *irq, Duration::ZERO))
        .collect();
    assert_eq!(
        delivered.len(),
        7,
        "exactly seven interrupts were injected: {delivered:?}"
    );
    let waiting = (48..56).find(|irq| !delivered.contains(irq)).unwrap();
    // The guest takes one interrupt and acknowledges it: its line drops, the waiting one goes.
    let first = (delivered[0] - 48) as usize;
    drivers[first]
        .device()
        .ack_interrupt(drivers[first].device().interrupt_status());
    assert!(
        sb.sim.wait_irq(1, waiting, Duration::from_secs(10)),
        "deferred irq {waiting} never came"
    );
    assert_eq!(sb.sim.stats().pending_limit_violations, 0);
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
