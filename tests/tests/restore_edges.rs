//! The edges of a backend restore: a restored backend whose config differs from its
//! predecessor's, and a restore that gave up (the status socket then says the device needs
//! a reset), which the guest's next reset starts again.

mod common;

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use hvisor_bridge::status::DeviceState;
use hvisor_vhost_tests::driver::BlkOptions;
use hvisor_vhost_tests::harness::{bin_path, bridge_status, children_running, Rng, SimBridge};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
const NEEDS_RESET: u32 = 0x40;
/// VIRTIO_BLK_F_RO.
const BLK_F_RO: u64 = 1 << 5;

/// SIGKILLs the backend and waits until it is dead: kill(2) returns before it is, and until
/// then it may still complete a request.
fn kill_backend(sb: &SimBridge) {
    let pids = children_running(sb.bridge.pid(), "vhost-user-blk");
    assert_eq!(pids.len(), 1, "one backend: {pids:?}");
    let exited = pidfd(pids[0]);
    // SAFETY: kill(2) on a backend of the bridge this test started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) }, 0);
    let ready = poll_in(&[exited.as_raw_fd()], PROCESS_WAIT);
    assert_eq!(ready, [0], "the backend did not die");
}

#[test]
fn a_restored_backend_with_other_config_raises_a_config_interrupt() {
    let dir = dir_with_images("restore-config", &["disk.img"]);
    let image = dir.path().join("disk.img");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let mut rng = Rng::new(7);
    verified_io(&mut blk, &mut rng, "before the restart");
    assert_eq!(blk.capacity(), DISK_SIZE / 512);

    // The image grows; the running backend took its size at start-up, the next one reports
    // the new capacity.
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(2 * DISK_SIZE)
        .unwrap();
    kill_backend(&sb);
    // This I/O can only complete once a new backend serves it. The config interrupt comes
    // when the control worker reports the restore, which can trail the first completions of
    // the new backend by a little: the guest goes on doing I/O (taking its interrupts) until
    // it has seen it.
    verified_io(&mut blk, &mut rng, "across the restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    while blk.config_interrupts() == 0 {
        assert!(
            Instant::now() < deadline,
            "no config interrupt after a restore that changed the config"
        );
        verified_io(&mut blk, &mut rng, "after the restart");
    }
    assert_eq!(blk.reread_config().unwrap().capacity, 2 * DISK_SIZE / 512);
}

#[test]
fn a_restore_that_gave_up_is_tried_again_at_the_guest_reset() {
    let dir = dir_with_images("restore-again", &["disk.img"]);
    let refuse = dir.path().join("refuse");
    // The backend program refuses to start while `refuse` exists.
    let wrapper = script(
        dir.path(),
        "blk-wrapper.sh",
        &format!(
            "[ -e {} ] && exit 1\nexec {} \"$@\"\n",
            refuse.display(),
            bin_path("vhost-user-blk").display()
        ),
    );
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(
        dir.clone(),
        &cfg,
        &[
            "--blk-backend",
            wrapper.to_str().unwrap(),
            "--reconnect-timeout-s",
            "1",
        ],
    );
    let g = Guest::new(&sb, 1, 0, IRQ);
    let opts = BlkOptions::default();
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    let mut rng = Rng::new(8);
    verified_io(&mut blk, &mut rng, "before the crash");

    std::fs::write(&refuse, b"").unwrap();
    kill_backend(&sb);
    // The restore gives up after the reconnect timeout: the device needs a reset. The guest
    // polls Status as a driver that saw the config interrupt would.
    let deadline = Instant::now() + Duration::from_secs(30);
    while blk.device().status() & NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "the device never needed a reset");
        std::thread::yield_now();
    }
    // The status socket says so too, and counts no restore.
    let status = bridge_status(sb.dir.path());
    assert_eq!(
        status.devices[0].state,
        DeviceState::NeedsReset,
        "{status:?}"
    );
    assert_eq!(status.devices[0].backend_pid, None, "{status:?}");
    assert_eq!(status.counters.reconnects, 0, "{status:?}");

    // The backend could start again; the guest resets the device and sets it up afresh.
    std::fs::remove_file(&refuse).unwrap();
    drop(blk);
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    verified_io(&mut blk, &mut rng, "after the guest's reset");
}

/// A restored backend that negotiates and then cannot take the guest's features (it offers
/// fewer) fails the device, but its connection stays the device's and is watched: when that
/// backend dies too, the bridge notices and restores a good one, which the guest's reset
/// then uses.
#[test]
fn a_restore_refused_after_negotiation_keeps_watching_the_new_backend() {
    let dir = dir_with_images("restore-refused", &["disk.img"]);
    let degrade = dir.path().join("read-only");
    // While `read-only` exists the backend is started read-only, which offers neither
    // DISCARD nor WRITE_ZEROES, both of which the guest acked.
    let wrapper = script(
        dir.path(),
        "blk-wrapper.sh",
        &format!(
            "[ -e {} ] && set -- \"$@\" --read-only\nexec {} \"$@\"\n",
            degrade.display(),
            bin_path("vhost-user-blk").display()
        ),
    );
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let log_path = dir.path().join("bridge.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let sb = SimBridge::start_with(
        dir.clone(),
        &cfg,
        &["--blk-backend", wrapper.to_str().unwrap()],
        Some(log),
    );
    let g = Guest::new(&sb, 1, 0, IRQ);
    // A driver that does not take RO, so that the read-only backend's features are a subset
    // of the good one's: the guest's reset then negotiates what both can serve.
    let opts = BlkOptions {
        features: BlkOptions::default().features & !BLK_F_RO,
        ..BlkOptions::default()
    };
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    let mut rng = Rng::new(9);
    verified_io(&mut blk, &mut rng, "before the crash");

    std::fs::write(&degrade, b"").unwrap();
    kill_backend(&sb);
    let deadline = Instant::now() + Duration::from_secs(30);
    while blk.device().status() & NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "the device never needed a reset");
        std::thread::yield_now();
    }

    // The refused backend dies too: the bridge must see it and start a good one.
    std::fs::remove_file(&degrade).unwrap();
    kill_backend(&sb);
    let log_lines = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let restarts = |log: &str| log.matches("hung up; restarting it").count();
    while restarts(&log_lines()) < 2 {
        assert!(
            Instant::now() < deadline,
            "the bridge never noticed the refused backend's death:\n{}",
            log_lines()
        );
        std::thread::yield_now();
    }
    drop(blk);
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    verified_io(&mut blk, &mut rng, "after the guest's reset");
}
