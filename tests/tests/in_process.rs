//! The bridge library and the simulated hypervisor in one process: the same `build` + `run`
//! that the daemon uses, over `SimHypervisor::hsm()` instead of a provider socket. The
//! backend is still a real `vhost-user-blk` process.

mod common;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::process::Command;
use std::time::Duration;

use common::*;
use hvisor_bridge::config::Config;
use hvisor_bridge::event_loop::LoopOptions;
use hvisor_bridge::BridgeOptions;
use hvisor_hsm::SimHypervisor;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator};
use hvisor_vhost_tests::harness::{bin_path, sim_zones, Irq, Process, Ram, Vcpu};
use vmm_sys_util::eventfd::EventFd;

#[test]
fn bridge_library_serves_an_in_process_simulated_zone() {
    let dir = dir_with_images("inproc", &["disk.img"]);
    let socket = dir.path().join("blk.sock");
    let _backend = Process::spawn(
        "vhost-user-blk",
        Command::new(bin_path("vhost-user-blk"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--image")
            .arg(dir.path().join("disk.img")),
    );
    let entry = format!(
        r#"{{"type":"blk","addr":"0xa003c00","len":"0x200","irq":78,"socket":"{}","status":"enable"}}"#,
        socket.display()
    );
    let config = Config::parse(&config(&[zone(1, &[entry], None)]), dir.path()).unwrap();
    let sim = SimHypervisor::new(sim_zones(&config)).unwrap();
    let options = BridgeOptions {
        runtime_dir: dir.path().join("run"),
        programs: hvisor_bridge::supervisor::BackendPrograms::beside_bridge(),
        backends: Default::default(),
        connect_timeout: Duration::from_secs(10),
        reconnect_timeout: Duration::from_secs(10),
        loop_options: LoopOptions::default(),
    };
    let stop = EventFd::new(0).unwrap();
    // SAFETY: `stop` outlives the bridge, which only polls the fd.
    let stop_fd = unsafe { BorrowedFd::borrow_raw(stop.as_raw_fd()) };
    let mut running =
        hvisor_bridge::build(&config, sim.hsm(), &options, Some(stop_fd), None).unwrap();
    std::thread::scope(|s| {
        let bridge = s.spawn(move || running.bridge.run().unwrap());
        {
            let vcpu = Vcpu(sim.vcpu(1, 0));
            let ram = Ram(sim.ram(1));
            let irq = Irq::new(&sim, 1, 78);
            let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x100_0000);
            let mut blk = BlkDriver::new(
                &vcpu,
                0xa003c00,
                &ram,
                &irq,
                &mut alloc,
                &BlkOptions::default(),
            )
            .unwrap();
            let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
            assert_eq!(blk.write(64, &data).unwrap(), BlkStatus::Ok);
            let mut back = vec![0u8; data.len()];
            assert_eq!(blk.read(64, &mut back).unwrap(), BlkStatus::Ok);
            assert_eq!(back, data);
            assert_eq!(irq.lost_interrupts(), 0, "an interrupt was lost");
        }
        stop.write(1).unwrap();
        let stats = bridge.join().unwrap();
        assert!(
            stats.requests > 40,
            "the bridge served the init sequence and I/O: {stats:?}"
        );
        assert!(
            stats.interrupts >= 1,
            "completions were injected: {stats:?}"
        );
    });
}
