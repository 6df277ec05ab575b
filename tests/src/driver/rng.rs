//! A virtio-rng (entropy device) driver, modelled on Linux's `virtio-rng.c`: one request
//! queue of device-writable buffers that the device fills with random bytes.

use std::time::Duration;

use super::generic::{DeviceSpec, GenericDevice};
use super::mmio::VIRTIO_F_VERSION_1;
use super::virtqueue::{BufferSegment, GuestAllocator};
use super::{DriverError, GuestMemory, Interrupts, MmioBus, Result};

pub const VIRTIO_ID_RNG: u32 = 4;

const REQUEST_QUEUE: u16 = 0;
const QUEUE_SIZE: u16 = 64;

/// A virtio-rng device with a buffer for one request at a time.
#[derive(Debug)]
pub struct RngDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    dev: GenericDevice<'a, B, M, I>,
    mem: &'a M,
    buffer: u64,
    buffer_len: u32,
    timeout: Duration,
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> RngDriver<'a, B, M, I> {
    /// Initialises the device at `base`; requests ask for at most `buffer_len` bytes.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        buffer_len: u32,
        timeout: Duration,
    ) -> Result<Self> {
        let spec = DeviceSpec {
            device_id: VIRTIO_ID_RNG,
            features: VIRTIO_F_VERSION_1,
            queue_sizes: &[QUEUE_SIZE],
        };
        let dev = GenericDevice::new(bus, base, mem, irq, alloc, &spec)?;
        let buffer = alloc.alloc(u64::from(buffer_len), 64)?;
        Ok(Self {
            dev,
            mem,
            buffer,
            buffer_len,
            timeout,
        })
    }

    /// The device underneath, for status and interrupts.
    pub fn device(&mut self) -> &mut GenericDevice<'a, B, M, I> {
        &mut self.dev
    }

    /// Posts one buffer of `len` bytes and returns what the device put in it (it may fill
    /// less than asked).
    pub fn read(&mut self, len: u32) -> Result<Vec<u8>> {
        if len == 0 || len > self.buffer_len {
            return Err(DriverError::InvalidOption(
                "rng read length must be 1..=buffer_len",
            ));
        }
        self.mem.write(self.buffer, &vec![0u8; len as usize]);
        self.dev
            .add(REQUEST_QUEUE, &[BufferSegment::writable(self.buffer, len)])?;
        self.dev.kick(REQUEST_QUEUE)?;
        let used = self.dev.wait_used(REQUEST_QUEUE, self.timeout)?;
        let mut bytes = vec![0u8; used.len as usize];
        self.mem.read(self.buffer, &mut bytes);
        Ok(bytes)
    }
}
