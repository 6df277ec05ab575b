//! The device-independent half of a driver for any virtio device: bring-up with a feature
//! set, one [`SplitQueue`] per virtqueue, and blocking waits for used buffers that handle
//! interrupts as Linux's `vm_interrupt` does. The rng, vsock and fs drivers sit on it.

use std::fmt;
use std::time::{Duration, Instant};

use super::mmio::{status, VirtioMmioDevice, INTERRUPT_CONFIG};
use super::virtqueue::{BufferSegment, GuestAllocator, SplitQueue, UsedElem, MAX_QUEUE_SIZE};
use super::{DriverError, GuestMemory, Interrupts, MmioBus, Result};

/// What a driver asks of a device at bring-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSpec<'s> {
    /// The virtio device id the window must show.
    pub device_id: u32,
    /// Features to accept if offered (VERSION_1 is always accepted).
    pub features: u64,
    /// The wanted size of each queue, in queue order.
    pub queue_sizes: &'s [u16],
}

/// A virtio device with its queues set up and DRIVER_OK set.
pub struct GenericDevice<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    device: VirtioMmioDevice<'a, B>,
    irq: &'a I,
    queues: Vec<SplitQueue<'a, M>>,
    features: u64,
    config_interrupts: u64,
}

impl<B: MmioBus, M: GuestMemory, I: Interrupts> fmt::Debug for GenericDevice<'_, B, M, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenericDevice")
            .field("device", &self.device)
            .field("queues", &self.queues)
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> GenericDevice<'a, B, M, I> {
    /// Probes the device at `base`, checks its type, negotiates features and sets up one
    /// queue per entry of `spec.queue_sizes` (each capped at the queue's QueueNumMax, rounded
    /// down to a power of two), with rings from `alloc`. On failure after initialisation
    /// began, sets FAILED.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        spec: &DeviceSpec<'_>,
    ) -> Result<Self> {
        let device = VirtioMmioDevice::new(bus, base);
        let info = device.probe()?;
        if info.device_id != spec.device_id {
            return Err(DriverError::WrongDeviceType {
                expected: spec.device_id,
                found: info.device_id,
            });
        }
        let features = device.init(spec.features)?;
        let mut queues = Vec::with_capacity(spec.queue_sizes.len());
        for (index, &wanted) in (0u16..).zip(spec.queue_sizes) {
            match set_up_queue(&device, mem, alloc, index, wanted, features) {
                Ok(queue) => queues.push(queue),
                Err(error) => {
                    device.fail();
                    return Err(error);
                }
            }
        }
        device.driver_ok();
        Ok(Self {
            device,
            irq,
            queues,
            features,
            config_interrupts: 0,
        })
    }

    /// The transport, for config space and status.
    pub fn device(&self) -> &VirtioMmioDevice<'a, B> {
        &self.device
    }

    /// The negotiated features.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The size of queue `queue`.
    pub fn queue_size(&self, queue: u16) -> Result<u16> {
        Ok(self.ring(queue)?.size())
    }

    /// Config-change interrupts seen so far.
    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts
    }

    fn ring(&self, queue: u16) -> Result<&SplitQueue<'a, M>> {
        self.queues
            .get(usize::from(queue))
            .ok_or(DriverError::NoSuchQueue(queue))
    }

    fn ring_mut(&mut self, queue: u16) -> Result<&mut SplitQueue<'a, M>> {
        self.queues
            .get_mut(usize::from(queue))
            .ok_or(DriverError::NoSuchQueue(queue))
    }

    /// Makes the chain `segments` available on `queue` (without a kick); returns its head.
    pub fn add(&mut self, queue: u16, segments: &[BufferSegment]) -> Result<u16> {
        self.ring_mut(queue)?.add_chain(segments)
    }

    /// Notifies `queue` if the device asked to hear about what was added.
    pub fn kick(&mut self, queue: u16) -> Result<()> {
        if self.ring_mut(queue)?.kick_needed() {
            self.device.notify(queue);
        }
        Ok(())
    }

    /// The next used buffer of `queue`, if there is one.
    pub fn pop(&mut self, queue: u16) -> Result<Option<UsedElem>> {
        self.ring_mut(queue)?.pop_used()
    }

    /// Waits up to `timeout` for a used buffer on `queue`. Fails with
    /// [`DriverError::DeviceNeedsReset`] when a config interrupt comes with
    /// DEVICE_NEEDS_RESET set.
    pub fn wait_used(&mut self, queue: u16, timeout: Duration) -> Result<UsedElem> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.pop(queue)? {
                return Ok(used);
            }
            self.wait_interrupt(deadline)?;
        }
    }

    /// Waits until `deadline` for one interrupt and acknowledges what it signals.
    pub fn wait_interrupt(&mut self, deadline: Instant) -> Result<u32> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(DriverError::Timeout);
            }
            if !self.irq.wait(deadline - now) {
                continue;
            }
            let pending = self.device.interrupt_status();
            if pending != 0 {
                self.device.ack_interrupt(pending);
            }
            if pending & INTERRUPT_CONFIG != 0 {
                self.config_interrupts += 1;
                if self.device.status() & status::DEVICE_NEEDS_RESET != 0 {
                    return Err(DriverError::DeviceNeedsReset);
                }
            }
            return Ok(pending);
        }
    }
}

fn set_up_queue<'a, B: MmioBus, M: GuestMemory>(
    device: &VirtioMmioDevice<'_, B>,
    mem: &'a M,
    alloc: &mut GuestAllocator,
    index: u16,
    wanted: u16,
    features: u64,
) -> Result<SplitQueue<'a, M>> {
    let max = device.queue_num_max(index);
    if max == 0 {
        return Err(DriverError::QueueUnavailable(index));
    }
    let bound = u32::from(wanted).min(max).clamp(1, MAX_QUEUE_SIZE);
    // The largest power of two not above the bound (1..=32768) fits in u16.
    let size = (1u32 << (31 - bound.leading_zeros())) as u16;
    let mut ring = SplitQueue::new(mem, alloc, size)?;
    ring.set_features(features);
    device.setup_queue(index, size, &ring.memory())?;
    Ok(ring)
}
