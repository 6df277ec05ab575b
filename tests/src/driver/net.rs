//! A virtio-net driver over [`VirtioMmioDevice`] and [`SplitQueue`], modelled on Linux's
//! `virtio_net.c`: receive buffers stay posted, frames go out behind a `virtio_net_hdr_v1`,
//! merged receive buffers (MRG_RXBUF) are put back together, and the control queue switches
//! the number of queue pairs.
//!
//! It uses queue pair 0 (receiveq1 = queue 0, transmitq1 = queue 1) and, when CTRL_VQ is
//! negotiated, the control queue after the last pair. [`frames`] builds and parses the
//! Ethernet, ARP, IPv4 and ICMP frames the tests exchange.

use std::fmt;
use std::time::{Duration, Instant};

use super::mmio::{status, VirtioMmioDevice, INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};
use super::virtqueue::{BufferSegment, GuestAllocator, SplitQueue, VIRTIO_F_EVENT_IDX};
use super::{account_unannounced, DriverError, GuestMemory, Interrupts, MmioBus};

pub const VIRTIO_ID_NET: u32 = 1;
/// `struct virtio_net_hdr_v1`, the header under VERSION_1.
pub const HEADER_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
/// The control queue's answers.
pub const CTRL_OK: u8 = 0;
pub const CTRL_ERR: u8 = 1;
/// Written to the ack byte before submission, so "the device never answered" shows.
const ACK_UNWRITTEN: u8 = 0xff;

/// virtio-net feature bits.
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MTU: u64 = 1 << 3;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
    pub const CTRL_VQ: u64 = 1 << 17;
    pub const MQ: u64 = 1 << 22;
}

/// Control queue classes and commands (virtio 1.2 §5.1.6.5).
pub mod ctrl {
    pub const CLASS_RX: u8 = 0;
    pub const CLASS_MAC: u8 = 1;
    pub const CLASS_MQ: u8 = 4;
    pub const MQ_VQ_PAIRS_SET: u8 = 0;
}

/// Config space offsets (`struct virtio_net_config`).
mod config_offset {
    pub const MAC: u64 = 0;
    pub const STATUS: u64 = 6;
    pub const MAX_VIRTQUEUE_PAIRS: u64 = 8;
    pub const MTU: u64 = 10;
}

const STATUS_LINK_UP: u16 = 1;

/// What can go wrong besides the transport errors of [`DriverError`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NetError {
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error("Frame of {len} bytes does not fit a {max}-byte transmit buffer")]
    FrameTooLarge { len: usize, max: usize },
    #[error("Receive buffer of {0} bytes is shorter than the header")]
    ShortBuffer(u32),
    #[error("Header says {expected} buffers, only {found} were used")]
    MissingBuffers { expected: u16, found: u16 },
    #[error("Header says 0 buffers")]
    ZeroBuffers,
    #[error("Control queue not negotiated")]
    NoControlQueue,
    #[error("Control command answered {0:#x}")]
    ControlRefused(u8),
}

pub type Result<T> = std::result::Result<T, NetError>;

/// The device configuration this driver uses; fields of features not negotiated are None.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: Option<[u8; 6]>,
    pub link_up: Option<bool>,
    /// 1 unless MQ was negotiated.
    pub max_queue_pairs: u16,
    pub mtu: Option<u16>,
}

impl NetConfig {
    pub fn read<B: MmioBus>(
        device: &VirtioMmioDevice<'_, B>,
        negotiated: u64,
    ) -> std::result::Result<Self, DriverError> {
        let has = |bit: u64| negotiated & bit != 0;
        let mac = if has(feature::MAC) {
            let mut mac = [0u8; 6];
            device.read_config_bytes(config_offset::MAC, &mut mac)?;
            Some(mac)
        } else {
            None
        };
        Ok(Self {
            mac,
            link_up: has(feature::STATUS)
                .then(|| device.read_config_u16(config_offset::STATUS) & STATUS_LINK_UP != 0),
            max_queue_pairs: if has(feature::MQ) {
                device.read_config_u16(config_offset::MAX_VIRTQUEUE_PAIRS)
            } else {
                1
            },
            mtu: has(feature::MTU).then(|| device.read_config_u16(config_offset::MTU)),
        })
    }
}

/// How to set the driver up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetOptions {
    /// Features to accept if offered (VERSION_1 is always accepted).
    pub features: u64,
    /// Upper bound on each queue's size; rounded down to a power of two within QueueNumMax.
    pub queue_size: u16,
    /// Bytes of each receive buffer, header included. Without MRG_RXBUF a buffer must hold a
    /// whole frame.
    pub rx_buffer_len: u32,
    /// Frames that can wait for transmission at once.
    pub tx_slots: usize,
    /// Largest frame (without the header) `send` accepts.
    pub max_tx_frame: u32,
    /// Kick after every send; otherwise call [`NetDriver::kick_tx`] after a batch.
    pub auto_kick: bool,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            features: feature::MAC
                | feature::STATUS
                | feature::MTU
                | feature::MRG_RXBUF
                | VIRTIO_F_EVENT_IDX
                | VIRTIO_F_VERSION_1,
            queue_size: 256,
            rx_buffer_len: 2048,
            tx_slots: 64,
            max_tx_frame: 1514,
            auto_kick: true,
        }
    }
}

/// A received frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    pub header: [u8; HEADER_LEN],
    /// The Ethernet frame, header stripped.
    pub frame: Vec<u8>,
    /// Receive buffers it took.
    pub buffers: u16,
}

/// A virtio-net device, initialised and ready (DRIVER_OK) once constructed.
pub struct NetDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    device: VirtioMmioDevice<'a, B>,
    mem: &'a M,
    irq: &'a I,
    features: u64,
    config: NetConfig,
    rx: SplitQueue<'a, M>,
    /// The buffer behind each posted receive head.
    rx_buffers: Vec<Option<u64>>,
    rx_buffer_len: u32,
    tx: SplitQueue<'a, M>,
    /// The slot behind each transmit head.
    tx_owner: Vec<Option<usize>>,
    tx_slot_addrs: Vec<u64>,
    tx_free: Vec<usize>,
    max_tx_frame: usize,
    auto_kick: bool,
    ctrl: Option<ControlQueue<'a, M>>,
    config_interrupts: u64,
    lost_interrupts: u64,
}

struct ControlQueue<'a, M: GuestMemory> {
    index: u16,
    ring: SplitQueue<'a, M>,
    /// Command at 0, ack byte at [`CTRL_ACK_OFFSET`].
    buffer: u64,
}

const CTRL_ACK_OFFSET: u64 = 64;
const CTRL_DATA_MAX: usize = 60;

impl<B: MmioBus, M: GuestMemory, I: Interrupts> fmt::Debug for NetDriver<'_, B, M, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NetDriver")
            .field("device", &self.device)
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .field("tx_in_flight", &self.tx_in_flight())
            .finish_non_exhaustive()
    }
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> NetDriver<'a, B, M, I> {
    /// Probes and initialises the device at `base`, allocates rings and buffers from `alloc`,
    /// sets DRIVER_OK and posts every receive buffer. On failure after initialisation began,
    /// sets FAILED.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        options: &NetOptions,
    ) -> Result<Self> {
        validate(options)?;
        let device = VirtioMmioDevice::new(bus, base);
        let info = device.probe()?;
        if info.device_id != VIRTIO_ID_NET {
            return Err(DriverError::WrongDeviceType {
                expected: VIRTIO_ID_NET,
                found: info.device_id,
            }
            .into());
        }
        let features = device.init(options.features)?;
        let set_up = (|| {
            let config = NetConfig::read(&device, features)?;
            let rx = set_up_queue(&device, mem, alloc, 0, options.queue_size, features)?;
            let tx = set_up_queue(&device, mem, alloc, 1, options.queue_size, features)?;
            let ctrl = if features & feature::CTRL_VQ != 0 {
                let index = 2 * config.max_queue_pairs.max(1);
                let ring = set_up_queue(&device, mem, alloc, index, 64, features)?;
                let buffer = alloc.alloc(128, 64)?;
                Some(ControlQueue {
                    index,
                    ring,
                    buffer,
                })
            } else {
                None
            };
            let rx_slots = (0..rx.size())
                .map(|_| alloc.alloc(u64::from(options.rx_buffer_len), 64))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            let tx_slot_len =
                (HEADER_LEN as u64 + u64::from(options.max_tx_frame)).next_multiple_of(64);
            let tx_slots = (0..options.tx_slots)
                .map(|_| alloc.alloc(tx_slot_len, 64))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok::<_, DriverError>((config, rx, tx, ctrl, rx_slots, tx_slots))
        })();
        let (config, rx, tx, ctrl, rx_slots, tx_slots) = match set_up {
            Ok(parts) => parts,
            Err(error) => {
                device.fail();
                return Err(error.into());
            }
        };
        device.driver_ok();
        let rx_size = usize::from(rx.size());
        let tx_size = usize::from(tx.size());
        let mut driver = Self {
            device,
            mem,
            irq,
            features,
            config,
            rx,
            rx_buffers: vec![None; rx_size],
            rx_buffer_len: options.rx_buffer_len,
            tx,
            tx_owner: vec![None; tx_size],
            tx_free: (0..tx_slots.len()).rev().collect(),
            tx_slot_addrs: tx_slots,
            max_tx_frame: options.max_tx_frame as usize,
            auto_kick: options.auto_kick,
            ctrl,
            config_interrupts: 0,
            lost_interrupts: 0,
        };
        for gpa in rx_slots {
            driver.post_rx_buffer(gpa)?;
        }
        driver.kick_rx();
        Ok(driver)
    }

    pub fn device(&self) -> &VirtioMmioDevice<'a, B> {
        &self.device
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The MAC the device gave, if MAC was negotiated.
    pub fn mac(&self) -> Option<[u8; 6]> {
        self.config.mac
    }

    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts
    }

    /// Completions the device published without an interrupt (see [`Interrupts::lost`]).
    pub fn lost_interrupts(&self) -> u64 {
        self.lost_interrupts
    }

    /// Frames handed to the device and not yet returned.
    pub fn tx_in_flight(&self) -> usize {
        self.tx_slot_addrs.len() - self.tx_free.len()
    }

    /// Receive buffers currently posted.
    pub fn rx_posted(&self) -> u16 {
        self.rx.chains_in_flight()
    }

    fn post_rx_buffer(&mut self, gpa: u64) -> Result<()> {
        let head = self
            .rx
            .add_chain(&[BufferSegment::writable(gpa, self.rx_buffer_len)])?;
        self.rx_buffers[usize::from(head)] = Some(gpa);
        Ok(())
    }

    fn kick_rx(&mut self) {
        if self.rx.kick_needed() {
            self.device.notify(0);
        }
    }

    /// Notifies the transmit queue if the device wants to hear of new frames.
    pub fn kick_tx(&mut self) {
        if self.tx.kick_needed() {
            self.device.notify(1);
        }
    }

    /// Queues `frame` (an Ethernet frame) behind a zero header: no offloads.
    pub fn send(&mut self, frame: &[u8], timeout: Duration) -> Result<()> {
        self.send_with_header(&[0; HEADER_LEN], frame, timeout)
    }

    /// Queues `frame` behind `header`, as two descriptors. Waits up to `timeout` for a free
    /// transmit slot and descriptors.
    pub fn send_with_header(
        &mut self,
        header: &[u8; HEADER_LEN],
        frame: &[u8],
        timeout: Duration,
    ) -> Result<()> {
        if frame.len() > self.max_tx_frame {
            return Err(NetError::FrameTooLarge {
                len: frame.len(),
                max: self.max_tx_frame,
            });
        }
        let deadline = Instant::now() + timeout;
        // A frame takes a slot and two descriptors; wait for the device to return some.
        let slot = loop {
            self.reclaim_tx()?;
            if self.tx.num_free() >= 2 {
                if let Some(slot) = self.tx_free.pop() {
                    break slot;
                }
            }
            // Frames the device has not been told about would never come back.
            self.kick_tx();
            self.wait_interrupt(deadline)?;
        };
        let gpa = self.tx_slot_addrs[slot];
        self.mem.write(gpa, header);
        self.mem.write(gpa + HEADER_LEN as u64, frame);
        let added = self.tx.add_chain(&[
            BufferSegment::readable(gpa, HEADER_LEN as u32),
            // Bounded by max_tx_frame, a u32.
            BufferSegment::readable(gpa + HEADER_LEN as u64, frame.len() as u32),
        ]);
        let head = match added {
            Ok(head) => head,
            Err(error) => {
                self.tx_free.push(slot);
                return Err(error.into());
            }
        };
        self.tx_owner[usize::from(head)] = Some(slot);
        if self.auto_kick {
            self.kick_tx();
        }
        Ok(())
    }

    /// Frees the slots of every frame the device has sent; returns how many.
    pub fn reclaim_tx(&mut self) -> Result<usize> {
        let mut reclaimed = 0;
        while let Some(used) = self.tx.pop_used()? {
            if let Some(slot) = self.tx_owner[usize::from(used.id)].take() {
                self.tx_free.push(slot);
                reclaimed += 1;
            }
        }
        Ok(reclaimed)
    }

    /// Waits until the device has returned every queued frame.
    pub fn flush_tx(&mut self, timeout: Duration) -> Result<()> {
        self.kick_tx();
        let deadline = Instant::now() + timeout;
        loop {
            self.reclaim_tx()?;
            if self.tx_in_flight() == 0 {
                return Ok(());
            }
            self.wait_interrupt(deadline)?;
        }
    }

    /// Waits up to `timeout` for the next frame.
    pub fn recv(&mut self, timeout: Duration) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(received) = self.try_recv()? {
                return Ok(received);
            }
            self.wait_interrupt(deadline)?;
        }
    }

    /// Waits up to `timeout` for a frame `wanted` accepts, discarding the others (the host
    /// kernel sends its own traffic too).
    pub fn recv_matching(
        &mut self,
        timeout: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> Result<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = self.recv(left)?;
            if wanted(&received.frame) {
                return Ok(received);
            }
        }
    }

    /// Takes the next frame if the device has completed one: its first buffer's header says
    /// how many buffers follow (always 1 without MRG_RXBUF). Buffers are posted again.
    pub fn try_recv(&mut self) -> Result<Option<Received>> {
        let Some(first) = self.rx.pop_used()? else {
            return Ok(None);
        };
        let data = self.take_rx_buffer(first.id, first.len)?;
        if data.len() < HEADER_LEN {
            self.kick_rx();
            return Err(NetError::ShortBuffer(first.len));
        }
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(&data[..HEADER_LEN]);
        let num_buffers = if self.features & feature::MRG_RXBUF != 0 {
            u16::from_le_bytes([header[NUM_BUFFERS_OFFSET], header[NUM_BUFFERS_OFFSET + 1]])
        } else {
            1
        };
        let mut frame = data[HEADER_LEN..].to_vec();
        if num_buffers == 0 {
            self.kick_rx();
            return Err(NetError::ZeroBuffers);
        }
        for found in 1..num_buffers {
            // The device publishes a frame's buffers together.
            let Some(next) = self.rx.pop_used()? else {
                self.kick_rx();
                return Err(NetError::MissingBuffers {
                    expected: num_buffers,
                    found,
                });
            };
            frame.extend(self.take_rx_buffer(next.id, next.len)?);
        }
        self.kick_rx();
        Ok(Some(Received {
            header,
            frame,
            buffers: num_buffers,
        }))
    }

    /// Reads `len` bytes of the buffer behind `head` and posts the buffer again.
    fn take_rx_buffer(&mut self, head: u16, len: u32) -> Result<Vec<u8>> {
        // pop_used only returns heads this queue tracked, and every receive head has a buffer.
        let Some(gpa) = self.rx_buffers[usize::from(head)].take() else {
            return Err(DriverError::UsedIdNotInFlight(u32::from(head)).into());
        };
        // pop_used checked len against the buffer's writable length.
        let mut data = vec![0u8; len as usize];
        self.mem.read(gpa, &mut data);
        self.post_rx_buffer(gpa)?;
        Ok(data)
    }

    /// Waits for one interrupt and acknowledges it, as Linux's `vm_interrupt` does. Err(Timeout)
    /// once `deadline` has passed, unless completions that no interrupt announced are on the
    /// rings: those are counted as lost and Ok lets the caller take them.
    fn wait_interrupt(&mut self, deadline: Instant) -> Result<()> {
        let now = Instant::now();
        if now >= deadline || !self.irq.wait(deadline - now) {
            let unannounced = self
                .rings()
                .map(SplitQueue::unannounced_used)
                .map(u64::from)
                .sum();
            if unannounced == 0 {
                return Err(DriverError::Timeout.into());
            }
            account_unannounced(
                self.irq,
                "virtio-net",
                unannounced,
                &mut self.lost_interrupts,
            );
            // Late or lost, handle it as an interrupt: ACK what the device flagged so that
            // its line can rise again and the test goes on; a loss is on record.
        }
        self.rx.note_interrupt();
        self.tx.note_interrupt();
        if let Some(ctrl) = self.ctrl.as_mut() {
            ctrl.ring.note_interrupt();
        }
        let pending = self.device.interrupt_status();
        if pending != 0 {
            self.device.ack_interrupt(pending);
        }
        if pending & INTERRUPT_CONFIG != 0 {
            self.config_interrupts += 1;
            if self.device.status() & status::DEVICE_NEEDS_RESET != 0 {
                return Err(DriverError::DeviceNeedsReset.into());
            }
        }
        Ok(())
    }

    /// Every ring of the device.
    fn rings(&self) -> impl Iterator<Item = &SplitQueue<'a, M>> {
        [&self.rx, &self.tx]
            .into_iter()
            .chain(self.ctrl.as_ref().map(|ctrl| &ctrl.ring))
    }

    /// Sends a control command and returns the device's ack byte.
    pub fn control(
        &mut self,
        class: u8,
        command: u8,
        data: &[u8],
        timeout: Duration,
    ) -> Result<u8> {
        if data.len() > CTRL_DATA_MAX {
            return Err(DriverError::InvalidOption("control data longer than 60 bytes").into());
        }
        let Some(ctrl) = self.ctrl.as_mut() else {
            return Err(NetError::NoControlQueue);
        };
        let buffer = ctrl.buffer;
        self.mem.write(buffer, &[class, command]);
        self.mem.write(buffer + 2, data);
        self.mem.write(buffer + CTRL_ACK_OFFSET, &[ACK_UNWRITTEN]);
        let mut segments = vec![BufferSegment::readable(buffer, 2)];
        if !data.is_empty() {
            segments.push(BufferSegment::readable(buffer + 2, data.len() as u32));
        }
        segments.push(BufferSegment::writable(buffer + CTRL_ACK_OFFSET, 1));
        let head = ctrl.ring.add_chain(&segments)?;
        if ctrl.ring.kick_needed() {
            self.device.notify(ctrl.index);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let ctrl = self.ctrl.as_mut().ok_or(NetError::NoControlQueue)?;
            if let Some(used) = ctrl.ring.pop_used()? {
                if used.id != head {
                    return Err(DriverError::UsedIdNotInFlight(u32::from(used.id)).into());
                }
                let mut ack = [0u8];
                self.mem.read(buffer + CTRL_ACK_OFFSET, &mut ack);
                return Ok(ack[0]);
            }
            self.wait_interrupt(deadline)?;
        }
    }

    /// Asks the device to use `pairs` queue pairs (MQ with CTRL_VQ).
    pub fn set_queue_pairs(&mut self, pairs: u16, timeout: Duration) -> Result<()> {
        match self.control(
            ctrl::CLASS_MQ,
            ctrl::MQ_VQ_PAIRS_SET,
            &pairs.to_le_bytes(),
            timeout,
        )? {
            CTRL_OK => Ok(()),
            ack => Err(NetError::ControlRefused(ack)),
        }
    }
}

fn validate(options: &NetOptions) -> Result<()> {
    if options.queue_size == 0 {
        return Err(DriverError::InvalidOption("queue_size must be positive").into());
    }
    if options.tx_slots == 0 {
        return Err(DriverError::InvalidOption("tx_slots must be positive").into());
    }
    if (options.rx_buffer_len as usize) < HEADER_LEN {
        return Err(DriverError::InvalidOption("rx_buffer_len must hold the header").into());
    }
    Ok(())
}

fn set_up_queue<'a, B: MmioBus, M: GuestMemory>(
    device: &VirtioMmioDevice<'_, B>,
    mem: &'a M,
    alloc: &mut GuestAllocator,
    index: u16,
    wanted_size: u16,
    features: u64,
) -> std::result::Result<SplitQueue<'a, M>, DriverError> {
    let max = device.queue_num_max(index);
    if max == 0 {
        return Err(DriverError::QueueUnavailable(index));
    }
    let bound = u32::from(wanted_size).min(max).min(32768);
    // Largest power of two not above the bound; bound >= 1 and <= 32768 so it fits in u16.
    let size = (1u32 << (31 - bound.leading_zeros())) as u16;
    let mut ring = SplitQueue::new(mem, alloc, size)?;
    ring.set_features(features & VIRTIO_F_EVENT_IDX);
    device.setup_queue(index, size, &ring.memory())?;
    Ok(ring)
}

/// Ethernet, ARP, IPv4 and ICMP frames, built and parsed the way the tests need them.
pub mod frames {
    pub const ETH_HEADER_LEN: usize = 14;
    pub const ETHERTYPE_IPV4: u16 = 0x0800;
    pub const ETHERTYPE_ARP: u16 = 0x0806;
    /// IEEE 802 "local experimental" EtherType, for frames no stack answers.
    pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;
    pub const BROADCAST: [u8; 6] = [0xff; 6];
    const IPV4_HEADER_LEN: usize = 20;
    const ICMP_ECHO_REPLY: u8 = 0;
    const ICMP_ECHO_REQUEST: u8 = 8;
    const IPPROTO_ICMP: u8 = 1;

    /// An Ethernet frame.
    pub fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::with_capacity(ETH_HEADER_LEN + payload.len());
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&src);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    pub fn ethertype(frame: &[u8]) -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]))
    }

    pub fn source(frame: &[u8]) -> Option<[u8; 6]> {
        frame.get(6..12)?.try_into().ok()
    }

    pub fn destination(frame: &[u8]) -> Option<[u8; 6]> {
        frame.get(..6)?.try_into().ok()
    }

    /// The RFC 1071 Internet checksum.
    pub fn checksum(data: &[u8]) -> u16 {
        let mut sum: u32 = data
            .chunks(2)
            .map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A broadcast ARP request: who has `target_ip`, tell `sender_ip` at `sender_mac`.
    pub fn arp_request(sender_mac: [u8; 6], sender_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
        let mut arp = Vec::with_capacity(28);
        arp.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
        arp.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        arp.extend_from_slice(&[6, 4]);
        arp.extend_from_slice(&1u16.to_be_bytes()); // request
        arp.extend_from_slice(&sender_mac);
        arp.extend_from_slice(&sender_ip);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&target_ip);
        ethernet(BROADCAST, sender_mac, ETHERTYPE_ARP, &arp)
    }

    /// An ARP reply's sender: (MAC, IPv4 address, target IPv4 address).
    pub fn parse_arp_reply(frame: &[u8]) -> Option<([u8; 6], [u8; 4], [u8; 4])> {
        if ethertype(frame)? != ETHERTYPE_ARP {
            return None;
        }
        let arp = frame.get(ETH_HEADER_LEN..ETH_HEADER_LEN + 28)?;
        if arp[..8] != [0, 1, 8, 0, 6, 4, 0, 2] {
            return None;
        }
        Some((
            arp[8..14].try_into().ok()?,
            arp[14..18].try_into().ok()?,
            arp[24..28].try_into().ok()?,
        ))
    }

    /// An IPv4 ICMP echo request from `src` to `dst`.
    pub fn icmp_echo_request(
        eth_dst: [u8; 6],
        eth_src: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        id: u16,
        seq: u16,
        data: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![ICMP_ECHO_REQUEST, 0, 0, 0];
        icmp.extend_from_slice(&id.to_be_bytes());
        icmp.extend_from_slice(&seq.to_be_bytes());
        icmp.extend_from_slice(data);
        let sum = checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let total_len = (IPV4_HEADER_LEN + icmp.len()) as u16;
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&total_len.to_be_bytes());
        ip.extend_from_slice(&id.to_be_bytes()); // identification
        ip.extend_from_slice(&[0x40, 0]); // don't fragment
        ip.extend_from_slice(&[64, IPPROTO_ICMP, 0, 0]);
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        ip.extend_from_slice(&icmp);
        ethernet(eth_dst, eth_src, ETHERTYPE_IPV4, &ip)
    }

    /// An ICMP echo reply, checksums verified: (IPv4 source, id, seq, data).
    pub fn parse_icmp_echo_reply(frame: &[u8]) -> Option<([u8; 4], u16, u16, Vec<u8>)> {
        if ethertype(frame)? != ETHERTYPE_IPV4 {
            return None;
        }
        let ip = frame.get(ETH_HEADER_LEN..)?;
        let header_len = usize::from(ip.first()? & 0x0f) * 4;
        let total_len = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
        if ip.first()? >> 4 != 4
            || header_len < IPV4_HEADER_LEN
            || total_len < header_len
            || ip.len() < total_len
            || ip[9] != IPPROTO_ICMP
            || checksum(&ip[..header_len]) != 0
        {
            return None;
        }
        let icmp = &ip[header_len..total_len];
        if icmp.len() < 8 || icmp[0] != ICMP_ECHO_REPLY || checksum(icmp) != 0 {
            return None;
        }
        Some((
            ip[12..16].try_into().ok()?,
            u16::from_be_bytes([icmp[4], icmp[5]]),
            u16::from_be_bytes([icmp[6], icmp[7]]),
            icmp[8..].to_vec(),
        ))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checksum_matches_rfc_1071_examples() {
            // RFC 1071 §3's example words sum to 0xddf2 (checksum 0x220d).
            assert_eq!(
                checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
                0x220d
            );
            // Odd lengths pad with a zero byte.
            assert_eq!(checksum(&[0x12]), !0x1200);
            let ip = [
                0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 0x40, 1, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1,
            ];
            let sum = checksum(&ip);
            let mut with_sum = ip;
            with_sum[10..12].copy_from_slice(&sum.to_be_bytes());
            assert_eq!(checksum(&with_sum), 0);
        }

        #[test]
        fn arp_and_icmp_frames_are_well_formed() {
            let mac = [2, 0, 0, 0, 0, 1];
            let request = arp_request(mac, [10, 77, 0, 2], [10, 77, 0, 1]);
            assert_eq!(request.len(), ETH_HEADER_LEN + 28);
            assert_eq!(destination(&request), Some(BROADCAST));
            assert_eq!(ethertype(&request), Some(ETHERTYPE_ARP));
            // Turned into a reply, it parses.
            let mut reply = request.clone();
            reply[ETH_HEADER_LEN + 7] = 2;
            assert_eq!(
                parse_arp_reply(&reply),
                Some((mac, [10, 77, 0, 2], [10, 77, 0, 1]))
            );
            assert_eq!(parse_arp_reply(&request), None, "a request is not a reply");

            let echo = icmp_echo_request(mac, mac, [1, 2, 3, 4], [5, 6, 7, 8], 7, 9, b"ping");
            // Turn the request into the reply a peer would send.
            let mut reply = echo.clone();
            reply[ETH_HEADER_LEN + 12..ETH_HEADER_LEN + 16].copy_from_slice(&[5, 6, 7, 8]);
            reply[ETH_HEADER_LEN + 16..ETH_HEADER_LEN + 20].copy_from_slice(&[1, 2, 3, 4]);
            let icmp = ETH_HEADER_LEN + 20;
            reply[icmp] = 0;
            reply[icmp + 2..icmp + 4].fill(0);
            let sum = checksum(&reply[icmp..]);
            reply[icmp + 2..icmp + 4].copy_from_slice(&sum.to_be_bytes());
            assert_eq!(
                parse_icmp_echo_reply(&reply),
                Some(([5, 6, 7, 8], 7, 9, b"ping".to_vec()))
            );
            assert_eq!(
                parse_icmp_echo_reply(&echo),
                None,
                "a request is not a reply"
            );
            reply[icmp + 9] ^= 1;
            assert_eq!(parse_icmp_echo_reply(&reply), None, "bad checksum");
        }
    }
}
