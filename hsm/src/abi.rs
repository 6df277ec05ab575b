//! `#[repr(C)]` mirrors of hvisor's virtio bridge page (`include/hvisor.h` in hvisor-tool,
//! `virtio_trampoline.rs` in hvisor), and [`HvisorAbi`], the variants of its layout.
//!
//! The structs and constants below are the layout of hvisor 6a3fb78 and every release since
//! mid-2025 (`MAX_REQ`/`MAX_DEVS`/`MAX_CPUS` = 32/8/32). Older hvisor branches sized the
//! arrays differently, which moves every field after `req_list`; [`BridgeLayout`] computes
//! the offsets of any variant at run time, and [`crate::BridgePage`] uses it.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::str::FromStr;

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
/// hvisor's limit of distinct pending virtio IRQs per zone (target CPU) with [`MAX_DEVS`]:
/// see [`HvisorAbi::max_pending_irqs`].
pub const MAX_PENDING_IRQS: usize = MAX_DEVS - 1;

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

/// Offset of `req_list` in every variant: four `u32` indices come first.
const REQ_LIST_OFFSET: usize = 16;

/// One variant of hvisor's bridge page: the three array sizes it was built with.
///
/// `Display` and `FromStr` use `MAX_REQ/MAX_DEVS/MAX_CPUS`, e.g. `32/8/32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HvisorAbi {
    /// Slots of each ring (`MAX_REQ`).
    pub max_req: usize,
    /// Entries of `mmio_addrs`, and one more than the pending IRQs per CPU (`MAX_DEVS`).
    pub max_devs: usize,
    /// Entries of `cfg_flags` / `cfg_values`, indexed by physical CPU id (`MAX_CPUS`).
    pub max_cpus: usize,
}

/// A variant that cannot describe a bridge page, or a layout that contradicts hvisor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AbiError {
    /// Not three numbers separated by `/`.
    #[error("{0:?} is not MAX_REQ/MAX_DEVS/MAX_CPUS (e.g. 32/8/32)")]
    Syntax(String),
    /// The numbers cannot describe a ring in one page.
    #[error("hvisor ABI {abi}: {reason}")]
    Invalid {
        /// The variant.
        abi: HvisorAbi,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// hvisor reports a config version whose layout differs from the one stated.
    #[error(
        "hvisor reports config version {magic:#x}, whose bridge page is {implied} \
         (MAX_REQ/MAX_DEVS/MAX_CPUS), but {stated} was stated: the two sides would read \
         each other's fields at the wrong offsets"
    )]
    Mismatch {
        /// hvisor's `CONFIG_MAGIC_VERSION`.
        magic: u64,
        /// The layout that version has.
        implied: HvisorAbi,
        /// The layout the user stated.
        stated: HvisorAbi,
    },
}

impl HvisorAbi {
    /// hvisor since mid-2025 (`CONFIG_MAGIC_VERSION` 0x3 to 0x5, and some 0x1/0x2 builds),
    /// including 6a3fb78: what the `#[repr(C)]` structs of this module describe.
    pub const CURRENT: HvisorAbi = HvisorAbi::new(MAX_REQ, MAX_DEVS, MAX_CPUS);

    /// The variants hvisor's history has had, newest first: 32/8/32, then the 2025 branches'
    /// 32/4/32, 32/8/4 and 32/4/4, and the 2024 ones' 32/4/16 and 32/4/20.
    pub const PRESETS: [HvisorAbi; 6] = [
        HvisorAbi::CURRENT,
        HvisorAbi::new(32, 4, 32),
        HvisorAbi::new(32, 8, 4),
        HvisorAbi::new(32, 4, 4),
        HvisorAbi::new(32, 4, 16),
        HvisorAbi::new(32, 4, 20),
    ];

    /// A variant; see [`HvisorAbi::validate`].
    pub const fn new(max_req: usize, max_devs: usize, max_cpus: usize) -> HvisorAbi {
        HvisorAbi {
            max_req,
            max_devs,
            max_cpus,
        }
    }

    /// Checks that the variant describes a ring that fits in the bridge mapping.
    pub fn validate(self) -> Result<HvisorAbi, AbiError> {
        let invalid = |reason| Err(AbiError::Invalid { abi: self, reason });
        // Both sides wrap indices with `& (MAX_REQ - 1)` or `% MAX_REQ`: they agree only
        // for a power of two.
        if self.max_req < 2 || !self.max_req.is_power_of_two() {
            return invalid("MAX_REQ must be a power of two, at least 2");
        }
        // hvisor keeps at most MAX_DEVS - 1 IRQs pending per CPU.
        if self.max_devs < 2 {
            return invalid("MAX_DEVS must be at least 2");
        }
        if self.max_cpus == 0 {
            return invalid("MAX_CPUS must be at least 1");
        }
        match self.size_checked() {
            Some(size) if size <= MMAP_SIZE => Ok(self),
            _ => invalid("the bridge page does not fit in 4096 bytes"),
        }
    }

    fn size_checked(self) -> Option<usize> {
        let per_req = size_of::<DeviceReq>() + size_of::<DeviceRes>();
        let end = self
            .max_req
            .checked_mul(per_req)?
            .checked_add(self.max_cpus.checked_mul(16)?)?
            .checked_add(self.max_devs.checked_mul(8)?)?
            .checked_add(REQ_LIST_OFFSET + 2)?;
        // Tail padding to the struct's 8-byte alignment.
        end.checked_next_multiple_of(8)
    }

    /// The field offsets of this variant. Call on a validated variant.
    pub fn layout(self) -> BridgeLayout {
        let res_list = REQ_LIST_OFFSET + self.max_req * size_of::<DeviceReq>();
        let cfg_flags = res_list + self.max_req * size_of::<DeviceRes>();
        let cfg_values = cfg_flags + self.max_cpus * 8;
        let mmio_addrs = cfg_values + self.max_cpus * 8;
        let mmio_avail = mmio_addrs + self.max_devs * 8;
        BridgeLayout {
            abi: self,
            req_list: REQ_LIST_OFFSET,
            res_list,
            cfg_flags,
            cfg_values,
            mmio_addrs,
            mmio_avail,
            need_wakeup: mmio_avail + 1,
            size: (mmio_avail + 2).next_multiple_of(8),
        }
    }

    /// How many distinct virtio IRQs hvisor keeps pending per target CPU:
    /// `hv_virtio_inject_irq` asserts `len + 1 < MAX_DEVS` before adding one, so
    /// `MAX_DEVS - 1`. All of a zone's virtio IRQs go to its first CPU, so this is also the
    /// limit per zone.
    pub fn max_pending_irqs(self) -> usize {
        self.max_devs.saturating_sub(1)
    }

    /// The layout hvisor's `CONFIG_MAGIC_VERSION` implies, when it implies only one: every
    /// hvisor with version 0x3, 0x4 or 0x5 has 32/8/32. Versions 0x1 and 0x2 were used by
    /// branches with different layouts, later ones are unknown here.
    pub fn implied_by_magic(magic: u64) -> Option<HvisorAbi> {
        matches!(magic, 0x3..=0x5).then_some(HvisorAbi::CURRENT)
    }

    /// Checks a stated layout against the one `magic` implies.
    pub fn check_magic(self, magic: u64) -> Result<(), AbiError> {
        match HvisorAbi::implied_by_magic(magic) {
            Some(implied) if implied != self => Err(AbiError::Mismatch {
                magic,
                implied,
                stated: self,
            }),
            _ => Ok(()),
        }
    }
}

impl Default for HvisorAbi {
    fn default() -> Self {
        HvisorAbi::CURRENT
    }
}

impl fmt::Display for HvisorAbi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.max_req, self.max_devs, self.max_cpus)
    }
}

impl FromStr for HvisorAbi {
    type Err = AbiError;

    /// `MAX_REQ/MAX_DEVS/MAX_CPUS`, decimal, validated.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || AbiError::Syntax(s.to_owned());
        let mut numbers = s.split('/').map(|n| n.trim().parse::<usize>());
        let mut next = || numbers.next().and_then(Result::ok).ok_or_else(syntax);
        let abi = HvisorAbi::new(next()?, next()?, next()?);
        if numbers.next().is_some() {
            return Err(syntax());
        }
        abi.validate()
    }
}

/// Byte offsets of the bridge page's fields for one [`HvisorAbi`]. `req_front`, `req_rear`,
/// `res_front` and `res_rear` are at 0, 4, 8 and 12 in every variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BridgeLayout {
    /// The variant.
    pub abi: HvisorAbi,
    /// `req_list`.
    pub req_list: usize,
    /// `res_list`.
    pub res_list: usize,
    /// `cfg_flags`.
    pub cfg_flags: usize,
    /// `cfg_values`.
    pub cfg_values: usize,
    /// `mmio_addrs`.
    pub mmio_addrs: usize,
    /// `mmio_avail`.
    pub mmio_avail: usize,
    /// `need_wakeup`.
    pub need_wakeup: usize,
    /// Size of the struct, tail padding included.
    pub size: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_layout_is_the_repr_c_struct() {
        let layout = HvisorAbi::CURRENT.layout();
        assert_eq!(layout.req_list, offset_of!(VirtioBridge, req_list));
        assert_eq!(layout.res_list, offset_of!(VirtioBridge, res_list));
        assert_eq!(layout.cfg_flags, offset_of!(VirtioBridge, cfg_flags));
        assert_eq!(layout.cfg_values, offset_of!(VirtioBridge, cfg_values));
        assert_eq!(layout.mmio_addrs, offset_of!(VirtioBridge, mmio_addrs));
        assert_eq!(layout.mmio_avail, offset_of!(VirtioBridge, mmio_avail));
        assert_eq!(layout.need_wakeup, offset_of!(VirtioBridge, need_wakeup));
        assert_eq!(layout.size, size_of::<VirtioBridge>());
        assert_eq!(HvisorAbi::CURRENT.max_pending_irqs(), MAX_PENDING_IRQS);
    }

    #[test]
    fn older_layouts_move_the_fields_after_req_list() {
        // hvisor 2025 branches with MAX_DEVS = 4 and MAX_CPUS = 4 (`VirtioBridge` there).
        let layout = HvisorAbi::new(32, 4, 4).layout();
        assert_eq!(
            (layout.cfg_flags, layout.cfg_values, layout.mmio_addrs),
            (0x610, 0x630, 0x650)
        );
        assert_eq!((layout.mmio_avail, layout.need_wakeup), (0x670, 0x671));
        assert_eq!(layout.size, 0x678);
        let layout = HvisorAbi::new(32, 4, 32).layout();
        assert_eq!((layout.mmio_avail, layout.need_wakeup), (0x830, 0x831));
        assert_eq!(HvisorAbi::new(32, 4, 32).max_pending_irqs(), 3);
        for abi in HvisorAbi::PRESETS {
            assert_eq!(abi.validate(), Ok(abi));
            assert!(abi.layout().size <= MMAP_SIZE);
        }
    }

    #[test]
    fn abi_parses_and_prints() {
        for abi in HvisorAbi::PRESETS {
            assert_eq!(abi.to_string().parse::<HvisorAbi>(), Ok(abi));
        }
        assert_eq!("32/4/4".parse(), Ok(HvisorAbi::new(32, 4, 4)));
        assert_eq!(" 32 / 8 / 32 ".parse(), Ok(HvisorAbi::CURRENT));
        for bad in ["", "32/8", "32/8/32/1", "32/x/32", "-1/8/32", "32,8,32"] {
            assert_eq!(
                bad.parse::<HvisorAbi>(),
                Err(AbiError::Syntax(bad.into())),
                "{bad:?}"
            );
        }
        for bad in [
            "24/8/32",
            "1/8/32",
            "32/1/32",
            "32/8/0",
            "128/8/32",
            "32/8/1000",
        ] {
            let err = bad.parse::<HvisorAbi>().unwrap_err();
            assert!(matches!(err, AbiError::Invalid { .. }), "{bad}: {err}");
        }
        let err = "32/8/99999999999999999".parse::<HvisorAbi>().unwrap_err();
        assert!(matches!(err, AbiError::Invalid { .. }), "{err}");
    }

    #[test]
    fn magic_check_names_both_layouts() {
        assert_eq!(HvisorAbi::implied_by_magic(5), Some(HvisorAbi::CURRENT));
        assert_eq!(HvisorAbi::implied_by_magic(3), Some(HvisorAbi::CURRENT));
        assert_eq!(HvisorAbi::implied_by_magic(1), None, "ambiguous");
        assert_eq!(HvisorAbi::implied_by_magic(6), None, "unknown");
        assert!(HvisorAbi::CURRENT.check_magic(5).is_ok());
        assert!(HvisorAbi::new(32, 4, 4).check_magic(1).is_ok());
        let err = HvisorAbi::new(32, 4, 4).check_magic(5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "hvisor reports config version 0x5, whose bridge page is 32/8/32 \
             (MAX_REQ/MAX_DEVS/MAX_CPUS), but 32/4/4 was stated: the two sides would read \
             each other's fields at the wrong offsets"
        );
    }

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
