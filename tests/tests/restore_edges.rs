//! The edges of a backend restore: a restored backend whose config differs from its
//! predecessor's, and a restore that gave up (the status socket then says the device needs
//! a reset), which the guest's next reset starts again.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hvisor_bridge::status::DeviceState;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus};
use hvisor_vhost_tests::harness::{
    bin_path, bridge_status, children_running, Irq, Ram, Rng, SimBridge, Vcpu,
};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
const NEEDS_RESET: u32 = 0x40;

fn verified_io(blk: &mut BlkDriver<'_, Vcpu, Ram, Irq>, rng: &mut Rng, what: &str) {
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
}

/// SIGKILLs the backend and waits until it is dead: kill(2) returns before it is, and until
/// then it may still complete a request.
fn kill_backend(sb: &SimBridge) {
    let pids = children_running(sb.bridge.pid(), "vhost-user-blk");
    assert_eq!(pids.len(), 1, "one backend: {pids:?}");
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pids[0] as libc::pid_t, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    // SAFETY: kill(2) on a backend of the bridge this test started; no memory is touched.
    assert_eq!(unsafe { libc::kill(pids[0] as i32, libc::SIGKILL) }, 0);
    let mut poll = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; a pidfd turns readable when its process has exited.
    let ready = unsafe { libc::poll(&mut poll, 1, 30_000) };
    assert_eq!(ready, 1, "the backend did not die");
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

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
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
