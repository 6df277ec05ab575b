//! `hvisor zone shutdown` with the bridge running: hvisor tells the daemon nothing, so the
//! bridge asks which zones run (HVISOR_ZONE_LIST on a board) and resets the devices of a
//! zone that is gone, while the other zone goes on with verified I/O. The zone, started
//! again, initialises its devices afresh.
//!
//! The bridge library runs in this process over the simulated hypervisor, whose zone list
//! follows `shutdown_zone` and `restart_zone`; the `Hsm` the bridge is given counts its
//! questions.

mod common;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use hvisor_bridge::config::Config;
use hvisor_bridge::event_loop::LoopOptions;
use hvisor_bridge::supervisor::BackendPrograms;
use hvisor_bridge::BridgeOptions;
use hvisor_hsm::{BridgePage, Hsm, HsmError, RamFd, SimHypervisor};
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator};
use hvisor_vhost_tests::harness::{bin_path, sim_zones, Irq, Ram, Vcpu};
use vmm_sys_util::eventfd::EventFd;

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
/// virtio-mmio Status register.
const STATUS: u64 = 0x70;

/// The simulated hypervisor's `Hsm`; counts the bridge's questions about running zones so
/// the test knows when one was asked after a change.
#[derive(Debug)]
struct ZoneList {
    inner: Arc<dyn Hsm>,
    asked: Mutex<u64>,
    changed: Condvar,
}

impl ZoneList {
    /// Waits until the bridge has asked twice more: the first answer after a change has
    /// then been acted on (the loop asks again only after handling it).
    fn wait_two_polls(&self) {
        let asked = self.asked.lock().unwrap();
        let target = *asked + 2;
        let (asked, timeout) = self
            .changed
            .wait_timeout_while(asked, Duration::from_secs(20), |n| *n < target)
            .unwrap();
        assert!(
            !timeout.timed_out(),
            "the bridge stopped asking: {}",
            *asked
        );
    }
}

impl Hsm for ZoneList {
    fn bridge(&self) -> &BridgePage {
        self.inner.bridge()
    }
    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.inner.wakeup_fd()
    }
    fn ack_wakeup(&self) {
        self.inner.ack_wakeup()
    }
    fn finish_req(&self) -> Result<(), HsmError> {
        self.inner.finish_req()
    }
    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError> {
        self.inner.ram_region(zone0_ipa, size)
    }
    fn live_zones(&self) -> Option<Vec<u32>> {
        let live = self.inner.live_zones();
        *self.asked.lock().unwrap() += 1;
        self.changed.notify_all();
        live
    }
}

/// Writes the bridge's stop eventfd when dropped.
struct StopOnDrop<'a>(&'a EventFd);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

fn blk<'a>(
    vcpu: &'a Vcpu,
    ram: &'a Ram,
    irq: &'a Irq,
    offset: u64,
) -> BlkDriver<'a, Vcpu, Ram, Irq> {
    let mut alloc = GuestAllocator::new(RAM_BASE + offset, 0x100_0000);
    BlkDriver::new(vcpu, BLK, ram, irq, &mut alloc, &BlkOptions::default()).unwrap()
}

fn verified_io(blk: &mut BlkDriver<'_, Vcpu, Ram, Irq>, sector: u64, fill: u8) {
    let data = vec![fill; 4096];
    assert_eq!(blk.write(sector, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; 4096];
    assert_eq!(blk.read(sector, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
}

#[test]
fn shut_down_zone_has_its_devices_reset_and_the_other_zone_keeps_serving() {
    let dir = dir_with_images("zoneshutdown", &["z1.img", "z2.img"]);
    let cfg = config(&[
        zone(1, &[blk_entry(BLK, IRQ, "z1.img", "")], None),
        zone(2, &[blk_entry(BLK, IRQ, "z2.img", "")], None),
    ]);
    let config = Config::parse(&cfg, dir.path()).unwrap();
    let sim = SimHypervisor::new(sim_zones(&config)).unwrap();
    let zones = Arc::new(ZoneList {
        inner: sim.hsm(),
        asked: Mutex::new(0),
        changed: Condvar::new(),
    });
    let mut programs = BackendPrograms::beside_bridge();
    programs.blk = bin_path("vhost-user-blk");
    let options = BridgeOptions {
        runtime_dir: dir.path().join("run"),
        programs,
        backends: Default::default(),
        connect_timeout: Duration::from_secs(10),
        reconnect_timeout: Duration::from_secs(10),
        loop_options: LoopOptions {
            // Ask often, so the test does not wait for the default cadence.
            zone_poll: Some(Duration::from_millis(1)),
            ..LoopOptions::default()
        },
    };
    let stop = EventFd::new(0).unwrap();
    // SAFETY: `stop` outlives the bridge, which only polls the fd.
    let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let hsm: Arc<dyn Hsm> = zones.clone();
    let mut running = hvisor_bridge::build(&config, hsm, &options, Some(stop_fd), None).unwrap();
    let stats = std::thread::scope(|s| {
        let bridge = s.spawn(move || running.bridge.run().unwrap());
        // A failed assertion must still stop the bridge, or the scope would wait for ever.
        let stopper = StopOnDrop(&stop);
        let (vcpu1, ram1, irq1) = (
            Vcpu(sim.vcpu(1, 0)),
            Ram(sim.ram(1)),
            Irq::new(&sim, 1, IRQ),
        );
        let (vcpu2, ram2, irq2) = (
            Vcpu(sim.vcpu(2, 1)),
            Ram(sim.ram(2)),
            Irq::new(&sim, 2, IRQ),
        );
        let mut disk2 = blk(&vcpu2, &ram2, &irq2, 0x10_0000);
        {
            let mut disk1 = blk(&vcpu1, &ram1, &irq1, 0x10_0000);
            verified_io(&mut disk1, 8, 0x11);
            verified_io(&mut disk2, 8, 0x21);
            // Both zones seen running before one goes.
            zones.wait_two_polls();
            assert_eq!(disk1.device().status() & 0x4, 0x4, "zone 1 is DRIVER_OK");
        }
        // `hvisor zone shutdown -id 1`.
        sim.shutdown_zone(1).unwrap();
        zones.wait_two_polls();
        // The bridge reset zone 1's device as if its guest had written Status=0 (its
        // backend stopped its vrings); this read stands in for the bridge's state.
        assert_eq!(
            vcpu1
                .0
                .read_within(BLK + STATUS, 4, Duration::from_secs(10))
                .unwrap(),
            0
        );
        // Zone 2 never noticed.
        verified_io(&mut disk2, 16, 0x22);
        // `hvisor zone start` of zone 1 again: a new guest initialises its device afresh.
        sim.restart_zone(1).unwrap();
        {
            let mut disk1 = blk(&vcpu1, &ram1, &irq1, 0x10_0000);
            verified_io(&mut disk1, 24, 0x12);
        }
        verified_io(&mut disk2, 24, 0x23);
        assert_eq!(irq1.lost_interrupts(), 0, "zone 1 lost an interrupt");
        assert_eq!(irq2.lost_interrupts(), 0, "zone 2 lost an interrupt");
        drop(stopper);
        bridge.join().unwrap()
    });
    assert_eq!(stats.zone_resets, 1, "{stats:?}");
}
