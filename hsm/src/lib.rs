//! The hypervisor side of hvisor-vhost.
//!
//! - [`abi`]: the `#[repr(C)]` bridge page shared with hvisor and its constants, and
//!   [`HvisorAbi`], the layout variants of older hvisor builds.
//! - [`ring`]: [`BridgePage`], safe atomic access to a mapped bridge page (both roles).
//! - [`dev`]: [`DevHvisor`], the real `/dev/hvisor` kernel module, both generations (an
//!   eventfd wakeup, or signal 10 to one thread: [`WakeupKind`]).
//! - [`provider`]: a UNIX-socket protocol that hands the bridge its fds, and
//!   [`ProviderHsm`], its bridge side.
//! - [`sim`]: [`SimHypervisor`], hvisor's role played in software for tests and demos;
//!   [`sim_options`]: how closely it follows the real hvisor (by default, exactly where it
//!   can).
//!
//! The bridge only sees the [`Hsm`] trait.

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;

pub mod abi;
pub mod dev;
mod mmap;
pub mod provider;
pub mod ring;
pub mod sim;
pub mod sim_options;
mod sim_server;
mod wakeup;

pub use abi::{DeviceReq, DeviceRes, HvisorAbi, VirtioBridge};
pub use dev::DevHvisor;
pub use provider::ProviderHsm;
pub use ring::BridgePage;
pub use sim::{ProviderServer, SimHypervisor, SimRam, SimRegion, SimStats, SimVcpu, SimZoneSpec};
pub use sim_options::{NotifyAccess, SimOptions, SimOrdering, SimRamLayout, SimWakeup};
pub use wakeup::{WakeupKind, SIGHVI};

/// What the bridge needs from the hypervisor: the request ring, its wakeup, the
/// completion kick and the zone RAM.
pub trait Hsm: Send + Sync + std::fmt::Debug {
    /// The shared bridge page.
    fn bridge(&self) -> &BridgePage;
    /// Readable when the hypervisor wants the daemon to look at the ring: an eventfd, or,
    /// with an hvisor.ko that wakes the daemon with signal 10 ([`WakeupKind::Signal`]), a
    /// signalfd. That signal is directed at one thread, the one that opened the HSM
    /// (INIT_VIRTIO), and a signalfd is only readable for the thread it is pending for: so
    /// the thread that opened the HSM must be the one that polls this fd.
    fn wakeup_fd(&self) -> BorrowedFd<'_>;
    /// Clears the wakeup fd after it polled readable. Never blocks.
    fn ack_wakeup(&self);
    /// res_list has new entries: HVISOR_FINISH_REQ on real hvisor.
    fn finish_req(&self) -> Result<(), HsmError>;
    /// The fd + file offset that map the zone RAM region whose root-Linux address is `zone0_ipa`.
    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError>;
    /// The ids of the zones that are running now, when the hypervisor can tell
    /// (HVISOR_ZONE_LIST on real hvisor); `None` when it cannot. hvisor does not tell the
    /// daemon when a zone shuts down, so the bridge asks, now and then.
    fn live_zones(&self) -> Option<Vec<u32>> {
        None
    }
}

/// A file that maps zone RAM at `offset` (what vhost-user SET_MEM_TABLE sends).
#[derive(Debug, Clone)]
pub struct RamFd {
    /// The file to mmap.
    pub fd: Arc<OwnedFd>,
    /// The mmap offset of the requested `zone0_ipa`.
    pub offset: u64,
}

/// Errors of the HSM layer.
#[derive(Debug, thiserror::Error)]
pub enum HsmError {
    /// The hypervisor device could not be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// Device path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An ioctl on the hypervisor device failed.
    #[error("ioctl {name} failed")]
    Ioctl {
        /// The ioctl's name.
        name: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// INIT_VIRTIO returned a positive error code (ENOTTY: no virtio wakeup IRQ found).
    #[error("INIT_VIRTIO returned {0}: is the hvisor_virtio_device node in the root device tree?")]
    InitVirtio(i32),
    /// A system call needed by the HSM layer failed.
    #[error("{what} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// A CPU id outside `0..MAX_CPUS`.
    #[error("cpu id {0} out of range")]
    BadCpu(u64),
    /// The result ring stayed full: the hypervisor is not draining it.
    #[error("result ring full")]
    ResultRingFull,
    /// No zone RAM region covers the requested range.
    #[error("no RAM region covers {zone0_ipa:#x}+{size:#x}")]
    NoRamRegion {
        /// Requested root-Linux address.
        zone0_ipa: u64,
        /// Requested size.
        size: u64,
    },
    /// The provider broke the handover protocol.
    #[error("provider protocol: {0}")]
    Protocol(String),
    /// A guest-physical range not inside one RAM region of the zone.
    #[error("zone {zone}: {gpa:#x}+{len:#x} is not inside one RAM region")]
    GuestAddress {
        /// Zone id.
        zone: u32,
        /// Guest-physical address.
        gpa: u64,
        /// Access length.
        len: u64,
    },
    /// A zone id the simulator does not know.
    #[error("unknown zone {0}")]
    UnknownZone(u32),
    /// An invalid simulator zone specification.
    #[error("simulator config: {0}")]
    SimConfig(String),
    /// A bridge-page layout that is invalid or contradicts hvisor's.
    #[error(transparent)]
    Abi(#[from] abi::AbiError),
    /// A synchronous access got no reply in time.
    #[error("no reply from the bridge for cpu {0}")]
    SyncTimeout(u64),
}

impl HsmError {
    pub(crate) fn io(what: &'static str, source: io::Error) -> Self {
        HsmError::Io { what, source }
    }
}
