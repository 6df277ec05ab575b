//! `#[repr(C)]` mirrors of hvisor's virtio bridge page (`include/hvisor.h` in hvisor-tool,
//! `virtio_trampoline.rs` in hvisor). Both sides must be built with these constants.

use std::mem::{offset_of, size_of};

/// Size of the bridge mapping.
pub const MMAP_SIZE: usize = 4096;
/// Slots in each ring (a power of two; one slot always stays empty).
pub const MAX_REQ: usize = 32;
/// Entries of `mmio_addrs`.
pub const MAX_DEVS: usize = 8;
/// Entries of `cfg_flags` / `cfg_values`, indexed by physical CPU id.
pub const MAX_CPUS: usize = 32;
/// Window offset whose writes hvisor sends asynchronously (QueueNotify).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// hvisor's limit of distinct pending virtio IRQs per zone (target CPU).
pub const MAX_PENDING_IRQS: usize = 7;

/// One trapped MMIO access (`struct device_req`), hypervisor to daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceReq {
    /// Physical CPU that trapped; selects the reply slot.
    pub src_cpu: u64,
    /// Absolute guest-physical address of the access.
    pub address: u64,
    /// Access width in bytes.
    pub size: u64,
    /// Value written (0 for reads).
    pub value: u64,
    /// Zone id of the guest.
    pub src_zone: u32,
    /// 1 for a write.
    pub is_write: u8,
    /// 1 when the access is asynchronous and must not be replied to.
    pub need_interrupt: u8,
    /// Always 0.
    pub padding: u16,
}

/// An "inject IRQ" result (`struct device_res`), daemon to hypervisor.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceRes {
    /// Zone to interrupt.
    pub target_zone: u32,
    /// Raw interrupt-controller id (GIC INTID, PLIC id).
    pub irq_id: u32,
}

/// The shared page (`struct virtio_bridge`). Only ever accessed through [`crate::BridgePage`].
#[repr(C)]
#[derive(Debug)]
pub struct VirtioBridge {
    /// Request consumer index (daemon).
    pub req_front: u32,
    /// Request producer index (hypervisor).
    pub req_rear: u32,
    /// Result consumer index (hypervisor).
    pub res_front: u32,
    /// Result producer index (daemon).
    pub res_rear: u32,
    /// Request ring.
    pub req_list: [DeviceReq; MAX_REQ],
    /// Result ring.
    pub res_list: [DeviceRes; MAX_REQ],
    /// Per-CPU reply counters, bumped by the daemon.
    pub cfg_flags: [u64; MAX_CPUS],
    /// Per-CPU reply values.
    pub cfg_values: [u64; MAX_CPUS],
    /// Device base addresses (informational; hvisor ignores them).
    pub mmio_addrs: [u64; MAX_DEVS],
    /// 1 once `mmio_addrs` is filled (informational).
    pub mmio_avail: u8,
    /// 1 when the daemon sleeps and wants a wakeup IRQ.
    pub need_wakeup: u8,
}

const _: () = assert!(size_of::<VirtioBridge>() == 2136);
const _: () = assert!(offset_of!(VirtioBridge, need_wakeup) == 0x851);
const _: () = assert!(size_of::<VirtioBridge>() <= MMAP_SIZE);
const _: () = assert!(MAX_REQ.is_power_of_two());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_layout_matches_hvisor() {
        assert_eq!(size_of::<VirtioBridge>(), 2136);
        assert_eq!(offset_of!(VirtioBridge, req_front), 0x0);
        assert_eq!(offset_of!(VirtioBridge, req_rear), 0x4);
        assert_eq!(offset_of!(VirtioBridge, res_front), 0x8);
        assert_eq!(offset_of!(VirtioBridge, res_rear), 0xc);
        assert_eq!(offset_of!(VirtioBridge, req_list), 0x10);
        assert_eq!(offset_of!(VirtioBridge, res_list), 0x510);
        assert_eq!(offset_of!(VirtioBridge, cfg_flags), 0x610);
        assert_eq!(offset_of!(VirtioBridge, cfg_values), 0x710);
        assert_eq!(offset_of!(VirtioBridge, mmio_addrs), 0x810);
        assert_eq!(offset_of!(VirtioBridge, mmio_avail), 0x850);
        assert_eq!(offset_of!(VirtioBridge, need_wakeup), 0x851);
    }

    #[test]
    fn device_req_layout_matches_hvisor() {
        assert_eq!(size_of::<DeviceReq>(), 40);
        assert_eq!(offset_of!(DeviceReq, src_cpu), 0);
        assert_eq!(offset_of!(DeviceReq, address), 8);
        assert_eq!(offset_of!(DeviceReq, size), 16);
        assert_eq!(offset_of!(DeviceReq, value), 24);
        assert_eq!(offset_of!(DeviceReq, src_zone), 32);
        assert_eq!(offset_of!(DeviceReq, is_write), 36);
        assert_eq!(offset_of!(DeviceReq, need_interrupt), 37);
        assert_eq!(offset_of!(DeviceReq, padding), 38);
    }

    #[test]
    fn device_res_layout_matches_hvisor() {
        assert_eq!(size_of::<DeviceRes>(), 8);
        assert_eq!(offset_of!(DeviceRes, target_zone), 0);
        assert_eq!(offset_of!(DeviceRes, irq_id), 4);
    }
}
