//! An injection that finds hvisor's result ring full is retried by a timer, not left until
//! the device's next event. The simulator holds its result ring (a hypervisor that stopped
//! draining); device A's unacknowledged, re-injected line fills it; then device B completes a
//! request. Its injection fails; once the ring drains again, B's guest must get its
//! interrupt without any further event from B.

mod common;

use std::fs::File;
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus};
use hvisor_vhost_tests::harness::SimBridge;

const A: u64 = 0xa003c00;
const A_IRQ: u32 = 78;
const B: u64 = 0xa003e00;
const B_IRQ: u32 = 79;
/// The result ring's capacity (hvisor's MAX_REQ entries, one kept empty).
const RING_CAPACITY: usize = 31;

/// Waits (polling the shared page, as hvisor's side would see it) until `done`.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::yield_now();
    }
}

#[test]
fn an_injection_that_found_the_ring_full_is_retried() {
    let dir = dir_with_images("ring-full", &["a.img", "b.img"]);
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(A, A_IRQ, "a.img", ""),
            blk_entry(B, B_IRQ, "b.img", ""),
        ],
        None,
    )]);
    let log_path = dir.path().join("bridge.log");
    let log = File::create(&log_path).unwrap();
    // Re-injection every millisecond fills the held ring quickly.
    let sb = SimBridge::start_with(dir, &cfg, &["--reinject-ms", "1"], Some(log));
    let guest_a = Guest::new(&sb, 1, 0, A_IRQ);
    let guest_b = Guest::new(&sb, 1, 1, B_IRQ);
    let opts = BlkOptions::default();
    let mut a = guest_a.blk(A, 0x10_0000, &opts);
    let mut b = guest_b.blk(B, 0x200_0000, &opts);
    let block = vec![0x5au8; 4096];

    sb.sim.hold_results(true);
    // A's request completes and its line is injected, and injected again every millisecond,
    // while its guest does not take the interrupt.
    a.submit_write(0, &block).unwrap();
    a.kick();
    wait_for("the result ring to fill", || {
        sb.sim.results_queued() == RING_CAPACITY
    });

    std::thread::scope(|s| {
        let b_io = s.spawn(|| {
            // Completes only with B's interrupt: a lost one is a timeout here, and counted.
            let status = b.write(0, &block).unwrap();
            assert_eq!(status, BlkStatus::Ok);
        });
        // The bridge says when B's injection found the ring full; then the ring drains.
        let needle = format!("irq {B_IRQ} is injected again");
        wait_for("B's injection to find the ring full", || {
            std::fs::read_to_string(&log_path).is_ok_and(|l| l.contains(&needle))
        });
        sb.sim.hold_results(false);
        b_io.join().unwrap();
    });
    let done = a.complete(Duration::from_secs(30)).unwrap();
    assert_eq!(done.len(), 1);
}
