//! The driver half of a split virtqueue (virtio 1.x §2.7), laid out in guest memory.
//!
//! Descriptor bookkeeping (the free list, chain lengths, writable byte counts) lives in driver
//! memory only, as Linux's `desc_extra` does: nothing the device can write is trusted.

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use super::{DriverError, GuestMemory, Result};

pub const VIRTQ_DESC_F_NEXT: u16 = 1;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Set by the device in the used ring flags: the driver need not kick.
pub const VRING_USED_F_NO_NOTIFY: u16 = 1;

pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_EVENT_IDX: u64 = 1 << 29;

pub const MAX_QUEUE_SIZE: u32 = 32768;
pub const DESC_SIZE: u64 = 16;
/// Spec alignments of the three parts (virtio 1.x §2.7, "Virtqueue Part Alignment").
pub const DESC_ALIGN: u64 = 16;
pub const AVAIL_ALIGN: u64 = 2;
pub const USED_ALIGN: u64 = 4;
/// Each part starts on its own cache line, so that the driver-written avail ring and the
/// device-written used ring never share one.
const PART_PLACEMENT_ALIGN: u64 = 64;

/// Bytes of the descriptor table for `size` entries.
pub fn desc_table_len(size: u16) -> u64 {
    DESC_SIZE * u64::from(size)
}

/// Bytes of the avail ring: flags, idx, `ring[size]`, used_event.
pub fn avail_ring_len(size: u16) -> u64 {
    6 + 2 * u64::from(size)
}

/// Bytes of the used ring: flags, idx, `ring[size]` of `{id: u32, len: u32}`, avail_event.
pub fn used_ring_len(size: u16) -> u64 {
    6 + 8 * u64::from(size)
}

/// True when moving an index from `old` to `new` crosses `event_idx` (the virtio spec's
/// `vring_need_event`), in wrapping u16 arithmetic.
pub fn vring_need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A bump allocator over a guest-physical range, for rings and buffers. It never frees.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestAllocator {
    next: u64,
    end: u64,
}

impl GuestAllocator {
    /// Hands out addresses in `[base, base + size)`.
    pub fn new(base: u64, size: u64) -> Self {
        Self {
            next: base,
            end: base.saturating_add(size),
        }
    }

    /// `size` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, size: u64, align: u64) -> Result<u64> {
        if !align.is_power_of_two() {
            return Err(DriverError::InvalidAlignment(align));
        }
        let placed = self
            .next
            .checked_add(align - 1)
            .map(|unaligned| unaligned & !(align - 1))
            .and_then(|start| Some((start, start.checked_add(size)?)))
            .filter(|(_, end)| *end <= self.end);
        let Some((start, end)) = placed else {
            return Err(DriverError::OutOfGuestMemory { size, align });
        };
        self.next = end;
        Ok(start)
    }

    /// The lowest address not handed out yet.
    pub fn next(&self) -> u64 {
        self.next
    }

    pub fn remaining(&self) -> u64 {
        self.end.saturating_sub(self.next)
    }
}

/// Guest-physical addresses of a queue's three parts, as written to QueueDesc/Driver/Device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueMemory {
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BufferSegment {
    pub gpa: u64,
    pub len: u32,
    pub device_writable: bool,
}

impl BufferSegment {
    /// A buffer the device reads.
    pub fn readable(gpa: u64, len: u32) -> Self {
        Self {
            gpa,
            len,
            device_writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(gpa: u64, len: u32) -> Self {
        Self {
            gpa,
            len,
            device_writable: true,
        }
    }
}

/// Where a raw descriptor's `next` field points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawNext {
    /// The table slot that holds entry `n` of the same raw chain (so a chain can loop).
    Entry(usize),
    /// This table index, written verbatim (possibly out of range or someone else's).
    Index(u16),
}

/// A descriptor written exactly as given, for hostile-input tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    /// Written verbatim: set VIRTQ_DESC_F_NEXT yourself.
    pub flags: u16,
    pub next: RawNext,
}

/// One used-ring entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UsedElem {
    /// The head descriptor index of the completed chain.
    pub id: u16,
    /// Bytes the device says it wrote.
    pub len: u32,
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    /// Descriptors this chain holds in the table.
    descriptors: u16,
    /// Device-writable bytes; None for raw chains, whose device may report anything.
    writable_len: Option<u64>,
}

/// The driver side of one split virtqueue.
pub struct SplitQueue<'a, M: GuestMemory> {
    mem: &'a M,
    size: u16,
    memory: QueueMemory,
    /// Free-list links; for a chain in flight, the links of its descriptors in chain order.
    free_next: Vec<u16>,
    free_head: u16,
    num_free: u16,
    in_flight: Vec<Option<InFlight>>,
    chains_in_flight: u16,
    avail_idx: u16,
    last_used: u16,
    /// The device's used index when the driver last took an interrupt (or accounted for a
    /// lost one): entries up to it were announced.
    announced_used: u16,
    /// Buffers made available since the last `kick_needed`.
    num_added: u32,
    event_idx: bool,
    broken: bool,
}

impl<M: GuestMemory> fmt::Debug for SplitQueue<'_, M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SplitQueue")
            .field("size", &self.size)
            .field("memory", &self.memory)
            .field("num_free", &self.num_free)
            .field("avail_idx", &self.avail_idx)
            .field("last_used", &self.last_used)
            .field("event_idx", &self.event_idx)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<'a, M: GuestMemory> SplitQueue<'a, M> {
    /// Allocates and zeroes the three parts of a `size`-entry queue (a power of two).
    pub fn new(mem: &'a M, alloc: &mut GuestAllocator, size: u16) -> Result<Self> {
        if !size.is_power_of_two() {
            return Err(DriverError::InvalidQueueSize(u32::from(size)));
        }
        let desc = alloc.alloc(desc_table_len(size), DESC_ALIGN.max(PART_PLACEMENT_ALIGN))?;
        let driver = alloc.alloc(avail_ring_len(size), AVAIL_ALIGN.max(PART_PLACEMENT_ALIGN))?;
        let device = alloc.alloc(used_ring_len(size), USED_ALIGN.max(PART_PLACEMENT_ALIGN))?;
        let zeroes = vec![0u8; desc_table_len(size) as usize];
        mem.write(desc, &zeroes);
        mem.write(driver, &zeroes[..avail_ring_len(size) as usize]);
        mem.write(device, &zeroes[..used_ring_len(size) as usize]);
        Ok(Self {
            mem,
            size,
            memory: QueueMemory {
                desc,
                driver,
                device,
            },
            free_next: (1..=size).map(|next| next % size).collect(),
            free_head: 0,
            num_free: size,
            in_flight: vec![None; usize::from(size)],
            chains_in_flight: 0,
            avail_idx: 0,
            last_used: 0,
            announced_used: 0,
            num_added: 0,
            event_idx: false,
            broken: false,
        })
    }

    /// Applies the negotiated features that change ring behaviour (EVENT_IDX).
    pub fn set_features(&mut self, negotiated: u64) {
        self.event_idx = negotiated & VIRTIO_F_EVENT_IDX != 0;
    }

    pub fn memory(&self) -> QueueMemory {
        self.memory
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Free descriptor table entries.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains made available and not yet returned by the device.
    pub fn chains_in_flight(&self) -> u16 {
        self.chains_in_flight
    }

    /// The driver's next avail index (equal to the avail ring's idx field).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver will consume.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    fn desc_addr(&self, index: u16) -> u64 {
        self.memory.desc + DESC_SIZE * u64::from(index)
    }

    fn avail_ring_addr(&self, slot: u16) -> u64 {
        self.memory.driver + 4 + 2 * u64::from(slot)
    }

    fn used_event_addr(&self) -> u64 {
        self.avail_ring_addr(self.size)
    }

    fn used_elem_addr(&self, slot: u16) -> u64 {
        self.memory.device + 4 + 8 * u64::from(slot)
    }

    fn avail_event_addr(&self) -> u64 {
        self.used_elem_addr(self.size)
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        let mut bytes = [0u8; 2];
        self.mem.read(gpa, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    fn write_u16(&self, gpa: u64, value: u16) {
        self.mem.write(gpa, &value.to_le_bytes());
    }

    fn write_desc(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut bytes = [0u8; DESC_SIZE as usize];
        bytes[0..8].copy_from_slice(&addr.to_le_bytes());
        bytes[8..12].copy_from_slice(&len.to_le_bytes());
        bytes[12..14].copy_from_slice(&flags.to_le_bytes());
        bytes[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write(gpa, &bytes);
    }

    fn check_usable(&self, entries: usize) -> Result<()> {
        if self.broken {
            return Err(DriverError::QueueBroken);
        }
        if entries == 0 {
            return Err(DriverError::EmptyChain);
        }
        if entries > usize::from(self.size) {
            return Err(DriverError::ChainTooLong(entries));
        }
        Ok(())
    }

    /// Takes `count` entries off the free list; returns the head. Their `free_next` links stay
    /// as the chain order.
    fn take_descriptors(&mut self, count: usize) -> Result<u16> {
        if count > usize::from(self.num_free) {
            return Err(DriverError::QueueFull {
                needed: count,
                free: usize::from(self.num_free),
            });
        }
        let head = self.free_head;
        let mut last = head;
        for _ in 1..count {
            last = self.free_next[usize::from(last)];
        }
        self.free_head = self.free_next[usize::from(last)];
        // count <= num_free <= size, so it fits in u16.
        self.num_free -= count as u16;
        Ok(head)
    }

    fn release_descriptors(&mut self, head: u16, count: u16) {
        let mut last = head;
        for _ in 1..count {
            last = self.free_next[usize::from(last)];
        }
        self.free_next[usize::from(last)] = self.free_head;
        self.free_head = head;
        self.num_free += count;
    }

    /// Writes the chain `segments` into free descriptors and makes it available.
    pub fn add_chain(&mut self, segments: &[BufferSegment]) -> Result<u16> {
        self.check_usable(segments.len())?;
        let head = self.take_descriptors(segments.len())?;
        let mut index = head;
        let mut writable_len = 0u64;
        for (position, segment) in segments.iter().enumerate() {
            let is_last = position + 1 == segments.len();
            let next = if is_last {
                0
            } else {
                self.free_next[usize::from(index)]
            };
            let mut flags = if is_last { 0 } else { VIRTQ_DESC_F_NEXT };
            if segment.device_writable {
                flags |= VIRTQ_DESC_F_WRITE;
                writable_len += u64::from(segment.len);
            }
            self.write_desc(self.desc_addr(index), segment.gpa, segment.len, flags, next);
            index = next;
        }
        self.track_and_publish(head, segments.len() as u16, Some(writable_len));
        Ok(head)
    }

    /// Writes `segments` as an indirect table at `table_gpa` (16 bytes per entry, 16-aligned,
    /// owned by the caller until the chain completes) and makes available one descriptor with
    /// VIRTQ_DESC_F_INDIRECT. Use it only when INDIRECT_DESC was negotiated (or to test a
    /// device that must refuse it).
    pub fn add_indirect(&mut self, table_gpa: u64, segments: &[BufferSegment]) -> Result<u16> {
        self.check_usable(segments.len())?;
        let head = self.take_descriptors(1)?;
        let mut writable_len = 0u64;
        for (position, segment) in (0u16..).zip(segments) {
            let is_last = usize::from(position) + 1 == segments.len();
            let mut flags = if is_last { 0 } else { VIRTQ_DESC_F_NEXT };
            if segment.device_writable {
                flags |= VIRTQ_DESC_F_WRITE;
                writable_len += u64::from(segment.len);
            }
            let next = if is_last { 0 } else { position + 1 };
            self.write_desc(
                table_gpa + DESC_SIZE * u64::from(position),
                segment.gpa,
                segment.len,
                flags,
                next,
            );
        }
        let table_len = DESC_SIZE as u32 * segments.len() as u32;
        self.write_desc(
            self.desc_addr(head),
            table_gpa,
            table_len,
            VIRTQ_DESC_F_INDIRECT,
            0,
        );
        self.track_and_publish(head, 1, Some(writable_len));
        Ok(head)
    }

    /// Writes `descriptors` verbatim into free table entries (entry `n` of the slice into the
    /// `n`th descriptor taken) and makes the first one available. Any used length is accepted
    /// for such a chain.
    pub fn add_raw(&mut self, descriptors: &[RawDescriptor]) -> Result<u16> {
        self.check_usable(descriptors.len())?;
        if descriptors.iter().any(|descriptor| {
            matches!(descriptor.next, RawNext::Entry(entry) if entry >= descriptors.len())
        }) {
            return Err(DriverError::InvalidOption(
                "raw descriptor points past its chain",
            ));
        }
        let head = self.take_descriptors(descriptors.len())?;
        let mut slots = Vec::with_capacity(descriptors.len());
        let mut index = head;
        for _ in descriptors {
            slots.push(index);
            index = self.free_next[usize::from(index)];
        }
        for (descriptor, slot) in descriptors.iter().zip(&slots) {
            let next = match descriptor.next {
                RawNext::Entry(entry) => slots[entry],
                RawNext::Index(index) => index,
            };
            self.write_desc(
                self.desc_addr(*slot),
                descriptor.addr,
                descriptor.len,
                descriptor.flags,
                next,
            );
        }
        self.track_and_publish(head, descriptors.len() as u16, None);
        Ok(head)
    }

    /// Puts `head` in the avail ring without owning any descriptor: a device must reject an
    /// out-of-range head and must not complete one it was not given.
    pub fn publish_raw_head(&mut self, head: u16) -> Result<()> {
        if self.broken {
            return Err(DriverError::QueueBroken);
        }
        self.publish(head);
        Ok(())
    }

    fn track_and_publish(&mut self, head: u16, descriptors: u16, writable_len: Option<u64>) {
        self.in_flight[usize::from(head)] = Some(InFlight {
            descriptors,
            writable_len,
        });
        self.chains_in_flight += 1;
        self.publish(head);
    }

    fn publish(&mut self, head: u16) {
        let slot = self.avail_idx & (self.size - 1);
        self.write_u16(self.avail_ring_addr(slot), head);
        // Descriptors and the ring entry must be visible before the index that exposes them.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.write_u16(self.memory.driver + 2, self.avail_idx);
        self.num_added += 1;
    }

    /// Whether the device wants a QueueNotify for what was added since the last call:
    /// `avail_event` with EVENT_IDX, otherwise VRING_USED_F_NO_NOTIFY.
    pub fn kick_needed(&mut self) -> bool {
        let added = std::mem::take(&mut self.num_added);
        if added == 0 {
            return false;
        }
        // More than 2^16 - 1 additions make the old index ambiguous: always kick.
        if added >= u32::from(u16::MAX) {
            return true;
        }
        // The avail idx store must be ordered before the load of the device's suppression
        // state, or both sides can miss each other.
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = new.wrapping_sub(added as u16);
        if self.event_idx {
            vring_need_event(self.read_u16(self.avail_event_addr()), new, old)
        } else {
            self.read_u16(self.memory.device) & VRING_USED_F_NO_NOTIFY == 0
        }
    }

    /// Records that the driver took an interrupt (or accounted for a lost one): every used
    /// entry published so far has been announced.
    pub fn note_interrupt(&mut self) {
        // The index must be read after the interrupt that announced it.
        fence(Ordering::Acquire);
        self.announced_used = self.read_u16(self.memory.device + 2);
    }

    /// Used entries not taken yet that the device published after the driver last took an
    /// interrupt: if a wait for one times out, the device never announced them.
    pub fn unannounced_used(&self) -> u16 {
        let pending = self
            .read_u16(self.memory.device + 2)
            .wrapping_sub(self.last_used);
        let announced = self.announced_used.wrapping_sub(self.last_used);
        // `announced` wraps past `pending` once the driver took every announced entry.
        if announced <= pending {
            pending - announced
        } else {
            pending
        }
    }

    /// Asks for an interrupt once the used index passes `value` (EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        self.write_u16(self.used_event_addr(), value);
        // Publish before re-reading the used index, pairing with the device's fence.
        fence(Ordering::SeqCst);
    }

    /// Takes the next used entry, if any. A used entry that names no chain in flight, or an
    /// index that jumps by more than the queue size, breaks the queue (like Linux's
    /// BAD_RING). A length above the chain's writable bytes is reported after the chain is
    /// recycled, and the queue stays usable.
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>> {
        if self.broken {
            return Err(DriverError::QueueBroken);
        }
        let used_idx = self.read_u16(self.memory.device + 2);
        if used_idx == self.last_used {
            return Ok(None);
        }
        if used_idx.wrapping_sub(self.last_used) > self.size {
            self.broken = true;
            return Err(DriverError::UsedIndexJump {
                last: self.last_used,
                reported: used_idx,
            });
        }
        // The entry must be read after the index that covers it.
        fence(Ordering::Acquire);
        let mut element = [0u8; 8];
        self.mem.read(
            self.used_elem_addr(self.last_used & (self.size - 1)),
            &mut element,
        );
        let id = u32::from_le_bytes([element[0], element[1], element[2], element[3]]);
        let len = u32::from_le_bytes([element[4], element[5], element[6], element[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) {
            self.broken = true;
            return Err(DriverError::UsedIdOutOfRange(id));
        }
        let head = id as u16;
        let Some(chain) = self.in_flight[usize::from(head)].take() else {
            self.broken = true;
            return Err(DriverError::UsedIdNotInFlight(id));
        };
        self.release_descriptors(head, chain.descriptors);
        self.chains_in_flight -= 1;
        if self.event_idx {
            self.set_used_event(self.last_used);
        }
        match chain.writable_len {
            Some(max) if u64::from(len) > max => {
                Err(DriverError::UsedLengthTooLarge { id: head, len, max })
            }
            _ => Ok(Some(UsedElem { id: head, len })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fake::VecMemory;

    const RAM_BASE: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 1 << 20;

    fn ram() -> VecMemory {
        VecMemory::new(RAM_BASE, RAM_SIZE as usize)
    }

    fn queue(mem: &VecMemory, size: u16) -> SplitQueue<'_, VecMemory> {
        let mut alloc = GuestAllocator::new(RAM_BASE, RAM_SIZE / 2);
        SplitQueue::new(mem, &mut alloc, size).expect("queue")
    }

    /// Plays the device: completes the chain at `head` with `len` bytes.
    fn complete(mem: &VecMemory, queue: &SplitQueue<'_, VecMemory>, head: u32, len: u32) {
        let memory = queue.memory();
        let used_idx = mem.read_u16(memory.device + 2);
        let slot = u64::from(used_idx & (queue.size() - 1));
        mem.write(memory.device + 4 + 8 * slot, &head.to_le_bytes());
        mem.write(memory.device + 8 + 8 * slot, &len.to_le_bytes());
        mem.write_u16(memory.device + 2, used_idx.wrapping_add(1));
    }

    #[test]
    fn ring_part_sizes_follow_the_spec() {
        assert_eq!(desc_table_len(256), 4096);
        assert_eq!(avail_ring_len(256), 6 + 512);
        assert_eq!(used_ring_len(256), 6 + 2048);
        assert_eq!(desc_table_len(1), 16);
        assert_eq!(used_ring_len(32768), 6 + 8 * 32768);
    }

    #[test]
    fn ring_parts_are_aligned_disjoint_and_zeroed() {
        let mem = ram();
        mem.fill(0xa5);
        let mut alloc = GuestAllocator::new(RAM_BASE + 3, RAM_SIZE - 3);
        let queue = SplitQueue::new(&mem, &mut alloc, 128).unwrap();
        let memory = queue.memory();
        assert_eq!(memory.desc % DESC_ALIGN, 0);
        assert_eq!(memory.driver % AVAIL_ALIGN, 0);
        assert_eq!(memory.device % USED_ALIGN, 0);
        assert!(memory.desc + desc_table_len(128) <= memory.driver);
        assert!(memory.driver + avail_ring_len(128) <= memory.device);
        assert!(memory.device + used_ring_len(128) <= alloc.next());
        let mut used = vec![0xffu8; used_ring_len(128) as usize];
        mem.read(memory.device, &mut used);
        assert!(used.iter().all(|byte| *byte == 0));
        let mut avail = vec![0xffu8; avail_ring_len(128) as usize];
        mem.read(memory.driver, &mut avail);
        assert!(avail.iter().all(|byte| *byte == 0));
    }

    #[test]
    fn queue_size_must_be_a_power_of_two() {
        let mem = ram();
        let mut alloc = GuestAllocator::new(RAM_BASE, RAM_SIZE);
        for size in [0u16, 3, 100, 32767] {
            assert_eq!(
                SplitQueue::new(&mem, &mut alloc, size).unwrap_err(),
                DriverError::InvalidQueueSize(u32::from(size))
            );
        }
    }

    #[test]
    fn allocator_aligns_and_stops_at_the_end() {
        let mut alloc = GuestAllocator::new(0x1001, 0x1000);
        assert_eq!(alloc.alloc(10, 1).unwrap(), 0x1001);
        assert_eq!(alloc.alloc(16, 16).unwrap(), 0x1010);
        // 0x2000 is in range but 0x2000 + 2 is past the end.
        assert_eq!(
            alloc.alloc(2, 4096).unwrap_err(),
            DriverError::OutOfGuestMemory {
                size: 2,
                align: 4096,
            }
        );
        assert_eq!(alloc.next(), 0x1020);
        assert_eq!(alloc.remaining(), 0x2001 - 0x1020);
        assert_eq!(alloc.alloc(0x2001 - 0x1020, 1).unwrap(), 0x1020);
        assert_eq!(alloc.remaining(), 0);
        assert!(alloc.alloc(1, 1).is_err());
        assert_eq!(
            alloc.alloc(1, 3).unwrap_err(),
            DriverError::InvalidAlignment(3)
        );
    }

    #[test]
    fn allocator_rejects_address_overflow() {
        let mut alloc = GuestAllocator::new(u64::MAX - 8, 100);
        assert!(alloc.alloc(4, 1).is_ok());
        assert!(alloc.alloc(4, 16).is_err());
        assert!(alloc.alloc(u64::MAX, 1).is_err());
    }

    #[test]
    fn chain_is_written_linked_and_published_in_order() {
        let mem = ram();
        let mut queue = queue(&mem, 8);
        let segments = [
            BufferSegment::readable(0x4008_0000, 16),
            BufferSegment::writable(0x4008_1000, 4096),
            BufferSegment::writable(0x4008_2000, 1),
        ];
        let head = queue.add_chain(&segments).unwrap();
        assert_eq!(head, 0);
        let memory = queue.memory();
        let mut index = head;
        for (position, segment) in segments.iter().enumerate() {
            let desc = mem.read_desc(memory.desc + 16 * u64::from(index));
            assert_eq!(desc.0, segment.gpa);
            assert_eq!(desc.1, segment.len);
            let has_next = position + 1 < segments.len();
            assert_eq!(desc.2 & VIRTQ_DESC_F_NEXT != 0, has_next);
            assert_eq!(desc.2 & VIRTQ_DESC_F_WRITE != 0, segment.device_writable);
            index = desc.3;
        }
        assert_eq!(mem.read_u16(memory.driver + 4), head);
        assert_eq!(mem.read_u16(memory.driver + 2), 1);
        assert_eq!(queue.num_free(), 5);
        assert_eq!(queue.chains_in_flight(), 1);
    }

    #[test]
    fn free_list_is_reused_and_exhaustion_is_an_error() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let segment = BufferSegment::writable(0x4008_0000, 8);
        let first = queue.add_chain(&[segment; 3]).unwrap();
        assert_eq!(
            queue.add_chain(&[segment; 2]).unwrap_err(),
            DriverError::QueueFull { needed: 2, free: 1 }
        );
        let second = queue.add_chain(&[segment]).unwrap();
        assert_eq!(queue.num_free(), 0);
        assert_eq!(
            queue.add_chain(&[segment]).unwrap_err(),
            DriverError::QueueFull { needed: 1, free: 0 }
        );
        complete(&mem, &queue, u32::from(first), 8);
        assert_eq!(
            queue.pop_used().unwrap(),
            Some(UsedElem { id: first, len: 8 })
        );
        assert_eq!(queue.num_free(), 3);
        // The freed chain is handed out again.
        let third = queue.add_chain(&[segment; 3]).unwrap();
        assert_eq!(third, first);
        complete(&mem, &queue, u32::from(second), 0);
        complete(&mem, &queue, u32::from(third), 24);
        assert_eq!(queue.pop_used().unwrap().unwrap().id, second);
        assert_eq!(queue.pop_used().unwrap().unwrap().id, third);
        assert_eq!(queue.pop_used().unwrap(), None);
        assert_eq!(queue.num_free(), 4);
        assert_eq!(queue.chains_in_flight(), 0);
    }

    #[test]
    fn chain_longer_than_queue_or_empty_is_refused() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let segment = BufferSegment::readable(0x4008_0000, 8);
        assert_eq!(
            queue.add_chain(&[segment; 5]).unwrap_err(),
            DriverError::ChainTooLong(5)
        );
        assert_eq!(queue.add_chain(&[]).unwrap_err(), DriverError::EmptyChain);
        assert_eq!(
            queue.add_indirect(0x4009_0000, &[segment; 5]).unwrap_err(),
            DriverError::ChainTooLong(5)
        );
    }

    #[test]
    fn indirect_chain_takes_one_descriptor() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let table = 0x4009_0000;
        let segments = [
            BufferSegment::readable(0x4008_0000, 16),
            BufferSegment::writable(0x4008_1000, 512),
            BufferSegment::writable(0x4008_2000, 1),
        ];
        let head = queue.add_indirect(table, &segments).unwrap();
        assert_eq!(queue.num_free(), 3);
        let desc = mem.read_desc(queue.memory().desc + 16 * u64::from(head));
        assert_eq!(desc, (table, 48, VIRTQ_DESC_F_INDIRECT, 0));
        let entries: Vec<_> = (0..3).map(|i| mem.read_desc(table + 16 * i)).collect();
        assert_eq!(
            entries[0],
            (0x4008_0000, 16, VIRTQ_DESC_F_NEXT, 1),
            "readable entry links to 1"
        );
        assert_eq!(
            entries[1],
            (0x4008_1000, 512, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 2)
        );
        assert_eq!(entries[2], (0x4008_2000, 1, VIRTQ_DESC_F_WRITE, 0));
        complete(&mem, &queue, u32::from(head), 513);
        assert_eq!(queue.pop_used().unwrap().unwrap().len, 513);
        assert_eq!(queue.num_free(), 4);
    }

    #[test]
    fn raw_chain_can_loop_and_is_recycled() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
        let looping = [
            RawDescriptor {
                addr: 0x4008_0000,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: RawNext::Entry(1),
            },
            RawDescriptor {
                addr: 0x4008_1000,
                len: 16,
                flags: VIRTQ_DESC_F_NEXT,
                next: RawNext::Entry(0),
            },
        ];
        let head = queue.add_raw(&looping).unwrap();
        let first = mem.read_desc(queue.memory().desc + 16 * u64::from(head));
        let second = mem.read_desc(queue.memory().desc + 16 * u64::from(first.3));
        assert_ne!(first.3, head);
        assert_eq!(second.3, head, "the chain loops back to its head");
        // A raw chain accepts any used length.
        complete(&mem, &queue, u32::from(head), u32::MAX);
        assert_eq!(queue.pop_used().unwrap().unwrap().len, u32::MAX);
        assert_eq!(queue.num_free(), 3);
        let dangling = [RawDescriptor {
            addr: 0,
            len: 0,
            flags: 0,
            next: RawNext::Entry(1),
        }];
        assert!(matches!(
            queue.add_raw(&dangling),
            Err(DriverError::InvalidOption(_))
        ));
        assert_eq!(queue.num_free(), 3);
    }

    #[test]
    fn need_event_handles_wraparound() {
        // Crossing the event index, including across the u16 wrap.
        assert!(vring_need_event(0, 1, 0));
        assert!(!vring_need_event(1, 1, 0));
        assert!(vring_need_event(5, 10, 3));
        assert!(!vring_need_event(10, 10, 3));
        assert!(vring_need_event(u16::MAX, 0, u16::MAX));
        assert!(vring_need_event(u16::MAX - 1, 2, u16::MAX - 3));
        assert!(!vring_need_event(3, 2, u16::MAX - 3));
        assert!(vring_need_event(0, 1, u16::MAX));
        assert!(!vring_need_event(2, 1, u16::MAX));
        // Nothing added never needs an event.
        assert!(!vring_need_event(7, 7, 7));
    }

    #[test]
    fn kick_honours_no_notify_flag() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        assert!(!queue.kick_needed(), "nothing added");
        queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
        assert!(queue.kick_needed());
        mem.write_u16(queue.memory().device, VRING_USED_F_NO_NOTIFY);
        queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
        assert!(!queue.kick_needed());
    }

    #[test]
    fn kick_honours_avail_event_across_wrap() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        queue.set_features(VIRTIO_F_EVENT_IDX);
        let avail_event = queue.memory().device + 4 + 8 * 4;
        // No-notify flag is ignored with EVENT_IDX.
        mem.write_u16(queue.memory().device, VRING_USED_F_NO_NOTIFY);
        let mut expected_idx = 0u16;
        for round in 0..70_000u32 {
            // The device wants a kick when avail idx passes `round`'s event.
            let event = expected_idx.wrapping_add((round % 3) as u16);
            mem.write_u16(avail_event, event);
            let head = queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
            let crossed = event == expected_idx;
            assert_eq!(queue.kick_needed(), crossed, "round {round}");
            expected_idx = expected_idx.wrapping_add(1);
            assert_eq!(queue.avail_idx(), expected_idx);
            complete(&mem, &queue, u32::from(head), 0);
            assert!(queue.pop_used().unwrap().is_some());
        }
        assert_eq!(queue.last_used(), expected_idx);
    }

    #[test]
    fn pop_used_publishes_used_event_with_event_idx() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        queue.set_features(VIRTIO_F_EVENT_IDX);
        let used_event = queue.memory().driver + 4 + 2 * 4;
        let head = queue.add_chain(&[BufferSegment::writable(0, 4)]).unwrap();
        complete(&mem, &queue, u32::from(head), 4);
        queue.pop_used().unwrap();
        assert_eq!(mem.read_u16(used_event), 1);
        queue.set_used_event(9);
        assert_eq!(mem.read_u16(used_event), 9);
    }

    #[test]
    fn used_entries_published_after_the_last_interrupt_are_unannounced() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let heads: Vec<u16> = (0..3)
            .map(|_| queue.add_chain(&[BufferSegment::writable(0, 4)]).unwrap())
            .collect();
        complete(&mem, &queue, u32::from(heads[0]), 4);
        assert_eq!(queue.unannounced_used(), 1);
        queue.note_interrupt();
        assert_eq!(queue.unannounced_used(), 0, "announced, not yet taken");
        complete(&mem, &queue, u32::from(heads[1]), 4);
        assert_eq!(
            queue.unannounced_used(),
            1,
            "only the entry after the interrupt"
        );
        queue.pop_used().unwrap();
        queue.pop_used().unwrap();
        complete(&mem, &queue, u32::from(heads[2]), 4);
        assert_eq!(
            queue.unannounced_used(),
            1,
            "an interrupt behind the taken entries announces nothing new"
        );
    }

    #[test]
    fn bad_used_id_breaks_the_queue() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        queue.add_chain(&[BufferSegment::writable(0, 4)]).unwrap();
        complete(&mem, &queue, 4, 0);
        assert_eq!(
            queue.pop_used().unwrap_err(),
            DriverError::UsedIdOutOfRange(4)
        );
        assert_eq!(queue.pop_used().unwrap_err(), DriverError::QueueBroken);
        assert_eq!(
            queue
                .add_chain(&[BufferSegment::readable(0, 1)])
                .unwrap_err(),
            DriverError::QueueBroken
        );
    }

    #[test]
    fn used_id_not_in_flight_breaks_the_queue() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let head = queue.add_chain(&[BufferSegment::writable(0, 4)]).unwrap();
        complete(&mem, &queue, u32::from(head), 0);
        complete(&mem, &queue, u32::from(head), 0);
        assert!(queue.pop_used().unwrap().is_some());
        assert_eq!(
            queue.pop_used().unwrap_err(),
            DriverError::UsedIdNotInFlight(u32::from(head))
        );
    }

    #[test]
    fn used_index_jump_breaks_the_queue() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        mem.write_u16(queue.memory().device + 2, 5);
        assert_eq!(
            queue.pop_used().unwrap_err(),
            DriverError::UsedIndexJump {
                last: 0,
                reported: 5
            }
        );
    }

    #[test]
    fn used_length_above_writable_bytes_is_an_error_but_recycles() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        let head = queue
            .add_chain(&[
                BufferSegment::readable(0, 100),
                BufferSegment::writable(0, 10),
            ])
            .unwrap();
        complete(&mem, &queue, u32::from(head), 11);
        assert_eq!(
            queue.pop_used().unwrap_err(),
            DriverError::UsedLengthTooLarge {
                id: head,
                len: 11,
                max: 10
            }
        );
        assert_eq!(queue.num_free(), 4);
        assert!(!queue.is_broken());
        queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
    }

    #[test]
    fn avail_ring_wraps_at_queue_size() {
        let mem = ram();
        let mut queue = queue(&mem, 2);
        for round in 0..5u16 {
            let head = queue.add_chain(&[BufferSegment::readable(0, 1)]).unwrap();
            let slot = u64::from(round % 2);
            assert_eq!(mem.read_u16(queue.memory().driver + 4 + 2 * slot), head);
            assert_eq!(mem.read_u16(queue.memory().driver + 2), round + 1);
            complete(&mem, &queue, u32::from(head), 0);
            queue.pop_used().unwrap().unwrap();
        }
    }

    #[test]
    fn raw_head_is_published_untracked() {
        let mem = ram();
        let mut queue = queue(&mem, 4);
        queue.publish_raw_head(0xffff).unwrap();
        assert_eq!(mem.read_u16(queue.memory().driver + 4), 0xffff);
        assert_eq!(queue.chains_in_flight(), 0);
        assert_eq!(queue.num_free(), 4);
    }
}
