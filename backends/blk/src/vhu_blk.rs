//! The vhost-user side of the block device: features, configuration space and queue
//! processing on top of [`BlockDevice`].
//!
//! The backend implements `VhostUserBackend` (interior mutability) rather than
//! `VhostUserBackendMut`: the `RwLock` wrapper for the latter takes the write lock for every
//! queue event, which would serialise the per-queue worker threads of a multiqueue device.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use vhost_user_frontdoor::process::WorkerExitEvents;

use log::{debug, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{ByteValued, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::blk::{BlockDevice, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SECTOR_SIZE};
use crate::pinning;
use crate::stats::{IoStats, QueueCounters};
use crate::virtio_blk::{BlkConfig, CONFIG_SPACE_SIZE, WCE_OFFSET};

/// Largest single data segment the driver may use (SIZE_MAX).
pub const SEGMENT_SIZE_MAX: u32 = 1 << 20;
/// Largest queue the backend accepts.
pub const MAX_QUEUE_SIZE: u16 = 1024;
/// Queues are mapped to worker threads through a 64-bit mask.
pub const MAX_QUEUES: usize = 64;
/// How long a queue thread waits for the driver's next request before signalling completions.
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_micros(100);
/// Longest accepted coalescing window.
pub const MAX_COALESCE_WINDOW: Duration = Duration::from_millis(10);
/// Bounds the latency that coalescing adds: completions are signalled after at most this
/// many windows, however steadily the driver keeps submitting.
const MAX_WINDOWS_PER_SIGNAL: u32 = 16;
/// Completions signalled without waiting between two probes of whether waiting pays.
const PROBE_INTERVAL: usize = 128;
/// Consecutive fruitless waits after which waiting is turned off.
const WAIT_CREDIT: usize = 8;

type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Event {0} is not a queue of this worker")]
    UnknownEvent(u16),
    #[error("Guest memory is not configured")]
    NoMemory,
    #[error("Cannot create a worker exit event")]
    ExitEvent(#[source] io::Error),
    #[error("Cannot access the virtqueue")]
    Queue(#[source] virtio_queue::Error),
    #[error("Cannot wait for a queue kick")]
    Kick(#[source] io::Error),
    #[error("Cannot notify the frontend")]
    Notify(#[source] io::Error),
}

impl From<Error> for io::Error {
    fn from(error: Error) -> Self {
        io::Error::other(error)
    }
}

/// Queue geometry of the device.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    pub num_queues: usize,
    pub queue_size: u16,
}

/// A vhost-user-blk backend serving one frontend connection.
#[derive(Debug)]
pub struct VhostUserBlkBackend {
    device: BlockDevice,
    queues: QueueConfig,
    mem: RwLock<Option<GuestMemory>>,
    event_idx: AtomicBool,
    acked_features: AtomicU64,
    exit_events: WorkerExitEvents,
    /// See [`Self::process_queue`]; zero signals at once.
    window: Duration,
    coalescing: Vec<Coalescing>,
    /// Shared with the process, which reports them; they outlive the connection.
    stats: Arc<IoStats>,
}

impl VhostUserBlkBackend {
    pub fn new(device: BlockDevice, queues: QueueConfig) -> Result<Self, Error> {
        let threads = worker_masks(queues.num_queues).len();
        let exit_events = WorkerExitEvents::new(threads).map_err(Error::ExitEvent)?;
        Ok(VhostUserBlkBackend {
            device,
            queues,
            mem: RwLock::new(None),
            event_idx: AtomicBool::new(false),
            acked_features: AtomicU64::new(0),
            exit_events,
            window: DEFAULT_COALESCE_WINDOW,
            coalescing: (0..queues.num_queues).map(|_| Coalescing::new()).collect(),
            stats: Arc::new(IoStats::new(queues.num_queues)),
        })
    }

    /// How long to wait for more requests before signalling completions (zero: never
    /// wait); capped at [`MAX_COALESCE_WINDOW`].
    pub fn with_coalesce_window(mut self, window: Duration) -> Self {
        self.window = window.min(MAX_COALESCE_WINDOW);
        self
    }

    /// Counts into `stats` (one entry per queue) instead of counters of its own, so that
    /// the counts add up across connections.
    pub fn with_stats(mut self, stats: Arc<IoStats>) -> Self {
        self.stats = stats;
        self
    }

    /// The per-queue I/O counters.
    pub fn stats(&self) -> &Arc<IoStats> {
        &self.stats
    }

    pub fn device(&self) -> &BlockDevice {
        &self.device
    }

    fn discard_offered(&self) -> bool {
        !self.device.read_only() && self.device.storage().supports_discard()
    }

    fn negotiated(&self, feature: u32) -> bool {
        self.acked_features.load(Ordering::Acquire) & (1 << feature) != 0
    }

    /// The configuration space as the driver sees it now.
    fn config(&self) -> BlkConfig {
        let storage = self.device.storage();
        let logical = storage.logical_block_size();
        let physical_blocks = (storage.physical_block_size() / logical).max(1);
        let mut config = BlkConfig::default();
        let fields = &mut config.0;
        fields.capacity = (storage.capacity() / SECTOR_SIZE).to_le();
        fields.size_max = SEGMENT_SIZE_MAX.to_le();
        fields.seg_max = u32::from(self.queues.queue_size.saturating_sub(2).max(1)).to_le();
        fields.blk_size = logical.to_le();
        fields.physical_block_exp = physical_blocks.trailing_zeros() as u8;
        fields.min_io_size = u16::try_from(physical_blocks).unwrap_or(u16::MAX).to_le();
        fields.wce = u8::from(!self.device.writethrough());
        fields.num_queues = u16::try_from(self.queues.num_queues)
            .unwrap_or(u16::MAX)
            .to_le();
        if self.discard_offered() {
            let alignment = (storage.physical_block_size() / SECTOR_SIZE as u32).max(1);
            fields.max_discard_sectors = MAX_DISCARD_SECTORS.to_le();
            fields.max_discard_seg = MAX_DISCARD_SEGMENTS.to_le();
            fields.discard_sector_alignment = alignment.to_le();
            fields.max_write_zeroes_sectors = MAX_DISCARD_SECTORS.to_le();
            fields.max_write_zeroes_seg = MAX_DISCARD_SEGMENTS.to_le();
            fields.write_zeroes_may_unmap = 1;
        }
        config
    }

    fn memory(&self) -> Result<GuestMemory, Error> {
        self.mem
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
            .ok_or(Error::NoMemory)
    }

    /// Serves the queue, then signals the driver once for everything completed.
    ///
    /// When the driver keeps several requests in flight, the thread waits a short window for
    /// its next kick before signalling, so that one interrupt covers a burst of completions:
    /// an interrupt costs a guest far more than a kick (under TCG, and through a hypervisor's
    /// injection path). Whether waiting pays is probed now and then; a driver that waits for
    /// each completion before submitting again (queue depth 1) turns the wait off.
    fn process_queue(&self, queue: usize, vring: &VringRwLock) -> Result<(), Error> {
        let mem = self.memory()?;
        let counters = self
            .stats
            .queue(queue)
            .ok_or(Error::UnknownEvent(queue as u16))?;
        let completed = self.serve_available(vring, &mem, counters)?;
        if completed == 0 {
            return Ok(());
        }
        let coalescing = self.coalescing.get(queue);
        if let Some(coalescing) = coalescing.filter(|c| c.should_wait(completed, self.window)) {
            let started = Instant::now();
            let mut caught = 0;
            while started.elapsed() < self.window * MAX_WINDOWS_PER_SIGNAL
                && wait_for_kick(vring, self.window).map_err(Error::Kick)?
            {
                caught += self.serve_available(vring, &mem, counters)?;
            }
            coalescing.record(caught);
        }
        let mut state = vring.get_mut();
        if !self.event_idx.load(Ordering::Acquire)
            || state.needs_notification().map_err(Error::Queue)?
        {
            state.signal_used_queue().map_err(Error::Notify)?;
        }
        Ok(())
    }

    /// Completes every available request; returns how many were completed.
    fn serve_available(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemory,
        counters: &QueueCounters,
    ) -> Result<usize, Error> {
        if !self.event_idx.load(Ordering::Acquire) {
            return self
                .process_available(vring, mem, counters)
                .map(|(_, completed)| completed);
        }
        // With EVENT_IDX, re-check after re-enabling notifications so that a request added
        // in between is not left waiting for a kick that will not come.
        let mut completed = 0;
        loop {
            vring.disable_notification().map_err(Error::Queue)?;
            let (popped, done) = self.process_available(vring, mem, counters)?;
            completed += done;
            if !vring.enable_notification().map_err(Error::Queue)? {
                return Ok(completed);
            }
            if !popped {
                // The avail index says there is work, yet no chain can be popped: the guest
                // wrote an index more than a ring ahead. Looping would spin forever; wait for
                // the next kick instead.
                // The process's logger rate-limits this line (a guest can repeat it at will).
                warn!("Guest avail index runs ahead of the ring; ignoring it until the next kick");
                return Ok(completed);
            }
        }
    }

    /// Pops and completes chains until the ring is empty; returns whether any chain was
    /// popped and how many were completed.
    fn process_available(
        &self,
        vring: &VringRwLock,
        mem: &GuestMemory,
        counters: &QueueCounters,
    ) -> Result<(bool, usize), Error> {
        let mut state = vring.get_mut();
        let mut completed = 0;
        let mut popped = false;
        while let Some(chain) = state.get_queue_mut().pop_descriptor_chain(mem.memory()) {
            popped = true;
            let head = chain.head_index();
            let used_len = self.device.process_chain(chain, counters);
            match state.add_used(head, used_len) {
                Ok(()) => completed += 1,
                // A head index beyond the ring comes from the guest; the process's logger
                // rate-limits the line.
                Err(e) => warn!("Cannot complete request {head}: {e}"),
            }
        }
        Ok((popped, completed))
    }
}

/// Whether one queue's thread waits for more requests before it signals completions.
#[derive(Debug)]
struct Coalescing {
    /// Waits left before giving up: reset when a wait catches a request, decremented when
    /// one catches none. A burst of requests ends with an empty wait, so one is no reason
    /// to stop.
    credit: AtomicUsize,
    /// Requests left before the next probe while waiting is off.
    until_probe: AtomicUsize,
}

impl Coalescing {
    fn new() -> Self {
        Coalescing {
            credit: AtomicUsize::new(0),
            until_probe: AtomicUsize::new(PROBE_INTERVAL),
        }
    }

    /// Called with the requests just completed; true if the thread should wait for more.
    fn should_wait(&self, completed: usize, window: Duration) -> bool {
        if window.is_zero() {
            return false;
        }
        // One thread serves each queue, so these relaxed steps never race.
        if self.credit.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let left = self.until_probe.load(Ordering::Relaxed);
        if left > completed {
            self.until_probe.store(left - completed, Ordering::Relaxed);
            return false;
        }
        self.until_probe.store(PROBE_INTERVAL, Ordering::Relaxed);
        true
    }

    /// Records how many requests the waits caught.
    fn record(&self, caught: usize) {
        let credit = self.credit.load(Ordering::Relaxed);
        let credit = if caught > 0 {
            WAIT_CREDIT
        } else {
            credit.saturating_sub(1)
        };
        self.credit.store(credit, Ordering::Relaxed);
    }
}

/// Waits up to `timeout` for a kick on `vring`; true if one came and the queue is enabled.
/// The kick is consumed.
fn wait_for_kick(vring: &VringRwLock, timeout: Duration) -> io::Result<bool> {
    let kicked = {
        // The read lock keeps the kick descriptor open; the frontend replacing it waits at
        // most `timeout`.
        let state = vring.get_ref();
        let Some(kick) = state.get_kick() else {
            return Ok(false);
        };
        let mut pollfd = libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let timeout = libc::timespec {
            tv_sec: 0,
            // The window is below a second (checked when the backend is built).
            tv_nsec: libc::c_long::try_from(timeout.as_nanos()).unwrap_or(0),
        };
        // SAFETY: `pollfd` and `timeout` are valid for the call; no signal mask is passed.
        let ret = unsafe { libc::ppoll(&mut pollfd, 1, &timeout, std::ptr::null()) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(error);
        }
        ret > 0 && pollfd.revents & libc::POLLIN != 0
    };
    // Not under the lock above: std's RwLock may deadlock on a second read lock.
    Ok(kicked && vring.read_kick()?)
}

/// Worker-thread queue masks: a single thread for one queue, otherwise one thread per queue.
fn worker_masks(num_queues: usize) -> Vec<u64> {
    (0..num_queues.clamp(1, MAX_QUEUES))
        .map(|queue| 1u64 << queue)
        .collect()
}

impl VhostUserBackend for VhostUserBlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.queues.num_queues
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queues.queue_size)
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH
            | 1 << VIRTIO_BLK_F_TOPOLOGY
            | 1 << VIRTIO_BLK_F_CONFIG_WCE
            | 1 << VIRTIO_BLK_F_MQ
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.device.read_only() {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.discard_offered() {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
        // Writeback unless the driver cannot flush, in which case writes must be durable
        // when they complete (virtio 1.2 §5.2.5).
        self.device
            .set_writethrough(!self.negotiated(VIRTIO_BLK_F_FLUSH));
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // BACKEND_REQ: the front door in front of the daemon keeps the backend channel and
        // pushes configuration changes (a resized image) on it.
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn reset_device(&self) {
        self.acked_features.store(0, Ordering::Release);
        self.device.set_writethrough(false);
    }

    fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // VUB limits offset + size to 4 KiB; bytes beyond the device's fields read as zero.
        let (Ok(offset), Ok(size)) = (usize::try_from(offset), usize::try_from(size)) else {
            return Vec::new();
        };
        if offset.checked_add(size).is_none_or(|end| end > 0x1000) {
            return Vec::new();
        }
        let config = self.config();
        let fields = &config.as_slice()[..CONFIG_SPACE_SIZE];
        let mut out = vec![0u8; size];
        if offset < fields.len() {
            let count = size.min(fields.len() - offset);
            out[..count].copy_from_slice(&fields[offset..offset + count]);
        }
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only `wce` is writable. Writes elsewhere are ignored rather than refused: VUB ends
        // the whole connection when this returns an error, and a driver must not write
        // read-only fields anyway (virtio 1.2 §2.5.1).
        let wce = usize::try_from(offset)
            .ok()
            .and_then(|start| WCE_OFFSET.checked_sub(start))
            .and_then(|index| buf.get(index));
        let touches_other_fields = buf.len() > usize::from(wce.is_some());
        if touches_other_fields {
            debug!(
                "Ignoring a write to read-only configuration bytes at {offset:#x}+{}",
                buf.len()
            );
        }
        match wce {
            Some(&wce) if self.negotiated(VIRTIO_BLK_F_CONFIG_WCE) => {
                self.device.set_writethrough(wce == 0);
            }
            Some(_) => debug!("Ignoring a cache-mode write without CONFIG_WCE"),
            None => {}
        }
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemory) -> io::Result<()> {
        // Once per memory table, off the data path.
        let pinnable = pinning::guest_memory_pinnable(&mem.memory());
        self.device.storage().set_guest_memory_pinnable(pinnable);
        *self
            .mem
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(mem);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        worker_masks(self.queues.num_queues)
    }

    fn exit_event(&self, thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        self.exit_events.for_thread(thread_index)
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or(Error::UnknownEvent(device_event))?;
        self.process_queue(usize::from(device_event), vring)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use vm_memory::{Address, Bytes, FileOffset, GuestAddress};

    use vmm_sys_util::event::{new_event_consumer_and_notifier, EventFlag};

    use super::*;
    use crate::blk::tests::{guest_memory, write_header, MemStorage, DATA_ADDR, HEADER_ADDR};
    use crate::blk::BlockStorage;

    const QUEUE_SIZE: u16 = 16;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    fn backend_with(read_only: bool, num_queues: usize) -> (Arc<MemStorage>, VhostUserBlkBackend) {
        let storage = Arc::new(MemStorage::new(64));
        let device = BlockDevice::new(storage.clone(), read_only, b"serial");
        let queues = QueueConfig {
            num_queues,
            queue_size: QUEUE_SIZE,
        };
        (storage, VhostUserBlkBackend::new(device, queues).unwrap())
    }

    fn backend() -> (Arc<MemStorage>, VhostUserBlkBackend) {
        backend_with(false, 1)
    }

    fn config_field<const N: usize>(backend: &VhostUserBlkBackend, offset: usize) -> [u8; N] {
        let bytes = backend.get_config(offset as u32, N as u32);
        bytes.try_into().unwrap()
    }

    #[test]
    fn features_follow_the_device() {
        let (_, writable) = backend();
        let features = writable.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
            VIRTIO_BLK_F_CONFIG_WCE,
        ] {
            assert_ne!(features & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            0
        );
        let protocol = writable.protocol_features();
        assert_eq!(
            protocol,
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::BACKEND_REQ
        );

        let (_, read_only) = backend_with(true, 1);
        let features = read_only.features();
        assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn config_space_describes_the_disk() {
        let (_, backend) = backend_with(false, 3);
        assert_eq!(u64::from_le_bytes(config_field(&backend, 0)), 64);
        assert_eq!(
            u32::from_le_bytes(config_field(&backend, 8)),
            SEGMENT_SIZE_MAX
        );
        assert_eq!(u32::from_le_bytes(config_field(&backend, 12)), 14);
        assert_eq!(u32::from_le_bytes(config_field(&backend, 20)), 512);
        // 4096-byte physical blocks over 512-byte logical blocks.
        assert_eq!(config_field::<1>(&backend, 24), [3]);
        assert_eq!(u16::from_le_bytes(config_field(&backend, 26)), 8);
        assert_eq!(config_field::<1>(&backend, WCE_OFFSET), [1]);
        assert_eq!(u16::from_le_bytes(config_field(&backend, 34)), 3);
        assert_eq!(
            u32::from_le_bytes(config_field(&backend, 36)),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            u32::from_le_bytes(config_field(&backend, 40)),
            MAX_DISCARD_SEGMENTS
        );
        assert_eq!(u32::from_le_bytes(config_field(&backend, 44)), 8);
        assert_eq!(config_field::<1>(&backend, 56), [1]);
    }

    #[test]
    fn config_reads_are_bounds_checked() {
        let (_, backend) = backend();
        let full = backend.get_config(0, CONFIG_SPACE_SIZE as u32);
        assert_eq!(full.len(), CONFIG_SPACE_SIZE);
        // Reads past the fields are zero-filled, whatever the frontend's idea of the size.
        let wide = backend.get_config(0, 256);
        assert_eq!(wide.len(), 256);
        assert_eq!(&wide[..CONFIG_SPACE_SIZE], &full[..]);
        assert!(wide[CONFIG_SPACE_SIZE..].iter().all(|&b| b == 0));
        let straddling = backend.get_config(56, 8);
        assert_eq!(&straddling[..4], &full[56..60]);
        assert_eq!(&straddling[4..], &[0; 4]);
        assert_eq!(backend.get_config(0x800, 16), vec![0; 16]);
        // Past the 4 KiB configuration window or overflowing: no data.
        assert!(backend.get_config(0xfff, 2).is_empty());
        assert!(backend.get_config(u32::MAX, 2).is_empty());
        assert!(backend.get_config(4, u32::MAX).is_empty());
        assert!(backend.get_config(0, 0).is_empty());
    }

    #[test]
    fn cache_mode_is_writable_only_with_config_wce() {
        let (_, backend) = backend();
        let wce_offset = WCE_OFFSET as u32;
        backend.set_config(wce_offset, &[0]).unwrap();
        assert!(!backend.device().writethrough());

        backend.acked_features(1 << VIRTIO_BLK_F_CONFIG_WCE | 1 << VIRTIO_BLK_F_FLUSH);
        backend.set_config(wce_offset, &[0]).unwrap();
        assert!(backend.device().writethrough());
        assert_eq!(config_field::<1>(&backend, WCE_OFFSET), [0]);
        backend.set_config(wce_offset, &[1]).unwrap();
        assert!(!backend.device().writethrough());

        // A wider write changes the cache mode and nothing else.
        let before = backend.get_config(0, CONFIG_SPACE_SIZE as u32);
        backend
            .set_config(wce_offset - 2, &[0xff, 0xff, 0, 0xff, 0xff, 0xff])
            .unwrap();
        assert!(backend.device().writethrough());
        let mut expected = before.clone();
        expected[WCE_OFFSET] = 0;
        assert_eq!(backend.get_config(0, CONFIG_SPACE_SIZE as u32), expected);

        // Writes that miss `wce` are ignored, including ones outside the configuration space.
        for (offset, data) in [
            (0, &[1u8, 2, 3, 4][..]),
            (wce_offset + 1, &[1][..]),
            (CONFIG_SPACE_SIZE as u32 - 1, &[0, 0][..]),
            (u32::MAX, &[0][..]),
            (wce_offset, &[][..]),
        ] {
            backend.set_config(offset, data).unwrap();
        }
        assert_eq!(backend.get_config(0, CONFIG_SPACE_SIZE as u32), expected);
    }

    #[test]
    fn without_flush_writes_are_writethrough() {
        let (_, backend) = backend();
        backend.acked_features(1 << VIRTIO_F_VERSION_1);
        assert!(backend.device().writethrough());
        assert_eq!(config_field::<1>(&backend, WCE_OFFSET), [0]);
        backend.reset_device();
        assert!(!backend.device().writethrough());
    }

    #[test]
    fn the_memory_table_tells_the_storage_whether_it_can_be_pinned() {
        let (storage, backend) = backend();
        backend
            .update_memory(GuestMemoryAtomic::new(guest_memory()))
            .unwrap();
        assert_eq!(*storage.pinnable.lock().unwrap(), Some(true));
        // A character device, as /dev/hvisor is.
        let zero = File::options()
            .read(true)
            .write(true)
            .open("/dev/zero")
            .unwrap();
        let range = (GuestAddress(0), 0x1000, Some(FileOffset::new(zero, 0)));
        let device_memory = GuestMemoryMmap::from_ranges_with_files([range]).unwrap();
        backend
            .update_memory(GuestMemoryAtomic::new(device_memory))
            .unwrap();
        assert_eq!(*storage.pinnable.lock().unwrap(), Some(false));
    }

    #[test]
    fn one_worker_thread_per_queue() {
        let (_, single) = backend();
        assert_eq!(single.queues_per_thread(), vec![1]);
        let (_, multi) = backend_with(false, 4);
        assert_eq!(multi.queues_per_thread(), vec![1, 2, 4, 8]);
        assert_eq!(multi.num_queues(), 4);
        assert!(multi.exit_event(3).is_some());
        assert!(multi.exit_event(4).is_none());
    }

    /// A started vring over a mock queue, with its call eventfd.
    struct QueueHarness {
        /// Shares its mappings with the atomic copy the backend and vring use.
        mem: GuestMemoryMmap,
        vring: VringRwLock,
        call: EventConsumer,
        desc_table: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    }

    impl QueueHarness {
        fn new(backend: &VhostUserBlkBackend) -> Self {
            let mem = guest_memory();
            let atomic = GuestMemoryAtomic::new(mem.clone());
            backend.update_memory(atomic.clone()).unwrap();
            let vring = VringRwLock::new(atomic, QUEUE_SIZE).unwrap();
            // Rings in their own pages of zeroed guest memory, away from request buffers.
            let (desc_table, avail, used) =
                (GuestAddress(0), GuestAddress(0x1000), GuestAddress(0x2000));
            vring
                .set_queue_info(desc_table.raw_value(), avail.raw_value(), used.raw_value())
                .unwrap();
            vring.set_queue_size(QUEUE_SIZE);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let (call, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
            // SAFETY: `into_raw_fd` hands over sole ownership of a valid eventfd.
            let call_file = unsafe { File::from_raw_fd(notifier.into_raw_fd()) };
            vring.set_call(Some(call_file));
            QueueHarness {
                mem,
                vring,
                call,
                desc_table,
                avail,
                used,
            }
        }

        /// Stores `descs` from table index `first` and offers `first` as a chain head.
        fn offer(&self, first: u16, descs: &[RawDescriptor]) {
            for (i, desc) in descs.iter().enumerate() {
                let addr = self
                    .desc_table
                    .unchecked_add(16 * (u64::from(first) + i as u64));
                self.mem.write_obj(*desc, addr).unwrap();
            }
            let idx_addr = self.avail.unchecked_add(2);
            let idx: u16 = self.mem.read_obj(idx_addr).unwrap();
            let slot = self
                .avail
                .unchecked_add(4 + 2 * u64::from(idx % QUEUE_SIZE));
            self.mem.write_obj(first, slot).unwrap();
            self.mem.write_obj(idx.wrapping_add(1), idx_addr).unwrap();
        }

        /// Adds a read of one sector at `sector` into a data buffer at `slot`.
        fn add_read(&self, slot: u16, sector: u64) {
            let base = u64::from(slot) * 0x1000;
            write_header(&self.mem, HEADER_ADDR + base, VIRTIO_BLK_T_IN, sector);
            let chain = [
                Descriptor::new(HEADER_ADDR + base, 16, 0, 0),
                Descriptor::new(DATA_ADDR + base, 512, W, 0),
                Descriptor::new(DATA_ADDR + base + 512, 1, W, 0),
            ];
            let mut raw = Vec::new();
            for (i, desc) in chain.iter().enumerate() {
                let index = slot * 3 + i as u16;
                let flags = if i < 2 {
                    desc.flags() | virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16
                } else {
                    desc.flags()
                };
                raw.push(RawDescriptor::from(Descriptor::new(
                    desc.addr().raw_value(),
                    desc.len(),
                    flags,
                    index + 1,
                )));
            }
            self.offer(slot * 3, &raw);
        }

        fn used_idx(&self) -> u16 {
            self.mem
                .read_obj::<u16>(self.used.unchecked_add(2))
                .unwrap()
        }

        fn used_elem(&self, index: u16) -> (u32, u32) {
            let elem = self.used.unchecked_add(4 + 8 * u64::from(index));
            (
                self.mem.read_obj::<u32>(elem).unwrap(),
                self.mem.read_obj::<u32>(elem.unchecked_add(4)).unwrap(),
            )
        }

        fn status(&self, slot: u16) -> u8 {
            let addr = GuestAddress(DATA_ADDR + u64::from(slot) * 0x1000 + 512);
            self.mem.read_obj(addr).unwrap()
        }

        fn notified(&self) -> bool {
            self.call.consume().is_ok()
        }
    }

    #[test]
    fn queue_requests_complete_and_notify() {
        let (storage, backend) = backend();
        let h = QueueHarness::new(&backend);
        h.add_read(0, 1);
        h.add_read(1, 2);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 2);
        assert_eq!(h.used_elem(0), (0, 513));
        assert_eq!(h.used_elem(1), (3, 513));
        assert_eq!(h.status(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(h.status(1), VIRTIO_BLK_S_OK as u8);
        let mut data = vec![0u8; 512];
        h.mem
            .read_slice(&mut data, GuestAddress(DATA_ADDR + 0x1000))
            .unwrap();
        assert_eq!(data, storage.data.lock().unwrap()[1024..1536]);
        assert!(h.notified());

        // A spurious wakeup with nothing new neither completes nor notifies.
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 2);
        assert!(!h.notified());
    }

    #[test]
    fn malformed_chain_is_returned_with_zero_length() {
        let (storage, backend) = backend();
        let h = QueueHarness::new(&backend);
        // A lone read-only descriptor: no status byte.
        let raw = [RawDescriptor::from(Descriptor::new(HEADER_ADDR, 16, 0, 0))];
        h.offer(0, &raw);
        h.add_read(1, 0);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 2);
        assert_eq!(h.used_elem(0), (0, 0));
        assert_eq!(h.used_elem(1), (3, 513));
        assert_eq!(storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn event_idx_suppresses_and_requests_notifications() {
        let (_, backend) = backend();
        backend.set_event_idx(true);
        let h = QueueHarness::new(&backend);
        h.vring.set_queue_event_idx(true);
        let used_event = h.avail.unchecked_add(4 + 2 * u64::from(QUEUE_SIZE));
        let avail_event = h.used.unchecked_add(4 + 8 * u64::from(QUEUE_SIZE));

        // The driver wants an interrupt only once used_idx passes 5: none for one request.
        h.mem.write_obj(5u16, used_event).unwrap();
        h.add_read(0, 0);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 1);
        assert!(!h.notified());
        // The device asks to be kicked for the next avail index.
        assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 1);

        // Now the driver asks for an interrupt after the next completion.
        h.mem.write_obj(1u16, used_event).unwrap();
        h.add_read(1, 1);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 2);
        assert!(h.notified());
        assert_eq!(h.mem.read_obj::<u16>(avail_event).unwrap(), 2);
    }

    #[test]
    fn events_need_memory_and_a_known_queue() {
        let (_, backend) = backend();
        let mem = GuestMemoryAtomic::new(guest_memory());
        let vring = VringRwLock::new(mem, QUEUE_SIZE).unwrap();
        let error = backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap_err();
        assert!(error.to_string().contains("not configured"), "{error}");
        let error = backend
            .handle_event(1, EventSet::IN, std::slice::from_ref(&vring), 0)
            .unwrap_err();
        assert!(error.to_string().contains("not a queue"), "{error}");
    }

    #[test]
    fn writes_through_the_queue_reach_storage() {
        let (storage, backend) = backend();
        let h = QueueHarness::new(&backend);
        let mem = &h.mem;
        write_header(mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 7);
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        let raw = [
            RawDescriptor::from(Descriptor::new(HEADER_ADDR, 16, next, 1)),
            RawDescriptor::from(Descriptor::new(DATA_ADDR, 512, next, 2)),
            RawDescriptor::from(Descriptor::new(DATA_ADDR + 512, 1, W, 0)),
        ];
        h.offer(0, &raw);
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_elem(0), (0, 1));
        assert_eq!(h.status(0), VIRTIO_BLK_S_OK as u8);
        assert_eq!(storage.data.lock().unwrap()[7 * 512..8 * 512], [0x5a; 512]);
        assert_eq!(storage.capacity(), 64 * 512);
        // Counted on queue 0.
        let counts = backend.stats().queue(0).unwrap().counts();
        assert_eq!((counts.requests, counts.bytes_written), (1, 512));
    }

    /// A kick eventfd for `vring`; the returned notifier is the driver's end.
    fn attach_kick(vring: &VringRwLock) -> EventNotifier {
        let (consumer, notifier) = new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap();
        // SAFETY: `into_raw_fd` hands over sole ownership of a valid eventfd.
        let kick_file = unsafe { File::from_raw_fd(consumer.into_raw_fd()) };
        vring.set_kick(Some(kick_file));
        notifier
    }

    /// The number of signals since the last call (the call eventfd's counter).
    fn signal_count(h: &QueueHarness) -> u64 {
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into `count` from the harness's eventfd.
        let ret = unsafe {
            libc::read(
                h.call.as_raw_fd(),
                std::ptr::addr_of_mut!(count).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        if ret < 0 {
            0
        } else {
            count
        }
    }

    #[test]
    fn coalescing_is_probed_and_given_up() {
        let window = Duration::from_micros(100);
        let coalescing = Coalescing::new();
        // Off until a probe: the probe comes after PROBE_INTERVAL completions.
        for _ in 1..PROBE_INTERVAL {
            assert!(!coalescing.should_wait(1, window));
        }
        assert!(coalescing.should_wait(1, window));
        // A probe that catches nothing leaves it off.
        coalescing.record(0);
        assert!(!coalescing.should_wait(1, window));
        // A batch as large as the interval probes at once; a catch turns waiting on.
        assert!(coalescing.should_wait(PROBE_INTERVAL, window));
        coalescing.record(3);
        // WAIT_CREDIT fruitless waits in a row turn it off again.
        for _ in 0..WAIT_CREDIT {
            assert!(coalescing.should_wait(1, window));
            coalescing.record(0);
        }
        assert!(!coalescing.should_wait(1, window));
        // A zero window never waits.
        coalescing.record(1);
        assert!(!coalescing.should_wait(1, Duration::ZERO));
    }

    #[test]
    fn kick_wait_consumes_a_kick_or_times_out() {
        let (_, backend) = backend();
        let h = QueueHarness::new(&backend);
        // No kick eventfd yet: nothing to wait for.
        assert!(!wait_for_kick(&h.vring, Duration::from_millis(1)).unwrap());
        let kick = attach_kick(&h.vring);
        kick.notify().unwrap();
        assert!(wait_for_kick(&h.vring, Duration::from_millis(1)).unwrap());
        // The kick was consumed: the next wait times out, and not before its window.
        let window = Duration::from_millis(2);
        let started = Instant::now();
        assert!(!wait_for_kick(&h.vring, window).unwrap());
        assert!(started.elapsed() >= window);
        // A kick on a disabled queue does not count.
        kick.notify().unwrap();
        h.vring.set_enabled(false);
        assert!(!wait_for_kick(&h.vring, window).unwrap());
    }

    #[test]
    fn coalesced_completions_are_signalled_once() {
        let (_, backend) = backend();
        let backend = backend.with_coalesce_window(Duration::from_millis(1));
        let h = QueueHarness::new(&backend);
        let kick = attach_kick(&h.vring);
        // Waiting is on (a previous wait caught a request) and a kick is pending.
        backend.coalescing[0].record(1);
        h.add_read(0, 0);
        h.add_read(1, 1);
        h.add_read(2, 2);
        kick.notify().unwrap();
        backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
            .unwrap();
        assert_eq!(h.used_idx(), 3);
        for slot in 0..3 {
            assert_eq!(h.used_elem(slot), (u32::from(slot) * 3, 513));
            assert_eq!(h.status(slot), VIRTIO_BLK_S_OK as u8);
        }
        assert_eq!(signal_count(&h), 1);
        // The pending kick brought nothing new: one fruitless wait is charged.
        assert_eq!(
            backend.coalescing[0].credit.load(Ordering::Relaxed),
            WAIT_CREDIT - 1
        );
    }

    #[test]
    fn a_zero_window_signals_every_batch() {
        let (_, backend) = backend();
        let backend = backend.with_coalesce_window(Duration::ZERO);
        let h = QueueHarness::new(&backend);
        let kick = attach_kick(&h.vring);
        backend.coalescing[0].record(1);
        for slot in 0..2 {
            h.add_read(slot, 0);
            kick.notify().unwrap();
            backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&h.vring), 0)
                .unwrap();
            assert_eq!(h.used_idx(), slot + 1);
            assert_eq!(signal_count(&h), 1);
        }
    }
}
