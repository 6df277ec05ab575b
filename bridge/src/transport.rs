//! virtio-mmio (version 2) register emulation for one device window.
//!
//! [`MmioTransport`] is a pure state machine. The event loop hands it every trapped access,
//! with offsets relative to the device base; it answers reads, drives a [`VirtioBackend`] and
//! says when an interrupt must be injected. It does no I/O of its own.
//!
//! Everything a guest writes is validated here, so a hostile driver can neither panic the
//! bridge nor make it hand a malformed queue layout to a backend. Anomalies are logged through
//! a per-transport limiter so that a guest cannot flood the log either.

use std::fmt;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_NOTIFICATION_DATA, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES, VIRTIO_MMIO_DEVICE_FEATURES_SEL,
    VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES, VIRTIO_MMIO_DRIVER_FEATURES_SEL,
    VIRTIO_MMIO_GUEST_PAGE_SIZE, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_ALIGN, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_PFN,
    VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH,
    VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH, VIRTIO_MMIO_SHM_BASE_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS,
    VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};

use crate::ratelimit::RateLimited;

/// The device-specific configuration space starts here; everything below is a register.
const CONFIG_SPACE_START: u64 = 0x100;
/// "virt" in little-endian ASCII.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (virtio 1.x) register layout; legacy version 1 is not emulated.
const MMIO_VERSION: u32 = 2;
/// "HVIS", the vendor id hvisor-tool reports.
const VENDOR_ID: u32 = 0x4856_4953;
/// QueueReset (virtio 1.2); virtio-bindings 0.2.7 does not name it.
const VIRTIO_MMIO_QUEUE_RESET: u32 = 0x0c0;
/// SHMLen/SHMBase value that means "no shared memory region with this id".
const NO_SHM_REGION: u32 = u32::MAX;
const INTERRUPT_BITS: u32 = VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG;

const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// Features the guest never sees: PROTOCOL_FEATURES belongs to the vhost-user link, and
/// RING_RESET needs a per-queue reset that [`VirtioBackend`] cannot express.
const HIDDEN_FEATURES: u64 = (1 << VHOST_USER_F_PROTOCOL_FEATURES) | (1 << VIRTIO_F_RING_RESET);

const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;
/// The bits a driver sets one at a time while it initializes the device.
const INIT_BITS: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
const KNOWN_STATUS_BITS: u32 = INIT_BITS | NEEDS_RESET | FAILED;

/// The initialization sequence (virtio 1.x §3.1.1): each bit a driver may add, with exactly
/// the initialization bits that must already be set. Any other change is refused.
const STATUS_TRANSITIONS: [(u32, u32); 4] = [
    (ACKNOWLEDGE, 0),
    (DRIVER, ACKNOWLEDGE),
    (FEATURES_OK, ACKNOWLEDGE | DRIVER),
    (DRIVER_OK, ACKNOWLEDGE | DRIVER | FEATURES_OK),
];

/// Ring alignments that hold for both split and packed virtqueues (virtio 1.x §2.7, §2.8).
const DESCRIPTOR_TABLE_ALIGN: u64 = 16;
const DRIVER_AREA_ALIGN: u64 = 2;
const DEVICE_AREA_ALIGN: u64 = 4;

/// The device behind a transport: a vhost-user frontend in the bridge, a mock in tests.
pub trait VirtioBackend {
    /// The virtio device type (DeviceID).
    fn device_id(&self) -> u32;
    /// Features offered to the guest (VHOST_USER_F_PROTOCOL_FEATURES already hidden).
    fn device_features(&self) -> u64;
    fn num_queues(&self) -> u16;
    /// QueueNumMax of `queue`; 0 makes the queue unusable.
    fn queue_max_size(&self, queue: u16) -> u16;
    fn config_len(&self) -> usize;
    /// Copies cached config space; the transport keeps `offset + data.len()` within
    /// `config_len`.
    fn read_config(&self, offset: usize, data: &mut [u8]);
    /// Writes config space; the transport keeps `offset + data.len()` within `config_len`.
    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), BackendError>;
    /// Starts the device on DRIVER_OK. `queues` holds every queue; only those with `ready` set
    /// are in use, and their size and ring alignment have been validated. Notifies sent before
    /// activation were dropped, so the backend should kick each started queue once.
    fn activate(&mut self, acked_features: u64, queues: &[QueueConfig])
        -> Result<(), BackendError>;
    /// Stops the device after the driver wrote 0 to Status.
    fn reset(&mut self) -> Result<(), BackendError>;
    /// The driver notified (kicked) `queue`, which is ready and was started by `activate`.
    fn notify(&mut self, queue: u16);
}

/// The layout of one virtqueue as the driver programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub index: u16,
    pub size: u16,
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the driver area (the available ring).
    pub driver: u64,
    /// Guest-physical address of the device area (the used ring).
    pub device: u64,
}

/// Why a backend could not carry out a transport request.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend refused the request itself.
    #[error("{0}")]
    Refused(String),
    /// The request failed on the way to or inside the backend.
    #[error("Backend request failed")]
    Failed(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl BackendError {
    pub fn new(reason: impl Into<String>) -> Self {
        Self::Refused(reason.into())
    }

    pub fn from_error(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Failed(Box::new(error))
    }
}

/// What the caller must do after a register write.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WriteEffect {
    /// Inject the device interrupt now (then call [`MmioTransport::mark_line_asserted`]).
    pub inject_interrupt: bool,
}

/// Why a queue layout was refused at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("queue {queue}: size {size} was refused when written")]
    RejectedSize { queue: u16, size: u32 },
    #[error("queue {queue}: size {size} is unusable (maximum {max})")]
    UnusableSize { queue: u16, size: u16, max: u16 },
    #[error("queue {queue}: {area} address {address:#x} is misaligned")]
    Misaligned {
        queue: u16,
        area: &'static str,
        address: u64,
    },
}

#[derive(Clone, Copy, Debug)]
struct QueueState {
    config: QueueConfig,
    /// The last QueueNum write when it was not a usable size; activation refuses it.
    rejected_size: Option<u32>,
    /// Ready when the backend was activated: only these queues are forwarded notifications.
    started: bool,
}

impl QueueState {
    fn initial(index: u16, max_size: u16) -> Self {
        Self {
            config: QueueConfig {
                index,
                size: max_size,
                ..QueueConfig::default()
            },
            rejected_size: None,
            started: false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum RingArea {
    DescriptorTable,
    DriverArea,
    DeviceArea,
}

#[derive(Clone, Copy, Debug)]
enum AddressHalf {
    Low,
    High,
}

/// A virtio-mmio v2 device window. See the module documentation.
#[derive(Debug)]
pub struct MmioTransport<B: VirtioBackend> {
    backend: B,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueState>,
    interrupt_status: u32,
    /// An injection was made and the driver has not acknowledged it yet.
    line_asserted: bool,
    config_generation: u32,
    activated: bool,
    warnings: RateLimitedWarnings,
}

impl<B: VirtioBackend> MmioTransport<B> {
    /// A transport whose log messages name the device by its type.
    pub fn new(backend: B) -> Self {
        let label = format!("virtio-mmio device type {}", backend.device_id());
        Self::with_label(backend, label)
    }

    /// A transport whose log messages start with `label` (e.g. the zone and window base).
    pub fn with_label(backend: B, label: impl Into<String>) -> Self {
        let queues = (0..backend.num_queues())
            .map(|index| QueueState::initial(index, backend.queue_max_size(index)))
            .collect();
        Self {
            backend,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            interrupt_status: 0,
            line_asserted: false,
            config_generation: 0,
            activated: false,
            warnings: RateLimitedWarnings::new(label.into()),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Handles a guest read of `size` bytes at `offset`; the result is masked to `size` bytes.
    pub fn read(&mut self, offset: u64, size: u8) -> u64 {
        let value = if offset >= CONFIG_SPACE_START {
            self.read_config_space(offset - CONFIG_SPACE_START, size)
        } else if let Some(register) = self.register_access(offset, size, "read") {
            u64::from(self.read_register(register))
        } else {
            0
        };
        value & width_mask(size)
    }

    /// Handles a guest write of the low `size` bytes of `value` at `offset`.
    pub fn write(&mut self, offset: u64, size: u8, value: u64) -> WriteEffect {
        if offset >= CONFIG_SPACE_START {
            self.write_config_space(offset - CONFIG_SPACE_START, size, value);
            return WriteEffect::default();
        }
        match self.register_access(offset, size, "write") {
            // A 4-byte access: only the low half of `value` belongs to it.
            Some(register) => self.write_register(register, value as u32),
            None => WriteEffect::default(),
        }
    }

    /// The backend completed buffers: sets the used-buffer interrupt bit. Returns true when
    /// the caller must inject the interrupt now (the line is not asserted yet).
    pub fn signal_used_buffer(&mut self) -> bool {
        self.raise_interrupt(VIRTIO_MMIO_INT_VRING)
    }

    /// The config space changed: bumps ConfigGeneration and sets the config interrupt bit.
    /// Returns true when the caller must inject the interrupt now.
    pub fn signal_config_change(&mut self) -> bool {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.raise_interrupt(VIRTIO_MMIO_INT_CONFIG)
    }

    pub fn interrupt_status(&self) -> u32 {
        self.interrupt_status
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver acknowledged (guest view, without PROTOCOL_FEATURES).
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Each queue's configuration as the driver set it (its size is the maximum until then).
    pub fn queues(&self) -> impl Iterator<Item = &QueueConfig> {
        self.queues.iter().map(|q| &q.config)
    }

    /// The backend was activated and has not been reset since.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    pub fn line_asserted(&self) -> bool {
        self.line_asserted
    }

    /// Records a successful injection; until the driver acknowledges it, further signals
    /// coalesce into InterruptStatus without asking for another injection.
    pub fn mark_line_asserted(&mut self) {
        self.line_asserted = self.interrupt_status != 0;
    }

    /// The device can no longer work (activation refused, backend gone). Once the driver has
    /// set DRIVER_OK, sets DEVICE_NEEDS_RESET and raises a config interrupt; returns true when
    /// the caller must inject it now. Before DRIVER_OK it does nothing: the driver cannot be
    /// told yet, and the activation on DRIVER_OK will fail on its own.
    pub fn fail(&mut self) -> bool {
        if self.status & DRIVER_OK == 0 || self.status & NEEDS_RESET != 0 {
            return false;
        }
        self.status |= NEEDS_RESET;
        self.signal_config_change()
    }

    /// Sets an InterruptStatus bit. No interrupt may reach the driver before DRIVER_OK.
    fn raise_interrupt(&mut self, bit: u32) -> bool {
        if self.status & DRIVER_OK == 0 {
            return false;
        }
        self.interrupt_status |= bit;
        !self.line_asserted
    }

    /// Non-config registers are 32 bits wide and aligned (virtio 1.x §4.2.2.2).
    fn register_access(&mut self, offset: u64, size: u8, kind: &str) -> Option<u32> {
        if size != 4 {
            self.warnings.warn(
                Anomaly::AccessWidth,
                format_args!("{size}-byte {kind} of register {offset:#x} ignored"),
            );
            return None;
        }
        if offset & 0b11 != 0 {
            self.warnings.warn(
                Anomaly::UnalignedRegister,
                format_args!("{kind} of unaligned register offset {offset:#x} ignored"),
            );
            return None;
        }
        u32::try_from(offset).ok()
    }

    fn read_register(&mut self, register: u32) -> u32 {
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.backend.device_id(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => low_half(self.device_features()),
                1 => high_half(self.device_features()),
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |queue| {
                u32::from(self.backend.queue_max_size(queue.config.index))
            }),
            VIRTIO_MMIO_QUEUE_READY => self
                .selected_queue()
                .map_or(0, |queue| u32::from(queue.config.ready)),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt_status,
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH => NO_SHM_REGION,
            // RING_RESET is never offered, so no queue reset is ever in progress.
            VIRTIO_MMIO_QUEUE_RESET => 0,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            VIRTIO_MMIO_DEVICE_FEATURES_SEL
            | VIRTIO_MMIO_DRIVER_FEATURES
            | VIRTIO_MMIO_DRIVER_FEATURES_SEL
            | VIRTIO_MMIO_QUEUE_SEL
            | VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_NOTIFY
            | VIRTIO_MMIO_INTERRUPT_ACK
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
            | VIRTIO_MMIO_SHM_SEL => {
                self.warnings.warn(
                    Anomaly::WriteOnlyRegister,
                    format_args!("read of write-only register {register:#x} returns 0"),
                );
                0
            }
            VIRTIO_MMIO_GUEST_PAGE_SIZE | VIRTIO_MMIO_QUEUE_ALIGN | VIRTIO_MMIO_QUEUE_PFN => {
                self.warnings.warn(
                    Anomaly::LegacyRegister,
                    format_args!("read of legacy register {register:#x} returns 0"),
                );
                0
            }
            _ => {
                self.warnings.warn(
                    Anomaly::UnknownRegister,
                    format_args!("read of unknown register {register:#x} returns 0"),
                );
                0
            }
        }
    }

    fn write_register(&mut self, register: u32, value: u32) -> WriteEffect {
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES => self.write_driver_features(value),
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => self.write_queue_num(value),
            VIRTIO_MMIO_QUEUE_READY => self.write_queue_ready(value),
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(value),
            VIRTIO_MMIO_INTERRUPT_ACK => return self.acknowledge_interrupt(value),
            VIRTIO_MMIO_STATUS => return self.write_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW => {
                self.write_queue_address(RingArea::DescriptorTable, AddressHalf::Low, value)
            }
            VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                self.write_queue_address(RingArea::DescriptorTable, AddressHalf::High, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => {
                self.write_queue_address(RingArea::DriverArea, AddressHalf::Low, value)
            }
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                self.write_queue_address(RingArea::DriverArea, AddressHalf::High, value)
            }
            VIRTIO_MMIO_QUEUE_USED_LOW => {
                self.write_queue_address(RingArea::DeviceArea, AddressHalf::Low, value)
            }
            VIRTIO_MMIO_QUEUE_USED_HIGH => {
                self.write_queue_address(RingArea::DeviceArea, AddressHalf::High, value)
            }
            // There are no shared memory regions, so the selection has nothing to select.
            VIRTIO_MMIO_SHM_SEL => {}
            VIRTIO_MMIO_QUEUE_RESET => self.warnings.warn(
                Anomaly::QueueReset,
                format_args!("QueueReset write ignored: VIRTIO_F_RING_RESET is not negotiated"),
            ),
            VIRTIO_MMIO_MAGIC_VALUE
            | VIRTIO_MMIO_VERSION
            | VIRTIO_MMIO_DEVICE_ID
            | VIRTIO_MMIO_VENDOR_ID
            | VIRTIO_MMIO_DEVICE_FEATURES
            | VIRTIO_MMIO_QUEUE_NUM_MAX
            | VIRTIO_MMIO_INTERRUPT_STATUS
            | VIRTIO_MMIO_SHM_LEN_LOW
            | VIRTIO_MMIO_SHM_LEN_HIGH
            | VIRTIO_MMIO_SHM_BASE_LOW
            | VIRTIO_MMIO_SHM_BASE_HIGH
            | VIRTIO_MMIO_CONFIG_GENERATION => self.warnings.warn(
                Anomaly::ReadOnlyRegister,
                format_args!("write of {value:#x} to read-only register {register:#x} ignored"),
            ),
            VIRTIO_MMIO_GUEST_PAGE_SIZE | VIRTIO_MMIO_QUEUE_ALIGN | VIRTIO_MMIO_QUEUE_PFN => {
                self.warnings.warn(
                    Anomaly::LegacyRegister,
                    format_args!("write to legacy register {register:#x} ignored"),
                )
            }
            _ => self.warnings.warn(
                Anomaly::UnknownRegister,
                format_args!("write to unknown register {register:#x} ignored"),
            ),
        }
        WriteEffect::default()
    }

    fn device_features(&self) -> u64 {
        self.backend.device_features() & !HIDDEN_FEATURES
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & FEATURES_OK != 0 {
            self.warnings.warn(
                Anomaly::FeaturesLocked,
                format_args!("DriverFeatures write after FEATURES_OK ignored"),
            );
            return;
        }
        let shift = match self.driver_features_sel {
            0 => 0,
            1 => 32,
            select => {
                self.warnings.warn(
                    Anomaly::FeatureSelect,
                    format_args!("DriverFeatures write with DriverFeaturesSel {select} ignored"),
                );
                return;
            }
        };
        let offered = (self.device_features() >> shift) & u64::from(u32::MAX);
        let requested = u64::from(value);
        if requested & !offered != 0 {
            self.warnings.warn(
                Anomaly::FeaturesNotOffered,
                format_args!(
                    "driver acked features {:#x} that were not offered; dropped",
                    (requested & !offered) << shift
                ),
            );
        }
        let half = u64::from(u32::MAX) << shift;
        self.acked_features = (self.acked_features & !half) | ((requested & offered) << shift);
    }

    fn features_acceptable(&self) -> bool {
        self.acked_features & !self.device_features() == 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) != 0
    }

    fn selected_queue(&self) -> Option<&QueueState> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get(index))
    }

    /// The selected queue's index for a write to `register`, when it exists and is not ready
    /// (the layout of a ready queue is frozen, virtio 1.x §4.2.2.2).
    fn writable_queue(&mut self, register: &str) -> Option<usize> {
        let selected = self.queue_sel;
        let Some(queue) = self.selected_queue() else {
            self.warnings.warn(
                Anomaly::QueueSelect,
                format_args!("{register} write for nonexistent queue {selected} ignored"),
            );
            return None;
        };
        if queue.config.ready {
            self.warnings.warn(
                Anomaly::QueueLocked,
                format_args!("{register} write to ready queue {selected} ignored"),
            );
            return None;
        }
        usize::try_from(selected).ok()
    }

    fn write_queue_num(&mut self, value: u32) {
        let Some(queue) = self
            .writable_queue("QueueNum")
            .and_then(|index| self.queues.get_mut(index))
        else {
            return;
        };
        let max = self.backend.queue_max_size(queue.config.index);
        match u16::try_from(value) {
            Ok(size) if size.is_power_of_two() && size <= max => {
                queue.config.size = size;
                queue.rejected_size = None;
            }
            _ => {
                queue.rejected_size = Some(value);
                let index = queue.config.index;
                self.warnings.warn(
                    Anomaly::QueueSize,
                    format_args!(
                        "queue {index}: size {value} is not a power of two in 1..={max}; \
                         activation will be refused"
                    ),
                );
            }
        }
    }

    fn write_queue_ready(&mut self, value: u32) {
        let selected = self.queue_sel;
        let activated = self.activated;
        let Some(queue) = usize::try_from(selected)
            .ok()
            .and_then(|index| self.queues.get_mut(index))
        else {
            self.warnings.warn(
                Anomaly::QueueSelect,
                format_args!("QueueReady write for nonexistent queue {selected} ignored"),
            );
            return;
        };
        let ready = match value {
            0 => false,
            1 => true,
            _ => {
                self.warnings.warn(
                    Anomaly::QueueReady,
                    format_args!("QueueReady value {value} for queue {selected} ignored"),
                );
                return;
            }
        };
        let changed = queue.config.ready != ready;
        queue.config.ready = ready;
        if activated && changed {
            // The backend keeps the queue set it was activated with until the next reset.
            self.warnings.warn(
                Anomaly::QueueReady,
                format_args!("queue {selected} QueueReady={value} after DRIVER_OK has no effect"),
            );
        }
    }

    fn write_queue_address(&mut self, area: RingArea, half: AddressHalf, value: u32) {
        let register = match area {
            RingArea::DescriptorTable => "QueueDesc",
            RingArea::DriverArea => "QueueDriver",
            RingArea::DeviceArea => "QueueDevice",
        };
        let Some(queue) = self
            .writable_queue(register)
            .and_then(|index| self.queues.get_mut(index))
        else {
            return;
        };
        let address = match area {
            RingArea::DescriptorTable => &mut queue.config.desc,
            RingArea::DriverArea => &mut queue.config.driver,
            RingArea::DeviceArea => &mut queue.config.device,
        };
        let value = u64::from(value);
        *address = match half {
            AddressHalf::Low => (*address & !u64::from(u32::MAX)) | value,
            AddressHalf::High => (*address & u64::from(u32::MAX)) | (value << 32),
        };
    }

    /// QueueNotify: the hot path, so it only indexes and compares.
    fn notify(&mut self, value: u32) {
        // With NOTIFICATION_DATA the queue index is the low 16 bits (virtio 1.x §4.2.3.4).
        let queue = if self.acked_features & (1 << VIRTIO_F_NOTIFICATION_DATA) != 0 {
            value & u32::from(u16::MAX)
        } else {
            value
        };
        let runnable = self.activated && self.status & NEEDS_RESET == 0;
        let target = u16::try_from(queue).ok().filter(|&index| {
            self.queues
                .get(usize::from(index))
                .is_some_and(|state| state.started && state.config.ready)
        });
        match target {
            Some(index) if runnable => self.backend.notify(index),
            _ => self.warnings.warn(
                Anomaly::Notify,
                format_args!(
                    "notify for queue {queue} dropped (status {:#x}, device {})",
                    self.status,
                    if runnable { "running" } else { "not running" }
                ),
            ),
        }
    }

    fn acknowledge_interrupt(&mut self, value: u32) -> WriteEffect {
        let cleared = self.interrupt_status & value & INTERRUPT_BITS;
        self.interrupt_status &= !value;
        // Bits still pending arrived after the driver read InterruptStatus, while the line was
        // asserted, so nothing was injected for them: raise the line again. Likewise when an
        // earlier injection failed (the line was never marked asserted).
        let raise_again = self.interrupt_status != 0 && (cleared != 0 || !self.line_asserted);
        if self.interrupt_status == 0 || raise_again {
            self.line_asserted = false;
        }
        WriteEffect {
            inject_interrupt: raise_again,
        }
    }

    fn write_status(&mut self, value: u32) -> WriteEffect {
        if value == 0 {
            self.reset();
            return WriteEffect::default();
        }
        let current = self.status;
        if value & !KNOWN_STATUS_BITS != 0 {
            self.warnings.warn(
                Anomaly::Status,
                format_args!("status {value:#x} has unknown bits; ignored"),
            );
            return WriteEffect::default();
        }
        let kept = current & (INIT_BITS | FAILED);
        if value & kept != kept {
            self.warnings.warn(
                Anomaly::Status,
                format_args!(
                    "status {value:#x} would clear bits of {current:#x}; only 0 resets; ignored"
                ),
            );
            return WriteEffect::default();
        }
        if value & NEEDS_RESET & !current != 0 {
            self.warnings.warn(
                Anomaly::Status,
                format_args!("the driver cannot set DEVICE_NEEDS_RESET; bit ignored"),
            );
        }
        if value & FAILED & !current != 0 {
            self.status |= FAILED;
            self.warnings.warn(
                Anomaly::Status,
                format_args!("the driver set FAILED (status {value:#x})"),
            );
        }
        let added = value & INIT_BITS & !current;
        if added != 0 && self.status & FAILED != 0 {
            self.warnings.warn(
                Anomaly::Status,
                format_args!("status {value:#x} after FAILED ignored; the driver must reset"),
            );
            return WriteEffect::default();
        }
        let mut effect = WriteEffect::default();
        for (bit, prerequisites) in STATUS_TRANSITIONS {
            if added & bit == 0 {
                continue;
            }
            let have = self.status & INIT_BITS;
            if have != prerequisites {
                self.warnings.warn(
                    Anomaly::Status,
                    format_args!(
                        "status bit {bit:#x} needs exactly {prerequisites:#x} set, not {have:#x}; \
                         refused"
                    ),
                );
                break;
            }
            match bit {
                FEATURES_OK if !self.features_acceptable() => {
                    let acked = self.acked_features;
                    self.warnings.warn(
                        Anomaly::Status,
                        format_args!("FEATURES_OK refused for features {acked:#x}"),
                    );
                    break;
                }
                DRIVER_OK => {
                    self.status |= DRIVER_OK;
                    effect = self.activate();
                }
                _ => self.status |= bit,
            }
        }
        effect
    }

    /// DRIVER_OK: validate every queue, then start the backend.
    fn activate(&mut self) -> WriteEffect {
        if let Err(problem) = self.check_queue_layouts() {
            self.warnings.warn(
                Anomaly::Activation,
                format_args!("activation refused: {problem}"),
            );
            return WriteEffect {
                inject_interrupt: self.fail(),
            };
        }
        let layouts: Vec<QueueConfig> = self.queues.iter().map(|queue| queue.config).collect();
        if let Err(error) = self.backend.activate(self.acked_features, &layouts) {
            self.warnings.warn(
                Anomaly::Activation,
                format_args!("backend activation failed: {}", ErrorChain(&error)),
            );
            return WriteEffect {
                inject_interrupt: self.fail(),
            };
        }
        self.activated = true;
        for queue in &mut self.queues {
            queue.started = queue.config.ready;
        }
        WriteEffect::default()
    }

    fn check_queue_layouts(&self) -> Result<(), QueueSetupError> {
        for queue in &self.queues {
            let config = &queue.config;
            if let Some(size) = queue.rejected_size {
                return Err(QueueSetupError::RejectedSize {
                    queue: config.index,
                    size,
                });
            }
            if !config.ready {
                continue;
            }
            let max = self.backend.queue_max_size(config.index);
            if !config.size.is_power_of_two() || config.size > max {
                return Err(QueueSetupError::UnusableSize {
                    queue: config.index,
                    size: config.size,
                    max,
                });
            }
            let areas = [
                ("descriptor table", config.desc, DESCRIPTOR_TABLE_ALIGN),
                ("driver area", config.driver, DRIVER_AREA_ALIGN),
                ("device area", config.device, DEVICE_AREA_ALIGN),
            ];
            for (area, address, alignment) in areas {
                // Alignments are powers of two.
                if address & (alignment - 1) != 0 {
                    return Err(QueueSetupError::Misaligned {
                        queue: config.index,
                        area,
                        address,
                    });
                }
            }
        }
        Ok(())
    }

    /// Status 0: stop the backend if it was told anything, then forget all driver state.
    /// ConfigGeneration keeps counting so a driver never sees an old generation again.
    fn reset(&mut self) {
        if self.activated || self.acked_features != 0 {
            if let Err(error) = self.backend.reset() {
                self.warnings.warn(
                    Anomaly::Backend,
                    format_args!("backend reset failed: {}", ErrorChain(&error)),
                );
            }
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for queue in &mut self.queues {
            let index = queue.config.index;
            *queue = QueueState::initial(index, self.backend.queue_max_size(index));
        }
        self.interrupt_status = 0;
        self.line_asserted = false;
        self.activated = false;
    }

    /// The part of a config access of `len` bytes at `offset` that lies inside config space,
    /// as (start, length); None when nothing does.
    fn config_span(&self, offset: u64, len: usize) -> Option<(usize, usize)> {
        let start = usize::try_from(offset).ok()?;
        let available = self.backend.config_len().checked_sub(start)?;
        let inside = len.min(available);
        (inside > 0).then_some((start, inside))
    }

    fn config_access_len(&mut self, offset: u64, size: u8, kind: &str) -> Option<usize> {
        if matches!(size, 1 | 2 | 4 | 8) {
            return Some(usize::from(size));
        }
        self.warnings.warn(
            Anomaly::ConfigSpace,
            format_args!("{size}-byte config {kind} at {offset:#x} ignored"),
        );
        None
    }

    fn read_config_space(&mut self, offset: u64, size: u8) -> u64 {
        let Some(len) = self.config_access_len(offset, size, "read") else {
            return 0;
        };
        let mut bytes = [0u8; 8];
        let span = self.config_span(offset, len);
        if let Some((start, inside)) = span {
            self.backend.read_config(start, &mut bytes[..inside]);
        }
        if span.is_none_or(|(_, inside)| inside < len) {
            self.warnings.warn(
                Anomaly::ConfigSpace,
                format_args!("config read of {len} bytes at {offset:#x} past the end reads 0"),
            );
        }
        u64::from_le_bytes(bytes)
    }

    fn write_config_space(&mut self, offset: u64, size: u8, value: u64) {
        let Some(len) = self.config_access_len(offset, size, "write") else {
            return;
        };
        let bytes = value.to_le_bytes();
        let span = self.config_span(offset, len);
        if let Some((start, inside)) = span {
            if let Err(error) = self.backend.write_config(start, &bytes[..inside]) {
                self.warnings.warn(
                    Anomaly::Backend,
                    format_args!("config write at {offset:#x} failed: {}", ErrorChain(&error)),
                );
            }
        }
        if span.is_none_or(|(_, inside)| inside < len) {
            self.warnings.warn(
                Anomaly::ConfigSpace,
                format_args!("config write of {len} bytes at {offset:#x} past the end dropped"),
            );
        }
    }
}

fn width_mask(size: u8) -> u64 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        4 => 0xffff_ffff,
        8 => u64::MAX,
        _ => 0,
    }
}

fn low_half(value: u64) -> u32 {
    (value & u64::from(u32::MAX)) as u32
}

fn high_half(value: u64) -> u32 {
    (value >> 32) as u32
}

/// Kinds of guest or backend misbehaviour, each rate-limited separately.
#[derive(Clone, Copy, Debug)]
enum Anomaly {
    AccessWidth,
    UnalignedRegister,
    UnknownRegister,
    ReadOnlyRegister,
    WriteOnlyRegister,
    LegacyRegister,
    FeatureSelect,
    FeaturesLocked,
    FeaturesNotOffered,
    QueueSelect,
    QueueLocked,
    QueueSize,
    QueueReady,
    Notify,
    Status,
    QueueReset,
    ConfigSpace,
    Activation,
    Backend,
}

impl Anomaly {
    /// `Backend` is the last variant.
    const COUNT: usize = Anomaly::Backend as usize + 1;
}

/// Per-kind rate limiting of guest-triggered warnings, so a guest that repeats a bad access
/// in a loop costs a handful of log lines, not one per trap.
#[derive(Debug)]
struct RateLimitedWarnings {
    label: String,
    limiters: [RateLimited; Anomaly::COUNT],
}

impl RateLimitedWarnings {
    fn new(label: String) -> Self {
        Self {
            label,
            limiters: Default::default(),
        }
    }

    fn warn(&mut self, kind: Anomaly, message: fmt::Arguments<'_>) {
        let limiter = &mut self.limiters[kind as usize];
        if limiter.hit() {
            let seen = limiter.count();
            log::warn!("{}: {message} ({kind:?} #{seen})", self.label);
        }
    }
}

/// Displays an error followed by its sources.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLK_DEVICE_ID: u32 = 2;
    const QUEUE_MAX: u16 = 256;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
    const EVENT_IDX: u64 = 1 << 29;
    const BLK_FLUSH: u64 = 1 << 9;
    const BLK_SEG_MAX: u64 = 1 << 2;
    const RING_RESET: u64 = 1 << VIRTIO_F_RING_RESET;
    const PROTOCOL_FEATURES: u64 = 1 << VHOST_USER_F_PROTOCOL_FEATURES;
    /// What the mock offers: bit 30 and RING_RESET must never reach the guest.
    const OFFERED: u64 =
        VERSION_1 | EVENT_IDX | BLK_FLUSH | BLK_SEG_MAX | PROTOCOL_FEATURES | RING_RESET;
    const GUEST_VISIBLE: u64 = VERSION_1 | EVENT_IDX | BLK_FLUSH | BLK_SEG_MAX;
    const CONFIG_LEN: usize = 20;
    const RAM_BASE: u64 = 0x1_4000_0000;

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Call {
        Activate {
            features: u64,
            queues: Vec<QueueConfig>,
        },
        Reset,
        Notify(u16),
        WriteConfig {
            offset: usize,
            data: Vec<u8>,
        },
    }

    /// Records every call and checks the contract the transport promises a backend.
    #[derive(Debug)]
    struct MockBackend {
        features: u64,
        queue_max: Vec<u16>,
        config: Vec<u8>,
        refuse_activation: bool,
        calls: Vec<Call>,
    }

    impl MockBackend {
        fn new() -> Self {
            Self {
                features: OFFERED,
                queue_max: vec![QUEUE_MAX, QUEUE_MAX],
                config: (0..CONFIG_LEN).map(|i| 0xa0 + i as u8).collect(),
                refuse_activation: false,
                calls: Vec::new(),
            }
        }

        fn activations(&self) -> Vec<&Call> {
            self.calls
                .iter()
                .filter(|call| matches!(call, Call::Activate { .. }))
                .collect()
        }

        fn notifies(&self) -> Vec<u16> {
            self.calls
                .iter()
                .filter_map(|call| match call {
                    Call::Notify(queue) => Some(*queue),
                    _ => None,
                })
                .collect()
        }

        fn resets(&self) -> usize {
            self.calls
                .iter()
                .filter(|call| **call == Call::Reset)
                .count()
        }
    }

    impl VirtioBackend for MockBackend {
        fn device_id(&self) -> u32 {
            BLK_DEVICE_ID
        }

        fn device_features(&self) -> u64 {
            self.features
        }

        fn num_queues(&self) -> u16 {
            u16::try_from(self.queue_max.len()).expect("mock queue count fits u16")
        }

        fn queue_max_size(&self, queue: u16) -> u16 {
            self.queue_max.get(usize::from(queue)).copied().unwrap_or(0)
        }

        fn config_len(&self) -> usize {
            self.config.len()
        }

        fn read_config(&self, offset: usize, data: &mut [u8]) {
            // Slicing panics if the transport breaks the bounds it promises.
            data.copy_from_slice(&self.config[offset..offset + data.len()]);
        }

        fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), BackendError> {
            self.config[offset..offset + data.len()].copy_from_slice(data);
            self.calls.push(Call::WriteConfig {
                offset,
                data: data.to_vec(),
            });
            Ok(())
        }

        fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), BackendError> {
            let offered = self.features & !HIDDEN_FEATURES;
            assert_eq!(features & !offered, 0, "acked features were not offered");
            assert_eq!(queues.len(), self.queue_max.len());
            for (index, queue) in queues.iter().enumerate() {
                assert_eq!(usize::from(queue.index), index);
                if queue.ready {
                    assert!(queue.size.is_power_of_two() && queue.size <= self.queue_max[index]);
                    assert_eq!(queue.desc % 16, 0);
                    assert_eq!(queue.driver % 2, 0);
                    assert_eq!(queue.device % 4, 0);
                }
            }
            self.calls.push(Call::Activate {
                features,
                queues: queues.to_vec(),
            });
            if self.refuse_activation {
                return Err(BackendError::new("mock refuses activation"));
            }
            Ok(())
        }

        fn reset(&mut self) -> Result<(), BackendError> {
            self.calls.push(Call::Reset);
            Ok(())
        }

        fn notify(&mut self, queue: u16) {
            assert!(
                queue < self.num_queues(),
                "notify for nonexistent queue {queue}"
            );
            self.calls.push(Call::Notify(queue));
        }
    }

    type Transport = MmioTransport<MockBackend>;

    fn transport() -> Transport {
        MmioTransport::new(MockBackend::new())
    }

    fn offset(register: u32) -> u64 {
        u64::from(register)
    }

    fn read32(t: &mut Transport, register: u32) -> u32 {
        u32::try_from(t.read(offset(register), 4)).expect("a 4-byte read fits 32 bits")
    }

    fn write32(t: &mut Transport, register: u32, value: u32) -> WriteEffect {
        t.write(offset(register), 4, u64::from(value))
    }

    /// virtio core's add_status: read, OR, write back.
    fn add_status(t: &mut Transport, bit: u32) -> WriteEffect {
        let status = read32(t, VIRTIO_MMIO_STATUS);
        write32(t, VIRTIO_MMIO_STATUS, status | bit)
    }

    /// Linux virtio_mmio probe plus virtio core feature negotiation, up to the FEATURES_OK
    /// read-back. Returns whether the device kept FEATURES_OK.
    fn linux_negotiate(t: &mut Transport, driver_features: u64) -> bool {
        assert_eq!(read32(t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(read32(t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(read32(t, VIRTIO_MMIO_DEVICE_ID), BLK_DEVICE_ID);
        assert_eq!(read32(t, VIRTIO_MMIO_VENDOR_ID), 0x4856_4953);
        write32(t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(read32(t, VIRTIO_MMIO_STATUS), 0);
        add_status(t, ACKNOWLEDGE);
        add_status(t, DRIVER);
        write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = read32(t, VIRTIO_MMIO_DEVICE_FEATURES);
        write32(t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = read32(t, VIRTIO_MMIO_DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        let wanted = offered & driver_features;
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, high_half(wanted));
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(t, VIRTIO_MMIO_DRIVER_FEATURES, low_half(wanted));
        add_status(t, FEATURES_OK);
        read32(t, VIRTIO_MMIO_STATUS) & FEATURES_OK != 0
    }

    /// The split-ring layout Linux would allocate for queue `index` at `base`.
    fn ring_layout(index: u16, size: u16, base: u64) -> QueueConfig {
        let desc = base;
        let driver = desc + 16 * u64::from(size);
        let device = (driver + 6 + 2 * u64::from(size) + 3) & !3;
        QueueConfig {
            index,
            size,
            ready: true,
            desc,
            driver,
            device,
        }
    }

    /// Linux vm_setup_vq for a version 2 device.
    fn linux_setup_queue(t: &mut Transport, layout: &QueueConfig) {
        write32(t, VIRTIO_MMIO_QUEUE_SEL, u32::from(layout.index));
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 0);
        let max = read32(t, VIRTIO_MMIO_QUEUE_NUM_MAX);
        assert!(max >= u32::from(layout.size));
        write32(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(layout.size));
        write32(t, VIRTIO_MMIO_QUEUE_DESC_LOW, low_half(layout.desc));
        write32(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, high_half(layout.desc));
        write32(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, low_half(layout.driver));
        write32(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, high_half(layout.driver));
        write32(t, VIRTIO_MMIO_QUEUE_USED_LOW, low_half(layout.device));
        write32(t, VIRTIO_MMIO_QUEUE_USED_HIGH, high_half(layout.device));
        write32(t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read32(t, VIRTIO_MMIO_QUEUE_READY), 1);
    }

    /// Full Linux bring-up of both queues; returns the layouts it programmed.
    fn linux_init(t: &mut Transport) -> Vec<QueueConfig> {
        assert!(linux_negotiate(t, u64::MAX));
        let layouts = vec![
            ring_layout(0, 128, RAM_BASE),
            ring_layout(1, QUEUE_MAX, RAM_BASE + 0x10000),
        ];
        for layout in &layouts {
            linux_setup_queue(t, layout);
        }
        assert_eq!(add_status(t, DRIVER_OK), WriteEffect::default());
        layouts
    }

    fn running_transport() -> Transport {
        let mut t = transport();
        linux_init(&mut t);
        t
    }

    #[test]
    fn linux_probe_sequence_activates_once_with_the_programmed_queues() {
        let mut t = transport();
        let layouts = linux_init(&mut t);
        assert_eq!(
            t.backend().calls,
            vec![Call::Activate {
                features: GUEST_VISIBLE,
                queues: layouts
            }]
        );
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert!(t.is_activated());
        assert_eq!(t.acked_features(), GUEST_VISIBLE);
    }

    #[test]
    fn queues_left_untouched_are_passed_as_not_ready() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        let layout = ring_layout(0, 64, RAM_BASE);
        linux_setup_queue(&mut t, &layout);
        add_status(&mut t, DRIVER_OK);
        let idle = QueueConfig {
            index: 1,
            size: QUEUE_MAX,
            ..QueueConfig::default()
        };
        assert_eq!(
            t.backend().activations(),
            vec![&Call::Activate {
                features: GUEST_VISIBLE,
                queues: vec![layout, idle]
            }]
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert!(t.backend().notifies().is_empty());
    }

    #[test]
    fn device_features_hide_protocol_features_and_ring_reset() {
        let mut t = transport();
        let mut offered = 0;
        for select in 0..2 {
            write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, select);
            offered |= u64::from(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES)) << (32 * select);
        }
        assert_eq!(offered, GUEST_VISIBLE);
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
    }

    #[test]
    fn config_reads_of_every_width_are_masked() {
        let mut t = running_transport();
        // Config bytes are 0xa0, 0xa1, ...
        assert_eq!(t.read(0x100, 1), 0xa0);
        assert_eq!(t.read(0x103, 1), 0xa3);
        assert_eq!(t.read(0x102, 2), 0xa3a2);
        assert_eq!(t.read(0x104, 4), 0xa7a6_a5a4);
        assert_eq!(t.read(0x108, 8), 0xafae_adac_abaa_a9a8);
        // Unaligned config access is served, not refused.
        assert_eq!(t.read(0x101, 4), 0xa4a3_a2a1);
        assert_eq!(t.read(0x100, 3), 0);
        assert_eq!(t.read(0x100, 16), 0);
    }

    #[test]
    fn config_reads_beyond_config_len_read_zero() {
        let mut t = transport();
        let last = 0x100 + CONFIG_LEN as u64;
        // Straddling the end: the bytes inside are real, the rest read 0.
        assert_eq!(t.read(last - 2, 4), 0xb3b2);
        assert_eq!(t.read(last - 1, 8), 0xb3);
        assert_eq!(t.read(last, 1), 0);
        assert_eq!(t.read(last + 0x40, 8), 0);
        assert_eq!(t.read(u64::MAX - 7, 8), 0);
    }

    #[test]
    fn config_writes_reach_the_backend_clamped_to_config_len() {
        let mut t = transport();
        assert_eq!(t.write(0x104, 2, 0xdead_beef), WriteEffect::default());
        let last = 0x100 + CONFIG_LEN as u64;
        t.write(last - 1, 4, 0x1122_3344);
        t.write(last, 4, 0x5566_7788);
        t.write(0x100, 3, 0x99);
        assert_eq!(
            t.backend().calls,
            vec![
                Call::WriteConfig {
                    offset: 4,
                    data: vec![0xef, 0xbe]
                },
                Call::WriteConfig {
                    offset: CONFIG_LEN - 1,
                    data: vec![0x44]
                },
            ]
        );
        assert_eq!(t.read(0x104, 2), 0xbeef);
    }

    #[test]
    fn interrupt_status_read_then_ack_lowers_the_line() {
        let mut t = running_transport();
        assert!(t.signal_used_buffer());
        t.mark_line_asserted();
        assert!(t.line_asserted());
        let status = read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS);
        assert_eq!(status, VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, status),
            WriteEffect::default()
        );
        assert_eq!(t.interrupt_status(), 0);
        assert!(!t.line_asserted());
    }

    #[test]
    fn signals_coalesce_while_the_line_is_asserted() {
        let mut t = running_transport();
        assert!(t.signal_used_buffer());
        t.mark_line_asserted();
        assert!(!t.signal_used_buffer());
        assert!(!t.signal_config_change());
        assert_eq!(t.interrupt_status(), INTERRUPT_BITS);
        write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INTERRUPT_BITS);
        assert!(t.signal_used_buffer());
    }

    #[test]
    fn a_signal_whose_injection_failed_asks_again() {
        let mut t = running_transport();
        assert!(t.signal_used_buffer());
        // The caller could not inject, so it did not mark the line.
        assert!(t.signal_used_buffer());
    }

    #[test]
    fn ack_leaving_bits_pending_asks_for_another_injection() {
        let mut t = running_transport();
        assert!(t.signal_used_buffer());
        t.mark_line_asserted();
        let seen = read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS);
        // A config change lands between the driver's read and its ACK.
        assert!(!t.signal_config_change());
        let effect = write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, seen);
        assert!(effect.inject_interrupt);
        assert!(!t.line_asserted());
        assert_eq!(t.interrupt_status(), VIRTIO_MMIO_INT_CONFIG);
        t.mark_line_asserted();
        // An ACK that clears nothing keeps the pending injection as it is.
        assert_eq!(
            write32(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 0),
            WriteEffect::default()
        );
        assert!(t.line_asserted());
    }

    #[test]
    fn no_interrupt_before_driver_ok() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        assert!(!t.signal_used_buffer());
        assert!(!t.signal_config_change());
        assert_eq!(t.interrupt_status(), 0);
        // The generation still moves, so a later config read is consistent.
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        t.mark_line_asserted();
        assert!(!t.line_asserted());
    }

    #[test]
    fn reset_stops_the_backend_clears_state_and_reinit_works() {
        let mut t = running_transport();
        assert!(t.signal_config_change());
        t.mark_line_asserted();
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(
            write32(&mut t, VIRTIO_MMIO_STATUS, 0),
            WriteEffect::default()
        );
        assert_eq!(t.backend().resets(), 1);
        assert_eq!(t.status(), 0);
        assert_eq!(t.interrupt_status(), 0);
        assert!(!t.line_asserted());
        assert!(!t.is_activated());
        assert_eq!(t.acked_features(), 0);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_QUEUE_READY),
            0,
            "queue 0 selected, not ready"
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.backend().notifies().is_empty());

        let layouts = linux_init(&mut t);
        let activations = t.backend().activations();
        assert_eq!(activations.len(), 2);
        assert_eq!(
            activations[1],
            &Call::Activate {
                features: GUEST_VISIBLE,
                queues: layouts
            }
        );
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(t.backend().notifies(), vec![1]);
    }

    #[test]
    fn reset_before_negotiation_leaves_the_backend_alone() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        add_status(&mut t, ACKNOWLEDGE);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(t.backend().calls.is_empty());
    }

    #[test]
    fn reset_after_feature_negotiation_resets_the_backend() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.backend().calls, vec![Call::Reset]);
    }

    #[test]
    fn failed_activation_sets_needs_reset_and_raises_a_config_interrupt() {
        let mut backend = MockBackend::new();
        backend.refuse_activation = true;
        let mut t = MmioTransport::new(backend);
        assert!(linux_negotiate(&mut t, u64::MAX));
        linux_setup_queue(&mut t, &ring_layout(0, 128, RAM_BASE));
        let effect = add_status(&mut t, DRIVER_OK);
        assert!(effect.inject_interrupt);
        assert_eq!(t.backend().activations().len(), 1);
        assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_STATUS) & NEEDS_RESET,
            NEEDS_RESET
        );
        assert_eq!(
            read32(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert!(!t.is_activated());
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.backend().notifies().is_empty());
        // Reset recovers: the backend is told, NEEDS_RESET is gone.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.backend().resets(), 1);
        assert_eq!(t.status(), 0);
    }

    /// Programs queue 0 with `size` written to QueueNum and reports the DRIVER_OK outcome.
    fn driver_ok_with_queue_num(size: u32) -> Transport {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        let layout = ring_layout(0, 16, RAM_BASE);
        linux_setup_queue(&mut t, &layout);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, size);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        add_status(&mut t, DRIVER_OK);
        t
    }

    #[test]
    fn invalid_queue_num_refuses_activation() {
        for size in [0, 3, 100, u32::from(QUEUE_MAX) * 2, 0x1_0000, u32::MAX] {
            let t = driver_ok_with_queue_num(size);
            assert!(
                t.backend().activations().is_empty(),
                "size {size} activated"
            );
            assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET, "size {size}");
            assert_eq!(t.interrupt_status(), VIRTIO_MMIO_INT_CONFIG, "size {size}");
        }
        let t = driver_ok_with_queue_num(u32::from(QUEUE_MAX));
        assert_eq!(t.backend().activations().len(), 1);
        assert_eq!(t.status() & NEEDS_RESET, 0);
    }

    #[test]
    fn a_later_valid_queue_num_replaces_a_rejected_one() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 7);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        add_status(&mut t, DRIVER_OK);
        assert_eq!(t.backend().activations().len(), 1);
    }

    #[test]
    fn a_rejected_size_on_an_unused_queue_still_refuses_activation() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        linux_setup_queue(&mut t, &ring_layout(0, 64, RAM_BASE));
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 0);
        add_status(&mut t, DRIVER_OK);
        assert!(t.backend().activations().is_empty());
        assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
    }

    #[test]
    fn misaligned_rings_refuse_activation() {
        let aligned = ring_layout(0, 64, RAM_BASE);
        let misaligned = [
            QueueConfig {
                desc: aligned.desc + 8,
                ..aligned
            },
            QueueConfig {
                driver: aligned.driver + 1,
                ..aligned
            },
            QueueConfig {
                device: aligned.device + 2,
                ..aligned
            },
        ];
        for layout in misaligned {
            let mut t = transport();
            assert!(linux_negotiate(&mut t, u64::MAX));
            linux_setup_queue(&mut t, &layout);
            assert!(add_status(&mut t, DRIVER_OK).inject_interrupt);
            assert!(t.backend().activations().is_empty(), "{layout:?}");
            assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
        }
    }

    #[test]
    fn out_of_range_queue_sel_reads_zero_and_ignores_writes() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        for select in [2, 3, 0xffff, 0x1_0000, u32::MAX] {
            write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, select);
            assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
            write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
            write32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
            write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
            assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        }
        // None of it touched a real queue, so activation goes through with nothing ready.
        add_status(&mut t, DRIVER_OK);
        let activations = t.backend().activations();
        let [Call::Activate { queues, .. }] = activations.as_slice() else {
            panic!("expected one activation, got {activations:?}");
        };
        assert!(queues.iter().all(|queue| !queue.ready && queue.desc == 0));
    }

    #[test]
    fn a_ready_queue_layout_is_frozen() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        let layout = ring_layout(0, 64, RAM_BASE);
        linux_setup_queue(&mut t, &layout);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
        write32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x8);
        write32(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x77);
        write32(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x2);
        add_status(&mut t, DRIVER_OK);
        let activations = t.backend().activations();
        let [Call::Activate { queues, .. }] = activations.as_slice() else {
            panic!("expected one activation, got {activations:?}");
        };
        assert_eq!(queues[0], layout);
    }

    #[test]
    fn register_accesses_of_other_widths_are_ignored() {
        let mut t = transport();
        for size in [1, 2, 8, 0, 3] {
            assert_eq!(
                t.read(offset(VIRTIO_MMIO_MAGIC_VALUE), size),
                0,
                "{size}-byte read"
            );
            assert_eq!(t.read(offset(VIRTIO_MMIO_VERSION), size), 0);
            t.write(offset(VIRTIO_MMIO_STATUS), size, u64::from(ACKNOWLEDGE));
            assert_eq!(t.status(), 0, "{size}-byte status write took effect");
        }
        assert!(t.backend().calls.is_empty());
    }

    #[test]
    fn unaligned_register_offsets_are_ignored() {
        let mut t = transport();
        for offset in [0x1, 0x2, 0x3, 0x71, 0x72, 0xfd] {
            assert_eq!(t.read(offset, 4), 0, "read at {offset:#x}");
            t.write(offset, 4, 0xffff_ffff);
        }
        assert_eq!(t.status(), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
    }

    #[test]
    fn unknown_and_legacy_registers_read_zero_and_ignore_writes() {
        let mut t = transport();
        let unknown = [
            0x018, 0x01c, 0x02c, 0x048, 0x054, 0x068, 0x074, 0x0a8, 0x0c4, 0x0f8,
        ];
        let legacy = [
            VIRTIO_MMIO_GUEST_PAGE_SIZE,
            VIRTIO_MMIO_QUEUE_ALIGN,
            VIRTIO_MMIO_QUEUE_PFN,
        ];
        for register in unknown.into_iter().chain(legacy) {
            assert_eq!(read32(&mut t, register), 0, "register {register:#x}");
            assert_eq!(write32(&mut t, register, 0x1000), WriteEffect::default());
            assert_eq!(
                read32(&mut t, register),
                0,
                "register {register:#x} after write"
            );
        }
        assert!(t.backend().calls.is_empty());
    }

    #[test]
    fn read_only_registers_ignore_writes() {
        let mut t = running_transport();
        assert!(t.signal_used_buffer());
        let read_only = [
            VIRTIO_MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES,
            VIRTIO_MMIO_QUEUE_NUM_MAX,
            VIRTIO_MMIO_INTERRUPT_STATUS,
            VIRTIO_MMIO_SHM_LEN_LOW,
            VIRTIO_MMIO_SHM_BASE_HIGH,
            VIRTIO_MMIO_CONFIG_GENERATION,
        ];
        let before: Vec<u32> = read_only.iter().map(|&r| read32(&mut t, r)).collect();
        for register in read_only {
            write32(&mut t, register, 0x5a5a_5a5a);
        }
        let after: Vec<u32> = read_only.iter().map(|&r| read32(&mut t, r)).collect();
        assert_eq!(before, after);
        assert_eq!(before[0], MAGIC_VALUE);
    }

    #[test]
    fn write_only_registers_read_zero() {
        let mut t = transport();
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        for register in [
            VIRTIO_MMIO_QUEUE_SEL,
            VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            VIRTIO_MMIO_DRIVER_FEATURES,
            VIRTIO_MMIO_QUEUE_NUM,
            VIRTIO_MMIO_QUEUE_NOTIFY,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_SHM_SEL,
        ] {
            assert_eq!(read32(&mut t, register), 0, "register {register:#x}");
        }
    }

    #[test]
    fn shared_memory_registers_report_no_region() {
        let mut t = transport();
        for select in [0, 1, 0xff] {
            write32(&mut t, VIRTIO_MMIO_SHM_SEL, select);
            let len = (u64::from(read32(&mut t, VIRTIO_MMIO_SHM_LEN_HIGH)) << 32)
                | u64::from(read32(&mut t, VIRTIO_MMIO_SHM_LEN_LOW));
            let base = (u64::from(read32(&mut t, VIRTIO_MMIO_SHM_BASE_HIGH)) << 32)
                | u64::from(read32(&mut t, VIRTIO_MMIO_SHM_BASE_LOW));
            assert_eq!(
                len,
                u64::MAX,
                "Linux treats an all-ones length as no region"
            );
            assert_eq!(base, u64::MAX);
        }
    }

    #[test]
    fn queue_reset_is_ignored_without_ring_reset() {
        let mut t = running_transport();
        assert_eq!(t.acked_features() & RING_RESET, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_RESET, 1);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_RESET), 0);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.backend().notifies(), vec![0]);
    }

    #[test]
    fn notify_reaches_only_started_queues() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        linux_setup_queue(&mut t, &ring_layout(0, 64, RAM_BASE));
        add_status(&mut t, DRIVER_OK);
        for queue in [1, 2, 0xffff, 0x1_0000, u32::MAX] {
            write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, queue);
        }
        // Queue 1 made ready after DRIVER_OK was never started by the backend.
        write32(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.backend().notifies(), vec![0]);
    }

    #[test]
    fn notify_before_driver_ok_is_not_forwarded() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        linux_setup_queue(&mut t, &ring_layout(0, 64, RAM_BASE));
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.backend().calls.is_empty());
        add_status(&mut t, DRIVER_OK);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(t.backend().notifies(), vec![0]);
    }

    #[test]
    fn notify_after_failure_is_not_forwarded() {
        let mut t = running_transport();
        assert!(t.fail());
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert!(t.backend().notifies().is_empty());
    }

    #[test]
    fn notification_data_carries_the_queue_in_the_low_half() {
        let mut backend = MockBackend::new();
        backend.features |= 1 << VIRTIO_F_NOTIFICATION_DATA;
        let mut t = MmioTransport::new(backend);
        linux_init(&mut t);
        assert_ne!(t.acked_features() & (1 << VIRTIO_F_NOTIFICATION_DATA), 0);
        write32(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0x8005_0001);
        assert_eq!(t.backend().notifies(), vec![1]);
    }

    #[test]
    fn driver_ok_without_features_ok_is_refused() {
        let mut t = transport();
        add_status(&mut t, ACKNOWLEDGE);
        add_status(&mut t, DRIVER);
        add_status(&mut t, DRIVER_OK);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER);
        // Valid bits in the same write are kept; DRIVER_OK is not.
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        write32(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER);
        assert!(t.backend().activations().is_empty());
    }

    #[test]
    fn status_bits_must_come_in_order_and_never_go_away() {
        let mut t = transport();
        add_status(&mut t, DRIVER);
        assert_eq!(t.status(), 0, "DRIVER before ACKNOWLEDGE");
        add_status(&mut t, ACKNOWLEDGE);
        add_status(&mut t, DRIVER);
        write32(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER, "clearing DRIVER");
        write32(&mut t, VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | 0x10);
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER, "unknown bit");
        write32(
            &mut t,
            VIRTIO_MMIO_STATUS,
            ACKNOWLEDGE | DRIVER | NEEDS_RESET,
        );
        assert_eq!(
            t.status(),
            ACKNOWLEDGE | DRIVER,
            "NEEDS_RESET is device-set"
        );
    }

    #[test]
    fn failed_is_accepted_at_any_time_and_blocks_progress() {
        let mut t = transport();
        add_status(&mut t, FAILED);
        assert_eq!(t.status(), FAILED);
        add_status(&mut t, ACKNOWLEDGE);
        assert_eq!(t.status(), FAILED);

        let mut t = running_transport();
        add_status(&mut t, FAILED);
        assert_eq!(t.status(), INIT_BITS | FAILED);
        write32(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.backend().resets(), 1);
    }

    #[test]
    fn features_not_offered_are_not_acked() {
        let mut t = transport();
        add_status(&mut t, ACKNOWLEDGE);
        add_status(&mut t, DRIVER);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        // Selectors past 1 are ignored.
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, u32::MAX);
        assert_eq!(t.acked_features(), GUEST_VISIBLE);
        assert_eq!(t.acked_features() & (PROTOCOL_FEATURES | RING_RESET), 0);
        // A later write replaces its half rather than accumulating.
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, low_half(BLK_FLUSH));
        assert_eq!(t.acked_features(), VERSION_1 | BLK_FLUSH);
    }

    #[test]
    fn driver_features_are_frozen_after_features_ok() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, VERSION_1));
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write32(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, low_half(EVENT_IDX));
        assert_eq!(t.acked_features(), VERSION_1);
    }

    #[test]
    fn features_ok_without_version_1_fails_read_back() {
        let mut t = transport();
        assert!(!linux_negotiate(&mut t, EVENT_IDX | BLK_FLUSH));
        assert_eq!(t.status(), ACKNOWLEDGE | DRIVER);
        add_status(&mut t, DRIVER_OK);
        assert!(t.backend().activations().is_empty());
    }

    #[test]
    fn fail_needs_driver_ok_and_signals_once() {
        let mut t = transport();
        assert!(linux_negotiate(&mut t, u64::MAX));
        assert!(!t.fail());
        assert_eq!(t.status() & NEEDS_RESET, 0);

        let mut t = running_transport();
        assert!(t.fail());
        assert_eq!(t.status() & NEEDS_RESET, NEEDS_RESET);
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        assert!(!t.fail());
        assert_eq!(read32(&mut t, VIRTIO_MMIO_CONFIG_GENERATION), 1);
        // The driver may echo NEEDS_RESET back while adding nothing.
        let status = read32(&mut t, VIRTIO_MMIO_STATUS);
        write32(&mut t, VIRTIO_MMIO_STATUS, status);
        assert_eq!(t.status(), status);
    }

    #[test]
    fn backend_errors_display_their_whole_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::BrokenPipe, "socket closed");
        let failed = BackendError::from_error(io);
        assert_eq!(
            ErrorChain(&failed).to_string(),
            "Backend request failed: socket closed"
        );
        let refused = BackendError::new("no CONFIG protocol feature");
        assert_eq!(
            ErrorChain(&refused).to_string(),
            "no CONFIG protocol feature"
        );
    }

    /// xorshift64: deterministic, no extra crate.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, bound: u64) -> u64 {
            self.next() % bound
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len() as u64) as usize]
        }
    }

    fn check_invariants(t: &Transport, step: usize) {
        let status = t.status();
        assert_eq!(status & !KNOWN_STATUS_BITS, 0, "step {step}");
        let init = status & INIT_BITS;
        assert!(
            STATUS_TRANSITIONS
                .iter()
                .any(|&(bit, before)| init == before || init == before | bit),
            "step {step}: status {status:#x} is not a prefix of the init sequence"
        );
        assert_eq!(t.interrupt_status() & !INTERRUPT_BITS, 0, "step {step}");
        if t.interrupt_status() != 0 {
            assert_ne!(
                status & DRIVER_OK,
                0,
                "step {step}: interrupt before DRIVER_OK"
            );
        }
        if t.line_asserted() {
            assert_ne!(
                t.interrupt_status(),
                0,
                "step {step}: line up with nothing pending"
            );
        }
        assert_eq!(t.acked_features() & !GUEST_VISIBLE, 0, "step {step}");
        if t.is_activated() {
            assert_ne!(status & DRIVER_OK, 0, "step {step}");
        }
    }

    /// A well-formed bring-up through plain writes, so the random walk also spends time in
    /// the activated state.
    fn driver_burst(t: &mut Transport, rng: &mut Rng) {
        let mut write = |register: u32, value: u64| t.write(offset(register), 4, value);
        write(VIRTIO_MMIO_STATUS, 0);
        for status in [1, 3] {
            write(VIRTIO_MMIO_STATUS, status);
        }
        write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(VIRTIO_MMIO_DRIVER_FEATURES, 1 | rng.below(4));
        write(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        write(VIRTIO_MMIO_DRIVER_FEATURES, rng.next() & 0xffff_ffff);
        write(VIRTIO_MMIO_STATUS, 11);
        for queue in 0..2 {
            write(VIRTIO_MMIO_QUEUE_SEL, queue);
            write(VIRTIO_MMIO_QUEUE_NUM, 1 << rng.below(9));
            write(VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000 * queue);
            write(VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1000 * queue + 0x800);
            write(VIRTIO_MMIO_QUEUE_USED_LOW, 0x1000 * queue + 0xc00);
            write(VIRTIO_MMIO_QUEUE_READY, rng.below(2));
        }
        write(VIRTIO_MMIO_STATUS, 15);
    }

    #[test]
    fn random_access_sequences_never_panic_and_reads_are_masked() {
        const REGISTERS: [u32; 33] = [
            VIRTIO_MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID,
            VIRTIO_MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES,
            VIRTIO_MMIO_DEVICE_FEATURES_SEL,
            VIRTIO_MMIO_DRIVER_FEATURES,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL,
            VIRTIO_MMIO_GUEST_PAGE_SIZE,
            VIRTIO_MMIO_QUEUE_SEL,
            VIRTIO_MMIO_QUEUE_NUM_MAX,
            VIRTIO_MMIO_QUEUE_NUM,
            VIRTIO_MMIO_QUEUE_ALIGN,
            VIRTIO_MMIO_QUEUE_PFN,
            VIRTIO_MMIO_QUEUE_READY,
            VIRTIO_MMIO_QUEUE_NOTIFY,
            VIRTIO_MMIO_INTERRUPT_STATUS,
            VIRTIO_MMIO_INTERRUPT_ACK,
            VIRTIO_MMIO_STATUS,
            VIRTIO_MMIO_QUEUE_DESC_LOW,
            VIRTIO_MMIO_QUEUE_DESC_HIGH,
            VIRTIO_MMIO_QUEUE_AVAIL_LOW,
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH,
            VIRTIO_MMIO_QUEUE_USED_LOW,
            VIRTIO_MMIO_QUEUE_USED_HIGH,
            VIRTIO_MMIO_SHM_SEL,
            VIRTIO_MMIO_SHM_LEN_LOW,
            VIRTIO_MMIO_SHM_LEN_HIGH,
            VIRTIO_MMIO_SHM_BASE_LOW,
            VIRTIO_MMIO_SHM_BASE_HIGH,
            VIRTIO_MMIO_QUEUE_RESET,
            VIRTIO_MMIO_CONFIG_GENERATION,
            VIRTIO_MMIO_STATUS,
        ];
        const WIDTHS: [u8; 10] = [4, 4, 4, 4, 1, 2, 8, 0, 3, 16];
        /// Values that move the state machine: status steps, selectors, sizes, aligned addresses.
        const USEFUL: [u64; 14] = [
            0, 1, 2, 3, 7, 11, 15, 0x80, 8, 64, 256, 0x1000, 0x4000, 0x40,
        ];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut t = transport();
        for step in 0..100_000 {
            let at = match rng.below(16) {
                0..=11 => offset(rng.pick(&REGISTERS)),
                12 => rng.below(0x100),
                13 => 0x100 + rng.below(2 * CONFIG_LEN as u64),
                14 => rng.below(0x1000),
                _ => rng.next(),
            };
            let size = rng.pick(&WIDTHS);
            let value = match rng.below(4) {
                0 | 1 => rng.pick(&USEFUL),
                2 => 1 << rng.below(64),
                _ => rng.next(),
            };
            match rng.below(20) {
                0..=7 => {
                    let read = t.read(at, size);
                    assert_eq!(
                        read & !width_mask(size),
                        0,
                        "step {step}: {size}-byte read at {at:#x} gave {read:#x}"
                    );
                }
                8..=16 => {
                    let effect = t.write(at, size, value);
                    if effect.inject_interrupt && rng.below(4) != 0 {
                        t.mark_line_asserted();
                    }
                }
                17 => {
                    if t.signal_used_buffer() && rng.below(4) != 0 {
                        t.mark_line_asserted();
                    }
                }
                18 => {
                    if t.signal_config_change() {
                        t.mark_line_asserted();
                    }
                }
                _ => match rng.below(100) {
                    0..=1 => {
                        if t.fail() {
                            t.mark_line_asserted();
                        }
                    }
                    2..=9 => driver_burst(&mut t, &mut rng),
                    _ => {
                        let queue = rng.below(3);
                        t.write(offset(VIRTIO_MMIO_QUEUE_NOTIFY), 4, queue);
                    }
                },
            }
            check_invariants(&t, step);
        }
        // The walk must reach deep states, or it proves little.
        assert!(!t.backend().activations().is_empty(), "never activated");
        assert!(!t.backend().notifies().is_empty(), "never notified");
        assert!(t.backend().resets() > 0, "never reset");
    }
}
