//! virtio-net device logic (virtio 1.2 §5.1), independent of the vhost-user transport: frames
//! move between a [`NetPort`] (one TAP queue) and a receive/transmit virtqueue pair, and the
//! control queue's commands are answered.
//!
//! The port exchanges frames in the same format as the virtqueues: a virtio-net header, then
//! the Ethernet frame. TAP devices opened with `IFF_VNET_HDR` speak exactly that, so headers
//! pass through; this module only checks them against the negotiated features and fills in
//! `num_buffers`.

use std::fmt::{self, Debug};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP, VIRTIO_NET_OK,
};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
    VolatileSlice,
};

use crate::virtio_net::{
    NetHeader, ETH_HEADER_LEN, HEADER_LEN, LEGACY_HEADER_LEN, NUM_BUFFERS_OFFSET,
};

/// Largest frame a TAP queue hands over: the header, a 64 KiB GSO packet, its Ethernet header
/// and a VLAN tag.
pub const MAX_FRAME_LEN: usize = HEADER_LEN + 65_536 + ETH_HEADER_LEN + 4;

/// Offload flags of `TUNSETOFFLOAD`.
pub mod tun_offload {
    pub const CSUM: u32 = libc::TUN_F_CSUM;
    pub const TSO4: u32 = libc::TUN_F_TSO4;
    pub const TSO6: u32 = libc::TUN_F_TSO6;
    pub const TSO_ECN: u32 = libc::TUN_F_TSO_ECN;
    pub const UFO: u32 = libc::TUN_F_UFO;
}

/// How long the warnings about dropped frames and bad chains stay quiet after one is logged.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// One queue of the host-side network device (a TAP queue).
pub trait NetPort: AsRawFd + Debug + Send + Sync {
    /// Reads one frame, virtio-net header first, into `buf`. `WouldBlock` when none is queued.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends one frame: the virtio-net `header`, then `payload` in order.
    fn write_frame(&self, header: &[u8], payload: &[VolatileSlice<'_>]) -> io::Result<usize>;
    /// Sets the virtio-net header length both directions use (10 or 12 bytes).
    fn set_header_len(&self, len: usize) -> io::Result<()>;
    /// Sets which offloads frames read from the port may carry (`tun_offload` flags).
    fn set_offloads(&self, flags: u32) -> io::Result<()>;
    /// Joins or leaves the set of queues the host device delivers frames to.
    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()>;
}

/// Failures that stop processing a queue (as opposed to a bad chain, which is returned).
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Cannot access the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    #[error("Cannot access the used ring")]
    UsedRing(#[source] GuestMemoryError),
}

/// Why a descriptor chain or a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("Device-readable descriptor in a receive chain")]
    ReadableDescriptor,
    #[error("Device-writable descriptor in a transmit chain")]
    WritableDescriptor,
    #[error("Descriptor at {0:#x} (+{1}) outside guest memory")]
    OutsideMemory(u64, u32),
    #[error("Chain shorter than the {0}-byte virtio-net header")]
    HeaderTooShort(usize),
    #[error("Frame of {0} bytes is shorter than an Ethernet header")]
    FrameTooShort(usize),
    #[error("Offload not negotiated: flags {flags:#x}, gso_type {gso_type:#x}")]
    OffloadNotNegotiated { flags: u8, gso_type: u8 },
}

/// The features the driver acknowledged, and what they imply for the data path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated(pub u64);

impl Negotiated {
    pub fn has(self, feature: u32) -> bool {
        self.0 & (1 << feature) != 0
    }

    /// 12 bytes (with `num_buffers`) under VERSION_1 or MRG_RXBUF, else the legacy 10.
    pub fn header_len(self) -> usize {
        if self.has(VIRTIO_F_VERSION_1) || self.has(VIRTIO_NET_F_MRG_RXBUF) {
            HEADER_LEN
        } else {
            LEGACY_HEADER_LEN
        }
    }

    pub fn mergeable_rx_buffers(self) -> bool {
        self.has(VIRTIO_NET_F_MRG_RXBUF)
    }

    /// The `TUNSETOFFLOAD` flags for what the driver can receive. TAP takes segmentation
    /// offloads only together with checksum offload, as virtio makes GUEST_TSO* depend on
    /// GUEST_CSUM.
    pub fn tap_offloads(self) -> u32 {
        if !self.has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut flags = tun_offload::CSUM;
        if self.has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= tun_offload::TSO4;
        }
        if self.has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= tun_offload::TSO6;
        }
        if self.has(VIRTIO_NET_F_GUEST_ECN) && flags & (tun_offload::TSO4 | tun_offload::TSO6) != 0
        {
            flags |= tun_offload::TSO_ECN;
        }
        if self.has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= tun_offload::UFO;
        }
        flags
    }

    /// Checks a transmitted header against the HOST_* features: a driver may only ask for
    /// the checksum and segmentation offloads it negotiated (virtio 1.2 §5.1.6.2.1).
    pub fn check_tx_header(self, header: &NetHeader) -> Result<(), ChainError> {
        let refused = || ChainError::OffloadNotNegotiated {
            flags: header.flags,
            gso_type: header.gso_type,
        };
        let needs_csum = u32::from(header.flags) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if needs_csum && !self.has(VIRTIO_NET_F_CSUM) {
            return Err(refused());
        }
        let gso_type = u32::from(header.gso_type);
        if gso_type & VIRTIO_NET_HDR_GSO_ECN != 0 && !self.has(VIRTIO_NET_F_HOST_ECN) {
            return Err(refused());
        }
        let allowed = match gso_type & !VIRTIO_NET_HDR_GSO_ECN {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => self.has(VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => self.has(VIRTIO_NET_F_HOST_TSO6),
            VIRTIO_NET_HDR_GSO_UDP => self.has(VIRTIO_NET_F_HOST_UFO),
            _ => false,
        };
        if allowed {
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// Clears what a received header may not carry: without GUEST_CSUM the device must leave
    /// `flags` zero (virtio 1.2 §5.1.6.4.1).
    fn sanitize_rx_header(self, header: &mut [u8]) {
        if !self.has(VIRTIO_NET_F_GUEST_CSUM) {
            if let Some(flags) = header.first_mut() {
                *flags = 0;
            }
        }
    }
}

/// Frame counters of a device, shared by its queue pairs.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames larger than any receive buffer chain could hold.
    pub rx_dropped: AtomicU64,
    /// Receive chains returned unused because they were malformed.
    pub rx_bad_chains: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains refused (malformed, offload not negotiated) or failed by the port.
    pub tx_errors: AtomicU64,
}

impl NetStats {
    fn add(counter: &AtomicU64, value: u64) {
        counter.fetch_add(value, Ordering::Relaxed);
    }
}

impl fmt::Display for NetStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        write!(
            f,
            "rx {} frames ({} bytes, {} dropped, {} bad chains), tx {} frames ({} bytes, {} errors)",
            get(&self.rx_frames),
            get(&self.rx_bytes),
            get(&self.rx_dropped),
            get(&self.rx_bad_chains),
            get(&self.tx_frames),
            get(&self.tx_bytes),
            get(&self.tx_errors),
        )
    }
}

/// Logs at most one warning per [`LOG_INTERVAL`], counting the ones it held back, so that a
/// guest cannot flood the log.
#[derive(Debug, Default)]
struct LogLimiter {
    quiet_until: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    fn warn(&mut self, args: fmt::Arguments<'_>) {
        let now = Instant::now();
        if self.quiet_until.is_some_and(|until| now < until) {
            self.suppressed += 1;
            return;
        }
        if self.suppressed > 0 {
            warn!("{args} ({} similar messages suppressed)", self.suppressed);
        } else {
            warn!("{args}");
        }
        self.suppressed = 0;
        self.quiet_until = Some(now + LOG_INTERVAL);
    }
}

/// Why a receive run stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxStop {
    /// The port has no more frames; nothing to do until it signals new ones.
    PortEmpty,
    /// A frame is waiting but the driver has not posted enough buffers; the avail index the
    /// attempt saw.
    OutOfBuffers(u16),
}

/// What became of the pending frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delivery {
    Delivered,
    /// Not enough buffers yet; the frame stays pending.
    NoBuffers,
    /// The frame was discarded.
    Dropped,
    /// A malformed chain was returned unused; the frame is still pending.
    ChainRejected,
}

/// The guest-memory buffers of one receive chain, within the pair's scratch list.
#[derive(Clone, Copy, Debug)]
struct RxChain {
    head: u16,
    /// End of this chain's entries in `rx_buffers`.
    buffers_end: usize,
    used_len: u32,
}

/// One receive/transmit virtqueue pair and its port.
#[derive(Debug)]
pub struct QueuePair<P: NetPort> {
    port: Arc<P>,
    negotiated: Negotiated,
    /// A frame read from the port, delivered from here into guest buffers.
    frame: Vec<u8>,
    /// Length of the frame in `frame` that still awaits buffers; 0 when there is none.
    pending: usize,
    /// False once a read found the port empty, until the port signals new frames.
    port_readable: bool,
    /// A transmit stopped because the port was full; resume when it is writable.
    tx_blocked: bool,
    rx_buffers: Vec<(GuestAddress, usize)>,
    rx_chains: Vec<RxChain>,
    stats: Arc<NetStats>,
    log: LogLimiter,
}

impl<P: NetPort> QueuePair<P> {
    pub fn new(port: Arc<P>, stats: Arc<NetStats>) -> Self {
        QueuePair {
            port,
            negotiated: Negotiated::default(),
            frame: vec![0; MAX_FRAME_LEN],
            pending: 0,
            port_readable: true,
            tx_blocked: false,
            rx_buffers: Vec::new(),
            rx_chains: Vec::new(),
            stats,
            log: LogLimiter::default(),
        }
    }

    pub fn port(&self) -> &Arc<P> {
        &self.port
    }

    /// Applies newly acknowledged features, including the port's header size and offloads.
    pub fn set_negotiated(&mut self, negotiated: Negotiated) -> io::Result<()> {
        self.negotiated = negotiated;
        self.port.set_header_len(negotiated.header_len())?;
        self.port.set_offloads(negotiated.tap_offloads())
    }

    /// The port signalled that frames may be waiting.
    pub fn port_became_readable(&mut self) {
        self.port_readable = true;
    }

    pub fn tx_blocked(&self) -> bool {
        self.tx_blocked
    }

    /// Moves frames from the port into the receive queue until the port is empty or the
    /// buffers run out, then re-arms the driver's notifications if it must post more.
    /// Returns whether the driver needs an interrupt.
    pub fn process_rx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, NetError> {
        let used_before = queue.next_used();
        loop {
            match self.fill_rx(queue, mem)? {
                RxStop::PortEmpty => {
                    // The port's own readiness event drives the next run, not the driver.
                    queue.disable_notification(mem).map_err(NetError::Queue)?;
                    break;
                }
                RxStop::OutOfBuffers(avail_seen) => {
                    // Ask to be kicked when buffers arrive; retry if some came meanwhile.
                    // (enable_notification's own answer counts buffers taken and handed
                    // back, which would spin.)
                    queue.enable_notification(mem).map_err(NetError::Queue)?;
                    if queue.event_idx_enabled() && avail_seen != queue.next_avail() {
                        // Some buffers are there, too few for the frame: the kick must come
                        // with the next buffer after them, not after the first of them.
                        set_avail_event(queue, mem, avail_seen)?;
                    }
                    let avail = queue
                        .avail_idx(mem, Ordering::Acquire)
                        .map_err(NetError::Queue)?;
                    if avail.0 == avail_seen {
                        break;
                    }
                }
            }
        }
        rx_needs_notification(queue, mem, used_before)
    }

    fn fill_rx(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<RxStop, NetError> {
        loop {
            // Read before each attempt, so that an attempt that fails saw at least this.
            let avail = queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(NetError::Queue)?
                .0;
            if self.pending == 0 {
                if !self.port_readable {
                    return Ok(RxStop::PortEmpty);
                }
                // Leave frames in the port while there is nowhere to put them.
                if avail == queue.next_avail() {
                    return Ok(RxStop::OutOfBuffers(avail));
                }
                match self.port.read_frame(&mut self.frame) {
                    Ok(len) if len < self.negotiated.header_len() + ETH_HEADER_LEN => {
                        self.log
                            .warn(format_args!("Ignoring a {len}-byte frame from the port"));
                    }
                    Ok(len) => self.pending = len,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.port_readable = false;
                        return Ok(RxStop::PortEmpty);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.log
                            .warn(format_args!("Cannot read from the port: {e}"));
                        self.port_readable = false;
                        return Ok(RxStop::PortEmpty);
                    }
                }
                continue;
            }
            let delivery = if self.negotiated.mergeable_rx_buffers() {
                self.deliver_merged(queue, mem)?
            } else {
                self.deliver_single(queue, mem)?
            };
            match delivery {
                Delivery::Delivered => {
                    NetStats::add(&self.stats.rx_frames, 1);
                    NetStats::add(&self.stats.rx_bytes, self.pending as u64);
                    self.pending = 0;
                }
                Delivery::Dropped => self.pending = 0,
                Delivery::NoBuffers => return Ok(RxStop::OutOfBuffers(avail)),
                Delivery::ChainRejected => {}
            }
        }
    }

    /// Without MRG_RXBUF each frame takes one whole chain.
    fn deliver_single(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Delivery, NetError> {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(Delivery::NoBuffers);
        };
        let head = chain.head_index();
        self.rx_buffers.clear();
        let capacity = match collect_writable(chain, mem, &mut self.rx_buffers) {
            Ok(capacity) if capacity >= self.negotiated.header_len() => capacity,
            Ok(_) => {
                return self.reject_rx_chain(
                    queue,
                    mem,
                    head,
                    &ChainError::HeaderTooShort(self.negotiated.header_len()),
                )
            }
            Err(error) => return self.reject_rx_chain(queue, mem, head, &error),
        };
        if self.pending > capacity {
            // Leave the chain for the next frame.
            queue.go_to_previous_position();
            return Ok(self.drop_frame(capacity));
        }
        let header_len = self.negotiated.header_len();
        self.negotiated
            .sanitize_rx_header(&mut self.frame[..header_len]);
        if header_len == HEADER_LEN {
            // One buffer per frame (required under VERSION_1, virtio 1.2 §5.1.6.4).
            self.frame[NUM_BUFFERS_OFFSET..HEADER_LEN].copy_from_slice(&1u16.to_le_bytes());
        }
        write_frame(mem, &self.rx_buffers, &self.frame[..self.pending]);
        // pending <= MAX_FRAME_LEN, which fits in u32.
        queue
            .add_used(mem, head, self.pending as u32)
            .map_err(NetError::Queue)?;
        Ok(Delivery::Delivered)
    }

    /// With MRG_RXBUF a frame fills as many chains as it needs; the first header says how
    /// many, and all of them are published together.
    fn deliver_merged(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<Delivery, NetError> {
        let start = queue.next_avail();
        let header_len = self.negotiated.header_len();
        self.rx_buffers.clear();
        self.rx_chains.clear();
        let mut placed = 0;
        while placed < self.pending {
            if self.rx_chains.len() == usize::from(queue.size()) {
                // Even a full ring of these buffers cannot hold the frame.
                queue.set_next_avail(start);
                return Ok(self.drop_frame(placed));
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                queue.set_next_avail(start);
                return Ok(Delivery::NoBuffers);
            };
            let head = chain.head_index();
            let first = self.rx_chains.is_empty();
            let collected =
                collect_writable(chain, mem, &mut self.rx_buffers).and_then(|capacity| {
                    if first && capacity < header_len {
                        Err(ChainError::HeaderTooShort(header_len))
                    } else {
                        Ok(capacity)
                    }
                });
            let capacity = match collected {
                Ok(capacity) => capacity,
                Err(error) => {
                    // Hand back this chain and the ones already taken for the frame, unused,
                    // and give up on the frame: the ring is not one this device can fill.
                    NetStats::add(&self.stats.rx_bad_chains, 1);
                    NetStats::add(&self.stats.rx_dropped, 1);
                    self.log.warn(format_args!(
                        "Receive chain {head} refused, frame dropped: {error}"
                    ));
                    for chain in &self.rx_chains {
                        queue
                            .add_used(mem, chain.head, 0)
                            .map_err(NetError::Queue)?;
                    }
                    queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
                    return Ok(Delivery::Dropped);
                }
            };
            let used = capacity.min(self.pending - placed);
            placed += used;
            self.rx_chains.push(RxChain {
                head,
                buffers_end: self.rx_buffers.len(),
                // used <= pending <= MAX_FRAME_LEN, which fits in u32.
                used_len: used as u32,
            });
        }
        self.negotiated
            .sanitize_rx_header(&mut self.frame[..header_len]);
        // At most a queue's worth of chains, so the count fits in u16.
        let num_buffers = self.rx_chains.len() as u16;
        self.frame[NUM_BUFFERS_OFFSET..HEADER_LEN].copy_from_slice(&num_buffers.to_le_bytes());
        let mut offset = 0;
        let mut buffers_start = 0;
        for chain in &self.rx_chains {
            let len = chain.used_len as usize;
            write_frame(
                mem,
                &self.rx_buffers[buffers_start..chain.buffers_end],
                &self.frame[offset..offset + len],
            );
            offset += len;
            buffers_start = chain.buffers_end;
        }
        publish_used(queue, mem, &self.rx_chains)?;
        Ok(Delivery::Delivered)
    }

    fn reject_rx_chain(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        error: &ChainError,
    ) -> Result<Delivery, NetError> {
        NetStats::add(&self.stats.rx_bad_chains, 1);
        self.log.warn(format_args!(
            "Receive chain {head} returned unused: {error}"
        ));
        queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
        Ok(Delivery::ChainRejected)
    }

    fn drop_frame(&mut self, room: usize) -> Delivery {
        NetStats::add(&self.stats.rx_dropped, 1);
        self.log.warn(format_args!(
            "Dropped a {}-byte frame: the receive buffers hold {room} bytes",
            self.pending
        ));
        Delivery::Dropped
    }

    /// Sends every frame the driver queued, gathering each straight from guest memory.
    /// Returns whether the driver needs an interrupt.
    pub fn process_tx(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, NetError> {
        self.tx_blocked = false;
        let mut completed = false;
        loop {
            queue.disable_notification(mem).map_err(NetError::Queue)?;
            let mut popped = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                popped = true;
                let head = chain.head_index();
                match self.send(chain, mem) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Retry this chain when the port has room; notifications stay off
                        // until then.
                        queue.go_to_previous_position();
                        self.tx_blocked = true;
                        return tx_needs_notification(queue, mem, completed);
                    }
                    Err(e) => {
                        NetStats::add(&self.stats.tx_errors, 1);
                        self.log
                            .warn(format_args!("Transmit chain {head} not sent: {e}"));
                    }
                    Ok(len) => {
                        NetStats::add(&self.stats.tx_frames, 1);
                        NetStats::add(&self.stats.tx_bytes, len as u64);
                    }
                }
                // The device writes nothing into a transmit chain.
                queue.add_used(mem, head, 0).map_err(NetError::Queue)?;
                completed = true;
            }
            // Stop when a pass popped nothing although the avail index says there is work:
            // the guest wrote an index more than a ring ahead, and looping would spin.
            if !queue.enable_notification(mem).map_err(NetError::Queue)? || !popped {
                break;
            }
        }
        tx_needs_notification(queue, mem, completed)
    }

    /// Checks one transmit chain and writes its frame to the port. A refused chain is an
    /// `InvalidData` error.
    fn send(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
    ) -> io::Result<usize> {
        let header_len = self.negotiated.header_len();
        let mut header = [0u8; HEADER_LEN];
        let mut header_filled = 0;
        let mut payload: Vec<VolatileSlice<'_>> = Vec::with_capacity(4);
        let mut payload_len = 0;
        let invalid = |error: ChainError| io::Error::new(io::ErrorKind::InvalidData, error);
        for desc in chain {
            if desc.is_write_only() {
                return Err(invalid(ChainError::WritableDescriptor));
            }
            let outside = || {
                invalid(ChainError::OutsideMemory(
                    desc.addr().raw_value(),
                    desc.len(),
                ))
            };
            let mut addr = desc.addr();
            let mut len = desc.len() as usize;
            if header_filled < header_len {
                let take = len.min(header_len - header_filled);
                mem.read_slice(&mut header[header_filled..header_filled + take], addr)
                    .map_err(|_| outside())?;
                header_filled += take;
                addr = addr.checked_add(take as u64).ok_or_else(outside)?;
                len -= take;
            }
            for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
                let slice = slice.map_err(|_| outside())?;
                payload_len += slice.len();
                payload.push(slice);
            }
        }
        if header_filled < header_len {
            return Err(invalid(ChainError::HeaderTooShort(header_len)));
        }
        if payload_len < ETH_HEADER_LEN {
            return Err(invalid(ChainError::FrameTooShort(payload_len)));
        }
        let mut fields = [0u8; LEGACY_HEADER_LEN];
        fields.copy_from_slice(&header[..LEGACY_HEADER_LEN]);
        self.negotiated
            .check_tx_header(&NetHeader::from_bytes(&fields))
            .map_err(invalid)?;
        // num_buffers means nothing on transmit; the port gets a zero.
        header[NUM_BUFFERS_OFFSET..].fill(0);
        self.port.write_frame(&header[..header_len], &payload)?;
        Ok(payload_len)
    }
}

/// Appends the device-writable buffers of a receive chain to `buffers`; returns their total
/// length. Every buffer must lie in guest memory.
fn collect_writable(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buffers: &mut Vec<(GuestAddress, usize)>,
) -> Result<usize, ChainError> {
    let start = buffers.len();
    let mut capacity = 0usize;
    for desc in chain {
        let failure = if !desc.is_write_only() {
            Some(ChainError::ReadableDescriptor)
        } else if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            Some(ChainError::OutsideMemory(
                desc.addr().raw_value(),
                desc.len(),
            ))
        } else {
            None
        };
        if let Some(error) = failure {
            buffers.truncate(start);
            return Err(error);
        }
        if desc.len() > 0 {
            buffers.push((desc.addr(), desc.len() as usize));
            capacity = capacity.saturating_add(desc.len() as usize);
        }
    }
    Ok(capacity)
}

/// Copies `data` into `buffers` in order. The buffers were range-checked and hold at least
/// `data.len()` bytes.
fn write_frame(mem: &GuestMemoryMmap, buffers: &[(GuestAddress, usize)], data: &[u8]) {
    let mut offset = 0;
    for &(addr, len) in buffers {
        if offset == data.len() {
            break;
        }
        let count = len.min(data.len() - offset);
        if let Err(e) = mem.write_slice(&data[offset..offset + count], addr) {
            // Unreachable after check_range unless the memory map changed underneath.
            debug!(
                "Cannot write a receive buffer at {:#x}: {e}",
                addr.raw_value()
            );
        }
        offset += count;
    }
}

/// Puts the chains of one merged frame in the used ring and exposes them with a single
/// index update: the driver must never see the first buffer without the others
/// (virtio 1.2 §5.1.6.4: "at least num_buffers are observed by the driver as used").
/// virtio-queue's `add_used` publishes each entry on its own, so the earlier entries are
/// written here and the last one through `add_used`, whose release store covers them all.
fn publish_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    chains: &[RxChain],
) -> Result<(), NetError> {
    let Some((last, earlier)) = chains.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let start = queue.next_used();
    let used_ring = GuestAddress(queue.used_ring());
    for (position, chain) in (0u16..).zip(earlier) {
        let slot = start.wrapping_add(position) % size;
        let mut element = [0u8; 8];
        element[..4].copy_from_slice(&u32::from(chain.head).to_le_bytes());
        element[4..].copy_from_slice(&chain.used_len.to_le_bytes());
        let addr = used_ring
            .checked_add(4 + 8 * u64::from(slot))
            .ok_or(NetError::UsedRing(GuestMemoryError::InvalidGuestAddress(
                used_ring,
            )))?;
        mem.write_slice(&element, addr)
            .map_err(NetError::UsedRing)?;
    }
    // earlier.len() < queue size, so it fits in u16.
    queue.set_next_used(start.wrapping_add(earlier.len() as u16));
    queue
        .add_used(mem, last.head, last.used_len)
        .map_err(NetError::Queue)
}

/// Whether the used entries added since `used_before` call for an interrupt. Receive entries
/// bypass `add_used`'s counting (see [`publish_used`]), so the EVENT_IDX test is done here on
/// the whole run, as virtio 1.2 §2.7.10 defines it.
fn rx_needs_notification(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    used_before: u16,
) -> Result<bool, NetError> {
    let used_now = queue.next_used();
    if used_now == used_before {
        return Ok(false);
    }
    if !queue.event_idx_enabled() {
        return Ok(true);
    }
    // The used index store must be ordered before the load of the driver's used_event.
    fence(Ordering::SeqCst);
    let avail_ring = GuestAddress(queue.avail_ring());
    let used_event_addr = avail_ring
        .checked_add(4 + 2 * u64::from(queue.size()))
        .ok_or(NetError::UsedRing(GuestMemoryError::InvalidGuestAddress(
            avail_ring,
        )))?;
    let used_event = u16::from_le(
        mem.load(used_event_addr, Ordering::Acquire)
            .map_err(NetError::UsedRing)?,
    );
    Ok(used_now.wrapping_sub(used_event).wrapping_sub(1) < used_now.wrapping_sub(used_before))
}

/// Writes `avail_event` (virtio 1.2 §2.7.10): the driver kicks once its avail index passes
/// `value`. virtio-queue only ever sets it to `next_avail`, which lags behind buffers a merged
/// frame took and handed back; vhost-net sets it to the avail index it last read, as here.
fn set_avail_event(queue: &Queue, mem: &GuestMemoryMmap, value: u16) -> Result<(), NetError> {
    let used_ring = GuestAddress(queue.used_ring());
    let addr = used_ring
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(NetError::UsedRing(GuestMemoryError::InvalidGuestAddress(
            used_ring,
        )))?;
    mem.store(value.to_le(), addr, Ordering::Release)
        .map_err(NetError::UsedRing)?;
    // The store must be visible before the avail index is read again.
    fence(Ordering::SeqCst);
    Ok(())
}

fn tx_needs_notification(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    completed: bool,
) -> Result<bool, NetError> {
    if !completed {
        return Ok(false);
    }
    queue.needs_notification(mem).map_err(NetError::Queue)
}

/// What the control queue may change on the device.
pub trait ControlTarget {
    /// Largest number of queue pairs the driver may enable.
    fn max_queue_pairs(&self) -> u16;
    /// Delivers frames to the first `pairs` queue pairs only.
    fn set_active_queue_pairs(&self, pairs: u16) -> io::Result<()>;
}

/// Command bytes read from a control chain: class, command and a few bytes of data.
const CTRL_READ_LEN: usize = 8;

/// Answers every command on the control queue with OK or ERR. Returns whether the driver
/// needs an interrupt.
pub fn process_ctrl(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    negotiated: Negotiated,
    target: &dyn ControlTarget,
) -> Result<bool, NetError> {
    let mut completed = false;
    loop {
        queue.disable_notification(mem).map_err(NetError::Queue)?;
        let mut popped = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            popped = true;
            let head = chain.head_index();
            let used_len = ctrl_command(chain, mem, negotiated, target);
            queue
                .add_used(mem, head, used_len)
                .map_err(NetError::Queue)?;
            completed = true;
        }
        // As for transmit: a runaway avail index must not make this loop spin.
        if !queue.enable_notification(mem).map_err(NetError::Queue)? || !popped {
            break;
        }
    }
    tx_needs_notification(queue, mem, completed)
}

/// Executes one control command (`struct virtio_net_ctrl`: class, command, data, then the
/// device-writable ack byte) and returns the bytes written: 1 with an ack, 0 when the chain
/// has no writable byte in guest memory.
fn ctrl_command(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    negotiated: Negotiated,
    target: &dyn ControlTarget,
) -> u32 {
    let mut command = [0u8; CTRL_READ_LEN];
    let mut read = 0;
    let mut ack_addr = None;
    let mut readable_ok = true;
    for desc in chain {
        if desc.is_write_only() {
            if desc.len() > 0 && ack_addr.is_none() {
                ack_addr = Some(desc.addr());
            }
            continue;
        }
        if ack_addr.is_some() {
            // A readable descriptor after the ack byte: not a command this device parses.
            readable_ok = false;
            continue;
        }
        let take = (desc.len() as usize).min(CTRL_READ_LEN - read);
        if mem
            .read_slice(&mut command[read..read + take], desc.addr())
            .is_err()
        {
            readable_ok = false;
        }
        read += take;
    }
    let Some(ack_addr) = ack_addr else {
        debug!("Control command without an ack byte");
        return 0;
    };
    let ack = if readable_ok && read >= 2 {
        execute_ctrl(
            command[0],
            command[1],
            &command[2..read],
            negotiated,
            target,
        )
    } else {
        VIRTIO_NET_ERR as u8
    };
    match mem.write_obj(ack, ack_addr) {
        Ok(()) => 1,
        Err(e) => {
            debug!("Cannot write a control ack: {e}");
            0
        }
    }
}

fn execute_ctrl(
    class: u8,
    command: u8,
    data: &[u8],
    negotiated: Negotiated,
    target: &dyn ControlTarget,
) -> u8 {
    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    if u32::from(class) != VIRTIO_NET_CTRL_MQ
        || u32::from(command) != VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
    {
        debug!("Unsupported control command {class}/{command}");
        return err;
    }
    let [lo, hi, ..] = *data else {
        return err;
    };
    let pairs = u16::from_le_bytes([lo, hi]);
    if !negotiated.has(VIRTIO_NET_F_MQ) || pairs == 0 || pairs > target.max_queue_pairs() {
        debug!("Refusing {pairs} queue pairs");
        return err;
    }
    match target.set_active_queue_pairs(pairs) {
        Ok(()) => ok,
        Err(e) => {
            warn!("Cannot switch to {pairs} queue pairs: {e}");
            err
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::os::fd::RawFd;
    use std::sync::Mutex;

    use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_GSO_UDP_L4};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    pub const W: u16 = VRING_DESC_F_WRITE as u16;
    const N: u16 = VRING_DESC_F_NEXT as u16;
    pub const MEM_SIZE: usize = 0x10_0000;
    /// Buffers live above the rings.
    pub const BUF: u64 = 0x8_0000;

    /// A port over in-memory queues: frames to read, frames written, and the settings.
    #[derive(Debug)]
    pub struct MockPort {
        pub incoming: Mutex<VecDeque<Vec<u8>>>,
        pub sent: Mutex<Vec<Vec<u8>>>,
        pub header_len: Mutex<Option<usize>>,
        pub offloads: Mutex<Option<u32>>,
        pub enabled: Mutex<Option<bool>>,
        /// Writes fail with WouldBlock while set.
        pub full: Mutex<bool>,
        event: EventFd,
    }

    impl MockPort {
        pub fn new() -> Self {
            MockPort {
                incoming: Mutex::new(VecDeque::new()),
                sent: Mutex::new(Vec::new()),
                header_len: Mutex::new(None),
                offloads: Mutex::new(None),
                enabled: Mutex::new(None),
                full: Mutex::new(false),
                event: EventFd::new(0).unwrap(),
            }
        }

        pub fn push(&self, frame: Vec<u8>) {
            self.incoming.lock().unwrap().push_back(frame);
        }
    }

    impl AsRawFd for MockPort {
        fn as_raw_fd(&self) -> RawFd {
            self.event.as_raw_fd()
        }
    }

    impl NetPort for MockPort {
        fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
            let frame = self
                .incoming
                .lock()
                .unwrap()
                .pop_front()
                .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }

        fn write_frame(&self, header: &[u8], payload: &[VolatileSlice<'_>]) -> io::Result<usize> {
            if *self.full.lock().unwrap() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut frame = header.to_vec();
            for slice in payload {
                let mut bytes = vec![0u8; slice.len()];
                slice.copy_to(&mut bytes[..]);
                frame.extend_from_slice(&bytes);
            }
            let len = frame.len();
            self.sent.lock().unwrap().push(frame);
            Ok(len)
        }

        fn set_header_len(&self, len: usize) -> io::Result<()> {
            *self.header_len.lock().unwrap() = Some(len);
            Ok(())
        }

        fn set_offloads(&self, flags: u32) -> io::Result<()> {
            *self.offloads.lock().unwrap() = Some(flags);
            Ok(())
        }

        fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
            *self.enabled.lock().unwrap() = Some(enabled);
            Ok(())
        }
    }

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn features(bits: &[u32]) -> Negotiated {
        Negotiated(bits.iter().fold(0, |acc, bit| acc | 1 << bit))
    }

    fn v1() -> Negotiated {
        features(&[VIRTIO_F_VERSION_1])
    }

    fn v1_mrg() -> Negotiated {
        features(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF])
    }

    /// A frame from the port: a 12-byte header with `flags`, then `len` payload bytes.
    fn port_frame(flags: u8, len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_LEN];
        frame[0] = flags;
        // Stale bytes where num_buffers goes: TAP does not write them.
        frame[10] = 0xee;
        frame[11] = 0xee;
        frame.extend((0..len).map(|i| (i % 251) as u8));
        frame
    }

    fn pair(port: &Arc<MockPort>, negotiated: Negotiated) -> QueuePair<MockPort> {
        let mut pair = QueuePair::new(port.clone(), Arc::new(NetStats::default()));
        pair.set_negotiated(negotiated).unwrap();
        pair
    }

    /// A split virtqueue in guest memory: descriptor table at 0, avail ring at 0x1000, used
    /// ring at 0x2000 (MockSplitQueue's layout lets the used ring overlap `used_event`, which
    /// EVENT_IDX tests need).
    struct Ring<'a> {
        queue: Queue,
        mem: &'a GuestMemoryMmap,
        next_desc: u16,
    }

    const DESC_TABLE: u64 = 0;
    const AVAIL_RING: u64 = 0x1000;
    const USED_RING: u64 = 0x2000;

    impl<'a> Ring<'a> {
        fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            let mut queue = Queue::new(size).unwrap();
            queue.set_size(size);
            queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
            queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
            queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
            queue.set_ready(true);
            Ring {
                queue,
                mem,
                next_desc: 0,
            }
        }

        fn size(&self) -> u16 {
            self.queue.size()
        }

        /// Offers one chain of `(addr, len, flags)` descriptors (NEXT is filled in) from the
        /// next descriptor index.
        fn offer(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let index = (head + i as u16) % self.size();
                let (flags, next) = if i + 1 < descs.len() {
                    (flags | N, (index + 1) % self.size())
                } else {
                    (flags, 0)
                };
                let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                let slot = GuestAddress(DESC_TABLE + 16 * u64::from(index));
                self.mem.write_obj(desc, slot).unwrap();
            }
            self.next_desc = (head + descs.len() as u16) % self.size();
            let idx: u16 = self.mem.read_obj(GuestAddress(AVAIL_RING + 2)).unwrap();
            let slot = AVAIL_RING + 4 + 2 * u64::from(idx % self.size());
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL_RING + 2))
                .unwrap();
            head
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
        }

        /// The `(id, len)` of used-ring slot `slot`.
        fn used(&self, slot: u16) -> (u32, u32) {
            let elem = USED_RING + 4 + 8 * u64::from(slot);
            (
                self.mem.read_obj(GuestAddress(elem)).unwrap(),
                self.mem.read_obj(GuestAddress(elem + 4)).unwrap(),
            )
        }

        fn avail_event(&self) -> u16 {
            let addr = USED_RING + 4 + 8 * u64::from(self.size());
            self.mem.read_obj(GuestAddress(addr)).unwrap()
        }

        fn set_used_event(&self, value: u16) {
            let addr = AVAIL_RING + 4 + 2 * u64::from(self.size());
            self.mem.write_obj(value, GuestAddress(addr)).unwrap();
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
            out
        }

        fn write(&self, addr: u64, data: &[u8]) {
            self.mem.write_slice(data, GuestAddress(addr)).unwrap();
        }
    }

    #[test]
    fn header_length_and_offloads_follow_the_features() {
        assert_eq!(Negotiated(0).header_len(), LEGACY_HEADER_LEN);
        assert_eq!(v1().header_len(), HEADER_LEN);
        assert_eq!(features(&[VIRTIO_NET_F_MRG_RXBUF]).header_len(), HEADER_LEN);

        assert_eq!(features(&[VIRTIO_NET_F_GUEST_TSO4]).tap_offloads(), 0);
        assert_eq!(
            features(&[VIRTIO_NET_F_GUEST_CSUM]).tap_offloads(),
            tun_offload::CSUM
        );
        assert_eq!(
            features(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6
            ])
            .tap_offloads(),
            tun_offload::CSUM | tun_offload::TSO4 | tun_offload::TSO6
        );
        assert_eq!(
            features(&[VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN]).tap_offloads(),
            tun_offload::CSUM,
            "ECN only together with TSO"
        );
        assert_eq!(
            features(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_ECN,
                VIRTIO_NET_F_GUEST_UFO
            ])
            .tap_offloads(),
            tun_offload::CSUM | tun_offload::TSO6 | tun_offload::TSO_ECN | tun_offload::UFO
        );

        let port = Arc::new(MockPort::new());
        pair(
            &port,
            features(&[VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_GUEST_CSUM]),
        );
        assert_eq!(*port.header_len.lock().unwrap(), Some(HEADER_LEN));
        assert_eq!(*port.offloads.lock().unwrap(), Some(tun_offload::CSUM));
    }

    #[test]
    fn transmit_offloads_must_be_negotiated() {
        let header = |flags: u32, gso_type: u32| NetHeader {
            flags: flags as u8,
            gso_type: gso_type as u8,
            ..NetHeader::default()
        };
        let csum = VIRTIO_NET_HDR_F_NEEDS_CSUM;
        let none = v1();
        assert_eq!(
            none.check_tx_header(&header(0, VIRTIO_NET_HDR_GSO_NONE)),
            Ok(())
        );
        assert!(none.check_tx_header(&header(csum, 0)).is_err());
        assert!(none
            .check_tx_header(&header(csum, VIRTIO_NET_HDR_GSO_TCPV4))
            .is_err());

        let tso4 = features(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4]);
        assert_eq!(tso4.check_tx_header(&header(csum, 0)), Ok(()));
        assert_eq!(
            tso4.check_tx_header(&header(csum, VIRTIO_NET_HDR_GSO_TCPV4)),
            Ok(())
        );
        assert_eq!(
            tso4.check_tx_header(&header(csum, VIRTIO_NET_HDR_GSO_TCPV6)),
            Err(ChainError::OffloadNotNegotiated {
                flags: 1,
                gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8
            })
        );
        for gso in [
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            VIRTIO_NET_HDR_GSO_UDP,
            VIRTIO_NET_HDR_GSO_UDP_L4,
            0x7f,
        ] {
            assert!(
                tso4.check_tx_header(&header(csum, gso)).is_err(),
                "{gso:#x}"
            );
        }
        let tso6 = features(&[VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO6]);
        assert_eq!(
            tso6.check_tx_header(&header(csum, VIRTIO_NET_HDR_GSO_TCPV6)),
            Ok(())
        );
    }

    #[test]
    fn received_frame_fills_one_chain_with_num_buffers_one() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(
            &port,
            features(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_GUEST_CSUM]),
        );
        let mut ring = Ring::new(&mem, 16);
        // The header and the frame split across two buffers, at an odd boundary.
        let head = ring.offer(&[(BUF, 7, W), (BUF + 0x1000, 2000, W)]);
        let frame = port_frame(VIRTIO_NET_HDR_F_DATA_VALID as u8, 60);
        port.push(frame.clone());
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used(0), (u32::from(head), frame.len() as u32));
        let mut expected = frame;
        expected[10..12].copy_from_slice(&1u16.to_le_bytes());
        let mut got = ring.read(BUF, 7);
        got.extend(ring.read(BUF + 0x1000, expected.len() - 7));
        assert_eq!(got, expected, "DATA_VALID kept with GUEST_CSUM");
        assert_eq!(pair.stats.rx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn without_guest_csum_received_flags_are_cleared() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1());
        let mut ring = Ring::new(&mem, 16);
        ring.offer(&[(BUF, 1526, W)]);
        port.push(port_frame(VIRTIO_NET_HDR_F_DATA_VALID as u8, 100));
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.read(BUF, 1), [0]);
    }

    #[test]
    fn legacy_header_has_no_num_buffers() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, Negotiated(0));
        assert_eq!(*port.header_len.lock().unwrap(), Some(LEGACY_HEADER_LEN));
        let mut ring = Ring::new(&mem, 16);
        ring.offer(&[(BUF, 1526, W)]);
        let mut frame = vec![0u8; LEGACY_HEADER_LEN];
        frame.extend([0xab; 64]);
        port.push(frame.clone());
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used(0).1, frame.len() as u32);
        assert_eq!(ring.read(BUF, frame.len()), frame);
    }

    #[test]
    fn merged_frame_spreads_over_chains_published_together() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 16);
        let heads: Vec<u16> = (0..4)
            .map(|i| ring.offer(&[(BUF + i * 0x1000, 1000, W)]))
            .collect();
        // 12 + 2500 bytes: three buffers of 1000, 1000 and 512.
        let frame = port_frame(0, 2500);
        port.push(frame.clone());
        ring.set_used_event(0);
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(ring.used(0), (u32::from(heads[0]), 1000));
        assert_eq!(ring.used(1), (u32::from(heads[1]), 1000));
        assert_eq!(ring.used(2), (u32::from(heads[2]), 512));
        let mut got = ring.read(BUF, 1000);
        got.extend(ring.read(BUF + 0x1000, 1000));
        got.extend(ring.read(BUF + 0x2000, 512));
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(got[HEADER_LEN..], frame[HEADER_LEN..]);
        // The fourth buffer is still available for the next frame.
        port.push(port_frame(0, 20));
        pair.port_became_readable();
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used(3), (u32::from(heads[3]), 32));
        assert_eq!(
            u16::from_le_bytes(ring.read(BUF + 0x3000 + 10, 2).try_into().unwrap()),
            1
        );
    }

    #[test]
    fn frame_waits_for_buffers_and_the_driver_is_asked_to_kick() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 16);
        ring.queue.set_event_idx(true);
        ring.offer(&[(BUF, 1000, W)]);
        let big = port_frame(0, 1500);
        port.push(big.clone());
        port.push(port_frame(0, 20));
        // One buffer cannot hold 1512 bytes: nothing is used, the frame stays pending, and
        // the second frame stays in the port.
        assert!(!pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 0);
        assert_eq!(port.incoming.lock().unwrap().len(), 1);
        assert_eq!(
            ring.avail_event(),
            1,
            "kick me when a buffer comes after this one"
        );
        assert_eq!(ring.queue.next_avail(), 0, "the taken chain went back");

        ring.offer(&[(BUF + 0x1000, 1000, W)]);
        ring.offer(&[(BUF + 0x2000, 1000, W)]);
        ring.set_used_event(0);
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(ring.used(0).1, 1000);
        assert_eq!(ring.used(1).1, 512);
        assert_eq!(ring.used(2).1, 32);
        assert!(port.incoming.lock().unwrap().is_empty());
        assert_eq!(pair.stats.rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn too_few_buffers_for_a_merged_frame_ask_for_a_kick_after_them() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 16);
        ring.queue.set_event_idx(true);
        ring.offer(&[(BUF, 500, W)]);
        ring.offer(&[(BUF + 0x1000, 500, W)]);
        port.push(port_frame(0, 1500));
        assert!(!pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.queue.next_avail(), 0, "both chains handed back");
        // Kick when the driver adds a third buffer, not at the first one already there.
        assert_eq!(ring.avail_event(), 2);
        ring.offer(&[(BUF + 0x2000, 1000, W)]);
        ring.set_used_event(0);
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 3);
    }

    #[test]
    fn event_idx_suppresses_receive_interrupts() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 16);
        ring.queue.set_event_idx(true);
        for i in 0..4 {
            ring.offer(&[(BUF + i * 0x1000, 2048, W)]);
        }
        // The driver wants an interrupt once used_idx passes 2.
        ring.set_used_event(2);
        port.push(port_frame(0, 20));
        port.push(port_frame(0, 20));
        assert!(!pair.process_rx(&mut ring.queue, &mem).unwrap());
        port.push(port_frame(0, 20));
        pair.port_became_readable();
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 3);
    }

    #[test]
    fn frame_larger_than_a_chain_is_dropped_and_counted() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1());
        let mut ring = Ring::new(&mem, 16);
        let head = ring.offer(&[(BUF, 100, W)]);
        port.push(port_frame(0, 200));
        port.push(port_frame(0, 50));
        assert!(pair.process_rx(&mut ring.queue, &mem).unwrap());
        // The oversized frame is gone; the chain took the next one.
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used(0), (u32::from(head), 62));
        assert_eq!(pair.stats.rx_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(pair.stats.rx_frames.load(Ordering::Relaxed), 1);

        // Merged: a frame bigger than a whole ring of buffers.
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = self::pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 2);
        ring.offer(&[(BUF, 64, W)]);
        ring.offer(&[(BUF + 0x1000, 64, W)]);
        port.push(port_frame(0, 500));
        assert!(!pair.process_rx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), 0);
        assert_eq!(ring.queue.next_avail(), 0);
        assert_eq!(pair.stats.rx_dropped.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn malformed_receive_chains_are_returned_unused() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1());
        let mut ring = Ring::new(&mem, 16);
        let readable = ring.offer(&[(BUF, 2048, 0)]);
        let short = ring.offer(&[(BUF + 0x1000, 8, W)]);
        let outside = ring.offer(&[(MEM_SIZE as u64 - 16, 2048, W)]);
        let good = ring.offer(&[(BUF + 0x2000, 2048, W)]);
        let frame = port_frame(0, 64);
        port.push(frame.clone());
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used_idx(), 4);
        assert_eq!(ring.used(0), (u32::from(readable), 0));
        assert_eq!(ring.used(1), (u32::from(short), 0));
        assert_eq!(ring.used(2), (u32::from(outside), 0));
        assert_eq!(ring.used(3), (u32::from(good), frame.len() as u32));
        assert_eq!(pair.stats.rx_bad_chains.load(Ordering::Relaxed), 3);
        assert_eq!(ring.read(BUF + 0x2000 + 12, 64), frame[12..]);

        // Merged: a bad chain in the middle returns the frame's chains unused.
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = self::pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 16);
        ring.offer(&[(BUF, 100, W)]);
        ring.offer(&[(BUF + 0x1000, 100, 0)]);
        ring.offer(&[(BUF + 0x2000, 2048, W)]);
        port.push(port_frame(0, 150));
        port.push(port_frame(0, 20));
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(ring.used(0), (0, 0));
        assert_eq!(ring.used(1), (1, 0));
        assert_eq!(ring.used(2), (2, 32), "the next frame goes on");
    }

    #[test]
    fn transmitted_frame_is_gathered_and_header_checked() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, features(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_CSUM]));
        let mut ring = Ring::new(&mem, 16);
        let mut header = [0u8; HEADER_LEN];
        header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        header[10] = 7; // num_buffers: ignored on transmit
        let payload: Vec<u8> = (0..100u8).collect();
        // Header split over two descriptors, the second also carrying payload.
        ring.write(BUF, &header[..5]);
        ring.write(BUF + 0x1000, &header[5..]);
        ring.write(BUF + 0x1000 + 7, &payload[..40]);
        ring.write(BUF + 0x2000, &payload[40..]);
        let head = ring.offer(&[(BUF, 5, 0), (BUF + 0x1000, 47, 0), (BUF + 0x2000, 60, 0)]);
        assert!(pair.process_tx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used(0), (u32::from(head), 0));
        let sent = port.sent.lock().unwrap();
        let mut expected = header.to_vec();
        expected[10] = 0;
        expected.extend(&payload);
        assert_eq!(sent.as_slice(), [expected]);
        assert_eq!(pair.stats.tx_bytes.load(Ordering::Relaxed), 100);
    }

    #[test]
    fn malformed_transmit_chains_are_not_sent() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1());
        let mut ring = Ring::new(&mem, 16);
        let mut csum_header = [0u8; HEADER_LEN];
        csum_header[0] = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        ring.write(BUF + 0x4000, &csum_header);
        let chains = [
            ring.offer(&[(BUF, 8, 0)]),                         // header too short
            ring.offer(&[(BUF, 12, 0), (BUF + 0x1000, 64, W)]), // writable descriptor
            ring.offer(&[(BUF, 12, 0), (MEM_SIZE as u64 - 8, 64, 0)]), // outside memory
            ring.offer(&[(BUF, 12, 0), (BUF + 0x1000, 10, 0)]), // shorter than Ethernet
            ring.offer(&[(BUF + 0x4000, 12, 0), (BUF + 0x1000, 64, 0)]), // CSUM not acked
            ring.offer(&[(BUF, 12, 0), (BUF + 0x1000, 64, 0)]), // fine
        ];
        assert!(pair.process_tx(&mut ring.queue, &mem).unwrap());
        assert_eq!(ring.used_idx(), chains.len() as u16);
        for (i, head) in chains.iter().enumerate() {
            assert_eq!(ring.used(i as u16), (u32::from(*head), 0));
        }
        assert_eq!(port.sent.lock().unwrap().len(), 1);
        assert_eq!(pair.stats.tx_errors.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn full_port_pauses_transmit_until_writable() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1());
        let mut ring = Ring::new(&mem, 16);
        ring.offer(&[(BUF, 80, 0)]);
        ring.offer(&[(BUF, 80, 0)]);
        *port.full.lock().unwrap() = true;
        assert!(!pair.process_tx(&mut ring.queue, &mem).unwrap());
        assert!(pair.tx_blocked());
        assert_eq!(ring.used_idx(), 0);
        *port.full.lock().unwrap() = false;
        assert!(pair.process_tx(&mut ring.queue, &mem).unwrap());
        assert!(!pair.tx_blocked());
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(port.sent.lock().unwrap().len(), 2);
    }

    #[derive(Debug)]
    struct Pairs {
        max: u16,
        active: Cell<u16>,
        fail: bool,
    }

    impl ControlTarget for Pairs {
        fn max_queue_pairs(&self) -> u16 {
            self.max
        }

        fn set_active_queue_pairs(&self, pairs: u16) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("refused"));
            }
            self.active.set(pairs);
            Ok(())
        }
    }

    /// Offers a control command and returns (used length, ack byte).
    fn ctrl(
        ring: &mut Ring<'_>,
        negotiated: Negotiated,
        target: &Pairs,
        command: &[u8],
    ) -> (u32, u8) {
        let index = u64::from(ring.next_desc);
        let cmd_addr = BUF + index * 0x100;
        let ack_addr = cmd_addr + 0x80;
        ring.write(cmd_addr, command);
        ring.write(ack_addr, &[0xff]);
        ring.offer(&[
            (cmd_addr, 2, 0),
            (cmd_addr + 2, command.len() as u32 - 2, 0),
            (ack_addr, 1, W),
        ]);
        process_ctrl(&mut ring.queue, ring.mem, negotiated, target).unwrap();
        let used = ring.used(ring.used_idx() - 1).1;
        (used, ring.read(ack_addr, 1)[0])
    }

    #[test]
    fn control_queue_sets_queue_pairs_and_refuses_the_rest() {
        let mem = memory();
        let mut ring = Ring::new(&mem, 64);
        let target = Pairs {
            max: 4,
            active: Cell::new(1),
            fail: false,
        };
        let mq = features(&[VIRTIO_F_VERSION_1, VIRTIO_NET_F_MQ]);
        let ok = VIRTIO_NET_OK as u8;
        let err = VIRTIO_NET_ERR as u8;
        assert_eq!(ctrl(&mut ring, mq, &target, &[4, 0, 3, 0]), (1, ok));
        assert_eq!(target.active.get(), 3);
        assert_eq!(ctrl(&mut ring, mq, &target, &[4, 0, 5, 0]), (1, err));
        assert_eq!(ctrl(&mut ring, mq, &target, &[4, 0, 0, 0]), (1, err));
        assert_eq!(
            ctrl(&mut ring, v1(), &target, &[4, 0, 2, 0]),
            (1, err),
            "MQ not acked"
        );
        assert_eq!(
            ctrl(&mut ring, mq, &target, &[4, 0, 2]),
            (1, err),
            "data too short"
        );
        // RX mode, MAC and announce commands are not offered.
        assert_eq!(ctrl(&mut ring, mq, &target, &[0, 0, 1]), (1, err));
        assert_eq!(
            ctrl(&mut ring, mq, &target, &[1, 1, 0, 0, 0, 0, 0, 0]),
            (1, err)
        );
        assert_eq!(ctrl(&mut ring, mq, &target, &[3, 0, 0]), (1, err));
        assert_eq!(target.active.get(), 3);
        let failing = Pairs {
            max: 4,
            active: Cell::new(1),
            fail: true,
        };
        assert_eq!(ctrl(&mut ring, mq, &failing, &[4, 0, 2, 0]), (1, err));

        // No ack byte: nothing written, used length 0.
        ring.write(BUF + 0x8000, &[4, 0, 1, 0]);
        ring.offer(&[(BUF + 0x8000, 4, 0)]);
        process_ctrl(&mut ring.queue, &mem, mq, &target).unwrap();
        assert_eq!(ring.used(ring.used_idx() - 1).1, 0);
        // A command outside guest memory is answered with ERR.
        ring.write(BUF + 0x9000, &[0xff]);
        ring.offer(&[(MEM_SIZE as u64 - 1, 4, 0), (BUF + 0x9000, 1, W)]);
        process_ctrl(&mut ring.queue, &mem, mq, &target).unwrap();
        assert_eq!(ring.used(ring.used_idx() - 1).1, 1);
        assert_eq!(ring.read(BUF + 0x9000, 1), [err]);
    }

    #[test]
    fn used_batch_wraps_around_the_ring() {
        let mem = memory();
        let port = Arc::new(MockPort::new());
        let mut pair = pair(&port, v1_mrg());
        let mut ring = Ring::new(&mem, 4);
        // Move the ring indices near the wrap: three single-buffer frames.
        for i in 0..3 {
            ring.offer(&[(BUF + i * 0x1000, 2048, W)]);
            port.push(port_frame(0, 20));
        }
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used_idx(), 3);
        // Reuse descriptors 0..3 for a three-buffer frame that wraps the used ring.
        ring.next_desc = 0;
        for i in 0..3 {
            ring.offer(&[(BUF + i * 0x1000, 100, W)]);
        }
        port.push(port_frame(0, 250));
        pair.port_became_readable();
        pair.process_rx(&mut ring.queue, &mem).unwrap();
        assert_eq!(ring.used_idx(), 6);
        assert_eq!(ring.used(3), (0, 100));
        assert_eq!(ring.used(0), (1, 100));
        assert_eq!(ring.used(1), (2, 62));
    }
}
