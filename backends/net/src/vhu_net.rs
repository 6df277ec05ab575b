//! The vhost-user side of the net device: features, configuration space, worker threads and
//! the events that drive each [`QueuePair`].
//!
//! Queue layout (virtio 1.2 §5.1.2): receiveq1, transmitq1, ..., receiveqN, transmitqN, then
//! the control queue. Each queue pair has its own worker thread and TAP queue; the control
//! queue shares the first pair's thread. A TAP queue is registered edge-triggered with its
//! pair's thread, so a worker wakes when frames arrive (or room frees up) and never polls.
//!
//! The backend implements `VhostUserBackend` (interior mutability) rather than
//! `VhostUserBackendMut`: the `RwLock` wrapper for the latter takes the write lock for every
//! event, which would serialise the queue pairs' threads.

use std::io;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use vhost_user_frontdoor::process::WorkerExitEvents;

use log::{debug, error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::net::{self, ControlTarget, Negotiated, NetError, NetPort, NetStats, QueuePair};
use crate::virtio_net::{NetConfigSpace, CONFIG_SPACE_SIZE};

/// Largest queue the backend accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queues are mapped to worker threads through a 64-bit mask: 2 per pair plus the control
/// queue.
pub const MAX_QUEUE_PAIRS: u16 = 31;

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Event {0} is not one of this worker's")]
    UnknownEvent(u16),
    #[error("Worker {0} serves no queue pair")]
    UnknownWorker(usize),
    #[error("Guest memory is not configured")]
    NoMemory,
    #[error("Cannot create a worker exit event")]
    ExitEvent(#[source] io::Error),
    #[error("Cannot register TAP queue {0} with its worker")]
    RegisterPort(usize, #[source] io::Error),
    #[error("Need one port per queue pair: {ports} ports for {pairs} pairs")]
    PortCount { ports: usize, pairs: u16 },
    #[error("Queue processing failed")]
    Net(#[source] NetError),
    #[error("Cannot notify the frontend")]
    Notify(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        io::Error::other(error)
    }
}

/// What the device shows the driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub mac: [u8; 6],
    pub mtu: u16,
    pub queue_pairs: u16,
    pub queue_size: u16,
}

/// A vhost-user-net backend serving one frontend connection over a set of ports.
#[derive(Debug)]
pub struct VhostUserNetBackend<P: NetPort> {
    config: NetConfig,
    pairs: Vec<Mutex<QueuePair<P>>>,
    ports: Vec<Arc<P>>,
    mem: RwLock<Option<GuestMemory>>,
    acked_features: AtomicU64,
    active_pairs: AtomicU16,
    stats: Arc<NetStats>,
    exit_events: WorkerExitEvents,
}

impl<P: NetPort + 'static> VhostUserNetBackend<P> {
    /// A backend with one port per queue pair.
    pub fn new(config: NetConfig, ports: Vec<Arc<P>>) -> Result<Self, Error> {
        if ports.len() != usize::from(config.queue_pairs) || ports.is_empty() {
            return Err(Error::PortCount {
                ports: ports.len(),
                pairs: config.queue_pairs,
            });
        }
        let stats = Arc::new(NetStats::default());
        let pairs = ports
            .iter()
            .map(|port| Mutex::new(QueuePair::new(port.clone(), stats.clone())))
            .collect();
        let exit_events = WorkerExitEvents::new(ports.len()).map_err(Error::ExitEvent)?;
        Ok(VhostUserNetBackend {
            config,
            pairs,
            ports,
            mem: RwLock::new(None),
            acked_features: AtomicU64::new(0),
            active_pairs: AtomicU16::new(1),
            stats,
            exit_events,
        })
    }

    /// The frame counters of this connection.
    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// The queue pairs frames are delivered to.
    pub fn active_queue_pairs(&self) -> u16 {
        self.active_pairs.load(Ordering::Acquire)
    }

    /// Registers each port with its pair's worker thread, edge-triggered: a worker hears of
    /// new frames or of room to write once, then reads or writes until it would block.
    pub fn register_ports<T: VhostUserBackend>(
        &self,
        handlers: &[Arc<VringEpollHandler<T>>],
    ) -> Result<(), Error> {
        let events = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
        for (index, (port, handler)) in self.ports.iter().zip(handlers).enumerate() {
            handler
                .register_listener(port.as_raw_fd(), events, self.port_event())
                .map_err(|e| Error::RegisterPort(index, e))?;
        }
        Ok(())
    }

    /// Event id of a pair's port inside its worker: past the queues and VUB's own event.
    fn port_event(&self) -> u64 {
        self.num_queues() as u64 + 1
    }

    fn ctrl_queue_index(&self) -> usize {
        2 * usize::from(self.config.queue_pairs)
    }

    fn negotiated(&self) -> Negotiated {
        Negotiated(self.acked_features.load(Ordering::Acquire))
    }

    fn memory(&self) -> Result<GuestMemory, Error> {
        self.mem
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or(Error::NoMemory)
    }

    fn pair(&self, index: usize) -> Result<MutexGuard<'_, QueuePair<P>>, Error> {
        let pair = self.pairs.get(index).ok_or(Error::UnknownWorker(index))?;
        Ok(pair.lock().unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// The configuration space as the driver sees it.
    fn config_space(&self) -> NetConfigSpace {
        let mut config = NetConfigSpace::default();
        let fields = &mut config.0;
        fields.mac = self.config.mac;
        // Feature-dependent fields are filled in unconditionally: the driver reads only the
        // ones it negotiated.
        fields.status = (VIRTIO_NET_S_LINK_UP as u16).to_le();
        fields.max_virtqueue_pairs = self.config.queue_pairs.to_le();
        fields.mtu = self.config.mtu.to_le();
        // SPEED_DUPLEX is not offered; still, say "unknown" rather than 0 Mb/s half duplex.
        fields.speed = u32::MAX.to_le();
        fields.duplex = 0xff;
        config
    }

    /// Connects the first `pairs` ports and disconnects the rest.
    fn activate_pairs(&self, pairs: u16) -> io::Result<()> {
        for (index, port) in self.ports.iter().enumerate() {
            port.set_queue_enabled(index < usize::from(pairs))?;
        }
        self.active_pairs.store(pairs, Ordering::Release);
        Ok(())
    }

    fn process_rx(&self, pair: &mut QueuePair<P>, vring: &VringRwLock) -> Result<(), Error> {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            // Frames wait in the port until the ring is started.
            pair.port_became_readable();
            return Ok(());
        }
        let mem = self.memory()?;
        let notify = pair
            .process_rx(state.get_queue_mut(), &mem.memory())
            .map_err(Error::Net)?;
        if notify {
            state.signal_used_queue().map_err(Error::Notify)?;
        }
        Ok(())
    }

    fn process_tx(&self, pair: &mut QueuePair<P>, vring: &VringRwLock) -> Result<(), Error> {
        let mut state = vring.get_mut();
        if !state.get_queue().ready() || !state.is_enabled() {
            return Ok(());
        }
        let mem = self.memory()?;
        let notify = pair
            .process_tx(state.get_queue_mut(), &mem.memory())
            .map_err(Error::Net)?;
        if notify {
            state.signal_used_queue().map_err(Error::Notify)?;
        }
        Ok(())
    }

    fn process_ctrl(&self, vring: &VringRwLock) -> Result<(), Error> {
        let mut state = vring.get_mut();
        let mem = self.memory()?;
        let notify = net::process_ctrl(
            state.get_queue_mut(),
            &mem.memory(),
            self.negotiated(),
            self,
        )
        .map_err(Error::Net)?;
        if notify {
            state.signal_used_queue().map_err(Error::Notify)?;
        }
        Ok(())
    }
}

impl<P: NetPort + 'static> ControlTarget for VhostUserNetBackend<P> {
    fn max_queue_pairs(&self) -> u16 {
        self.config.queue_pairs
    }

    fn set_active_queue_pairs(&self, pairs: u16) -> io::Result<()> {
        info!("Driver enabled {pairs} queue pairs");
        self.activate_pairs(pairs)
    }
}

/// Worker-thread queue masks: pair `i` (queues 2i and 2i+1) on thread `i`, and the control
/// queue with pair 0.
fn worker_masks(queue_pairs: u16) -> Vec<u64> {
    let ctrl = 1u64 << (2 * u32::from(queue_pairs));
    (0..u32::from(queue_pairs))
        .map(|pair| (0b11u64 << (2 * pair)) | if pair == 0 { ctrl } else { 0 })
        .collect()
}

/// Within a worker, VUB numbers the thread's queues in order: receive, transmit, and for
/// worker 0 the control queue.
const RX_EVENT: u16 = 0;
const TX_EVENT: u16 = 1;
const CTRL_EVENT: u16 = 2;

impl<P: NetPort + 'static> VhostUserBackend for VhostUserNetBackend<P> {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.ctrl_queue_index() + 1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.config.queue_size)
    }

    fn features(&self) -> u64 {
        [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
        ]
        .iter()
        .fold(
            VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            |acc, bit| acc | 1 << bit,
        )
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        let negotiated = Negotiated(features);
        debug!(
            "Features {features:#x}: {}-byte header, TAP offloads {:#x}",
            negotiated.header_len(),
            negotiated.tap_offloads()
        );
        for index in 0..self.pairs.len() {
            match self.pair(index) {
                Ok(mut pair) => {
                    if let Err(e) = pair.set_negotiated(negotiated) {
                        error!("Cannot configure TAP queue {index}: {e}");
                    }
                }
                Err(e) => error!("{e}"),
            }
        }
        // Only the first pair carries traffic until the driver asks for more through the
        // control queue (virtio 1.2 §5.1.6.5.5). A frontend that keeps the control queue to
        // itself (QEMU) enables pairs with SET_VRING_ENABLE instead, so all stay connected.
        let pairs = if negotiated.has(VIRTIO_NET_F_MQ) && !negotiated.has(VIRTIO_NET_F_CTRL_VQ) {
            self.config.queue_pairs
        } else {
            1
        };
        if let Err(e) = self.activate_pairs(pairs) {
            error!("Cannot enable {pairs} TAP queues: {e}");
        }
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: user-mode Linux 6.1 allocates its virtqueue interrupt only when this is
        // negotiated; without it virtio_net fails to probe there (it asks for IRQ 0, the timer).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        self.acked_features(0);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VUB sets EVENT_IDX on the vrings themselves; the data path reads it from the queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // VUB limits offset + size to 4 KiB; bytes beyond the device's fields read as zero.
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        if offset.checked_add(size).is_none_or(|end| end > 0x1000) {
            return Vec::new();
        }
        let config = self.config_space();
        let fields = &config.as_slice()[..CONFIG_SPACE_SIZE];
        let mut out = vec![0u8; size];
        if offset < fields.len() {
            let count = size.min(fields.len() - offset);
            out[..count].copy_from_slice(&fields[offset..offset + count]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Every field is read-only for a VERSION_1 driver (CTRL_MAC_ADDR is not offered).
        // Ignored rather than refused: VUB ends the connection when this returns an error.
        debug!(
            "Ignoring a write to read-only configuration bytes at {offset:#x}+{}",
            buf.len()
        );
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        *self
            .mem
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        worker_masks(self.config.queue_pairs)
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.for_thread(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        thread_id: usize,
    ) -> io::Result<()> {
        let vring = |index: u16| {
            vrings
                .get(usize::from(index))
                .ok_or(Error::UnknownEvent(device_event))
        };
        match device_event {
            RX_EVENT => {
                let mut pair = self.pair(thread_id)?;
                self.process_rx(&mut pair, vring(RX_EVENT)?)?;
            }
            TX_EVENT => {
                let mut pair = self.pair(thread_id)?;
                self.process_tx(&mut pair, vring(TX_EVENT)?)?;
            }
            CTRL_EVENT if thread_id == 0 => self.process_ctrl(vring(CTRL_EVENT)?)?,
            event if u64::from(event) == self.port_event() => {
                let mut pair = self.pair(thread_id)?;
                if evset.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                    warn!("TAP queue {thread_id} reports {evset:?}");
                }
                if evset.contains(EventSet::IN) {
                    pair.port_became_readable();
                    self.process_rx(&mut pair, vring(RX_EVENT)?)?;
                }
                if evset.contains(EventSet::OUT) && pair.tx_blocked() {
                    self.process_tx(&mut pair, vring(TX_EVENT)?)?;
                }
            }
            _ => return Err(Error::UnknownEvent(device_event).into()),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};

    use virtio_bindings::virtio_net::VIRTIO_NET_OK;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Address, Bytes, GuestAddress};

    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

    use super::*;
    use crate::net::tests::{memory, MockPort, BUF};
    use crate::virtio_net::HEADER_LEN;

    const QUEUE_SIZE: u16 = 16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const MAC: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    fn config(queue_pairs: u16) -> NetConfig {
        NetConfig {
            mac: MAC,
            mtu: 1500,
            queue_pairs,
            queue_size: QUEUE_SIZE,
        }
    }

    fn backend(queue_pairs: u16) -> (Vec<Arc<MockPort>>, VhostUserNetBackend<MockPort>) {
        let ports: Vec<_> = (0..queue_pairs)
            .map(|_| Arc::new(MockPort::new()))
            .collect();
        let backend = VhostUserNetBackend::new(config(queue_pairs), ports.clone()).unwrap();
        (ports, backend)
    }

    #[test]
    fn features_and_queue_layout() {
        let (_, backend) = backend(2);
        let features = backend.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_MQ,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        assert!(backend.protocol_features().contains(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
        ));
        assert_eq!(backend.num_queues(), 5);
        assert_eq!(backend.queues_per_thread(), vec![0b10011, 0b01100]);
        assert_eq!(backend.max_queue_size(), 16);
        assert!(backend.exit_event(1).is_some());
        assert!(backend.exit_event(2).is_none());
        assert!(matches!(
            VhostUserNetBackend::new(config(2), vec![Arc::new(MockPort::new())]),
            Err(Error::PortCount { ports: 1, pairs: 2 })
        ));
    }

    #[test]
    fn config_space_describes_the_link() {
        let (_, backend) = backend(3);
        let config = backend.get_config(0, CONFIG_SPACE_SIZE as u32);
        assert_eq!(config[..6], MAC);
        assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
        assert_eq!(u16::from_le_bytes([config[8], config[9]]), 3, "max pairs");
        assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500, "mtu");
        // Bounds: past the fields reads zero; past 4 KiB or overflowing reads nothing.
        let wide = backend.get_config(8, 64);
        assert_eq!(wide[..16], config[8..]);
        assert!(wide[16..].iter().all(|&b| b == 0));
        assert!(backend.get_config(0xfff, 2).is_empty());
        assert!(backend.get_config(u32::MAX, 2).is_empty());
        backend.set_config(0, &[0xff; 6]).unwrap();
        assert_eq!(backend.get_config(0, 6), MAC);
    }

    #[test]
    fn acked_features_configure_every_port() {
        let (ports, backend) = backend(2);
        let features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_NET_F_GUEST_CSUM
            | 1 << VIRTIO_NET_F_GUEST_TSO4
            | 1 << VIRTIO_NET_F_CTRL_VQ
            | 1 << VIRTIO_NET_F_MQ;
        backend.acked_features(features);
        for port in &ports {
            assert_eq!(*port.header_len.lock().unwrap(), Some(HEADER_LEN));
            assert_eq!(
                *port.offloads.lock().unwrap(),
                Some(net::tun_offload::CSUM | net::tun_offload::TSO4)
            );
        }
        // With a control queue, only the first pair is on until the driver asks.
        assert_eq!(*ports[0].enabled.lock().unwrap(), Some(true));
        assert_eq!(*ports[1].enabled.lock().unwrap(), Some(false));
        assert_eq!(backend.active_queue_pairs(), 1);
        backend.set_active_queue_pairs(2).unwrap();
        assert_eq!(*ports[1].enabled.lock().unwrap(), Some(true));
        // MQ without a control queue (QEMU keeps it): every pair stays on.
        backend.acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MQ);
        assert_eq!(backend.active_queue_pairs(), 2);
        backend.reset_device();
        assert_eq!(*ports[0].offloads.lock().unwrap(), Some(0));
        assert_eq!(backend.active_queue_pairs(), 1);
    }

    /// A started vring over guest memory, with its call eventfd.
    struct VringHarness {
        vring: VringRwLock,
        call: EventConsumer,
        desc: GuestAddress,
        avail: GuestAddress,
        next_desc: u16,
    }

    impl VringHarness {
        /// Rings at `base`, `base + 0x1000` and `base + 0x2000`.
        fn new(mem: &GuestMemory, base: u64) -> Self {
            let vring = VringRwLock::new(mem.clone(), QUEUE_SIZE).unwrap();
            vring
                .set_queue_info(base, base + 0x1000, base + 0x2000)
                .unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let (call, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
            // SAFETY: `into_raw_fd` hands over sole ownership of a valid eventfd.
            let call_file = unsafe { File::from_raw_fd(notifier.into_raw_fd()) };
            vring.set_call(Some(call_file));
            VringHarness {
                vring,
                call,
                desc: GuestAddress(base),
                avail: GuestAddress(base + 0x1000),
                next_desc: 0,
            }
        }

        /// Offers a chain of `(addr, len, flags)` descriptors (NEXT is filled in).
        fn offer(&mut self, mem: &GuestMemoryMmap, chain: &[(u64, u32, u16)]) {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                let index = head + i as u16;
                let (flags, next) = if i + 1 < chain.len() {
                    (flags | VRING_DESC_F_NEXT as u16, index + 1)
                } else {
                    (flags, 0)
                };
                let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                mem.write_obj(desc, self.desc.unchecked_add(16 * u64::from(index)))
                    .unwrap();
            }
            self.next_desc += chain.len() as u16;
            let idx_addr = self.avail.unchecked_add(2);
            let idx: u16 = mem.read_obj(idx_addr).unwrap();
            let slot = self
                .avail
                .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
            mem.write_obj(head, slot).unwrap();
            mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
        }

        fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
            let used = GuestAddress(self.vring.get_ref().get_queue().used_ring());
            mem.read_obj(used.unchecked_add(2)).unwrap()
        }

        fn notified(&self) -> bool {
            self.call.consume().is_ok()
        }
    }

    fn frame(len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; HEADER_LEN];
        frame.extend((0..len).map(|i| i as u8));
        frame
    }

    #[test]
    fn port_events_drive_receive_and_kicks_resume_it() {
        let (ports, backend) = backend(1);
        let mem = GuestMemoryAtomic::new(memory());
        backend.update_memory(mem.clone()).unwrap();
        backend.acked_features(1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MRG_RXBUF);
        let guest = mem.memory();
        let mut rx = VringHarness::new(&mem, 0);
        let tx = VringHarness::new(&mem, 0x4_0000);
        let vrings = [rx.vring.clone(), tx.vring.clone()];
        let port_event = backend.num_queues() as u16 + 1;

        // A frame arrives before any buffer: it stays in the port.
        ports[0].push(frame(100));
        backend
            .handle_event(port_event, EventSet::IN | EventSet::OUT, &vrings, 0)
            .unwrap();
        assert_eq!(ports[0].incoming.lock().unwrap().len(), 1);
        assert!(!rx.notified());

        // The driver posts a buffer and kicks: the frame is delivered.
        rx.offer(&guest, &[(BUF, 2048, W)]);
        backend
            .handle_event(RX_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(rx.used_idx(&guest), 1);
        assert!(rx.notified());
        assert!(ports[0].incoming.lock().unwrap().is_empty());

        // Out of buffers: the next frame waits for the next kick.
        ports[0].push(frame(60));
        backend
            .handle_event(port_event, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(ports[0].incoming.lock().unwrap().len(), 1);
        rx.offer(&guest, &[(BUF + 0x1000, 2048, W)]);
        backend
            .handle_event(RX_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(rx.used_idx(&guest), 2);
        assert_eq!(backend.stats().rx_frames.load(Ordering::Relaxed), 2);

        // A disabled ring takes nothing, even on a port event.
        ports[0].push(frame(60));
        rx.offer(&guest, &[(BUF + 0x2000, 2048, W)]);
        rx.vring.set_enabled(false);
        backend
            .handle_event(port_event, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(rx.used_idx(&guest), 2);
        rx.vring.set_enabled(true);
        backend
            .handle_event(RX_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(rx.used_idx(&guest), 3);
    }

    #[test]
    fn writable_port_resumes_a_blocked_transmit() {
        let (ports, backend) = backend(1);
        let mem = GuestMemoryAtomic::new(memory());
        backend.update_memory(mem.clone()).unwrap();
        backend.acked_features(1 << VIRTIO_F_VERSION_1);
        let guest = mem.memory();
        let rx = VringHarness::new(&mem, 0);
        let mut tx = VringHarness::new(&mem, 0x4_0000);
        let vrings = [rx.vring.clone(), tx.vring.clone()];
        let port_event = backend.num_queues() as u16 + 1;
        tx.offer(&guest, &[(BUF, 80, 0)]);
        *ports[0].full.lock().unwrap() = true;
        backend
            .handle_event(TX_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(tx.used_idx(&guest), 0);
        *ports[0].full.lock().unwrap() = false;
        backend
            .handle_event(port_event, EventSet::OUT, &vrings, 0)
            .unwrap();
        assert_eq!(tx.used_idx(&guest), 1);
        assert!(tx.notified());
        assert_eq!(ports[0].sent.lock().unwrap().len(), 1);
    }

    #[test]
    fn control_queue_is_served_by_the_first_worker() {
        let (ports, backend) = backend(2);
        let mem = GuestMemoryAtomic::new(memory());
        backend.update_memory(mem.clone()).unwrap();
        backend.acked_features(
            1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_CTRL_VQ | 1 << VIRTIO_NET_F_MQ,
        );
        let guest = mem.memory();
        let rx = VringHarness::new(&mem, 0);
        let tx = VringHarness::new(&mem, 0x4_0000);
        let mut ctrl = VringHarness::new(&mem, 0xc_0000);
        let vrings = [rx.vring.clone(), tx.vring.clone(), ctrl.vring.clone()];
        // class MQ, command VQ_PAIRS_SET, 2 pairs; then the ack byte.
        guest.write_slice(&[4, 0, 2, 0], GuestAddress(BUF)).unwrap();
        guest
            .write_slice(&[0xff], GuestAddress(BUF + 0x100))
            .unwrap();
        ctrl.offer(&guest, &[(BUF, 4, 0), (BUF + 0x100, 1, W)]);
        backend
            .handle_event(CTRL_EVENT, EventSet::IN, &vrings, 0)
            .unwrap();
        assert_eq!(ctrl.used_idx(&guest), 1);
        assert_eq!(
            guest.read_obj::<u8>(GuestAddress(BUF + 0x100)).unwrap(),
            VIRTIO_NET_OK as u8
        );
        assert_eq!(backend.active_queue_pairs(), 2);
        assert_eq!(*ports[1].enabled.lock().unwrap(), Some(true));
        assert!(ctrl.notified());
        // Worker 1 has no control queue.
        assert!(backend
            .handle_event(CTRL_EVENT, EventSet::IN, &vrings[..2], 1)
            .is_err());
    }

    #[test]
    fn unknown_events_and_missing_memory_are_errors() {
        let (_, backend) = backend(1);
        let mem = GuestMemoryAtomic::new(memory());
        let rx = VringHarness::new(&mem, 0);
        let tx = VringHarness::new(&mem, 0x4_0000);
        let vrings = [rx.vring.clone(), tx.vring.clone()];
        let error = backend
            .handle_event(TX_EVENT, EventSet::IN, &vrings, 0)
            .unwrap_err();
        assert!(error.to_string().contains("not configured"), "{error}");
        assert!(backend.handle_event(9, EventSet::IN, &vrings, 0).is_err());
        assert!(backend
            .handle_event(RX_EVENT, EventSet::IN, &vrings, 5)
            .is_err());
    }
}
