//! The bridge's await spin (`--await-spin-us`): while an answer is certain to come (the
//! backend's used-buffer signal after a QueueNotify, the guest's InterruptStatus read and
//! InterruptACK after an injection) the bridge keeps polling instead of sleeping, so none of
//! them pays a wakeup. Counted, not timed: the bridge's `stopping:` line says how often it
//! slept.

mod common;

use std::fs::File;
use std::sync::Arc;

use common::*;
use hvisor_vhost_tests::driver::BlkOptions;
use hvisor_vhost_tests::harness::SimBridge;

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
const REQUESTS: u64 = 400;

/// One counter of the bridge's `stopping:` line, e.g. "sleeps".
fn stopping_counter(log_path: &std::path::Path, name: &str) -> (String, u64) {
    let log = std::fs::read_to_string(log_path).unwrap();
    let stats = log
        .lines()
        .find(|l| l.contains("stopping:"))
        .unwrap_or_else(|| panic!("no stopping line in:\n{log}"))
        .to_string();
    let suffix = format!(" {name}");
    let count = stats
        .split(',')
        .find_map(|part| {
            let part = part.trim();
            let part = part.rsplit_once(": ").map_or(part, |(_, p)| p);
            part.strip_suffix(suffix.as_str())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} count in {stats:?}"));
    (stats, count)
}

/// QD1 reads with `bridge_args`; returns the bridge's sleeps and its stats line.
fn sleeps_for_qd1_reads(tag: &str, bridge_args: &[&str]) -> (u64, String) {
    let dir = dir_with_images(tag, &["disk.img"]);
    let log_path = dir.path().join("bridge.log");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start_with(
        Arc::clone(&dir),
        &cfg,
        bridge_args,
        Some(File::create(&log_path).unwrap()),
    );
    let guest = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = guest.blk(BLK, 0, &BlkOptions::default());
    let mut buf = vec![0u8; 4096];
    for i in 0..REQUESTS {
        blk.read((i * 8) % 1024, &mut buf).expect("read");
    }
    drop(blk);
    let mut sb = sb;
    assert!(sb.bridge.terminate().success());
    let (stats, sleeps) = stopping_counter(&log_path, "sleeps");
    let (_, requests) = stopping_counter(&log_path, "requests");
    eprintln!("{tag}: {stats}");
    assert!(
        requests >= 3 * REQUESTS,
        "each read is a notify, a status read and an ACK"
    );
    // Each read's notify is answered by the backend's call, whether or not the bridge polls
    // for it; the line also sums their round trips, which benchmarks divide by this count.
    // A call the bridge reads after the next notify answers both and counts once, so a few
    // reads may go uncounted; none counted is the failure.
    let (_, answered) = stopping_counter(&log_path, "answered kicks");
    assert!(
        (REQUESTS * 9 / 10..REQUESTS + 16).contains(&answered),
        "{answered} answered kicks for {REQUESTS} reads ({stats})"
    );
    (sleeps, stats)
}

/// Without the await spin the notify-to-call round trips are still counted: they are a
/// benchmark's view of the backend's share of each request.
#[test]
fn notify_to_call_round_trips_are_counted_without_the_await_spin() {
    sleeps_for_qd1_reads("no-await-spin", &["--spin-us", "0", "--await-spin-us", "0"]);
}

/// With no idle spin and an await spin far longer than any answer takes, the bridge sleeps
/// only where nothing is owed: between the guest's ACK and its next QueueNotify. That is at
/// most once per request; without the await spin it also sleeps after each notify and after
/// each injection.
#[test]
fn the_await_spin_sleeps_at_most_once_per_request() {
    let (sleeps, stats) = sleeps_for_qd1_reads(
        "await-spin",
        &["--spin-us", "0", "--await-spin-us", "10000000"],
    );
    // Setup (feature negotiation, queue set-up) adds a few dozen sleeps of its own; without
    // the await spin the reads alone take more than three per request.
    assert!(
        sleeps <= REQUESTS * 3 / 2,
        "{sleeps} sleeps for {REQUESTS} QD1 reads: the bridge slept while an answer was owed ({stats})"
    );
}
