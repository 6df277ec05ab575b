//! Shared set-up for the end-to-end tests: configs, and a guest that owns its accessors.
#![allow(dead_code)]

use std::sync::Arc;

use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, GuestAllocator};
use hvisor_vhost_tests::harness::{Irq, Ram, SimBridge, TempDir, Vcpu};

/// Zone RAM used by every test zone: 64 MiB at 0x5000_0000.
pub const RAM_BASE: u64 = 0x5000_0000;
pub const RAM_SIZE: u64 = 0x400_0000;
/// Image size of the test disks.
pub const DISK_SIZE: u64 = 96 << 20;

/// A blk device entry of a config.
pub fn blk_entry(addr: u64, irq: u32, img: &str, extra: &str) -> String {
    format!(
        r#"{{"type":"blk","addr":"{addr:#x}","len":"0x200","irq":{irq},"img":"{img}","status":"enable"{extra}}}"#
    )
}

/// A zone with the test RAM region and the given device entries.
pub fn zone(id: u32, devices: &[String], windows: Option<&str>) -> String {
    let windows = windows
        .map(|w| format!(r#","virtio_windows":{w}"#))
        .unwrap_or_default();
    format!(
        r#"{{"id":{id},"memory_region":[{{"zone0_ipa":"{:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],"devices":[{}]{windows}}}"#,
        RAM_BASE + u64::from(id) * 0x1000_0000,
        devices.join(",")
    )
}

/// A whole config.
pub fn config(zones: &[String]) -> String {
    format!(r#"{{"zones":[{}]}}"#, zones.join(","))
}

/// A fresh scratch dir with a sparse image per name.
pub fn dir_with_images(tag: &str, images: &[&str]) -> Arc<TempDir> {
    let _ = env_logger::builder().is_test(true).try_init();
    let dir = Arc::new(TempDir::new(tag));
    for name in images {
        hvisor_vhost_tests::harness::make_image(&dir.path().join(name), DISK_SIZE);
    }
    dir
}

/// The accessors a guest of one device uses: a vCPU, RAM and the device's IRQ line.
pub struct Guest {
    pub vcpu: Vcpu,
    pub ram: Ram,
    pub irq: Irq,
}

impl Guest {
    pub fn new(sb: &SimBridge, zone: u32, cpu: u64, irq: u32) -> Guest {
        Guest {
            vcpu: sb.vcpu(zone, cpu),
            ram: sb.ram(zone),
            irq: sb.irq(zone, irq),
        }
    }

    /// A blk driver on `base`, with rings and buffers from `[RAM_BASE + offset, +32 MiB)`.
    pub fn blk(
        &self,
        base: u64,
        offset: u64,
        options: &BlkOptions,
    ) -> BlkDriver<'_, Vcpu, Ram, Irq> {
        let mut alloc = GuestAllocator::new(RAM_BASE + offset, 0x200_0000);
        BlkDriver::new(&self.vcpu, base, &self.ram, &self.irq, &mut alloc, options)
            .unwrap_or_else(|e| panic!("blk init at {base:#x}: {e}"))
    }
}
