//! A virtio-blk driver over [`VirtioMmioDevice`] and [`SplitQueue`], modelled on Linux's
//! `virtio_blk.c`: blocking requests for functional tests, queued requests for benchmarks
//! (several in flight, completed through the interrupt line) and raw chains for hostile tests.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use super::mmio::{status, VirtioMmioDevice, INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};
use super::virtqueue::{
    BufferSegment, GuestAllocator, RawDescriptor, SplitQueue, DESC_ALIGN, DESC_SIZE,
    MAX_QUEUE_SIZE, VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC,
};
use super::{account_unannounced, DriverError, GuestMemory, Interrupts, MmioBus, Result};

pub const VIRTIO_ID_BLOCK: u32 = 2;
/// virtio-blk sectors are 512 bytes whatever `blk_size` says.
pub const SECTOR_SIZE: usize = 512;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// virtio-blk feature bits.
pub mod feature {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const GEOMETRY: u64 = 1 << 4;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
    pub const TOPOLOGY: u64 = 1 << 10;
    pub const CONFIG_WCE: u64 = 1 << 11;
    pub const MQ: u64 = 1 << 12;
    pub const DISCARD: u64 = 1 << 13;
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Request types (`virtio_blk_outhdr.type`).
pub mod request_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
    pub const WRITE_ZEROES: u32 = 13;
}

/// Config space offsets (`struct virtio_blk_config`).
mod config_offset {
    pub const CAPACITY: u64 = 0;
    pub const SIZE_MAX: u64 = 8;
    pub const SEG_MAX: u64 = 12;
    pub const BLK_SIZE: u64 = 20;
    pub const WRITEBACK: u64 = 32;
    pub const NUM_QUEUES: u64 = 34;
    pub const MAX_DISCARD_SECTORS: u64 = 36;
    pub const MAX_DISCARD_SEG: u64 = 40;
    pub const MAX_WRITE_ZEROES_SECTORS: u64 = 48;
    pub const MAX_WRITE_ZEROES_SEG: u64 = 52;
    pub const WRITE_ZEROES_MAY_UNMAP: u64 = 56;
}

const HEADER_LEN: u32 = 16;
const RANGE_LEN: u32 = 16;
/// Per-slot area: header at 0, discard/write-zeroes range at 16, status byte at 32.
const META_LEN: u64 = 64;
const RANGE_OFFSET: u64 = 16;
const STATUS_OFFSET: u64 = 32;
/// Written to the status byte before submission, so "the device never wrote a status" shows.
const STATUS_UNWRITTEN: u8 = 0xff;
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;

/// The status byte a device returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkStatus {
    Ok,
    IoErr,
    Unsupp,
    /// Anything else, including 0xff when the device never wrote the byte.
    Other(u8),
}

impl BlkStatus {
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Self::Ok,
            1 => Self::IoErr,
            2 => Self::Unsupp,
            other => Self::Other(other),
        }
    }

    pub fn to_byte(self) -> u8 {
        match self {
            Self::Ok => 0,
            Self::IoErr => 1,
            Self::Unsupp => 2,
            Self::Other(other) => other,
        }
    }

    /// `Ok(())` for [`BlkStatus::Ok`], otherwise [`DriverError::RequestFailed`].
    pub fn check(self) -> Result<()> {
        match self {
            Self::Ok => Ok(()),
            failed => Err(DriverError::RequestFailed(failed)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// The device configuration this driver uses; fields of features not negotiated are None.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkConfig {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub size_max: Option<u32>,
    pub seg_max: Option<u32>,
    pub blk_size: Option<u32>,
    /// 1 unless VIRTIO_BLK_F_MQ was negotiated.
    pub num_queues: u16,
    pub read_only: bool,
    pub writeback: Option<u8>,
    pub max_discard_sectors: Option<u32>,
    pub max_discard_seg: Option<u32>,
    pub max_write_zeroes_sectors: Option<u32>,
    pub max_write_zeroes_seg: Option<u32>,
    pub write_zeroes_may_unmap: Option<bool>,
}

impl BlkConfig {
    /// Reads the fields that `negotiated` makes valid.
    pub fn read<B: MmioBus>(device: &VirtioMmioDevice<'_, B>, negotiated: u64) -> Result<Self> {
        let has = |bit: u64| negotiated & bit != 0;
        let u32_if = |bit: u64, offset: u64| has(bit).then(|| device.read_config_u32(offset));
        Ok(Self {
            capacity: device.read_config_u64(config_offset::CAPACITY)?,
            size_max: u32_if(feature::SIZE_MAX, config_offset::SIZE_MAX),
            seg_max: u32_if(feature::SEG_MAX, config_offset::SEG_MAX),
            blk_size: u32_if(feature::BLK_SIZE, config_offset::BLK_SIZE),
            num_queues: if has(feature::MQ) {
                device.read_config_u16(config_offset::NUM_QUEUES)
            } else {
                1
            },
            read_only: has(feature::RO),
            writeback: has(feature::CONFIG_WCE)
                .then(|| device.read_config_u8(config_offset::WRITEBACK)),
            max_discard_sectors: u32_if(feature::DISCARD, config_offset::MAX_DISCARD_SECTORS),
            max_discard_seg: u32_if(feature::DISCARD, config_offset::MAX_DISCARD_SEG),
            max_write_zeroes_sectors: u32_if(
                feature::WRITE_ZEROES,
                config_offset::MAX_WRITE_ZEROES_SECTORS,
            ),
            max_write_zeroes_seg: u32_if(
                feature::WRITE_ZEROES,
                config_offset::MAX_WRITE_ZEROES_SEG,
            ),
            write_zeroes_may_unmap: has(feature::WRITE_ZEROES)
                .then(|| device.read_config_u8(config_offset::WRITE_ZEROES_MAY_UNMAP) != 0),
        })
    }
}

/// How to set the driver up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkOptions {
    /// Features to accept if offered (VERSION_1 is always accepted).
    pub features: u64,
    /// Upper bound on each queue's size; rounded down to a power of two within QueueNumMax.
    pub queue_size: u16,
    /// Queues to use (capped by the device's `num_queues`). Requests go round-robin.
    pub num_queues: u16,
    /// Requests that can be in flight at once; each owns its buffers.
    pub slots: usize,
    /// Data bytes per request (a multiple of 512). Larger blocking transfers are split.
    pub max_transfer: usize,
    /// Cap on one data descriptor's length, on top of the device's `size_max`.
    pub max_segment_len: Option<u32>,
    /// Put each request in an indirect table when INDIRECT_DESC was negotiated.
    pub use_indirect: bool,
    /// Kick after every submission; otherwise call [`BlkDriver::kick`] after a batch.
    pub auto_kick: bool,
    /// Timeout of the blocking requests.
    pub timeout: Duration,
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            features: feature::SIZE_MAX
                | feature::SEG_MAX
                | feature::GEOMETRY
                | feature::RO
                | feature::BLK_SIZE
                | feature::FLUSH
                | feature::TOPOLOGY
                | feature::CONFIG_WCE
                | feature::MQ
                | feature::DISCARD
                | feature::WRITE_ZEROES
                | VIRTIO_F_INDIRECT_DESC
                | VIRTIO_F_EVENT_IDX
                | VIRTIO_F_VERSION_1,
            queue_size: 256,
            num_queues: 1,
            slots: 32,
            max_transfer: 128 * 1024,
            max_segment_len: None,
            use_indirect: true,
            auto_kick: true,
            timeout: Duration::from_secs(10),
        }
    }
}

/// Names one submitted request; stays valid for [`BlkDriver::read_data`] until its slot is
/// reused by a later submission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestTag {
    slot: usize,
    generation: u64,
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: RequestTag,
    pub kind: RequestKind,
    pub queue: u16,
    pub status: BlkStatus,
    /// Bytes the device says it wrote (data plus the status byte).
    pub used_len: u32,
    /// Data bytes of the request.
    pub data_len: usize,
}

/// What became of a raw chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawOutcome {
    /// The device returned the chain; `status` is the byte at the given address, if any.
    Completed {
        used_len: u32,
        status: Option<u8>,
    },
    NoCompletion,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    meta: u64,
    data: u64,
    indirect_table: u64,
    generation: u64,
    in_flight: Option<SlotRequest>,
}

#[derive(Clone, Copy, Debug)]
struct SlotRequest {
    kind: RequestKind,
    data_len: usize,
}

#[derive(Clone, Copy, Debug)]
enum Owner {
    Slot(usize),
    Raw(u64),
}

struct DriverQueue<'a, M: GuestMemory> {
    ring: SplitQueue<'a, M>,
    /// Who owns each in-flight head.
    owners: Vec<Option<Owner>>,
}

/// A virtio-blk device, initialised and ready (DRIVER_OK) once constructed.
pub struct BlkDriver<'a, B: MmioBus, M: GuestMemory, I: Interrupts> {
    device: VirtioMmioDevice<'a, B>,
    mem: &'a M,
    irq: &'a I,
    features: u64,
    config: BlkConfig,
    queues: Vec<DriverQueue<'a, M>>,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    next_queue: usize,
    /// Completions collected but not returned yet.
    done: VecDeque<Completion>,
    /// Raw chains returned by the device: (sequence, used length).
    raw_done: Vec<(u64, u32)>,
    raw_sequence: u64,
    /// Reused chain-building buffer.
    segments: Vec<BufferSegment>,
    segment_len: u32,
    max_request_bytes: usize,
    use_indirect: bool,
    auto_kick: bool,
    timeout: Duration,
    config_interrupts: u64,
    lost_interrupts: u64,
}

impl<B: MmioBus, M: GuestMemory, I: Interrupts> fmt::Debug for BlkDriver<'_, B, M, I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlkDriver")
            .field("device", &self.device)
            .field("features", &format_args!("{:#x}", self.features))
            .field("config", &self.config)
            .field("queues", &self.queues.len())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl<'a, B: MmioBus, M: GuestMemory, I: Interrupts> BlkDriver<'a, B, M, I> {
    /// Probes and initialises the device at `base`, allocates rings and request buffers from
    /// `alloc` and sets DRIVER_OK. On failure after initialisation began, sets FAILED.
    pub fn new(
        bus: &'a B,
        base: u64,
        mem: &'a M,
        irq: &'a I,
        alloc: &mut GuestAllocator,
        options: &BlkOptions,
    ) -> Result<Self> {
        validate(options)?;
        let device = VirtioMmioDevice::new(bus, base);
        let info = device.probe()?;
        if info.device_id != VIRTIO_ID_BLOCK {
            return Err(DriverError::WrongDeviceType {
                expected: VIRTIO_ID_BLOCK,
                found: info.device_id,
            });
        }
        let features = device.init(options.features)?;
        let parts = match SetUp::new(&device, mem, alloc, options, features) {
            Ok(parts) => parts,
            Err(error) => {
                device.fail();
                return Err(error);
            }
        };
        device.driver_ok();
        Ok(Self {
            device,
            mem,
            irq,
            features,
            config: parts.config,
            queues: parts.queues,
            free_slots: (0..parts.slots.len()).rev().collect(),
            slots: parts.slots,
            next_queue: 0,
            done: VecDeque::new(),
            raw_done: Vec::new(),
            raw_sequence: 0,
            segments: Vec::with_capacity(parts.limits.max_data_segments + 2),
            segment_len: parts.limits.segment_len,
            max_request_bytes: parts.limits.max_request_bytes,
            use_indirect: parts.use_indirect,
            auto_kick: options.auto_kick,
            timeout: options.timeout,
            config_interrupts: 0,
            lost_interrupts: 0,
        })
    }

    pub fn device(&self) -> &VirtioMmioDevice<'a, B> {
        &self.device
    }

    pub fn features(&self) -> u64 {
        self.features
    }

    pub fn config(&self) -> &BlkConfig {
        &self.config
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.config.capacity
    }

    pub fn num_queues(&self) -> u16 {
        self.queues.len() as u16
    }

    /// The ring of queue `index`, for inspection.
    pub fn queue(&self, index: u16) -> Option<&SplitQueue<'a, M>> {
        self.queues.get(usize::from(index)).map(|queue| &queue.ring)
    }

    /// Data bytes one request can carry.
    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Config-change interrupts seen so far.
    pub fn config_interrupts(&self) -> u64 {
        self.config_interrupts
    }

    /// Re-reads the config space (after a config-change interrupt).
    /// Completions the device published without an interrupt (see [`Interrupts::lost`]).
    pub fn lost_interrupts(&self) -> u64 {
        self.lost_interrupts
    }

    pub fn reread_config(&mut self) -> Result<&BlkConfig> {
        self.config = BlkConfig::read(&self.device, self.features)?;
        Ok(&self.config)
    }

    /// Queues a read of `len` bytes (a multiple of 512) at `sector`.
    pub fn submit_read(&mut self, sector: u64, len: usize) -> Result<RequestTag> {
        self.check_data_len(len)?;
        self.submit(RequestKind::Read, request_type::IN, sector, len, |_, _| {})
    }

    /// Queues a write of `data` (a multiple of 512 bytes) at `sector`.
    pub fn submit_write(&mut self, sector: u64, data: &[u8]) -> Result<RequestTag> {
        self.check_data_len(data.len())?;
        self.submit(
            RequestKind::Write,
            request_type::OUT,
            sector,
            data.len(),
            |mem, slot| mem.write(slot.data, data),
        )
    }

    pub fn submit_flush(&mut self) -> Result<RequestTag> {
        self.submit(RequestKind::Flush, request_type::FLUSH, 0, 0, |_, _| {})
    }

    pub fn submit_get_id(&mut self) -> Result<RequestTag> {
        self.submit(
            RequestKind::GetId,
            request_type::GET_ID,
            0,
            ID_BYTES,
            |_, _| {},
        )
    }

    pub fn submit_discard(&mut self, sector: u64, sectors: u32) -> Result<RequestTag> {
        self.submit(
            RequestKind::Discard,
            request_type::DISCARD,
            0,
            0,
            |mem, slot| {
                write_range(mem, slot, sector, sectors, 0);
            },
        )
    }

    pub fn submit_write_zeroes(
        &mut self,
        sector: u64,
        sectors: u32,
        unmap: bool,
    ) -> Result<RequestTag> {
        let flags = if unmap { WRITE_ZEROES_FLAG_UNMAP } else { 0 };
        self.submit(
            RequestKind::WriteZeroes,
            request_type::WRITE_ZEROES,
            0,
            0,
            |mem, slot| write_range(mem, slot, sector, sectors, flags),
        )
    }

    fn check_data_len(&self, len: usize) -> Result<()> {
        if !is_whole_sectors(len) {
            return Err(DriverError::UnalignedLength(len));
        }
        if len > self.max_request_bytes {
            return Err(DriverError::RequestTooLarge {
                len,
                max: self.max_request_bytes,
            });
        }
        Ok(())
    }

    /// Builds header / data / status (or header / range / status) in a free slot and makes it
    /// available on the next queue in turn.
    fn submit(
        &mut self,
        kind: RequestKind,
        request_type: u32,
        sector: u64,
        data_len: usize,
        fill: impl FnOnce(&M, &Slot),
    ) -> Result<RequestTag> {
        let slot_index = self
            .free_slots
            .pop()
            .ok_or(DriverError::NoFreeSlot(self.slots.len()))?;
        let slot = self.slots[slot_index];
        fill(self.mem, &slot);
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write(slot.meta, &header);
        self.mem
            .write(slot.meta + STATUS_OFFSET, &[STATUS_UNWRITTEN]);

        self.segments.clear();
        self.segments
            .push(BufferSegment::readable(slot.meta, HEADER_LEN));
        match kind {
            RequestKind::Discard | RequestKind::WriteZeroes => self
                .segments
                .push(BufferSegment::readable(slot.meta + RANGE_OFFSET, RANGE_LEN)),
            _ => {
                let device_writable = kind != RequestKind::Write;
                let mut offset = 0usize;
                while offset < data_len {
                    // Bounded by max_request_bytes, which fits in u32 segments.
                    let len = (data_len - offset).min(self.segment_len as usize);
                    self.segments.push(BufferSegment {
                        gpa: slot.data + offset as u64,
                        len: len as u32,
                        device_writable,
                    });
                    offset += len;
                }
            }
        }
        self.segments
            .push(BufferSegment::writable(slot.meta + STATUS_OFFSET, 1));

        let queue_index = self.next_queue;
        let queue = &mut self.queues[queue_index];
        let added = if self.use_indirect {
            queue.ring.add_indirect(slot.indirect_table, &self.segments)
        } else {
            queue.ring.add_chain(&self.segments)
        };
        let head = match added {
            Ok(head) => head,
            Err(error) => {
                self.free_slots.push(slot_index);
                return Err(error);
            }
        };
        queue.owners[usize::from(head)] = Some(Owner::Slot(slot_index));
        self.next_queue = (queue_index + 1) % self.queues.len();

        let slot = &mut self.slots[slot_index];
        slot.generation += 1;
        slot.in_flight = Some(SlotRequest { kind, data_len });
        let tag = RequestTag {
            slot: slot_index,
            generation: slot.generation,
        };
        if self.auto_kick {
            self.kick_queue(queue_index);
        }
        Ok(tag)
    }

    fn kick_queue(&mut self, index: usize) {
        if self.queues[index].ring.kick_needed() {
            self.device.notify(index as u16);
        }
    }

    /// Notifies every queue that has new requests the device wants to hear about.
    pub fn kick(&mut self) {
        for index in 0..self.queues.len() {
            self.kick_queue(index);
        }
    }

    /// Waits for at least one completion and returns all that are ready; Err(Timeout) when
    /// none arrived in time.
    pub fn complete(&mut self, timeout: Duration) -> Result<Vec<Completion>> {
        let deadline = Instant::now() + timeout;
        while self.done.is_empty() {
            self.collect(deadline)?;
        }
        Ok(self.done.drain(..).collect())
    }

    /// Copies the data of a completed read or GET_ID into `buf` (up to the request's length);
    /// returns the bytes copied.
    pub fn read_data(&self, completion: &Completion, buf: &mut [u8]) -> Result<usize> {
        let slot = self
            .slots
            .get(completion.tag.slot)
            .ok_or(DriverError::StaleCompletion)?;
        if slot.generation != completion.tag.generation || slot.in_flight.is_some() {
            return Err(DriverError::StaleCompletion);
        }
        let len = completion.data_len.min(buf.len());
        self.mem.read(slot.data, &mut buf[..len]);
        Ok(len)
    }

    /// Returns once at least one completion (of a slot or raw chain) was collected. Like
    /// Linux's `virtio_blk`, it sleeps until the interrupt and only then looks at the rings
    /// (`vm_interrupt`: read InterruptStatus, ACK, then the rings), so a completion whose
    /// interrupt never comes is found only once the wait times out, and counted as lost.
    fn collect(&mut self, deadline: Instant) -> Result<()> {
        loop {
            let now = Instant::now();
            if now < deadline && self.irq.wait(deadline - now) {
                self.take_interrupt()?;
                if self.drain_used()? > 0 {
                    return Ok(());
                }
                continue;
            }
            let unannounced: u64 = self
                .queues
                .iter()
                .map(|queue| u64::from(queue.ring.unannounced_used()))
                .sum();
            if unannounced == 0 {
                return Err(DriverError::Timeout);
            }
            account_unannounced(
                self.irq,
                "virtio-blk",
                unannounced,
                &mut self.lost_interrupts,
            );
            // Late or lost, ACK what the device flagged so that its line can rise again and
            // the test goes on; a loss is on record.
            self.take_interrupt()?;
            self.drain_used()?;
            return Ok(());
        }
    }

    /// Handles one interrupt: ACKs InterruptStatus and acts on a config change.
    fn take_interrupt(&mut self) -> Result<()> {
        for queue in &mut self.queues {
            queue.ring.note_interrupt();
        }
        let pending = self.device.interrupt_status();
        if pending != 0 {
            self.device.ack_interrupt(pending);
        }
        if pending & INTERRUPT_CONFIG != 0 {
            self.config_interrupts += 1;
            if self.device.status() & status::DEVICE_NEEDS_RESET != 0 {
                self.drain_used()?;
                return Err(DriverError::DeviceNeedsReset);
            }
        }
        Ok(())
    }

    /// Moves every used entry of every queue into `done` / `raw_done`.
    fn drain_used(&mut self) -> Result<usize> {
        let mut collected = 0;
        for queue_index in 0..self.queues.len() {
            loop {
                let queue = &mut self.queues[queue_index];
                let used = match queue.ring.pop_used() {
                    Ok(Some(used)) => used,
                    Ok(None) => break,
                    Err(DriverError::UsedLengthTooLarge { id, len, max }) => {
                        // The ring recycled the chain; release what owned it, then report.
                        if let Some(Owner::Slot(slot)) = queue.owners[usize::from(id)].take() {
                            self.release_slot(slot);
                        }
                        return Err(DriverError::UsedLengthTooLarge { id, len, max });
                    }
                    Err(error) => return Err(error),
                };
                match queue.owners[usize::from(used.id)].take() {
                    Some(Owner::Slot(slot_index)) => {
                        if let Some(completion) =
                            self.finish_slot(slot_index, queue_index, used.len)
                        {
                            self.done.push_back(completion);
                        }
                    }
                    Some(Owner::Raw(sequence)) => self.raw_done.push((sequence, used.len)),
                    // The ring only returns heads it tracked, and every tracked head has an
                    // owner; nothing to release.
                    None => continue,
                }
                collected += 1;
            }
        }
        Ok(collected)
    }

    fn finish_slot(
        &mut self,
        slot_index: usize,
        queue: usize,
        used_len: u32,
    ) -> Option<Completion> {
        let slot = self.slots[slot_index];
        let request = slot.in_flight?;
        let mut status = [STATUS_UNWRITTEN];
        self.mem.read(slot.meta + STATUS_OFFSET, &mut status);
        self.release_slot(slot_index);
        Some(Completion {
            tag: RequestTag {
                slot: slot_index,
                generation: slot.generation,
            },
            kind: request.kind,
            queue: queue as u16,
            status: BlkStatus::from_byte(status[0]),
            used_len,
            data_len: request.data_len,
        })
    }

    fn release_slot(&mut self, slot_index: usize) {
        if self.slots[slot_index].in_flight.take().is_some() {
            self.free_slots.push(slot_index);
        }
    }

    fn wait_for(&mut self, tag: RequestTag) -> Result<Completion> {
        // A blocking call waits for its own request, so it must be kicked whatever
        // `auto_kick` says (kick() only notifies queues with unannounced requests).
        self.kick();
        let deadline = Instant::now() + self.timeout;
        loop {
            let position = self.done.iter().position(|done| done.tag == tag);
            if let Some(completion) = position.and_then(|position| self.done.remove(position)) {
                return Ok(completion);
            }
            self.collect(deadline)?;
        }
    }

    /// Reads `buf.len()` bytes (a multiple of 512) at `sector`, split into requests of at most
    /// [`Self::max_request_bytes`]. Stops at the first request that fails.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<BlkStatus> {
        if !is_whole_sectors(buf.len()) {
            return Err(DriverError::UnalignedLength(buf.len()));
        }
        let chunk_len = self.max_request_bytes;
        for (chunk_sector, chunk) in chunk_sectors(sector, chunk_len).zip(buf.chunks_mut(chunk_len))
        {
            let tag = self.submit_read(chunk_sector, chunk.len())?;
            let completion = self.wait_for(tag)?;
            if completion.status != BlkStatus::Ok {
                return Ok(completion.status);
            }
            self.read_data(&completion, chunk)?;
        }
        Ok(BlkStatus::Ok)
    }

    /// Writes `data` (a multiple of 512 bytes) at `sector`, split like [`Self::read`].
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<BlkStatus> {
        if !is_whole_sectors(data.len()) {
            return Err(DriverError::UnalignedLength(data.len()));
        }
        let chunk_len = self.max_request_bytes;
        for (chunk_sector, chunk) in chunk_sectors(sector, chunk_len).zip(data.chunks(chunk_len)) {
            let tag = self.submit_write(chunk_sector, chunk)?;
            let status = self.wait_for(tag)?.status;
            if status != BlkStatus::Ok {
                return Ok(status);
            }
        }
        Ok(BlkStatus::Ok)
    }

    pub fn flush(&mut self) -> Result<BlkStatus> {
        let tag = self.submit_flush()?;
        Ok(self.wait_for(tag)?.status)
    }

    /// The device's serial (GET_ID), up to the first NUL.
    pub fn get_id(&mut self) -> Result<String> {
        let tag = self.submit_get_id()?;
        let completion = self.wait_for(tag)?;
        completion.status.check()?;
        let mut id = [0u8; ID_BYTES];
        self.read_data(&completion, &mut id)?;
        let len = id.iter().position(|byte| *byte == 0).unwrap_or(ID_BYTES);
        Ok(String::from_utf8_lossy(&id[..len]).into_owned())
    }

    pub fn discard(&mut self, sector: u64, sectors: u32) -> Result<BlkStatus> {
        let tag = self.submit_discard(sector, sectors)?;
        Ok(self.wait_for(tag)?.status)
    }

    pub fn write_zeroes(&mut self, sector: u64, sectors: u32, unmap: bool) -> Result<BlkStatus> {
        let tag = self.submit_write_zeroes(sector, sectors, unmap)?;
        Ok(self.wait_for(tag)?.status)
    }

    /// Makes `descriptors` available verbatim on `queue` (see [`SplitQueue::add_raw`]), kicks
    /// if the device asks for it, and waits up to `timeout` for the device to return the
    /// chain. `status_gpa` names a byte of guest RAM to read back on completion.
    pub fn raw_submit(
        &mut self,
        queue: u16,
        descriptors: &[RawDescriptor],
        status_gpa: Option<u64>,
        timeout: Duration,
    ) -> Result<RawOutcome> {
        let queue_index = usize::from(queue);
        let driver_queue = self
            .queues
            .get_mut(queue_index)
            .ok_or(DriverError::NoSuchQueue(queue))?;
        let head = driver_queue.ring.add_raw(descriptors)?;
        let sequence = self.raw_sequence;
        self.raw_sequence += 1;
        driver_queue.owners[usize::from(head)] = Some(Owner::Raw(sequence));
        self.kick_queue(queue_index);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(position) = self.raw_done.iter().position(|(s, _)| *s == sequence) {
                let (_, used_len) = self.raw_done.swap_remove(position);
                let status = status_gpa.map(|gpa| {
                    let mut byte = [0u8];
                    self.mem.read(gpa, &mut byte);
                    byte[0]
                });
                return Ok(RawOutcome::Completed { used_len, status });
            }
            match self.collect(deadline) {
                Ok(()) => {}
                Err(DriverError::Timeout) => return Ok(RawOutcome::NoCompletion),
                Err(error) => return Err(error),
            }
        }
    }

    /// Puts an arbitrary `head` in `queue`'s avail ring and kicks if asked to.
    pub fn publish_raw_head(&mut self, queue: u16, head: u16) -> Result<()> {
        let queue_index = usize::from(queue);
        self.queues
            .get_mut(queue_index)
            .ok_or(DriverError::NoSuchQueue(queue))?
            .ring
            .publish_raw_head(head)?;
        self.kick_queue(queue_index);
        Ok(())
    }
}

/// Everything between FEATURES_OK and DRIVER_OK.
struct SetUp<'a, M: GuestMemory> {
    config: BlkConfig,
    queues: Vec<DriverQueue<'a, M>>,
    slots: Vec<Slot>,
    limits: TransferLimits,
    use_indirect: bool,
}

impl<'a, M: GuestMemory> SetUp<'a, M> {
    fn new<B: MmioBus>(
        device: &VirtioMmioDevice<'_, B>,
        mem: &'a M,
        alloc: &mut GuestAllocator,
        options: &BlkOptions,
        features: u64,
    ) -> Result<Self> {
        let config = BlkConfig::read(device, features)?;
        let num_queues = options.num_queues.min(config.num_queues.max(1));
        let queues = (0..num_queues)
            .map(|index| set_up_queue(device, mem, alloc, index, options.queue_size, features))
            .collect::<Result<Vec<_>>>()?;
        let smallest_queue = queues
            .iter()
            .map(|queue| queue.ring.size())
            .min()
            .unwrap_or(0);
        let limits = TransferLimits::new(&config, options, smallest_queue)?;
        let use_indirect = options.use_indirect && features & VIRTIO_F_INDIRECT_DESC != 0;
        let slots = allocate_slots(mem, alloc, options, &limits, use_indirect)?;
        Ok(Self {
            config,
            queues,
            slots,
            limits,
            use_indirect,
        })
    }
}

fn validate(options: &BlkOptions) -> Result<()> {
    if options.queue_size == 0 {
        return Err(DriverError::InvalidOption("queue_size must be positive"));
    }
    if options.num_queues == 0 {
        return Err(DriverError::InvalidOption("num_queues must be positive"));
    }
    if options.slots == 0 {
        return Err(DriverError::InvalidOption("slots must be positive"));
    }
    if options.max_transfer < SECTOR_SIZE || !is_whole_sectors(options.max_transfer) {
        return Err(DriverError::InvalidOption(
            "max_transfer must be a positive multiple of 512",
        ));
    }
    if options.max_segment_len == Some(0) {
        return Err(DriverError::InvalidOption(
            "max_segment_len must be positive",
        ));
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
) -> Result<DriverQueue<'a, M>> {
    let max = device.queue_num_max(index);
    if max == 0 {
        return Err(DriverError::QueueUnavailable(index));
    }
    let bound = u32::from(wanted_size).min(max).min(MAX_QUEUE_SIZE);
    // Largest power of two not above the bound; bound >= 1 and <= 32768 so it fits in u16.
    let size = (1u32 << (31 - bound.leading_zeros())) as u16;
    let mut ring = SplitQueue::new(mem, alloc, size)?;
    ring.set_features(features & VIRTIO_F_EVENT_IDX);
    device.setup_queue(index, size, &ring.memory())?;
    Ok(DriverQueue {
        ring,
        owners: vec![None; usize::from(size)],
    })
}

/// How requests are cut into descriptors.
struct TransferLimits {
    max_data_segments: usize,
    segment_len: u32,
    max_request_bytes: usize,
}

impl TransferLimits {
    fn new(config: &BlkConfig, options: &BlkOptions, queue_size: u16) -> Result<Self> {
        // A chain holds the header, the data segments and the status byte, and may not be
        // longer than the queue (virtio 1.x §2.7.5.3.1, also for indirect tables).
        let ring_limit = usize::from(queue_size).saturating_sub(2);
        // Like Linux, a seg_max of 0 means one segment.
        let device_limit = config.seg_max.map_or(usize::MAX, |seg_max| {
            usize::try_from(seg_max.max(1)).unwrap_or(usize::MAX)
        });
        let max_data_segments = ring_limit.min(device_limit);
        let segment_len = config
            .size_max
            .filter(|size_max| *size_max > 0)
            .unwrap_or(u32::MAX)
            .min(options.max_segment_len.unwrap_or(u32::MAX));
        let by_segments = max_data_segments.saturating_mul(segment_len as usize);
        let max_request_bytes = options.max_transfer.min(by_segments) / SECTOR_SIZE * SECTOR_SIZE;
        if max_request_bytes == 0 {
            return Err(DriverError::InvalidOption(
                "queue or segment limits leave no room for a 512-byte request",
            ));
        }
        Ok(Self {
            max_data_segments,
            segment_len,
            max_request_bytes,
        })
    }
}

fn allocate_slots<M: GuestMemory>(
    mem: &M,
    alloc: &mut GuestAllocator,
    options: &BlkOptions,
    limits: &TransferLimits,
    use_indirect: bool,
) -> Result<Vec<Slot>> {
    let data_len = limits.max_request_bytes.max(ID_BYTES) as u64;
    let table_len = DESC_SIZE * (limits.max_data_segments as u64 + 2);
    let mut slots = Vec::with_capacity(options.slots);
    for _ in 0..options.slots {
        let meta = alloc.alloc(META_LEN, META_LEN)?;
        mem.write(meta, &[0u8; META_LEN as usize]);
        let data = alloc.alloc(data_len, 4096)?;
        let indirect_table = if use_indirect {
            alloc.alloc(table_len, DESC_ALIGN)?
        } else {
            0
        };
        slots.push(Slot {
            meta,
            data,
            indirect_table,
            generation: 0,
            in_flight: None,
        });
    }
    Ok(slots)
}

fn write_range<M: GuestMemory>(mem: &M, slot: &Slot, sector: u64, sectors: u32, flags: u32) {
    let mut range = [0u8; RANGE_LEN as usize];
    range[0..8].copy_from_slice(&sector.to_le_bytes());
    range[8..12].copy_from_slice(&sectors.to_le_bytes());
    range[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write(slot.meta + RANGE_OFFSET, &range);
}

// checked_rem rather than is_multiple_of keeps the workspace's rust-version (1.85).
fn is_whole_sectors(len: usize) -> bool {
    len.checked_rem(SECTOR_SIZE) == Some(0)
}

/// The first sector of each `chunk_len`-byte chunk starting at `sector`.
fn chunk_sectors(sector: u64, chunk_len: usize) -> impl Iterator<Item = u64> {
    let step = (chunk_len / SECTOR_SIZE) as u64;
    (0u64..).map(move |chunk| sector.wrapping_add(chunk * step))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::{FakeBlk, FAKE_SERIAL, MMIO_BASE, RAM_BASE, RAM_SIZE};
    use crate::driver::virtqueue::{RawNext, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};

    const OFFERED: u64 = VIRTIO_F_VERSION_1
        | VIRTIO_F_INDIRECT_DESC
        | VIRTIO_F_EVENT_IDX
        | feature::FLUSH
        | feature::SIZE_MAX
        | feature::SEG_MAX
        | feature::BLK_SIZE
        | feature::DISCARD
        | feature::WRITE_ZEROES
        | feature::MQ;
    const SHORT: Duration = Duration::from_millis(20);

    type FakeDriver<'a> = BlkDriver<'a, FakeBlk, FakeBlk, FakeBlk>;

    fn allocator() -> GuestAllocator {
        GuestAllocator::new(RAM_BASE, RAM_SIZE as u64)
    }

    fn driver<'a>(fake: &'a FakeBlk, options: &BlkOptions) -> Result<FakeDriver<'a>> {
        BlkDriver::new(fake, MMIO_BASE, fake, fake, &mut allocator(), options)
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|index| (index as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn initialises_reads_config_and_sets_driver_ok() {
        let fake = FakeBlk::new(2048, OFFERED);
        let blk = driver(&fake, &BlkOptions::default()).unwrap();
        assert_eq!(blk.capacity(), 2048);
        let config = blk.config();
        assert_eq!(config.size_max, Some(1 << 20));
        assert_eq!(config.seg_max, Some(128));
        assert_eq!(config.blk_size, Some(512));
        assert_eq!(config.num_queues, 2);
        assert_eq!(config.max_discard_sectors, Some(0));
        assert_eq!(config.writeback, None, "CONFIG_WCE was not offered");
        assert_eq!(blk.features(), OFFERED);
        assert_eq!(blk.num_queues(), 1);
        assert_eq!(blk.max_request_bytes(), 128 * 1024);
        assert_eq!(
            blk.device().status(),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK
        );
        let queue = fake.state().queues[0];
        assert!(queue.ready);
        assert_eq!(queue.num, 256);
    }

    #[test]
    fn write_then_read_round_trips_with_and_without_indirect() {
        for use_indirect in [true, false] {
            let fake = FakeBlk::new(2048, OFFERED);
            let options = BlkOptions {
                use_indirect,
                ..BlkOptions::default()
            };
            let mut blk = driver(&fake, &options).unwrap();
            let data = pattern(3 * SECTOR_SIZE, 7);
            assert_eq!(blk.write(5, &data), Ok(BlkStatus::Ok));
            assert_eq!(fake.state().disk[5 * 512..8 * 512], data[..]);
            let mut back = vec![0u8; data.len()];
            assert_eq!(blk.read(5, &mut back), Ok(BlkStatus::Ok));
            assert_eq!(back, data);
            let state = fake.state();
            assert_eq!(state.indirect_chains > 0, use_indirect);
            assert_eq!(blk.in_flight(), 0);
        }
    }

    #[test]
    fn large_transfers_are_split_within_size_max_and_seg_max() {
        let fake = FakeBlk::new(4096, OFFERED);
        fake.set_config_u32(8, 4096);
        fake.set_config_u32(12, 8);
        let options = BlkOptions {
            max_transfer: 1 << 20,
            slots: 2,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        assert_eq!(blk.max_request_bytes(), 8 * 4096);
        let data = pattern(1 << 20, 3);
        assert_eq!(blk.write(1, &data), Ok(BlkStatus::Ok));
        let mut back = vec![0u8; data.len()];
        assert_eq!(blk.read(1, &mut back), Ok(BlkStatus::Ok));
        assert!(back == data, "1 MiB read back differs");
        let state = fake.state();
        assert_eq!(state.longest_segment, 4096);
        assert_eq!(state.longest_chain, 8 + 2);
    }

    #[test]
    fn max_segment_len_caps_descriptors() {
        let fake = FakeBlk::new(64, OFFERED);
        let options = BlkOptions {
            max_segment_len: Some(1024),
            use_indirect: false,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        let data = pattern(8 * SECTOR_SIZE, 1);
        assert_eq!(blk.write(0, &data), Ok(BlkStatus::Ok));
        assert_eq!(fake.state().longest_segment, 1024);
        assert_eq!(fake.state().longest_chain, 4 + 2);
    }

    #[test]
    fn get_id_flush_discard_and_write_zeroes() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        assert_eq!(blk.get_id().unwrap(), FAKE_SERIAL);
        assert_eq!(blk.flush(), Ok(BlkStatus::Ok));
        let data = pattern(4 * SECTOR_SIZE, 9);
        assert_eq!(blk.write(0, &data), Ok(BlkStatus::Ok));
        assert_eq!(blk.write_zeroes(1, 2, true), Ok(BlkStatus::Ok));
        assert_eq!(blk.discard(0, 1), Ok(BlkStatus::Ok));
        let mut back = vec![0xffu8; data.len()];
        assert_eq!(blk.read(0, &mut back), Ok(BlkStatus::Ok));
        assert!(back[..3 * SECTOR_SIZE].iter().all(|byte| *byte == 0));
        assert_eq!(back[3 * SECTOR_SIZE..], data[3 * SECTOR_SIZE..]);
        assert_eq!(blk.write_zeroes(63, 2, false), Ok(BlkStatus::IoErr));
    }

    #[test]
    fn device_status_bytes_are_reported() {
        let fake = FakeBlk::new(64, OFFERED);
        let options = BlkOptions {
            features: BlkOptions::default().features & !feature::FLUSH,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        assert_eq!(blk.flush(), Ok(BlkStatus::Unsupp));
        let mut buf = vec![0u8; SECTOR_SIZE];
        assert_eq!(blk.read(64, &mut buf), Ok(BlkStatus::IoErr));
        assert_eq!(blk.write(63, &[0u8; 1024]), Ok(BlkStatus::IoErr));
        assert_eq!(
            blk.read(0, &mut [0u8; 100]),
            Err(DriverError::UnalignedLength(100))
        );
        assert_eq!(
            BlkStatus::IoErr.check(),
            Err(DriverError::RequestFailed(BlkStatus::IoErr))
        );
        assert_eq!(BlkStatus::from_byte(0xff), BlkStatus::Other(0xff));
        assert_eq!(BlkStatus::Other(7).to_byte(), 7);
    }

    fn queued_reads(event_idx: bool) -> (u32, usize) {
        let fake = FakeBlk::new(64, OFFERED);
        let mut features = BlkOptions::default().features;
        if !event_idx {
            features &= !VIRTIO_F_EVENT_IDX;
        }
        let options = BlkOptions {
            features,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        let data = pattern(8 * SECTOR_SIZE, 5);
        fake.state().disk[..data.len()].copy_from_slice(&data);
        fake.state().hold = true;
        let tags: Vec<_> = (0..8u64)
            .map(|sector| blk.submit_read(sector, SECTOR_SIZE).unwrap())
            .collect();
        assert_eq!(blk.in_flight(), 8);
        assert_eq!(
            blk.complete(SHORT),
            Err(DriverError::Timeout),
            "held device completes nothing"
        );
        fake.release();
        let completions = blk.complete(SHORT).unwrap();
        assert_eq!(completions.len(), 8);
        for (sector, tag) in tags.iter().enumerate() {
            let completion = completions.iter().find(|c| c.tag == *tag).unwrap();
            assert_eq!(completion.status, BlkStatus::Ok);
            assert_eq!(completion.kind, RequestKind::Read);
            assert_eq!(completion.used_len, SECTOR_SIZE as u32 + 1);
            let mut sector_data = [0u8; SECTOR_SIZE];
            assert_eq!(blk.read_data(completion, &mut sector_data), Ok(SECTOR_SIZE));
            let expected = &data[sector * SECTOR_SIZE..(sector + 1) * SECTOR_SIZE];
            assert_eq!(sector_data[..], expected[..]);
        }
        let notifies = fake.state().notifies;
        (notifies, blk.in_flight())
    }

    #[test]
    fn queued_requests_complete_together_and_event_idx_suppresses_kicks() {
        assert_eq!(queued_reads(true), (1, 0));
        assert_eq!(queued_reads(false), (8, 0));
    }

    #[test]
    fn interrupt_line_is_acknowledged_and_rearmed() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        fake.state().hold = true;
        let first = blk.submit_flush().unwrap();
        fake.release();
        assert_eq!(fake.state().interrupt_status, 1);
        fake.state().hold = true;
        let second = blk.submit_flush().unwrap();
        // The driver takes the delivery, ACKs, and finds the first completion.
        assert_eq!(blk.complete(SHORT).unwrap()[0].tag, first);
        assert_eq!(fake.state().interrupt_status, 0);
        assert_eq!(fake.state().deliveries, 0);
        // Nothing delivered, nothing on the ring.
        assert_eq!(blk.complete(SHORT), Err(DriverError::Timeout));
        // The line was lowered, so the next completion raises a fresh delivery.
        fake.release();
        assert_eq!(fake.state().deliveries, 1);
        assert_eq!(blk.complete(SHORT).unwrap()[0].tag, second);
        assert_eq!(blk.lost_interrupts(), 0);
    }

    #[test]
    fn a_completion_without_its_interrupt_is_counted_as_lost() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        fake.state().swallow_deliveries = 1;
        // The device completes the flush at once but never delivers the interrupt: the
        // driver finds the completion only when its wait times out, and counts it.
        assert_eq!(blk.flush(), Ok(BlkStatus::Ok));
        assert_eq!(blk.lost_interrupts(), 1);
        assert_eq!(fake.state().reported_lost, 1, "the line is told too");
        // The driver ACKed the status the device set, so the line rises again.
        assert_eq!(fake.state().interrupt_status, 0);
        assert_eq!(blk.flush(), Ok(BlkStatus::Ok));
        assert_eq!(
            blk.lost_interrupts(),
            1,
            "a delivered interrupt is not counted"
        );
        // A completion that is still missing when the wait ends is no completion at all.
        fake.state().hold = true;
        blk.submit_flush().unwrap();
        assert_eq!(blk.complete(SHORT), Err(DriverError::Timeout));
        assert_eq!(blk.lost_interrupts(), 1);
    }

    #[test]
    fn manual_kick_notifies_once_per_batch() {
        let fake = FakeBlk::new(64, OFFERED);
        let options = BlkOptions {
            auto_kick: false,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        for sector in 0..4 {
            blk.submit_write(sector, &[1u8; SECTOR_SIZE]).unwrap();
        }
        assert_eq!(fake.state().notifies, 0);
        blk.kick();
        assert_eq!(fake.state().notifies, 1);
        let completions = blk.complete(SHORT).unwrap();
        assert_eq!(completions.len(), 4);
        assert!(completions.iter().all(|c| c.status == BlkStatus::Ok));
        blk.kick();
        assert_eq!(fake.state().notifies, 1, "nothing new to kick");
    }

    #[test]
    fn slots_run_out_and_completion_data_goes_stale() {
        let fake = FakeBlk::new(64, OFFERED);
        let options = BlkOptions {
            slots: 2,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        fake.state().hold = true;
        blk.submit_flush().unwrap();
        blk.submit_read(0, SECTOR_SIZE).unwrap();
        assert_eq!(blk.submit_flush(), Err(DriverError::NoFreeSlot(2)));
        fake.release();
        let completions = blk.complete(SHORT).unwrap();
        let read = completions
            .iter()
            .find(|c| c.kind == RequestKind::Read)
            .copied()
            .unwrap();
        let mut buf = [0u8; SECTOR_SIZE];
        assert_eq!(blk.read_data(&read, &mut buf), Ok(SECTOR_SIZE));
        // Reusing both slots recycles the read's buffer.
        blk.submit_flush().unwrap();
        blk.submit_flush().unwrap();
        assert_eq!(
            blk.read_data(&read, &mut buf),
            Err(DriverError::StaleCompletion)
        );
    }

    #[test]
    fn bad_used_id_is_an_error_not_a_panic() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        fake.state().bad_used_id = Some(999);
        assert_eq!(blk.flush(), Err(DriverError::UsedIdOutOfRange(999)));
        assert_eq!(blk.flush(), Err(DriverError::QueueBroken));
    }

    #[test]
    fn overlong_used_length_is_an_error_and_frees_the_slot() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        fake.state().used_len_bonus = 1;
        let mut buf = [0u8; SECTOR_SIZE];
        assert!(matches!(
            blk.read(0, &mut buf),
            Err(DriverError::UsedLengthTooLarge {
                len: 514,
                max: 513,
                ..
            })
        ));
        assert_eq!(blk.in_flight(), 0);
        fake.state().used_len_bonus = 0;
        assert_eq!(blk.read(0, &mut buf), Ok(BlkStatus::Ok));
    }

    #[test]
    fn device_needs_reset_surfaces_through_a_config_interrupt() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        fake.state().hold = true;
        blk.submit_flush().unwrap();
        fake.fail_device();
        assert_eq!(blk.complete(SHORT), Err(DriverError::DeviceNeedsReset));
        assert_eq!(blk.config_interrupts(), 1);
        assert_eq!(fake.state().interrupt_status, 0);
    }

    #[test]
    fn raw_chains_complete_loop_or_time_out() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut alloc = allocator();
        let mut blk = BlkDriver::new(
            &fake,
            MMIO_BASE,
            &fake,
            &fake,
            &mut alloc,
            &BlkOptions::default(),
        )
        .unwrap();
        let header = alloc.alloc(16, 16).unwrap();
        let data = alloc.alloc(512, 512).unwrap();
        let status_byte = alloc.alloc(1, 1).unwrap();
        fake.ram.write(header, &[0u8; 16]);
        let descriptor = |addr, len, flags, next| RawDescriptor {
            addr,
            len,
            flags,
            next,
        };
        let well_formed = [
            descriptor(header, 16, VIRTQ_DESC_F_NEXT, RawNext::Entry(1)),
            descriptor(
                data,
                512,
                VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                RawNext::Entry(2),
            ),
            descriptor(status_byte, 1, VIRTQ_DESC_F_WRITE, RawNext::Index(0)),
        ];
        fake.ram.write(status_byte, &[0xff]);
        assert_eq!(
            blk.raw_submit(0, &well_formed, Some(status_byte), SHORT),
            Ok(RawOutcome::Completed {
                used_len: 513,
                status: Some(0)
            })
        );
        let looping = [
            descriptor(header, 16, VIRTQ_DESC_F_NEXT, RawNext::Entry(1)),
            descriptor(status_byte, 1, VIRTQ_DESC_F_NEXT, RawNext::Entry(0)),
        ];
        fake.ram.write(status_byte, &[0xff]);
        assert_eq!(
            blk.raw_submit(0, &looping, Some(status_byte), SHORT),
            Ok(RawOutcome::Completed {
                used_len: 0,
                status: Some(0xff)
            })
        );
        fake.state().hold = true;
        assert_eq!(
            blk.raw_submit(0, &well_formed, None, SHORT),
            Ok(RawOutcome::NoCompletion)
        );
        assert_eq!(
            blk.raw_submit(5, &well_formed, None, SHORT),
            Err(DriverError::NoSuchQueue(5))
        );
    }

    #[test]
    fn bogus_avail_head_yields_an_error_not_a_panic() {
        let fake = FakeBlk::new(64, OFFERED);
        let mut blk = driver(&fake, &BlkOptions::default()).unwrap();
        blk.publish_raw_head(0, 999).unwrap();
        // The fake echoes the head it was given; the driver must refuse it.
        assert_eq!(blk.complete(SHORT), Err(DriverError::UsedIdOutOfRange(999)));
    }

    #[test]
    fn requests_alternate_between_queues() {
        let fake = FakeBlk::new(64, OFFERED);
        let options = BlkOptions {
            num_queues: 4,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        assert_eq!(blk.num_queues(), 2, "capped by the device's num_queues");
        fake.state().hold = true;
        let tags: Vec<_> = (0..4).map(|_| blk.submit_flush().unwrap()).collect();
        fake.release();
        let mut completions = Vec::new();
        while completions.len() < 4 {
            completions.extend(blk.complete(SHORT).unwrap());
        }
        let queues: Vec<_> = tags
            .iter()
            .map(|tag| completions.iter().find(|c| c.tag == *tag).unwrap().queue)
            .collect();
        assert_eq!(queues, [0, 1, 0, 1]);
        assert!(fake.state().queues.iter().all(|queue| queue.ready));
    }

    #[test]
    fn set_up_failures_mark_the_device_failed() {
        let fake = FakeBlk::new(64, OFFERED);
        fake.state().queues[0].num_max = 0;
        assert_eq!(
            driver(&fake, &BlkOptions::default()).unwrap_err(),
            DriverError::QueueUnavailable(0)
        );
        assert_ne!(fake.state().status & status::FAILED, 0);

        let other = FakeBlk::new(64, OFFERED);
        other.state().device_id = 1;
        assert_eq!(
            driver(&other, &BlkOptions::default()).unwrap_err(),
            DriverError::WrongDeviceType {
                expected: 2,
                found: 1
            }
        );
    }

    #[test]
    fn queue_size_is_rounded_to_a_power_of_two_within_the_maximum() {
        let fake = FakeBlk::new(64, OFFERED);
        fake.state().queues[0].num_max = 100;
        let blk = driver(&fake, &BlkOptions::default()).unwrap();
        assert_eq!(blk.queue(0).unwrap().size(), 64);
        assert_eq!(fake.state().queues[0].num, 64);
    }

    #[test]
    fn invalid_options_are_refused_before_touching_the_device() {
        let fake = FakeBlk::new(64, OFFERED);
        for options in [
            BlkOptions {
                slots: 0,
                ..BlkOptions::default()
            },
            BlkOptions {
                max_transfer: 1000,
                ..BlkOptions::default()
            },
            BlkOptions {
                queue_size: 0,
                ..BlkOptions::default()
            },
            BlkOptions {
                max_segment_len: Some(0),
                ..BlkOptions::default()
            },
        ] {
            assert!(matches!(
                driver(&fake, &options),
                Err(DriverError::InvalidOption(_))
            ));
        }
        assert!(fake.take_accesses().is_empty());
    }

    #[test]
    fn request_larger_than_one_slot_is_refused() {
        let fake = FakeBlk::new(1024, OFFERED);
        let options = BlkOptions {
            max_transfer: 4096,
            ..BlkOptions::default()
        };
        let mut blk = driver(&fake, &options).unwrap();
        assert_eq!(
            blk.submit_read(0, 8192),
            Err(DriverError::RequestTooLarge {
                len: 8192,
                max: 4096
            })
        );
        // The blocking call splits instead.
        let mut buf = vec![0u8; 8192];
        assert_eq!(blk.read(0, &mut buf), Ok(BlkStatus::Ok));
    }
}
