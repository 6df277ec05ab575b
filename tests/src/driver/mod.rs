//! A guest-side virtio-mmio driver, modelled on Linux's `virtio_mmio.c`, `virtio_ring.c` and
//! `virtio_blk.c`.
//!
//! It reaches the device only through three traits, so the same code runs against the simulated
//! hypervisor, a trap harness or the in-test fake device:
//! - [`MmioBus`]: register accesses (each one traps to the hypervisor);
//! - [`GuestMemory`]: the guest RAM that holds the virtqueues and the buffers;
//! - [`Interrupts`]: the device's interrupt line.
//!
//! Layers: [`mmio::VirtioMmioDevice`] (transport registers and the initialisation sequence),
//! [`virtqueue::SplitQueue`] (the driver half of a split virtqueue) and [`blk::BlkDriver`]
//! (virtio-blk requests, blocking and queued).
//!
//! Everything the device writes is treated as hostile: a misbehaving device yields a
//! [`DriverError`], never a panic.

use std::time::Duration;

pub mod blk;
pub mod console;
pub mod fs;
pub mod generic;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod virtqueue;
pub mod vsock;

#[cfg(test)]
mod fake;

pub use blk::{
    BlkConfig, BlkDriver, BlkOptions, BlkStatus, Completion, RawOutcome, RequestKind, RequestTag,
};
pub use mmio::{DeviceInfo, VirtioMmioDevice};
pub use virtqueue::{
    BufferSegment, GuestAllocator, QueueMemory, RawDescriptor, RawNext, SplitQueue, UsedElem,
};

/// Register accesses to the device's MMIO window, as a guest vCPU issues them.
pub trait MmioBus {
    /// Loads `size` (1, 2, 4 or 8) bytes at guest-physical `addr`.
    fn read(&self, addr: u64, size: u8) -> u64;
    /// Stores the low `size` bytes of `value` at guest-physical `addr`.
    fn write(&self, addr: u64, size: u8, value: u64);
}

/// Guest RAM, addressed by guest-physical address.
///
/// Implementations should copy naturally aligned 2-, 4- and 8-byte accesses in one access, so
/// that ring indices are never torn.
pub trait GuestMemory {
    /// Copies `buf.len()` bytes from guest RAM at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]);
    /// Copies `data` into guest RAM at `gpa`.
    fn write(&self, gpa: u64, data: &[u8]);
}

/// The device's interrupt line as the guest sees it.
pub trait Interrupts {
    /// Waits for one interrupt delivery; false when none came within `timeout`.
    fn wait(&self, timeout: Duration) -> bool;

    /// Told by a driver that `completions` used entries were published with no interrupt:
    /// its wait timed out with them on the ring (see [`LATE_INTERRUPT_GRACE`]). The driver
    /// goes on (it polls), but a Linux guest never polls its rings and would hang, so the
    /// line's owner counts them and the tests require none.
    fn lost(&self, completions: u64);
}

/// How long after a timed-out wait an interrupt may still arrive and count as delivered: a
/// completion published just as a wait's deadline passes has its interrupt on the way.
pub const LATE_INTERRUPT_GRACE: Duration = Duration::from_secs(2);

/// Called when a driver's wait for an interrupt timed out with `found` completions on its
/// rings that no interrupt announced. Unless the interrupt still comes within
/// [`LATE_INTERRUPT_GRACE`], counts them as lost, in `lost` and on the line, and logs them.
/// Either way the caller then handles an interrupt as usual (ACK, take the completions).
fn account_unannounced<I: Interrupts>(irq: &I, device: &str, found: u64, lost: &mut u64) {
    if irq.wait(LATE_INTERRUPT_GRACE) {
        return;
    }
    *lost += found;
    irq.lost(found);
    log::error!(
        "{device}: lost interrupt: {found} completion(s) on the used ring and no interrupt \
         ({lost} so far); a Linux guest would hang here"
    );
}

/// What can go wrong while driving a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DriverError {
    #[error("Bad magic value {0:#x}")]
    BadMagic(u32),
    #[error("Unsupported virtio-mmio version {0}")]
    UnsupportedVersion(u32),
    #[error("No device behind the window")]
    NoDevice,
    #[error("Device id {found}, expected {expected}")]
    WrongDeviceType { expected: u32, found: u32 },
    #[error("Device status stayed {0:#x} after reset")]
    ResetTimeout(u32),
    #[error("Device does not offer VIRTIO_F_VERSION_1")]
    MissingVersion1,
    #[error("Device refused the features (FEATURES_OK not set)")]
    FeaturesRejected,
    #[error("Device needs a reset")]
    DeviceNeedsReset,
    #[error("Queue {0} is not available")]
    QueueUnavailable(u16),
    #[error("Queue {0} is already live")]
    QueueAlreadyReady(u16),
    #[error("Queue {index} size {size} exceeds the maximum {max}")]
    QueueTooLarge { index: u16, size: u16, max: u32 },
    #[error("Queue size {0} is not a power of two in 1..=32768")]
    InvalidQueueSize(u32),
    #[error("Config generation never settled")]
    ConfigUnstable,
    #[error("Guest memory exhausted: {size} bytes aligned to {align} requested")]
    OutOfGuestMemory { size: u64, align: u64 },
    #[error("Alignment {0} is not a power of two")]
    InvalidAlignment(u64),
    #[error("Empty descriptor chain")]
    EmptyChain,
    #[error("Queue full: {needed} descriptors needed, {free} free")]
    QueueFull { needed: usize, free: usize },
    #[error("Descriptor chain of {0} entries is longer than the queue")]
    ChainTooLong(usize),
    #[error("Used ring reports id {0}, which is out of range")]
    UsedIdOutOfRange(u32),
    #[error("Used ring reports id {0}, which is not in flight")]
    UsedIdNotInFlight(u32),
    #[error("Used index jumped from {last} to {reported}")]
    UsedIndexJump { last: u16, reported: u16 },
    #[error("Used length {len} for id {id} exceeds the {max} writable bytes")]
    UsedLengthTooLarge { id: u16, len: u32, max: u64 },
    #[error("Queue is broken after a device error")]
    QueueBroken,
    #[error("No completion within the timeout")]
    Timeout,
    #[error("Buffer length {0} is not a multiple of the 512-byte sector")]
    UnalignedLength(usize),
    #[error("Request of {len} bytes exceeds the {max}-byte limit")]
    RequestTooLarge { len: usize, max: usize },
    #[error("All {0} request slots are in flight")]
    NoFreeSlot(usize),
    #[error("Completion data was already reused")]
    StaleCompletion,
    #[error("Queue {0} does not exist")]
    NoSuchQueue(u16),
    #[error("Request failed with status {0:?}")]
    RequestFailed(blk::BlkStatus),
    #[error("Invalid option: {0}")]
    InvalidOption(&'static str),
    #[error("Malformed reply from the device: {0}")]
    MalformedReply(&'static str),
    #[error("Connection refused by the peer")]
    ConnectionRefused,
    #[error("Connection reset by the peer")]
    ConnectionReset,
    #[error("FUSE request failed with errno {0}")]
    Fuse(i32),
}

/// The driver's result type.
pub type Result<T> = std::result::Result<T, DriverError>;
