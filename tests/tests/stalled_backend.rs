//! One stalled backend must not freeze the other devices. Two blk devices in one zone; the
//! backend of A is stopped with SIGSTOP while the guest writes A's config and later resets
//! A. Device B does verified I/O from another vCPU throughout: it must keep completing while
//! A's accesses wait, A must reach DEVICE_NEEDS_RESET within the bridge's control timeout,
//! and a guest reset (with SIGCONT sent as well) must bring A back with verified I/O.
//! B's latency while A is stalled is measured and printed, not asserted.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::BlkOptions;
use hvisor_vhost_tests::harness::{children_running, Rng, SimBridge};

const A: u64 = 0xa003c00;
const A_IRQ: u32 = 78;
const B: u64 = 0xa003e00;
const B_IRQ: u32 = 79;
/// The bridge's control timeout in this test.
const BOUND_MS: u64 = 1000;
/// virtio-blk config: the `writeback` byte (virtio 1.x §5.2.4).
const WRITEBACK_OFFSET: u64 = 32;
const NEEDS_RESET: u32 = 0x40;

/// SIGSTOP `pid`, and wait until every thread of it has stopped: kill(2) returns before they
/// do, and a thread that has not stopped yet still answers the bridge.
fn stop(pid: u32) {
    // SAFETY: kill(2) on a backend of the bridge this test started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let all_stopped = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("backend threads")
            .flatten()
            .all(|task| {
                std::fs::read_to_string(task.path().join("stat")).is_ok_and(|stat| {
                    stat.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            })
    };
    while !all_stopped() {
        assert!(Instant::now() < deadline, "backend {pid} did not stop");
        std::thread::yield_now();
    }
}

fn cont(pid: u32) {
    // SAFETY: as in `stop`; the process may be gone already (the bridge replaced it).
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
}

fn backend_of(sb: &SimBridge, image: &str) -> u32 {
    let pids = children_running(sb.bridge.pid(), image);
    assert_eq!(pids.len(), 1, "one backend serves {image}: {pids:?}");
    pids[0]
}

#[test]
fn a_stopped_backend_stalls_only_its_own_device() {
    let dir = dir_with_images("stalled", &["a.img", "b.img"]);
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(A, A_IRQ, "a.img", ""),
            blk_entry(B, B_IRQ, "b.img", ""),
        ],
        None,
    )]);
    let bound = BOUND_MS.to_string();
    let sb = SimBridge::start(dir, &cfg, &["--backend-timeout-ms", &bound]);
    let guest_a = Guest::new(&sb, 1, 0, A_IRQ);
    let guest_b = Guest::new(&sb, 1, 1, B_IRQ);
    let opts = BlkOptions::default();

    let stop_b = AtomicBool::new(false);
    let b_done = AtomicU64::new(0);
    // B's round trips while A was stalled (between `stalled_from` and its end).
    let b_latencies: Mutex<Vec<Duration>> = Mutex::new(Vec::new());
    let stalled = AtomicBool::new(false);

    std::thread::scope(|s| {
        let b = s.spawn(|| {
            let mut blk = guest_b.blk(B, 0x200_0000, &opts);
            let mut rng = Rng::new(0xb);
            while !stop_b.load(Ordering::Acquire) {
                let took = verified_io(&mut blk, &mut rng, "device B");
                if stalled.load(Ordering::Acquire) {
                    b_latencies.lock().unwrap().push(took);
                }
                b_done.fetch_add(1, Ordering::AcqRel);
            }
        });

        let mut blk = guest_a.blk(A, 0x10_0000, &opts);
        let mut rng = Rng::new(0xa);
        verified_io(&mut blk, &mut rng, "device A before the stall");
        let pid = backend_of(&sb, "a.img");
        stop(pid);
        stalled.store(true, Ordering::Release);

        // The config write needs a SET_CONFIG round trip that the stopped backend never
        // answers: this vCPU waits, B must not.
        let b_before = b_done.load(Ordering::Acquire);
        let started = Instant::now();
        blk.device().write_config(WRITEBACK_OFFSET, &[0]);
        let config_wait = started.elapsed();
        let b_during = b_done.load(Ordering::Acquire) - b_before;
        let status = blk.device().status();
        stalled.store(false, Ordering::Release);

        // SIGCONT, and the guest resets and re-initializes A: it works again.
        cont(pid);
        drop(blk);
        let mut blk = guest_a.blk(A, 0x10_0000, &opts);
        verified_io(&mut blk, &mut rng, "device A after its reset");

        // Its new backend stopped too, a guest reset of A (GET_VRING_BASE is never answered)
        // waits for the bound while B goes on; then A comes back once more.
        let pid = backend_of(&sb, "a.img");
        stop(pid);
        let b_before = b_done.load(Ordering::Acquire);
        let started = Instant::now();
        blk.device().set_status(0);
        let reset_wait = started.elapsed();
        let b_during_reset = b_done.load(Ordering::Acquire) - b_before;
        cont(pid);
        drop(blk);
        let mut blk = guest_a.blk(A, 0x10_0000, &opts);
        verified_io(&mut blk, &mut rng, "device A after a stalled reset");
        let b_after = b_done.load(Ordering::Acquire);

        stop_b.store(true, Ordering::Release);
        b.join().unwrap();

        let mut lat = std::mem::take(&mut *b_latencies.lock().unwrap());
        lat.sort();
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        println!(
            "A's config write waited {:.0} ms and its reset {:.0} ms (bound {BOUND_MS} ms); B \
             completed {b_during} and {b_during_reset} verified write+read pairs meanwhile, \
             {b_after} in all; B's round trip while A's config write was stalled: min {:.2} / \
             median {:.2} / max {:.2} ms over {}",
            ms(&config_wait),
            ms(&reset_wait),
            lat.first().map_or(0.0, ms),
            lat.get(lat.len() / 2).map_or(0.0, ms),
            lat.last().map_or(0.0, ms),
            lat.len()
        );
        assert!(
            b_during > 0 && b_during_reset > 0,
            "device B completed nothing while A's backend was stopped ({b_during} during the \
             config write, {b_during_reset} during the reset)"
        );
        assert_eq!(
            status & NEEDS_RESET,
            NEEDS_RESET,
            "A's status {status:#x} after its backend outlived the bound"
        );
    });
}
