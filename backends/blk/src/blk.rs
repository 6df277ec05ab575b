//! virtio-blk request handling, independent of the vhost-user transport.
//!
//! A request is one descriptor chain: a device-readable header, an optional payload, and a
//! device-writable status byte at the very end. Any layout is accepted (VIRTIO_F_VERSION_1
//! implies ANY_LAYOUT): the header is the first 16 readable bytes, the status the last
//! writable byte, and everything in between is payload.

use std::fmt::Debug;
use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap, VolatileSlice,
};

use crate::stats::QueueCounters;
use crate::virtio_blk::{DiscardSegment, RequestHeader, DISCARD_SEGMENT_SIZE, OUTHDR_SIZE};

/// virtio-blk addresses the disk in 512-byte sectors whatever the block size.
pub const SECTOR_SHIFT: u32 = 9;
pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;

/// Length of the GET_ID answer.
pub const SERIAL_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Largest DISCARD / WRITE_ZEROES range per segment: what fits a 32-bit byte count.
pub const MAX_DISCARD_SECTORS: u32 = u32::MAX >> SECTOR_SHIFT;
/// Segments accepted in one DISCARD or WRITE_ZEROES request.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// The storage a block device reads and writes. Offsets and lengths are in bytes; the
/// device has already checked them against `capacity()`.
pub trait BlockStorage: Debug + Send + Sync {
    /// Usable size in bytes, a multiple of [`SECTOR_SIZE`].
    fn capacity(&self) -> u64;
    /// Smallest unit the storage can write without read-modify-write.
    fn logical_block_size(&self) -> u32;
    /// Preferred I/O unit (the physical block size).
    fn physical_block_size(&self) -> u32;
    /// Fills `bufs`, in order, from `offset`.
    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Writes `bufs`, in order, at `offset`.
    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Whether `discard` and `write_zeroes` are available.
    fn supports_discard(&self) -> bool;
    /// Tells the storage the range is no longer needed; it may read back as anything.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes the range read back as zeroes, deallocating it if `unmap` allows.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
    /// Says whether the kernel can pin the guest memory now in use (get_user_pages), which
    /// storage that hands guest buffers to the kernel for DMA (O_DIRECT) needs. Storage that
    /// only copies has nothing to do.
    fn set_guest_memory_pinnable(&self, _pinnable: bool) {}
}

/// Why a request completed with a status other than OK.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Header shorter than {OUTHDR_SIZE} bytes")]
    HeaderTooShort,
    #[error("Device-readable descriptor after a device-writable one")]
    DirectionOrder,
    #[error("Descriptor outside guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("Unexpected {0} payload")]
    UnexpectedPayload(&'static str),
    #[error("Data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(usize),
    #[error("Sector range beyond the end of the device")]
    OutOfRange,
    #[error("Write to a read-only device")]
    ReadOnly,
    #[error("Bad discard or write-zeroes payload")]
    BadSegments,
    #[error("Unsupported request type {0}")]
    UnsupportedType(u32),
    #[error("Unsupported discard or write-zeroes flags {0:#x}")]
    UnsupportedFlags(u32),
    #[error("Storage I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        let status = match self {
            RequestError::UnsupportedType(_) | RequestError::UnsupportedFlags(_) => {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }
}

/// Guest buffers of one direction, in chain order.
#[derive(Default)]
struct GuestBuffers<'a> {
    slices: Vec<VolatileSlice<'a>>,
    len: usize,
}

impl<'a> GuestBuffers<'a> {
    /// Appends `[addr, addr + len)`, which must lie entirely in guest memory.
    fn push(
        &mut self,
        mem: &'a GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Result<(), RequestError> {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.map_err(RequestError::GuestMemory)?;
            self.len += slice.len();
            self.slices.push(slice);
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Removes and returns the first `count` bytes, or `None` if there are fewer.
    fn split_front(&mut self, count: usize) -> Option<GuestBuffers<'a>> {
        if count > self.len {
            return None;
        }
        let mut front = GuestBuffers::default();
        let mut taken = 0;
        while taken < count {
            let slice = self.slices.remove(0);
            let want = count - taken;
            if slice.len() > want {
                let (head, tail) = slice.split_at(want).ok()?;
                self.slices.insert(0, tail);
                front.slices.push(head);
                taken += want;
            } else {
                taken += slice.len();
                front.slices.push(slice);
            }
        }
        front.len = count;
        self.len -= count;
        Some(front)
    }

    /// Copies the start of the buffers into `out`; returns the bytes copied.
    fn read_into(&self, out: &mut [u8]) -> usize {
        let mut done = 0;
        for slice in &self.slices {
            if done == out.len() {
                break;
            }
            done += slice.copy_to(&mut out[done..]);
        }
        done
    }

    /// Copies `data` to the start of the buffers; returns the bytes copied.
    fn write_from(&self, data: &[u8]) -> usize {
        let mut done = 0;
        for slice in &self.slices {
            if done == data.len() {
                break;
            }
            let count = slice.len().min(data.len() - done);
            slice.copy_from(&data[done..done + count]);
            done += count;
        }
        done
    }
}

/// A virtio-blk device: request semantics on top of a [`BlockStorage`].
#[derive(Debug)]
pub struct BlockDevice {
    storage: Arc<dyn BlockStorage>,
    read_only: bool,
    serial: [u8; SERIAL_LEN],
    writethrough: AtomicBool,
}

impl BlockDevice {
    /// `serial` longer than [`SERIAL_LEN`] bytes is truncated; shorter is zero-padded.
    pub fn new(storage: Arc<dyn BlockStorage>, read_only: bool, serial: &[u8]) -> Self {
        let mut padded = [0u8; SERIAL_LEN];
        let len = serial.len().min(SERIAL_LEN);
        padded[..len].copy_from_slice(&serial[..len]);
        BlockDevice {
            storage,
            read_only,
            serial: padded,
            writethrough: AtomicBool::new(false),
        }
    }

    pub fn storage(&self) -> &Arc<dyn BlockStorage> {
        &self.storage
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// In writethrough mode every write is flushed before it completes.
    pub fn set_writethrough(&self, writethrough: bool) {
        self.writethrough.store(writethrough, Ordering::Release);
    }

    pub fn writethrough(&self) -> bool {
        self.writethrough.load(Ordering::Acquire)
    }

    /// Executes the request in `chain`, writes its status byte and counts it in `counters`.
    /// Returns the number of bytes written into device-writable buffers, the `len` of the
    /// used-ring entry.
    ///
    /// A chain that is cut short (a loop, a bad `next`, a bad indirect table, more than
    /// 4 GiB) or that does not end in a writable byte in guest memory has no status byte
    /// to write: nothing is written and 0 is returned.
    pub fn process_chain<M>(&self, chain: DescriptorChain<M>, counters: &QueueCounters) -> u32
    where
        M: Deref<Target = GuestMemoryMmap> + Clone,
    {
        let mem = chain.memory();
        let descriptors: Vec<Descriptor> = chain.clone().collect();
        counters.request();
        let Some(status) = status_byte(mem, &descriptors) else {
            counters.error();
            debug!(
                "Request {}: chain has no writable status byte",
                chain.head_index()
            );
            return 0;
        };
        let (status_code, written) = match self.execute(mem, &descriptors, counters) {
            Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
            Err(error) => {
                counters.error();
                debug!("Request {} failed: {error}", chain.head_index());
                (error.status(), 0)
            }
        };
        status.copy_from(&[status_code]);
        // The chain iterator stops before 4 GiB, so this fits; saturate rather than trust it.
        u32::try_from(written).unwrap_or(u32::MAX).saturating_add(1)
    }

    fn execute(
        &self,
        mem: &GuestMemoryMmap,
        descriptors: &[Descriptor],
        counters: &QueueCounters,
    ) -> Result<usize, RequestError> {
        let (mut readable, writable) = split_directions(mem, descriptors)?;
        let header = readable
            .split_front(OUTHDR_SIZE)
            .ok_or(RequestError::HeaderTooShort)?;
        let mut raw = [0u8; OUTHDR_SIZE];
        header.read_into(&mut raw);
        let header = RequestHeader::from_bytes(&raw);

        match header.request_type {
            VIRTIO_BLK_T_IN => {
                expect_empty(&readable, "device-readable")?;
                let offset = self.data_range(header.sector, writable.len)?;
                self.storage
                    .read_vectored_at(offset, &writable.slices)
                    .map_err(RequestError::Io)?;
                counters.read(writable.len);
                Ok(writable.len)
            }
            VIRTIO_BLK_T_OUT => {
                expect_empty(&writable, "device-writable")?;
                self.check_writable()?;
                let offset = self.data_range(header.sector, readable.len)?;
                self.storage
                    .write_vectored_at(offset, &readable.slices)
                    .map_err(RequestError::Io)?;
                counters.written(readable.len);
                self.flush_if_writethrough()?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                expect_empty(&readable, "device-readable")?;
                expect_empty(&writable, "device-writable")?;
                self.storage.flush().map_err(RequestError::Io)?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                expect_empty(&readable, "device-readable")?;
                let len = writable.len.min(SERIAL_LEN);
                Ok(writable.write_from(&self.serial[..len]))
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if self.storage.supports_discard() => {
                expect_empty(&writable, "device-writable")?;
                self.check_writable()?;
                let zeroes = header.request_type == VIRTIO_BLK_T_WRITE_ZEROES;
                for segment in parse_segments(&readable)? {
                    self.discard_segment(segment, zeroes)?;
                }
                if zeroes {
                    self.flush_if_writethrough()?;
                }
                Ok(0)
            }
            other => Err(RequestError::UnsupportedType(other)),
        }
    }

    fn check_writable(&self) -> Result<(), RequestError> {
        if self.read_only {
            Err(RequestError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn flush_if_writethrough(&self) -> Result<(), RequestError> {
        if self.writethrough() {
            self.storage.flush().map_err(RequestError::Io)?;
        }
        Ok(())
    }

    /// Byte offset of `sector` once `[sector, sector + len)` is checked to fit the device.
    fn byte_range(&self, sector: u64, len: u64) -> Result<u64, RequestError> {
        let offset = sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(RequestError::OutOfRange)?;
        let end = offset.checked_add(len).ok_or(RequestError::OutOfRange)?;
        if end > self.storage.capacity() {
            return Err(RequestError::OutOfRange);
        }
        Ok(offset)
    }

    /// Like `byte_range`, for IN/OUT payloads that must be whole sectors.
    fn data_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        if len as u64 & (SECTOR_SIZE - 1) != 0 {
            return Err(RequestError::UnalignedLength(len));
        }
        self.byte_range(sector, len as u64)
    }

    fn discard_segment(&self, segment: DiscardSegment, zeroes: bool) -> Result<(), RequestError> {
        let unmap = segment.flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        let allowed_flags = if zeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        if segment.flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags(segment.flags));
        }
        if segment.num_sectors > MAX_DISCARD_SECTORS {
            return Err(RequestError::OutOfRange);
        }
        let len = u64::from(segment.num_sectors) * SECTOR_SIZE;
        let offset = self.byte_range(segment.sector, len)?;
        let result = if zeroes {
            self.storage.write_zeroes(offset, len, unmap)
        } else {
            self.storage.discard(offset, len)
        };
        result.map_err(RequestError::Io)
    }
}

/// The status byte: the last byte of the last descriptor, if the chain is complete and that
/// descriptor is device-writable guest memory.
fn status_byte<'a>(
    mem: &'a GuestMemoryMmap,
    descriptors: &[Descriptor],
) -> Option<VolatileSlice<'a>> {
    let last = descriptors.last()?;
    if last.has_next() || !last.is_write_only() || last.len() == 0 {
        return None;
    }
    let addr = last.addr().checked_add(u64::from(last.len()) - 1)?;
    mem.get_slice(addr, 1).ok()
}

/// Splits the chain (whose last byte is the status) into readable and writable buffers,
/// leaving the status byte out.
fn split_directions<'a>(
    mem: &'a GuestMemoryMmap,
    descriptors: &[Descriptor],
) -> Result<(GuestBuffers<'a>, GuestBuffers<'a>), RequestError> {
    let mut readable = GuestBuffers::default();
    let mut writable = GuestBuffers::default();
    let mut seen_writable = false;
    let last = descriptors.len() - 1;
    for (index, desc) in descriptors.iter().enumerate() {
        let len = desc.len() as usize;
        if desc.is_write_only() {
            seen_writable = true;
            let len = if index == last { len - 1 } else { len };
            writable.push(mem, desc.addr(), len)?;
        } else if seen_writable {
            return Err(RequestError::DirectionOrder);
        } else {
            readable.push(mem, desc.addr(), len)?;
        }
    }
    Ok((readable, writable))
}

fn expect_empty(buffers: &GuestBuffers, direction: &'static str) -> Result<(), RequestError> {
    if buffers.is_empty() {
        Ok(())
    } else {
        Err(RequestError::UnexpectedPayload(direction))
    }
}

fn parse_segments(payload: &GuestBuffers) -> Result<Vec<DiscardSegment>, RequestError> {
    let count = payload.len / DISCARD_SEGMENT_SIZE;
    if payload.len & (DISCARD_SEGMENT_SIZE - 1) != 0
        || count == 0
        || count > MAX_DISCARD_SEGMENTS as usize
    {
        return Err(RequestError::BadSegments);
    }
    let mut raw = vec![0u8; payload.len];
    payload.read_into(&mut raw);
    Ok(raw
        .chunks_exact(DISCARD_SEGMENT_SIZE)
        .map(|chunk| {
            let mut segment = [0u8; DISCARD_SEGMENT_SIZE];
            segment.copy_from_slice(chunk);
            DiscardSegment::from_bytes(&segment)
        })
        .collect())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;

    /// In-memory storage that counts flushes and can be told to fail.
    #[derive(Debug)]
    pub(crate) struct MemStorage {
        pub data: Mutex<Vec<u8>>,
        pub flushes: AtomicUsize,
        pub fail_io: AtomicBool,
        pub discards: Mutex<Vec<(u64, u64, Option<bool>)>>,
        /// What the last memory table said about pinning.
        pub pinnable: Mutex<Option<bool>>,
    }

    impl MemStorage {
        pub(crate) fn new(sectors: u64) -> Self {
            let data = (0..sectors * SECTOR_SIZE)
                .map(|i| (i % 251) as u8)
                .collect();
            MemStorage {
                data: Mutex::new(data),
                flushes: AtomicUsize::new(0),
                fail_io: AtomicBool::new(false),
                discards: Mutex::new(Vec::new()),
                pinnable: Mutex::new(None),
            }
        }

        fn check(&self) -> io::Result<()> {
            if self.fail_io.load(Ordering::Relaxed) {
                Err(io::Error::other("injected failure"))
            } else {
                Ok(())
            }
        }
    }

    impl BlockStorage for MemStorage {
        fn capacity(&self) -> u64 {
            self.data.lock().unwrap().len() as u64
        }
        fn logical_block_size(&self) -> u32 {
            512
        }
        fn physical_block_size(&self) -> u32 {
            4096
        }
        fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            self.check()?;
            let data = self.data.lock().unwrap();
            let mut pos = offset as usize;
            for buf in bufs {
                buf.copy_from(&data[pos..pos + buf.len()]);
                pos += buf.len();
            }
            Ok(())
        }
        fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
            self.check()?;
            let mut data = self.data.lock().unwrap();
            let mut pos = offset as usize;
            for buf in bufs {
                buf.copy_to(&mut data[pos..pos + buf.len()]);
                pos += buf.len();
            }
            Ok(())
        }
        fn flush(&self) -> io::Result<()> {
            self.check()?;
            self.flushes.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        fn supports_discard(&self) -> bool {
            true
        }
        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.check()?;
            self.discards.lock().unwrap().push((offset, len, None));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
            self.check()?;
            let range = offset as usize..(offset + len) as usize;
            self.data.lock().unwrap()[range].fill(0);
            self.discards
                .lock()
                .unwrap()
                .push((offset, len, Some(unmap)));
            Ok(())
        }
        fn set_guest_memory_pinnable(&self, pinnable: bool) {
            *self.pinnable.lock().unwrap() = Some(pinnable);
        }
    }

    pub(crate) const MEM_SIZE: usize = 0x10_0000;
    pub(crate) const HEADER_ADDR: u64 = 0x1_0000;
    pub(crate) const DATA_ADDR: u64 = 0x2_0000;
    pub(crate) const STATUS_ADDR: u64 = 0x8_0000;
    const STATUS_UNTOUCHED: u8 = 0xee;
    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    pub(crate) fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    pub(crate) fn write_header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        let mut raw = [0u8; OUTHDR_SIZE];
        raw[..4].copy_from_slice(&request_type.to_le_bytes());
        raw[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&raw, GuestAddress(addr)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    struct Harness {
        mem: GuestMemoryMmap,
        storage: Arc<MemStorage>,
        device: BlockDevice,
        counters: QueueCounters,
    }

    impl Harness {
        fn new() -> Self {
            Self::with(false)
        }

        fn with(read_only: bool) -> Self {
            let mem = guest_memory();
            mem.write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS_ADDR))
                .unwrap();
            let storage = Arc::new(MemStorage::new(64));
            let device = BlockDevice::new(storage.clone(), read_only, b"test-serial");
            Harness {
                mem,
                storage,
                device,
                counters: QueueCounters::default(),
            }
        }

        /// Runs one chain laid out from `descs` (NEXT flags are filled in).
        fn run(&self, descs: &[RawDescriptor]) -> u32 {
            let queue = MockSplitQueue::new(&self.mem, 256);
            let chain = queue.build_desc_chain(descs).unwrap();
            self.device.process_chain(chain, &self.counters)
        }

        /// Runs one chain whose descriptors are stored exactly as given.
        fn run_raw(&self, descs: &[RawDescriptor]) -> u32 {
            let queue = MockSplitQueue::new(&self.mem, 256);
            let chain = queue.build_multiple_desc_chains(descs).unwrap();
            self.device.process_chain(chain, &self.counters)
        }

        fn status(&self) -> u8 {
            self.mem.read_obj(GuestAddress(STATUS_ADDR)).unwrap()
        }

        fn disk(&self, offset: usize, len: usize) -> Vec<u8> {
            self.storage.data.lock().unwrap()[offset..offset + len].to_vec()
        }

        fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut out = vec![0u8; len];
            self.mem.read_slice(&mut out, GuestAddress(addr)).unwrap();
            out
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_copies_sectors_into_guest() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 3);
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 1024, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
        assert_eq!(len, 1025);
        assert_eq!(h.guest(DATA_ADDR, 1024), h.disk(3 * 512, 1024));
    }

    #[test]
    fn write_copies_guest_into_storage() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 5);
        h.mem
            .write_slice(&[0xab; 512], GuestAddress(DATA_ADDR))
            .unwrap();
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
        assert_eq!(len, 1);
        assert_eq!(h.disk(5 * 512, 512), vec![0xab; 512]);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn multi_segment_read_and_write_keep_order() {
        let h = Harness::new();
        // Write three segments of different sizes, each filled with its own byte.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        let segments = [
            (DATA_ADDR, 512u32, 1u8),
            (0x4_0000, 1024, 2),
            (0x3_0000, 512, 3),
        ];
        let mut descs = vec![desc(HEADER_ADDR, 16, R)];
        for &(addr, len, fill) in &segments {
            h.mem
                .write_slice(&vec![fill; len as usize], GuestAddress(addr))
                .unwrap();
            descs.push(desc(addr, len, R));
        }
        descs.push(desc(STATUS_ADDR, 1, W));
        h.run(&descs);
        assert_eq!(h.status(), OK);
        let mut expected = vec![1u8; 512];
        expected.extend([2u8; 1024]);
        expected.extend([3u8; 512]);
        assert_eq!(h.disk(0, 2048), expected);

        // Read them back into three different writable segments.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        let targets = [(0x5_0000u64, 1536u32), (0x6_0000, 512)];
        let mut descs = vec![desc(HEADER_ADDR, 16, R)];
        descs.extend(targets.iter().map(|&(addr, len)| desc(addr, len, W)));
        descs.push(desc(STATUS_ADDR, 1, W));
        assert_eq!(h.run(&descs), 2049);
        assert_eq!(h.status(), OK);
        let mut read_back = h.guest(0x5_0000, 1536);
        read_back.extend(h.guest(0x6_0000, 512));
        assert_eq!(read_back, expected);
    }

    #[test]
    fn requests_bytes_and_errors_are_counted() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 1024, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        let read = [
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, W),
            desc(STATUS_ADDR, 1, W),
        ];
        h.run(&read);
        assert_eq!(h.status(), OK);
        // A failed transfer moves no bytes; a chain with no status byte is an error too.
        h.storage.fail_io.store(true, Ordering::Relaxed);
        h.run(&read);
        assert_eq!(h.status(), IOERR);
        assert_eq!(h.run(&[desc(HEADER_ADDR, 16, R)]), 0);
        assert_eq!(
            h.counters.counts(),
            crate::stats::QueueCounts {
                requests: 4,
                bytes_read: 512,
                bytes_written: 1024,
                errors: 2,
            }
        );
    }

    #[test]
    fn any_layout_header_data_and_status_share_descriptors() {
        let h = Harness::new();
        // Header split over two descriptors; data and status in one writable descriptor.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 1);
        let len = h.run(&[
            desc(HEADER_ADDR, 10, R),
            desc(HEADER_ADDR + 10, 6, R),
            desc(DATA_ADDR, 513, W),
        ]);
        assert_eq!(len, 513);
        assert_eq!(h.guest(DATA_ADDR, 512), h.disk(512, 512));
        assert_eq!(h.guest(DATA_ADDR + 512, 1), vec![OK]);
    }

    #[test]
    fn flush_reaches_storage() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 16, R), desc(STATUS_ADDR, 1, W)]),
            1
        );
        assert_eq!(h.status(), OK);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn writethrough_flushes_every_write() {
        let h = Harness::new();
        h.device.set_writethrough(true);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn get_id_returns_zero_padded_serial() {
        let h = Harness::new();
        h.mem
            .write_slice(&[0xff; 32], GuestAddress(DATA_ADDR))
            .unwrap();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_GET_ID, 0);
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 32, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
        assert_eq!(len, 21);
        let mut expected = b"test-serial".to_vec();
        expected.resize(SERIAL_LEN, 0);
        expected.extend([0xff; 12]);
        assert_eq!(h.guest(DATA_ADDR, 32), expected);
    }

    #[test]
    fn get_id_into_short_buffer_writes_what_fits() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_GET_ID, 0);
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 4, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
        assert_eq!(len, 5);
        assert_eq!(h.guest(DATA_ADDR, 4), b"test".to_vec());
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, 0x7777, 0);
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 16, R), desc(STATUS_ADDR, 1, W)]),
            1
        );
        assert_eq!(h.status(), UNSUPP);
    }

    #[test]
    fn out_of_range_sectors_fail() {
        let h = Harness::new();
        // 64 sectors: reading the last sector works, one past it does not.
        for (sector, expected) in [(63, OK), (64, IOERR), (u64::MAX / 512 + 1, IOERR)] {
            write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, sector);
            h.run(&[
                desc(HEADER_ADDR, 16, R),
                desc(DATA_ADDR, 512, W),
                desc(STATUS_ADDR, 1, W),
            ]);
            assert_eq!(h.status(), expected, "sector {sector}");
        }
        // A range that starts inside but ends outside.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 63);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 1024, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        // Overflow of sector * 512 + len.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, u64::MAX / 512);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 1024, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
    }

    #[test]
    fn write_to_read_only_device_fails_and_leaves_data() {
        let h = Harness::with(true);
        let before = h.disk(0, 512);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        assert_eq!(h.disk(0, 512), before);

        // Reads still work.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), OK);
    }

    #[test]
    fn partial_sector_payload_fails() {
        let h = Harness::new();
        for (request_type, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, R)] {
            write_header(&h.mem, HEADER_ADDR, request_type, 0);
            h.run(&[
                desc(HEADER_ADDR, 16, R),
                desc(DATA_ADDR, 100, flags),
                desc(STATUS_ADDR, 1, W),
            ]);
            assert_eq!(h.status(), IOERR);
        }
    }

    #[test]
    fn storage_error_is_ioerr() {
        let h = Harness::new();
        h.storage.fail_io.store(true, Ordering::Relaxed);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        assert_eq!(len, 1);
    }

    #[test]
    fn missing_status_descriptor_writes_nothing() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(h.run(&[desc(HEADER_ADDR, 16, R)]), 0);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn read_only_status_descriptor_writes_nothing() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 16, R), desc(STATUS_ADDR, 1, R)]),
            0
        );
        assert_eq!(h.status(), STATUS_UNTOUCHED);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn empty_status_descriptor_writes_nothing() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 16, R), desc(STATUS_ADDR, 0, W)]),
            0
        );
        assert_eq!(h.status(), STATUS_UNTOUCHED);
    }

    #[test]
    fn status_outside_guest_memory_writes_nothing() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        let end = MEM_SIZE as u64;
        assert_eq!(h.run(&[desc(HEADER_ADDR, 16, R), desc(end, 1, W)]), 0);
        // A status length that runs the address past u64::MAX.
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 16, R), desc(u64::MAX - 4, 0x10, W)]),
            0
        );
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn short_header_fails() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(
            h.run(&[desc(HEADER_ADDR, 8, R), desc(STATUS_ADDR, 1, W)]),
            1
        );
        assert_eq!(h.status(), IOERR);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn data_outside_guest_memory_fails_without_io() {
        let h = Harness::new();
        h.storage.fail_io.store(true, Ordering::Relaxed);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        // Starts inside guest memory and runs off its end.
        let near_end = MEM_SIZE as u64 - 512;
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(near_end, 1024, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        // Entirely outside.
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(0x4000_0000, 512, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        // A header outside guest memory.
        h.run(&[desc(u64::MAX - 8, 16, R), desc(STATUS_ADDR, 1, W)]);
        assert_eq!(h.status(), IOERR);
    }

    #[test]
    fn huge_lengths_do_not_touch_memory() {
        let h = Harness::new();
        h.storage.fail_io.store(true, Ordering::Relaxed);
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        // One descriptor close to 4 GiB: outside guest memory, so IOERR.
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 0xffff_fe00, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        // A chain totalling more than 4 GiB is cut short by the iterator: no status.
        h.mem
            .write_obj(STATUS_UNTOUCHED, GuestAddress(STATUS_ADDR))
            .unwrap();
        let len = h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 0xffff_0000, W),
            desc(DATA_ADDR, 0x0002_0000, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(len, 0);
        assert_eq!(h.status(), STATUS_UNTOUCHED);
    }

    #[test]
    fn descriptor_loop_is_cut_short() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        let next = VRING_DESC_F_NEXT as u16;
        // 0 -> 1 -> 2 -> 1 -> ...
        let len = h.run_raw(&[
            RawDescriptor::from(Descriptor::new(HEADER_ADDR, 16, next, 1)),
            RawDescriptor::from(Descriptor::new(DATA_ADDR, 512, next | W, 2)),
            RawDescriptor::from(Descriptor::new(STATUS_ADDR, 1, next | W, 1)),
        ]);
        assert_eq!(len, 0);
        assert_eq!(h.status(), STATUS_UNTOUCHED);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn next_index_beyond_queue_is_cut_short() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        let len = h.run_raw(&[
            RawDescriptor::from(Descriptor::new(
                HEADER_ADDR,
                16,
                VRING_DESC_F_NEXT as u16,
                999,
            )),
            RawDescriptor::from(Descriptor::new(STATUS_ADDR, 1, W, 0)),
        ]);
        assert_eq!(len, 0);
        assert_eq!(h.status(), STATUS_UNTOUCHED);
    }

    #[test]
    fn readable_after_writable_fails() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(0x3_0000, 512, W),
            desc(DATA_ADDR, 512, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
    }

    #[test]
    fn payload_in_wrong_direction_fails() {
        let h = Harness::new();
        // OUT whose data is device-writable: nothing to write and a stray writable buffer.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_OUT, 0);
        let before = h.disk(0, 512);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, W),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        assert_eq!(h.disk(0, 512), before);
        // IN whose data is device-readable.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 512, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        // A header the driver marked device-writable is not a header.
        h.run(&[desc(HEADER_ADDR, 16, W), desc(STATUS_ADDR, 1, W)]);
        assert_eq!(h.status(), IOERR);
    }

    #[test]
    fn indirect_table_is_followed() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_IN, 2);
        let table = 0x9_0000u64;
        let next = VRING_DESC_F_NEXT as u16;
        let entries = [
            Descriptor::new(HEADER_ADDR, 16, next, 1),
            Descriptor::new(DATA_ADDR, 512, next | W, 2),
            Descriptor::new(STATUS_ADDR, 1, W, 0),
        ];
        for (i, entry) in entries.iter().enumerate() {
            h.mem
                .write_obj(
                    RawDescriptor::from(*entry),
                    GuestAddress(table + 16 * i as u64),
                )
                .unwrap();
        }
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let len = h.run_raw(&[RawDescriptor::from(Descriptor::new(table, 48, indirect, 0))]);
        assert_eq!(len, 513);
        assert_eq!(h.status(), OK);
        assert_eq!(h.guest(DATA_ADDR, 512), h.disk(1024, 512));
    }

    #[test]
    fn bad_indirect_tables_are_cut_short() {
        let h = Harness::new();
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_FLUSH, 0);
        let indirect = virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        // Table length not a multiple of 16, and a table outside guest memory.
        for (addr, len) in [(0x9_0000u64, 40u32), (0x4000_0000, 48)] {
            let used = h.run_raw(&[RawDescriptor::from(Descriptor::new(addr, len, indirect, 0))]);
            assert_eq!(used, 0);
        }
        // An indirect table that points to another indirect table.
        let table = 0x9_0000u64;
        h.mem
            .write_obj(
                RawDescriptor::from(Descriptor::new(0xa_0000, 16, indirect, 0)),
                GuestAddress(table),
            )
            .unwrap();
        let used = h.run_raw(&[RawDescriptor::from(Descriptor::new(table, 16, indirect, 0))]);
        assert_eq!(used, 0);
        assert_eq!(h.status(), STATUS_UNTOUCHED);
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 0);
    }

    fn write_segments(mem: &GuestMemoryMmap, addr: u64, segments: &[(u64, u32, u32)]) {
        for (i, &(sector, num_sectors, flags)) in segments.iter().enumerate() {
            let mut raw = [0u8; DISCARD_SEGMENT_SIZE];
            raw[..8].copy_from_slice(&sector.to_le_bytes());
            raw[8..12].copy_from_slice(&num_sectors.to_le_bytes());
            raw[12..].copy_from_slice(&flags.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(addr + 16 * i as u64))
                .unwrap();
        }
    }

    fn run_discard(h: &Harness, request_type: u32, segments: &[(u64, u32, u32)]) -> u8 {
        write_header(&h.mem, HEADER_ADDR, request_type, 0);
        write_segments(&h.mem, DATA_ADDR, segments);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 16 * segments.len() as u32, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        h.status()
    }

    #[test]
    fn discard_segments_reach_storage() {
        let h = Harness::new();
        let status = run_discard(&h, VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (16, 8, 0)]);
        assert_eq!(status, OK);
        assert_eq!(
            *h.storage.discards.lock().unwrap(),
            vec![(0, 4096, None), (8192, 4096, None)]
        );
    }

    #[test]
    fn write_zeroes_zeroes_and_honours_unmap() {
        let h = Harness::new();
        h.device.set_writethrough(true);
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let status = run_discard(&h, VIRTIO_BLK_T_WRITE_ZEROES, &[(1, 2, unmap), (10, 1, 0)]);
        assert_eq!(status, OK);
        assert_eq!(h.disk(512, 1024), vec![0; 1024]);
        assert_eq!(h.disk(10 * 512, 512), vec![0; 512]);
        assert_ne!(h.disk(0, 512), vec![0; 512]);
        assert_eq!(
            *h.storage.discards.lock().unwrap(),
            vec![(512, 1024, Some(true)), (5120, 512, Some(false))]
        );
        assert_eq!(h.storage.flushes.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn bad_discard_requests_fail() {
        let h = Harness::new();
        // Unmap flag on a discard, reserved flags on write-zeroes.
        assert_eq!(run_discard(&h, VIRTIO_BLK_T_DISCARD, &[(0, 1, 1)]), UNSUPP);
        assert_eq!(
            run_discard(&h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 2)]),
            UNSUPP
        );
        // Beyond the end, and a sector count that overflows a byte count.
        assert_eq!(run_discard(&h, VIRTIO_BLK_T_DISCARD, &[(60, 8, 0)]), IOERR);
        assert_eq!(
            run_discard(&h, VIRTIO_BLK_T_DISCARD, &[(0, u32::MAX, 0)]),
            IOERR
        );
        // Too many segments.
        let many = vec![(0, 1, 0); MAX_DISCARD_SEGMENTS as usize + 1];
        assert_eq!(run_discard(&h, VIRTIO_BLK_T_DISCARD, &many), IOERR);
        // A payload that is not whole segments.
        write_header(&h.mem, HEADER_ADDR, VIRTIO_BLK_T_DISCARD, 0);
        h.run(&[
            desc(HEADER_ADDR, 16, R),
            desc(DATA_ADDR, 20, R),
            desc(STATUS_ADDR, 1, W),
        ]);
        assert_eq!(h.status(), IOERR);
        assert!(h.storage.discards.lock().unwrap().is_empty());
        // Read-only devices refuse both.
        let h = Harness::with(true);
        assert_eq!(run_discard(&h, VIRTIO_BLK_T_DISCARD, &[(0, 1, 0)]), IOERR);
        assert_eq!(
            run_discard(&h, VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0)]),
            IOERR
        );
        assert!(h.storage.discards.lock().unwrap().is_empty());
    }

    #[test]
    fn serial_is_truncated_to_twenty_bytes() {
        let storage = Arc::new(MemStorage::new(1));
        let device = BlockDevice::new(storage, false, &[b'x'; 30]);
        assert_eq!(device.serial, [b'x'; SERIAL_LEN]);
    }
}
