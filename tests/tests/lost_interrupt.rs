//! The end-to-end tests can see a lost interrupt: a completion the bridge publishes while the
//! guest never gets its interrupt. The guest driver still finds it once its wait times out,
//! so the request succeeds; only the lost-interrupt count shows it, and every test on a
//! `SimBridge` fails at its end when that count is not zero.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::SimOptions;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, DriverError, GuestMemory};
use hvisor_vhost_tests::harness::{bin_path, children_running, Irq, Ram, SimBridge, Vcpu};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

fn one_blk(tag: &str) -> SimBridge {
    let dir = dir_with_images(tag, &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    SimBridge::start(dir, &cfg, &[])
}

/// Short, so that the swallowed interrupt costs little time.
fn options() -> BlkOptions {
    BlkOptions {
        timeout: Duration::from_secs(1),
        ..BlkOptions::default()
    }
}

#[test]
fn a_swallowed_interrupt_is_counted_per_driver_and_per_bridge() {
    let mut sb = one_blk("lost-irq-count");
    sb.allow_lost_interrupts("the test drops one interrupt on purpose");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    let data = vec![0x5au8; 4096];
    assert_eq!(blk.write(0, &data).unwrap(), BlkStatus::Ok);
    assert_eq!(sb.lost_interrupts(), 0, "interrupts delivered so far");

    g.irq.swallow_next(1);
    assert_eq!(
        blk.write(8, &data).unwrap(),
        BlkStatus::Ok,
        "the driver still finds the completion once its wait times out"
    );
    assert_eq!(blk.lost_interrupts(), 1);
    assert_eq!(sb.lost_interrupts(), 1);

    // The device goes on interrupting: the next request is not counted.
    let mut back = vec![0u8; 4096];
    assert_eq!(blk.read(8, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
    assert_eq!(sb.lost_interrupts(), 1);
}

/// hvisor drops an injection that finds the IRQ still active in the guest, i.e. one that
/// lands between the handler's ACK and its EOI. The bridge then holds the line asserted, so
/// without a repeated injection the device would never interrupt again (zone1's network
/// stalled this way on the real hypervisor).
#[test]
fn an_injection_dropped_while_the_guest_handles_the_irq_is_repeated() {
    let dir = dir_with_images("lost-irq-active", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sim_options = SimOptions {
        drop_while_active: true,
        ..SimOptions::default()
    };
    let sb = SimBridge::start_with_options(dir, &cfg, &["--reinject-ms", "10"], None, sim_options);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    let data = vec![0x3cu8; 4096];
    // The guest takes this write's interrupt and, for the simulator, is still in its
    // handler until it waits on the line again.
    assert_eq!(blk.write(0, &data).unwrap(), BlkStatus::Ok);
    let tag = blk.submit_write(8, &data).unwrap();
    blk.kick();
    // Nothing signals the drop to the guest: poll the simulator's count of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sb.sim.stats().irqs_dropped_active == 0 {
        assert!(
            Instant::now() < deadline,
            "the completion was never injected"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Waiting ends the handler; only a repeated injection can wake the guest now.
    let done = blk.complete(Duration::from_secs(1)).unwrap();
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].tag, tag);
    assert_eq!(done[0].status, BlkStatus::Ok);
    assert_eq!(
        blk.lost_interrupts(),
        0,
        "the dropped injection was repeated"
    );
}

#[test]
#[should_panic(expected = "lost interrupts")]
fn a_test_that_loses_an_interrupt_fails_at_its_end() {
    let sb = one_blk("lost-irq-fails");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &options());
    g.irq.swallow_next(1);
    // The request itself succeeds: only the bridge's check when dropped fails the test.
    assert_eq!(blk.flush().unwrap(), BlkStatus::Ok);
}

/// `vhost-user-blk` with the longest interrupt-coalescing window, for the bridge to spawn.
fn coalescing_backend(dir: &Path) -> PathBuf {
    let path = dir.join("vhost-user-blk-coalescing");
    let script = format!(
        "#!/bin/sh\nexec '{}' --coalesce-us 10000 \"$@\"\n",
        bin_path("vhost-user-blk").display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Waits until the device has published a used entry for every request made available on
/// queue 0, watching the used index in guest RAM (the driver takes nothing).
fn wait_all_used(g: &Guest, blk: &BlkDriver<'_, Vcpu, Ram, Irq>) {
    let queue = blk.queue(0).unwrap();
    let used_idx = queue.memory().device + 2;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut idx = [0u8; 2];
        g.ram.read(used_idx, &mut idx);
        if u16::from_le_bytes(idx) == queue.avail_idx() {
            return;
        }
        assert!(Instant::now() < deadline, "the backend completes nothing");
        std::thread::yield_now();
    }
}

/// A backend that dies after it published completions and before it signalled them (inside
/// its coalescing window) leaves them without an interrupt unless the bridge's restore
/// announces them: a Linux guest would wait for ever.
#[test]
fn backend_killed_inside_its_coalescing_window_loses_no_interrupt() {
    /// Past 128 completions the backend probes whether waiting for the next kick pays; a
    /// guest that submits as soon as a request completes keeps it waiting from then on.
    const WARM_UP: u64 = 150;
    let dir = dir_with_images("lost-irq-kill", &["disk.img"]);
    let backend = coalescing_backend(dir.path());
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &["--blk-backend", backend.to_str().unwrap()]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let options = BlkOptions {
        slots: 160,
        max_transfer: 4096,
        timeout: Duration::from_secs(10),
        ..BlkOptions::default()
    };
    let mut blk = g.blk(BLK, 0x10_0000, &options);
    let data = vec![0x3cu8; 4096];
    for n in 0..WARM_UP {
        blk.submit_write(n * 8, &data).unwrap();
        wait_all_used(&g, &blk);
    }
    // Take every completion through its interrupt, then any delivery left pending, so that
    // none is pending when the backend dies.
    while blk.in_flight() > 0 {
        for completion in blk.complete(options.timeout).unwrap() {
            assert_eq!(completion.status, BlkStatus::Ok);
        }
    }
    assert_eq!(
        blk.complete(Duration::from_millis(50)),
        Err(DriverError::Timeout)
    );
    let delivered = sb.sim.stats().irqs_delivered;

    let tag = blk.submit_write(WARM_UP * 8, &data).unwrap();
    wait_all_used(&g, &blk);
    let backends = children_running(sb.bridge.pid(), "vhost-user-blk");
    assert_eq!(backends.len(), 1, "one backend: {backends:?}");
    assert_eq!(
        sb.sim.stats().irqs_delivered,
        delivered,
        "the backend signalled before the kill: it did not wait out its window"
    );
    // SAFETY: kill(2) on a process this test's bridge started; no memory is touched.
    let killed = unsafe { libc::kill(backends[0] as libc::pid_t, libc::SIGKILL) };
    assert_eq!(killed, 0);

    let completions = blk.complete(options.timeout).unwrap();
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0].tag, tag);
    assert_eq!(completions[0].status, BlkStatus::Ok);
    assert_eq!(
        blk.lost_interrupts(),
        0,
        "the completion the killed backend published never got its interrupt"
    );
}
