//! The virtio-mmio (version 2) transport, driven the way Linux's `virtio_mmio.c` and the virtio
//! core drive it.

use std::fmt;
use std::time::{Duration, Instant};

use super::virtqueue::{QueueMemory, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC};
use super::{DriverError, MmioBus, Result};

/// "virt" in little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;

/// Register offsets inside the window.
pub mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// InterruptStatus bits.
pub const INTERRUPT_VRING: u32 = 1;
pub const INTERRUPT_CONFIG: u32 = 2;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// Feature bits 24..=41 belong to the transport and the rings. This driver implements only
/// the ones below; the others (packed ring, notification data, queue reset, ...) would change
/// the driver's obligations, so it never accepts them.
const TRANSPORT_FEATURES: u64 = ((1 << 42) - 1) & !((1 << 24) - 1);
const SUPPORTED_TRANSPORT_FEATURES: u64 =
    VIRTIO_F_INDIRECT_DESC | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM;

/// How long to wait for the device to show status 0 after a reset.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);
/// How often to re-read a multi-access config field whose generation changed underneath.
const CONFIG_RETRIES: usize = 64;

/// What `probe` found in the identification registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    pub version: u32,
    pub device_id: u32,
    pub vendor_id: u32,
}

/// One virtio-mmio device window.
pub struct VirtioMmioDevice<'a, M: MmioBus> {
    bus: &'a M,
    base: u64,
}

impl<M: MmioBus> fmt::Debug for VirtioMmioDevice<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VirtioMmioDevice")
            .field("base", &format_args!("{:#x}", self.base))
            .finish_non_exhaustive()
    }
}

impl<'a, M: MmioBus> VirtioMmioDevice<'a, M> {
    /// A device whose register window starts at guest-physical `base`. Issues no access.
    pub fn new(bus: &'a M, base: u64) -> Self {
        Self { bus, base }
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    /// Raw access at `offset` inside the window, unmasked, for hostile-input tests.
    pub fn read_reg(&self, offset: u64, size: u8) -> u64 {
        self.bus.read(self.base.wrapping_add(offset), size)
    }

    /// Raw store at `offset` inside the window, for hostile-input tests.
    pub fn write_reg(&self, offset: u64, size: u8, value: u64) {
        self.bus.write(self.base.wrapping_add(offset), size, value);
    }

    fn read32(&self, offset: u64) -> u32 {
        self.read_reg(offset, 4) as u32
    }

    fn write32(&self, offset: u64, value: u32) {
        self.write_reg(offset, 4, u64::from(value));
    }

    /// Reads the identification registers, as `virtio_mmio_probe` does.
    pub fn probe(&self) -> Result<DeviceInfo> {
        let magic = self.read32(reg::MAGIC_VALUE);
        if magic != MAGIC_VALUE {
            return Err(DriverError::BadMagic(magic));
        }
        let version = self.read32(reg::VERSION);
        if version != 2 {
            return Err(DriverError::UnsupportedVersion(version));
        }
        let device_id = self.read32(reg::DEVICE_ID);
        if device_id == 0 {
            return Err(DriverError::NoDevice);
        }
        let vendor_id = self.read32(reg::VENDOR_ID);
        Ok(DeviceInfo {
            version,
            device_id,
            vendor_id,
        })
    }

    pub fn status(&self) -> u32 {
        self.read32(reg::STATUS)
    }

    /// Writes Status as is (0 resets the device).
    pub fn set_status(&self, value: u32) {
        self.write32(reg::STATUS, value);
    }

    /// Read-modify-write of Status, as `virtio_add_status` does.
    pub fn add_status(&self, bits: u32) {
        let current = self.status();
        self.set_status(current | bits);
    }

    /// Writes 0 to Status and waits until the device reads back 0 (virtio 1.x §4.2.2.1).
    pub fn reset(&self) -> Result<()> {
        self.set_status(0);
        let deadline = Instant::now() + RESET_TIMEOUT;
        let mut polls = 0u32;
        loop {
            let current = self.status();
            if current == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(DriverError::ResetTimeout(current));
            }
            // The device gives no event for reset completion: poll, backing off like
            // Linux's msleep(1) once a few quick re-reads did not suffice.
            polls += 1;
            if polls < 16 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Marks the driver as given up on the device.
    pub fn fail(&self) {
        self.add_status(status::FAILED);
    }

    /// The 64 device feature bits (high half first, as Linux reads them).
    pub fn device_features(&self) -> u64 {
        self.write32(reg::DEVICE_FEATURES_SEL, 1);
        let high = self.read32(reg::DEVICE_FEATURES);
        self.write32(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read32(reg::DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Writes the 64 driver feature bits (high half first, as Linux writes them).
    pub fn write_driver_features(&self, features: u64) {
        self.write32(reg::DRIVER_FEATURES_SEL, 1);
        self.write32(reg::DRIVER_FEATURES, (features >> 32) as u32);
        self.write32(reg::DRIVER_FEATURES_SEL, 0);
        self.write32(reg::DRIVER_FEATURES, features as u32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation and FEATURES_OK. Returns the negotiated
    /// features: the device's offer AND `wanted_features`, plus VERSION_1 (which a version 2
    /// device must offer, as Linux's `vm_finalize_features` checks), minus transport features
    /// this driver does not implement. The caller then sets up queues and calls
    /// [`Self::driver_ok`]. On failure the FAILED status bit is set, as the virtio core does.
    pub fn init(&self, wanted_features: u64) -> Result<u64> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let offered = self.device_features();
        if offered & VIRTIO_F_VERSION_1 == 0 {
            self.fail();
            return Err(DriverError::MissingVersion1);
        }
        let acceptable = (wanted_features & !TRANSPORT_FEATURES)
            | (wanted_features & SUPPORTED_TRANSPORT_FEATURES)
            | VIRTIO_F_VERSION_1;
        let negotiated = offered & acceptable;
        self.write_driver_features(negotiated);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            self.fail();
            return Err(DriverError::FeaturesRejected);
        }
        Ok(negotiated)
    }

    /// Tells the device the driver is ready (after the queues are set up).
    pub fn driver_ok(&self) {
        self.add_status(status::DRIVER_OK);
    }

    /// Selects `index` and reads QueueNumMax (0 means the queue does not exist).
    pub fn queue_num_max(&self, index: u16) -> u32 {
        self.write32(reg::QUEUE_SEL, u32::from(index));
        self.read32(reg::QUEUE_NUM_MAX)
    }

    /// Programs queue `index` of `size` entries at `memory` and marks it ready, in the order of
    /// Linux's `vm_setup_vq`: QueueSel, QueueReady must be 0, QueueNumMax, QueueNum, the three
    /// addresses (low then high), QueueReady=1.
    pub fn setup_queue(&self, index: u16, size: u16, memory: &QueueMemory) -> Result<()> {
        self.write32(reg::QUEUE_SEL, u32::from(index));
        if self.read32(reg::QUEUE_READY) != 0 {
            return Err(DriverError::QueueAlreadyReady(index));
        }
        let max = self.read32(reg::QUEUE_NUM_MAX);
        if max == 0 {
            return Err(DriverError::QueueUnavailable(index));
        }
        if u32::from(size) > max {
            return Err(DriverError::QueueTooLarge { index, size, max });
        }
        self.write32(reg::QUEUE_NUM, u32::from(size));
        self.write_address(reg::QUEUE_DESC_LOW, memory.desc);
        self.write_address(reg::QUEUE_DRIVER_LOW, memory.driver);
        self.write_address(reg::QUEUE_DEVICE_LOW, memory.device);
        self.write32(reg::QUEUE_READY, 1);
        Ok(())
    }

    fn write_address(&self, low_offset: u64, gpa: u64) {
        self.write32(low_offset, gpa as u32);
        self.write32(low_offset + 4, (gpa >> 32) as u32);
    }

    /// Kicks queue `queue` (QueueNotify).
    pub fn notify(&self, queue: u16) {
        self.write32(reg::QUEUE_NOTIFY, u32::from(queue));
    }

    pub fn interrupt_status(&self) -> u32 {
        self.read32(reg::INTERRUPT_STATUS)
    }

    pub fn ack_interrupt(&self, bits: u32) {
        self.write32(reg::INTERRUPT_ACK, bits);
    }

    pub fn config_generation(&self) -> u32 {
        self.read32(reg::CONFIG_GENERATION)
    }

    fn config_addr(offset: u64) -> u64 {
        reg::CONFIG + offset
    }

    /// One-access config reads: no generation check, as in Linux's `virtio_cread`.
    pub fn read_config_u8(&self, offset: u64) -> u8 {
        self.read_reg(Self::config_addr(offset), 1) as u8
    }

    pub fn read_config_u16(&self, offset: u64) -> u16 {
        self.read_reg(Self::config_addr(offset), 2) as u16
    }

    pub fn read_config_u32(&self, offset: u64) -> u32 {
        self.read_reg(Self::config_addr(offset), 4) as u32
    }

    /// Two 4-byte accesses inside a ConfigGeneration retry loop.
    pub fn read_config_u64(&self, offset: u64) -> Result<u64> {
        self.with_stable_generation(|dev| {
            let low = dev.read_config_u32(offset);
            let high = dev.read_config_u32(offset + 4);
            (u64::from(high) << 32) | u64::from(low)
        })
    }

    /// Byte-wise reads of `buf.len()` config bytes inside a ConfigGeneration retry loop.
    pub fn read_config_bytes(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.with_stable_generation(|dev| {
            for (index, byte) in (0u64..).zip(buf.iter_mut()) {
                *byte = dev.read_config_u8(offset + index);
            }
        })
    }

    fn with_stable_generation<T>(&self, mut read: impl FnMut(&Self) -> T) -> Result<T> {
        for _ in 0..CONFIG_RETRIES {
            let before = self.config_generation();
            let value = read(self);
            if self.config_generation() == before {
                return Ok(value);
            }
        }
        Err(DriverError::ConfigUnstable)
    }

    /// Writes config bytes with the widest natural accesses for 1, 2, 4 and 8 bytes (8 as two
    /// 4-byte stores) and byte stores otherwise, as Linux's `vm_set` does.
    pub fn write_config(&self, offset: u64, data: &[u8]) {
        let addr = Self::config_addr(offset);
        match *data {
            [b0] => self.write_reg(addr, 1, u64::from(b0)),
            [b0, b1] => self.write_reg(addr, 2, u64::from(u16::from_le_bytes([b0, b1]))),
            [b0, b1, b2, b3] => {
                self.write_reg(addr, 4, u64::from(u32::from_le_bytes([b0, b1, b2, b3])));
            }
            [b0, b1, b2, b3, b4, b5, b6, b7] => {
                self.write_reg(addr, 4, u64::from(u32::from_le_bytes([b0, b1, b2, b3])));
                self.write_reg(addr + 4, 4, u64::from(u32::from_le_bytes([b4, b5, b6, b7])));
            }
            _ => {
                for (index, byte) in (0u64..).zip(data) {
                    self.write_reg(addr + index, 1, u64::from(*byte));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::blk::feature;
    use crate::driver::fake::{Access, FakeBlk, MMIO_BASE};
    use crate::driver::virtqueue::{GuestAllocator, SplitQueue};

    const RING_PACKED: u64 = 1 << 34;

    fn read(offset: u64) -> Access {
        Access::Read { offset, size: 4 }
    }

    fn write(offset: u64, value: u64) -> Access {
        Access::Write {
            offset,
            size: 4,
            value,
        }
    }

    #[test]
    fn probe_reads_identification_registers() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        let info = device.probe().unwrap();
        assert_eq!(
            info,
            DeviceInfo {
                version: 2,
                device_id: 2,
                vendor_id: 0x454b_4146
            }
        );
        assert_eq!(
            fake.take_accesses(),
            [
                read(reg::MAGIC_VALUE),
                read(reg::VERSION),
                read(reg::DEVICE_ID),
                read(reg::VENDOR_ID)
            ]
        );
    }

    #[test]
    fn probe_rejects_what_linux_rejects() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        // Config space reads as zeroes, so the magic is wrong there.
        let elsewhere = VirtioMmioDevice::new(&fake, MMIO_BASE + 0x1000);
        assert_eq!(elsewhere.probe(), Err(DriverError::BadMagic(0)));
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        fake.state().version = 1;
        assert_eq!(device.probe(), Err(DriverError::UnsupportedVersion(1)));
        fake.state().version = 2;
        fake.state().device_id = 0;
        assert_eq!(device.probe(), Err(DriverError::NoDevice));
    }

    #[test]
    fn init_follows_linux_order() {
        let offered = VIRTIO_F_VERSION_1
            | VIRTIO_F_INDIRECT_DESC
            | VIRTIO_F_EVENT_IDX
            | RING_PACKED
            | feature::FLUSH;
        let fake = FakeBlk::new(8, offered);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        let wanted = feature::FLUSH | feature::RO | VIRTIO_F_EVENT_IDX | RING_PACKED;
        let negotiated = device.init(wanted).unwrap();
        let expected = VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX | feature::FLUSH;
        assert_eq!(negotiated, expected, "packed ring is never accepted");
        assert_eq!(fake.state().acked, expected);
        assert_eq!(
            fake.take_accesses(),
            [
                // virtio_reset_device, then wait for status 0.
                write(reg::STATUS, 0),
                read(reg::STATUS),
                // virtio_add_status(ACKNOWLEDGE), virtio_add_status(DRIVER).
                read(reg::STATUS),
                write(reg::STATUS, 1),
                read(reg::STATUS),
                write(reg::STATUS, 3),
                // vm_get_features: high half first.
                write(reg::DEVICE_FEATURES_SEL, 1),
                read(reg::DEVICE_FEATURES),
                write(reg::DEVICE_FEATURES_SEL, 0),
                read(reg::DEVICE_FEATURES),
                // vm_finalize_features: high half first.
                write(reg::DRIVER_FEATURES_SEL, 1),
                write(reg::DRIVER_FEATURES, expected >> 32),
                write(reg::DRIVER_FEATURES_SEL, 0),
                write(reg::DRIVER_FEATURES, expected & 0xffff_ffff),
                // virtio_features_ok: set FEATURES_OK, read it back.
                read(reg::STATUS),
                write(reg::STATUS, 0xb),
                read(reg::STATUS),
            ]
        );
        device.driver_ok();
        assert_eq!(
            fake.take_accesses(),
            [read(reg::STATUS), write(reg::STATUS, 0xf)]
        );
    }

    #[test]
    fn refused_features_fail_the_device() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        fake.state().refuse_features = true;
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        assert_eq!(device.init(0), Err(DriverError::FeaturesRejected));
        assert_eq!(device.status() & status::FAILED, status::FAILED);
    }

    #[test]
    fn version_1_is_required() {
        let fake = FakeBlk::new(8, feature::FLUSH);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        assert_eq!(device.init(u64::MAX), Err(DriverError::MissingVersion1));
        assert_eq!(
            device.status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FAILED
        );
        assert_eq!(fake.state().acked, 0, "no features written");
    }

    #[test]
    fn setup_queue_follows_vm_setup_vq_order() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        let memory = QueueMemory {
            desc: 0x1_2345_6000,
            driver: 0x2_0000_1000,
            device: 0x3_0000_2000,
        };
        device.setup_queue(1, 64, &memory).unwrap();
        assert_eq!(
            fake.take_accesses(),
            [
                write(reg::QUEUE_SEL, 1),
                read(reg::QUEUE_READY),
                read(reg::QUEUE_NUM_MAX),
                write(reg::QUEUE_NUM, 64),
                write(reg::QUEUE_DESC_LOW, 0x2345_6000),
                write(reg::QUEUE_DESC_HIGH, 1),
                write(reg::QUEUE_DRIVER_LOW, 0x1000),
                write(reg::QUEUE_DRIVER_HIGH, 2),
                write(reg::QUEUE_DEVICE_LOW, 0x2000),
                write(reg::QUEUE_DEVICE_HIGH, 3),
                write(reg::QUEUE_READY, 1),
            ]
        );
        let queue = fake.state().queues[1];
        assert_eq!(
            (
                queue.desc,
                queue.driver,
                queue.device,
                queue.num,
                queue.ready
            ),
            (memory.desc, memory.driver, memory.device, 64, true)
        );
        assert_eq!(
            device.setup_queue(1, 64, &memory),
            Err(DriverError::QueueAlreadyReady(1))
        );
    }

    #[test]
    fn setup_queue_checks_the_maximum() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        let mut alloc = GuestAllocator::new(crate::driver::fake::RAM_BASE, 1 << 20);
        let queue = SplitQueue::new(&fake, &mut alloc, 512).unwrap();
        assert_eq!(
            device.setup_queue(0, 512, &queue.memory()),
            Err(DriverError::QueueTooLarge {
                index: 0,
                size: 512,
                max: 256
            })
        );
        assert_eq!(
            device.setup_queue(7, 8, &queue.memory()),
            Err(DriverError::QueueUnavailable(7))
        );
        assert_eq!(device.queue_num_max(0), 256);
        assert_eq!(device.queue_num_max(2), 0);
        assert!(!fake.state().queues[0].ready);
    }

    #[test]
    fn config_reads_use_natural_widths() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        fake.set_config_u32(0, 2);
        fake.set_config_u32(4, 1);
        fake.set_config_u32(12, 0x0403_0201);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        assert_eq!(device.read_config_u8(12), 0x01);
        assert_eq!(device.read_config_u16(13), 0x0302);
        assert_eq!(device.read_config_u32(12), 0x0403_0201);
        assert_eq!(
            fake.take_accesses(),
            [
                Access::Read {
                    offset: 0x10c,
                    size: 1
                },
                Access::Read {
                    offset: 0x10d,
                    size: 2
                },
                Access::Read {
                    offset: 0x10c,
                    size: 4
                },
            ]
        );
        assert_eq!(device.read_config_u64(0), Ok(0x1_0000_0002));
        assert_eq!(
            fake.take_accesses(),
            [
                read(reg::CONFIG_GENERATION),
                read(reg::CONFIG),
                read(reg::CONFIG + 4),
                read(reg::CONFIG_GENERATION),
            ]
        );
    }

    #[test]
    fn config_generation_change_retries_then_gives_up() {
        let fake = FakeBlk::new(42, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        // Four bumps: the first two attempts see a change, the third is stable.
        fake.state().generation_churn = 4;
        assert_eq!(device.read_config_u64(0), Ok(42));
        let generation_reads = fake
            .take_accesses()
            .iter()
            .filter(|access| **access == read(reg::CONFIG_GENERATION))
            .count();
        assert_eq!(generation_reads, 6);
        let mut bytes = [0u8; 8];
        fake.state().generation_churn = u32::MAX;
        assert_eq!(device.read_config_u64(0), Err(DriverError::ConfigUnstable));
        assert_eq!(
            device.read_config_bytes(0, &mut bytes),
            Err(DriverError::ConfigUnstable)
        );
        fake.state().generation_churn = 0;
        device.read_config_bytes(0, &mut bytes).unwrap();
        assert_eq!(u64::from_le_bytes(bytes), 42);
    }

    #[test]
    fn config_writes_use_natural_widths() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        device.write_config(0x20, &[0xaa]);
        device.write_config(0x22, &[1, 2]);
        device.write_config(0x24, &[1, 2, 3, 4]);
        device.write_config(0x28, &[1, 2, 3, 4, 5, 6, 7, 8]);
        device.write_config(0x30, &[9, 8, 7]);
        let written: Vec<_> = fake
            .take_accesses()
            .into_iter()
            .map(|access| match access {
                Access::Write {
                    offset,
                    size,
                    value,
                } => (offset - reg::CONFIG, size, value),
                Access::Read { .. } => panic!("config write read a register"),
            })
            .collect();
        assert_eq!(
            written,
            [
                (0x20, 1, 0xaa),
                (0x22, 2, 0x0201),
                (0x24, 4, 0x0403_0201),
                (0x28, 4, 0x0403_0201),
                (0x2c, 4, 0x0807_0605),
                (0x30, 1, 9),
                (0x31, 1, 8),
                (0x32, 1, 7),
            ]
        );
    }

    #[test]
    fn interrupt_ack_notify_and_reset_hit_their_registers() {
        let fake = FakeBlk::new(8, VIRTIO_F_VERSION_1);
        let device = VirtioMmioDevice::new(&fake, MMIO_BASE);
        fake.fail_device();
        assert_eq!(device.interrupt_status(), INTERRUPT_CONFIG);
        device.ack_interrupt(INTERRUPT_CONFIG);
        assert_eq!(device.interrupt_status(), 0);
        device.notify(3);
        assert_eq!(fake.state().notifies, 1);
        device.reset().unwrap();
        assert_eq!(device.status(), 0);
        assert_eq!(device.read_reg(reg::MAGIC_VALUE, 4), u64::from(MAGIC_VALUE));
        device.write_reg(reg::QUEUE_SEL, 4, 1);
        assert_eq!(fake.state().queue_sel, 1);
    }
}
