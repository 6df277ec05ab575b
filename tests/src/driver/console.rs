//! A virtio-console driver over [`VirtioMmioDevice`] and [`SplitQueue`], modelled on Linux's
//! `virtio_console.c`: port 0's receive (queue 0) and transmit (queue 1) queues, and with
//! MULTIPORT the control queues (2 and 3) and the port handshake.
//!
//! Receive buffers are posted under the test's control ([`ConsoleOptions::rx_buffers`],
//! [`ConsoleDriver::post_rx_buffers`]), so a test can hold them back to see whether the
//! device keeps host input instead of dropping it.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use super::mmio::{VirtioMmioDevice, INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};
use super::virtqueue::{
    BufferSegment, GuestAllocator, SplitQueue, MAX_QUEUE_SIZE, VIRTIO_F_EVENT_IDX,
};
use super::{account_unannounced, DriverError, GuestMemory, Interrupts, MmioBus, Result};

pub const VIRTIO_ID_CONSOLE: u32 = 3;

/// virtio-console feature bits.
pub mod feature {
    pub const SIZE: u64 = 1 << 0;
    pub const MULTIPORT: u64 = 1 << 1;
}

/// Control events (`virtio_console_control.event`).
pub mod event {
    pub const DEVICE_READY: u16 = 0;
    pub const DEVICE_ADD: u16 = 1;
    pub const DEVICE_REMOVE: u16 = 2;
    pub const PORT_READY: u16 = 3;
    pub const CONSOLE_PORT: u16 = 4;
    pub const RESIZE: u16 = 5;
    pub const PORT_OPEN: u16 = 6;
    pub const PORT_NAME: u16 = 7;
}

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const CONTROL_RX_QUEUE: u16 = 2;
const CONTROL_TX_QUEUE: u16 = 3;
const CONTROL_HEADER_LEN: usize = 8;
/// Control receive buffers: room for a header and a long port name.
const CONTROL_RX_LEN: u32 = 512;
const CONTROL_SLOTS: usize = 16;

/// The configuration space fields this driver reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// With SIZE.
    pub cols: Option<u16>,
    pub rows: Option<u16>,
    /// With MULTIPORT.
    pub max_nr_ports: Option<u32>,
}

/// How to set the driver up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsoleOptions {
    /// Features to accept if offered (VERSION_1 is always accepted).
    pub features: u64,
    /// Upper bound on each queue's size; rounded down to a power of two within QueueNumMax.
    pub queue_size: u16,
    /// Receive buffers allocated (each is posted at most once at a time).
    pub rx_slots: usize,
    /// Receive buffers posted at start; the rest wait for [`ConsoleDriver::post_rx_buffers`].
    pub rx_buffers: usize,
    /// Bytes per receive buffer (Linux uses a page).
    pub rx_buffer_len: u32,
    /// Post a receive buffer again once its data was taken.
    pub repost_rx: bool,
    /// Transmit buffers that can be in flight at once.
    pub tx_slots: usize,
    /// Bytes per transmit buffer.
    pub tx_buffer_len: u32,
    /// How long a blocking call waits for the device to make progress.
    pub timeout: Duration,
    /// How control receive buffers are posted (MULTIPORT).
    pub control_rx: ControlRx,
}

/// How the driver posts control receive buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlRx {
    /// All of them at start, each posted again once read, as Linux does.
    Eager,
    /// None until the device has completed a request that it answers (DEVICE_READY or
    /// PORT_READY); then exactly as many as the replies it sends to it, none posted again.
    /// For a device that takes every posted buffer off the ring whenever it looks for
    /// control output and loses those it has nothing for: it then never sees a buffer
    /// while it has nothing to send.
    AfterRequest {
        device_ready: usize,
        port_ready: usize,
    },
}

impl ControlRx {
    /// What rust-vmm's vhost-device-console 0.1.0 needs: it answers DEVICE_READY with
    /// PORT_ADD, and PORT_READY with CONSOLE_PORT, PORT_NAME and PORT_OPEN.
    pub const VHOST_DEVICE_CONSOLE: Self = Self::AfterRequest {
        device_ready: 1,
        port_ready: 3,
    };
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            features: feature::SIZE | feature::MULTIPORT | VIRTIO_F_EVENT_IDX | VIRTIO_F_VERSION_1,
            queue_size: 128,
            rx_slots: 64,
            rx_buffer_len: 4096,
            rx_buffers: 64,
            repost_rx: true,
            tx_slots: 64,
            tx_buffer_len: 4096,
            timeout: Duration::from_secs(10),
            control_rx: ControlRx::Eager,
        }
    }
}

/// What the device told the driver about a port over the control queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortInfo {
    /// DEVICE_ADD seen.
    pub added: bool,
    /// CONSOLE_PORT seen.
    pub console: bool,
    /// PORT_NAME.
    pub name: Option<String>,
    /// The last PORT_OPEN value from the device.
    pub host_open: Option<bool>,
}

/// A queue whose buffers are fixed slots of guest memory.
struct SlotQueue<'a, M: GuestMemory> {
    index: u16,
    ring: SplitQueue<'a, M>,
    /// Guest-physical address of each slot.
    slots: Vec<u64>,
    slot_len: u32,
    /// Slots not in the ring.
    free: Vec<usize>,
    /// The slot behind each in-flight head.
    owner: Vec<Option<usize>>,
    /// Control receive buffers to post once the request in each slot completes.
    replies_owed: Vec<usize>,
}

/// Which queue to set up, and its buffers.
#[derive(Clone, Copy)]
struct QueueSpec {
    index: u16,
    /// Upper bound on the queue size.
    size: u16,
    slots: usize,
    slot_len: u32,
}

impl<'a, M: GuestMemory> SlotQueue<'a, M> {
    fn new<B: MmioBus>(
        device: &VirtioMmioDevice<'_, B>,
        mem: &'a M,
        alloc: &mut GuestAllocator,
        spec: QueueSpec,
        features: u64,
    ) -> Result<Self> {
        let QueueSpec {
            index,
            size: wanted_size,
            slots,
            slot_len,
        } = spec;
        let max = device.queue_num_max(index);
        if max == 0 {
            return Err(DriverError::QueueUnavailable(index));
        }
        let bound = u32::from(wanted_size).min(max).min(MAX_QUEUE_SIZE);
        // Largest power of two not above the bound (1..=32768), which fits in u16.
        let size = (1u32 << (31 - bound.leading_zeros())) as u16;
        let mut ring = SplitQueue::new(mem, alloc, size)?;
        ring.set_features(features & VIRTIO_F_EVENT_IDX);
        device.setup_queue(index, size, &ring.memory())?;
        let slots = (0..slots.min(usize::from(size)))
            .map(|_| alloc.alloc(u64::from(slot_len), 64))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            index,
            ring,
            free: (0..slots.len()).rev().collect(),
            replies_owed: vec![0; slots.len()],
            slots,
            slot_len,
            owner: vec![None; usize::from(size)],
        })
    }

    /// Makes `slot` available holding `len` bytes (device-readable) or as `len` bytes of
    /// room (device-writable).
    fn post(&mut self, slot: usize, len: u32, device_writable: bool) -> Result<()> {
        let segment = BufferSegment {
            gpa: self.slots[slot],
            len,
            device_writable,
        };
        let head = self.ring.add_chain(&[segment])?;
        self.owner[usize::from(head)] = Some(slot);
        Ok(())
    }

    fn kick<B: MmioBus>(&mut self, device: &VirtioMmioDevice<'_, B>) {
        if self.ring.kick_needed() {
            device.notify(self.index);
        }
    }

    /// The next completed slot and the length the device reported, capped at the bytes
    /// the device could write. A longer length is counted in `overlong` and otherwise
    /// ignored, as Linux ignores the length of output buffers.
    fn pop(&mut self, overlong: &mut u64) -> Result<Option<(usize, u32)>> {
        let (id, len) = match self.ring.pop_used() {
            Ok(Some(used)) => (used.id, used.len),
            Ok(None) => return Ok(None),
            Err(DriverError::UsedLengthTooLarge { id, max, .. }) => {
                *overlong += 1;
                // The ring recycled the chain; `max` is at most the slot length.
                (id, max as u32)
            }
            Err(error) => return Err(error),
        };
        // The ring only returns heads it tracked, and each tracked head has a slot.
        let slot = self.owner[usize::from(id)]
            .take()
            .ok_or(DriverError::UsedIdNotInFlight(u32::from(id)))?;
        Ok(Some((slot, len)))
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// A virtio-console device, initialised and ready (DRIVER_OK) once constructed.
pub struct ConsoleDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    device: VirtioMmioDevice<'a, B>,
    mem: &'a M,
    irq: &'a I,
    features: u64,
    config: ConsoleConfig,
    rx: SlotQueue<'a, M>,
    tx: SlotQueue<'a, M>,
    control: Option<(SlotQueue<'a, M>, SlotQueue<'a, M>)>,
    control_rx: ControlRx,
    repost_rx: bool,
    timeout: Duration,
    /// Bytes received and not yet returned by a read.
    received: VecDeque<u8>,
    ports: BTreeMap<u32, PortInfo>,
    /// Control events received, in order: (port, event, value).
    control_log: Vec<(u32, u16, u16)>,
    tx_stalls: u64,
    config_interrupts: u64,
    overlong_used: u64,
    lost_interrupts: u64,
}

impl<B: MmioBus, M: GuestMemory, I: Interrupts> fmt::Debug for ConsoleDriver<'_, B, M, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleDriver")
            .field("device", &self.device)
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .field("rx_posted", &self.rx.in_flight())
            .field("tx_in_flight", &self.tx.in_flight())
            .field("received", &self.received.len())
            .finish_non_exhaustive()
    }
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> ConsoleDriver<'a, B, M, I> {
    /// Probes and initialises the device at `base`, allocates rings and buffers from
    /// `alloc`, posts the first receive buffers and sets DRIVER_OK. With MULTIPORT it then
    /// sends DEVICE_READY; [`ConsoleDriver::wait_port_open`] waits for the handshake.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        options: &ConsoleOptions,
    ) -> Result<Self> {
        validate(options)?;
        let device = VirtioMmioDevice::new(bus, base);
        let info = device.probe()?;
        if info.device_id != VIRTIO_ID_CONSOLE {
            return Err(DriverError::WrongDeviceType {
                expected: VIRTIO_ID_CONSOLE,
                found: info.device_id,
            });
        }
        let features = device.init(options.features)?;
        let queues = match set_up_queues(&device, mem, alloc, options, features) {
            Ok(queues) => queues,
            Err(error) => {
                device.fail();
                return Err(error);
            }
        };
        let config = read_config(&device, features);
        device.driver_ok();
        let (rx, tx, control) = queues;
        let mut driver = Self {
            device,
            mem,
            irq,
            features,
            config,
            rx,
            tx,
            control,
            control_rx: options.control_rx,
            repost_rx: options.repost_rx,
            timeout: options.timeout,
            received: VecDeque::new(),
            ports: BTreeMap::new(),
            control_log: Vec::new(),
            tx_stalls: 0,
            config_interrupts: 0,
            overlong_used: 0,
            lost_interrupts: 0,
        };
        driver.post_rx_buffers(options.rx_buffers)?;
        if let Some((control_rx, _)) = driver.control.as_mut() {
            if driver.control_rx == ControlRx::Eager {
                post_control_rx(control_rx, usize::MAX)?;
                control_rx.kick(&driver.device);
            }
            driver.send_control(0, event::DEVICE_READY, 1)?;
        }
        Ok(driver)
    }

    pub fn device(&self) -> &VirtioMmioDevice<'a, B> {
        &self.device
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn config(&self) -> &ConsoleConfig {
        &self.config
    }

    /// Whether MULTIPORT was negotiated.
    pub fn multiport(&self) -> bool {
        self.control.is_some()
    }

    /// What the control queue said about each port.
    pub fn ports(&self) -> &BTreeMap<u32, PortInfo> {
        &self.ports
    }

    /// Control events received so far: (port, event, value).
    pub fn control_log(&self) -> &[(u32, u16, u16)] {
        &self.control_log
    }

    /// Receive buffers the device holds now.
    pub fn rx_posted(&self) -> usize {
        self.rx.in_flight()
    }

    /// Times a write found every transmit buffer in flight and had to wait for the device.
    pub fn tx_stalls(&self) -> u64 {
        self.tx_stalls
    }

    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts
    }

    /// Completions the device published without an interrupt (see [`Interrupts::lost`]).
    pub fn lost_interrupts(&self) -> u64 {
        self.lost_interrupts
    }

    /// Used-ring entries whose length exceeded the bytes the device may write (a device bug
    /// this driver tolerates, as Linux does for output buffers).
    pub fn overlong_used(&self) -> u64 {
        self.overlong_used
    }

    /// Posts up to `count` more receive buffers; returns how many were posted.
    pub fn post_rx_buffers(&mut self, count: usize) -> Result<usize> {
        let mut posted = 0;
        while posted < count {
            let Some(slot) = self.rx.free.pop() else {
                break;
            };
            let len = self.rx.slot_len;
            if let Err(error) = self.rx.post(slot, len, true) {
                self.rx.free.push(slot);
                return Err(error);
            }
            posted += 1;
        }
        self.rx.kick(&self.device);
        Ok(posted)
    }

    /// Queues `data` for transmission, waiting for the device whenever every transmit buffer
    /// is in flight. Returns once all of it was handed to the device.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        for chunk in data.chunks(self.tx.slot_len as usize) {
            let slot = loop {
                if let Some(slot) = self.tx.free.pop() {
                    break slot;
                }
                self.tx_stalls += 1;
                self.tx.kick(&self.device);
                let deadline = Instant::now() + self.timeout;
                self.wait_for_progress(deadline)?;
            };
            self.mem.write(self.tx.slots[slot], chunk);
            // chunk.len() <= slot_len, a u32.
            if let Err(error) = self.tx.post(slot, chunk.len() as u32, false) {
                self.tx.free.push(slot);
                return Err(error);
            }
            self.tx.kick(&self.device);
        }
        Ok(())
    }

    /// Waits until the device has completed every transmit buffer.
    pub fn flush(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        while self.tx.in_flight() > 0 {
            self.wait_for_progress(deadline)?;
        }
        Ok(())
    }

    /// Returns what was received, waiting up to `timeout` for at least one byte; empty if
    /// nothing came.
    pub fn read(&mut self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        self.collect()?;
        while self.received.is_empty() {
            match self.wait_for_progress(deadline) {
                Ok(()) => {}
                Err(DriverError::Timeout) => break,
                Err(error) => return Err(error),
            }
        }
        Ok(self.received.drain(..).collect())
    }

    /// Receives exactly `len` bytes, waiting up to the configured timeout for each bit of
    /// progress.
    pub fn read_exact(&mut self, len: usize) -> Result<Vec<u8>> {
        let mut data = Vec::with_capacity(len);
        loop {
            self.collect()?;
            let take = (len - data.len()).min(self.received.len());
            data.extend(self.received.drain(..take));
            if data.len() == len {
                return Ok(data);
            }
            let deadline = Instant::now() + self.timeout;
            self.wait_for_progress(deadline)?;
        }
    }

    /// Waits until the device reported port 0 open (MULTIPORT handshake done).
    pub fn wait_port_open(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            self.collect()?;
            if self.ports.get(&0).and_then(|p| p.host_open) == Some(true) {
                return Ok(());
            }
            self.wait_for_progress(deadline)?;
        }
    }

    /// Tells the device the guest opened (or closed) `port`, as Linux does on open(2).
    pub fn set_port_open(&mut self, port: u32, open: bool) -> Result<()> {
        self.send_control(port, event::PORT_OPEN, u16::from(open))
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        let replies = match self.control_rx {
            ControlRx::Eager => 0,
            ControlRx::AfterRequest {
                device_ready,
                port_ready,
            } => match event {
                event::DEVICE_READY => device_ready,
                event::PORT_READY => port_ready,
                _ => 0,
            },
        };
        loop {
            let Some((_, control_tx)) = self.control.as_mut() else {
                return Err(DriverError::InvalidOption("MULTIPORT was not negotiated"));
            };
            if let Some(slot) = control_tx.free.pop() {
                let mut message = [0u8; CONTROL_HEADER_LEN];
                message[0..4].copy_from_slice(&id.to_le_bytes());
                message[4..6].copy_from_slice(&event.to_le_bytes());
                message[6..8].copy_from_slice(&value.to_le_bytes());
                self.mem.write(control_tx.slots[slot], &message);
                if let Err(error) = control_tx.post(slot, CONTROL_HEADER_LEN as u32, false) {
                    control_tx.free.push(slot);
                    return Err(error);
                }
                control_tx.replies_owed[slot] = replies;
                control_tx.kick(&self.device);
                return Ok(());
            }
            self.wait_for_progress(deadline)?;
        }
    }

    /// Takes every completion: received data, finished transmissions, control messages.
    /// Returns how many there were.
    fn collect(&mut self) -> Result<usize> {
        let mut progress = 0;
        let mut repost = 0;
        while let Some((slot, len)) = self.rx.pop(&mut self.overlong_used)? {
            let len = len.min(self.rx.slot_len) as usize;
            let mut data = vec![0u8; len];
            self.mem.read(self.rx.slots[slot], &mut data);
            self.received.extend(data);
            self.rx.free.push(slot);
            repost += 1;
            progress += 1;
        }
        if self.repost_rx && repost > 0 {
            self.post_rx_buffers(repost)?;
        }
        while let Some((slot, _)) = self.tx.pop(&mut self.overlong_used)? {
            self.tx.free.push(slot);
            progress += 1;
        }
        progress += self.collect_control()?;
        Ok(progress)
    }

    fn collect_control(&mut self) -> Result<usize> {
        let Some((control_rx, control_tx)) = self.control.as_mut() else {
            return Ok(0);
        };
        let mut progress = 0;
        let mut posted = 0;
        while let Some((slot, _)) = control_tx.pop(&mut self.overlong_used)? {
            posted += post_control_rx(
                control_rx,
                std::mem::take(&mut control_tx.replies_owed[slot]),
            )?;
            control_tx.free.push(slot);
            progress += 1;
        }
        let mut messages = Vec::new();
        while let Some((slot, len)) = control_rx.pop(&mut self.overlong_used)? {
            let len = len.min(control_rx.slot_len) as usize;
            let mut data = vec![0u8; len];
            self.mem.read(control_rx.slots[slot], &mut data);
            messages.push(data);
            if self.control_rx == ControlRx::Eager {
                control_rx.post(slot, CONTROL_RX_LEN, true)?;
                posted += 1;
            } else {
                control_rx.free.push(slot);
            }
            progress += 1;
        }
        if posted > 0 {
            control_rx.kick(&self.device);
        }
        for message in messages {
            self.handle_control(&message)?;
        }
        Ok(progress)
    }

    /// Acts on a control message the way Linux's `handle_control_message` does.
    fn handle_control(&mut self, message: &[u8]) -> Result<()> {
        if message.len() < CONTROL_HEADER_LEN {
            return Ok(());
        }
        let id = u32::from_le_bytes([message[0], message[1], message[2], message[3]]);
        let event = u16::from_le_bytes([message[4], message[5]]);
        let value = u16::from_le_bytes([message[6], message[7]]);
        self.control_log.push((id, event, value));
        let max_ports = self.config.max_nr_ports.unwrap_or(1);
        if id >= max_ports {
            return Ok(());
        }
        let port = self.ports.entry(id).or_default();
        let reply = match event {
            event::DEVICE_ADD => {
                port.added = true;
                Some(event::PORT_READY)
            }
            event::CONSOLE_PORT => {
                port.console = true;
                // hvc takes the port at once, so the guest end is open.
                Some(event::PORT_OPEN)
            }
            event::PORT_NAME => {
                let name = &message[CONTROL_HEADER_LEN..];
                let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                port.name = Some(String::from_utf8_lossy(&name[..end]).into_owned());
                None
            }
            event::PORT_OPEN => {
                port.host_open = Some(value != 0);
                None
            }
            _ => None,
        };
        match reply {
            Some(reply) => self.send_control(id, reply, 1),
            None => Ok(()),
        }
    }

    /// Returns once something completed. It sleeps until the interrupt and then handles it
    /// the way Linux's `vm_interrupt` does: read InterruptStatus, ACK, then look at the rings.
    /// A completion whose interrupt never comes is found only once the wait times out, and
    /// counted as lost.
    fn wait_for_progress(&mut self, deadline: Instant) -> Result<()> {
        loop {
            let now = Instant::now();
            if now < deadline && self.irq.wait(deadline - now) {
                self.take_interrupt();
                if self.collect()? > 0 {
                    return Ok(());
                }
                continue;
            }
            let unannounced = self
                .queues()
                .map(SplitQueue::unannounced_used)
                .map(u64::from)
                .sum();
            if unannounced == 0 {
                return Err(DriverError::Timeout);
            }
            account_unannounced(
                self.irq,
                "virtio-console",
                unannounced,
                &mut self.lost_interrupts,
            );
            // Late or lost, ACK what the device flagged so that its line can rise again and
            // the test goes on; a loss is on record.
            self.take_interrupt();
            self.collect()?;
            return Ok(());
        }
    }

    /// Every ring of the device.
    fn queues(&self) -> impl Iterator<Item = &SplitQueue<'a, M>> {
        let control = self
            .control
            .iter()
            .flat_map(|(rx, tx)| [&rx.ring, &tx.ring]);
        [&self.rx.ring, &self.tx.ring].into_iter().chain(control)
    }

    /// Handles one interrupt: ACKs InterruptStatus and counts a config change.
    fn take_interrupt(&mut self) {
        self.rx.ring.note_interrupt();
        self.tx.ring.note_interrupt();
        if let Some((control_rx, control_tx)) = self.control.as_mut() {
            control_rx.ring.note_interrupt();
            control_tx.ring.note_interrupt();
        }
        let pending = self.device.interrupt_status();
        if pending != 0 {
            self.device.ack_interrupt(pending);
        }
        if pending & INTERRUPT_CONFIG != 0 {
            self.config_interrupts += 1;
        }
    }
}

type Queues<'a, M> = (
    SlotQueue<'a, M>,
    SlotQueue<'a, M>,
    Option<(SlotQueue<'a, M>, SlotQueue<'a, M>)>,
);

fn set_up_queues<'a, B: MmioBus, M: GuestMemory>(
    device: &VirtioMmioDevice<'_, B>,
    mem: &'a M,
    alloc: &mut GuestAllocator,
    options: &ConsoleOptions,
    features: u64,
) -> Result<Queues<'a, M>> {
    let size = options.queue_size;
    let queue = |index, slots, slot_len| QueueSpec {
        index,
        size,
        slots,
        slot_len,
    };
    let rx = SlotQueue::new(
        device,
        mem,
        alloc,
        queue(RX_QUEUE, options.rx_slots, options.rx_buffer_len),
        features,
    )?;
    let tx = SlotQueue::new(
        device,
        mem,
        alloc,
        queue(TX_QUEUE, options.tx_slots, options.tx_buffer_len),
        features,
    )?;
    let control = if features & feature::MULTIPORT != 0 {
        let control_rx = SlotQueue::new(
            device,
            mem,
            alloc,
            queue(CONTROL_RX_QUEUE, CONTROL_SLOTS, CONTROL_RX_LEN),
            features,
        )?;
        let control_tx = SlotQueue::new(
            device,
            mem,
            alloc,
            queue(CONTROL_TX_QUEUE, CONTROL_SLOTS, CONTROL_HEADER_LEN as u32),
            features,
        )?;
        Some((control_rx, control_tx))
    } else {
        None
    };
    Ok((rx, tx, control))
}

fn read_config<B: MmioBus>(device: &VirtioMmioDevice<'_, B>, features: u64) -> ConsoleConfig {
    let has = |bit: u64| features & bit != 0;
    ConsoleConfig {
        cols: has(feature::SIZE).then(|| device.read_config_u16(0)),
        rows: has(feature::SIZE).then(|| device.read_config_u16(2)),
        max_nr_ports: has(feature::MULTIPORT).then(|| device.read_config_u32(4)),
    }
}

/// Posts up to `count` free control receive buffers; returns how many were posted.
fn post_control_rx<M: GuestMemory>(
    control_rx: &mut SlotQueue<'_, M>,
    count: usize,
) -> Result<usize> {
    let mut posted = 0;
    while posted < count {
        let Some(slot) = control_rx.free.pop() else {
            break;
        };
        if let Err(error) = control_rx.post(slot, CONTROL_RX_LEN, true) {
            control_rx.free.push(slot);
            return Err(error);
        }
        posted += 1;
    }
    Ok(posted)
}

fn validate(options: &ConsoleOptions) -> Result<()> {
    if options.queue_size == 0 {
        return Err(DriverError::InvalidOption("queue_size must be positive"));
    }
    if options.rx_slots == 0 || options.tx_slots == 0 {
        return Err(DriverError::InvalidOption("buffer slots must be positive"));
    }
    if options.rx_buffer_len == 0 || options.tx_buffer_len == 0 {
        return Err(DriverError::InvalidOption(
            "buffer lengths must be positive",
        ));
    }
    Ok(())
}
