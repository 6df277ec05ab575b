//! [`BlockStorage`] on a raw image file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use log::{info, warn};
use vm_memory::VolatileSlice;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr};

use crate::blk::{BlockStorage, SECTOR_SIZE};
use crate::uring::{self, Direction};

// <linux/fs.h>; BLKGETSIZE64 is declared with a size_t argument but always writes a u64.
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, libc::size_t);
ioctl_io_nr!(BLKDISCARD, 0x12, 119);
ioctl_io_nr!(BLKZEROOUT, 0x12, 127);

/// The ioctls this backend makes, for its seccomp filter: block device geometry, discard and
/// write-zeroes.
// The constants are c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
pub fn seccomp_ioctls() -> Vec<u64> {
    vec![
        BLKGETSIZE64() as u64,
        BLKDISCARD() as u64,
        BLKZEROOUT() as u64,
        libc::BLKSSZGET as u64,
        libc::BLKPBSZGET as u64,
    ]
}

/// Linux's UIO_MAXIOV: the most iovecs one preadv/pwritev accepts.
const IOV_MAX: usize = 1024;
/// Largest bounce buffer used for O_DIRECT transfers from unaligned guest buffers.
const BOUNCE_CHUNK: usize = 1 << 20;
/// Alignment of bounce buffers: satisfies every logical block size up to a page.
const BOUNCE_ALIGN: usize = 4096;

/// How reads and writes of guest data reach the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// `preadv` and `pwritev`.
    #[default]
    Sync,
    /// READV and WRITEV on a per-thread io_uring.
    #[value(name = "io_uring")]
    IoUring,
}

/// How to open the backing image.
#[derive(Clone, Copy, Debug, Default)]
pub struct StorageOptions {
    pub read_only: bool,
    /// Bypass the host page cache (O_DIRECT).
    pub direct: bool,
    /// Take an advisory lock so a second backend cannot open the same image.
    pub lock: bool,
    pub engine: IoEngine,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("Cannot open {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Image {} is in use by another process", path.display())]
    Locked { path: PathBuf },
    #[error("Cannot lock {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read the image geometry")]
    Probe(#[source] io::Error),
    #[error("Image is neither a regular file nor a block device")]
    UnsupportedKind,
    #[error("io_uring is unavailable")]
    IoUring(#[source] io::Error),
}

/// A raw image: a regular file or a block device, read and written with pread/pwrite.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    block_device: bool,
    capacity: AtomicU64,
    logical_block_size: u32,
    physical_block_size: u32,
    direct: bool,
    /// Whether O_DIRECT may take guest buffers as they are. Memory without struct pages (a
    /// `VM_PFNMAP` mapping, such as zone RAM mapped from hvisor's `/dev/hvisor`) cannot be
    /// pinned by get_user_pages, so O_DIRECT on it fails with EFAULT: such memory always
    /// goes through the bounce buffer.
    guest_memory_pinnable: AtomicBool,
    engine: IoEngine,
}

impl FileStorage {
    pub fn open(path: &Path, options: &StorageOptions) -> Result<Self, OpenError> {
        let mut open_options = OpenOptions::new();
        open_options.read(true).write(!options.read_only);
        if options.direct {
            open_options.custom_flags(libc::O_DIRECT);
        }
        let file = open_options.open(path).map_err(|source| OpenError::Open {
            path: path.to_owned(),
            source,
        })?;
        if options.lock {
            lock(&file, options.read_only, path)?;
        }
        Self::from_file(file, options.direct)?.with_engine(options.engine)
    }

    /// Moves guest data with `engine`; fails if io_uring is asked for and unavailable.
    pub fn with_engine(mut self, engine: IoEngine) -> Result<Self, OpenError> {
        if engine == IoEngine::IoUring {
            uring::probe().map_err(OpenError::IoUring)?;
        }
        self.engine = engine;
        Ok(self)
    }

    /// Runs one `preadv` or `pwritev`, or its io_uring equivalent.
    ///
    /// # Safety
    ///
    /// Every iovec in `iov` must cover memory that is valid for the transfer's direction
    /// until the call returns.
    unsafe fn transfer(
        &self,
        direction: Direction,
        iov: &[libc::iovec],
        offset: u64,
    ) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        if self.engine == IoEngine::IoUring {
            // SAFETY: the caller upholds this function's contract, which is the engine's.
            return unsafe { uring::transfer(fd, direction, iov, offset) };
        }
        let at = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ret = match direction {
            // SAFETY: the caller guarantees the iovecs; the count is the length of `iov`.
            Direction::Read => unsafe { libc::preadv(fd, iov.as_ptr(), iov_count(iov), at) },
            // SAFETY: as for preadv; pwritev only reads through the iovecs.
            Direction::Write => unsafe { libc::pwritev(fd, iov.as_ptr(), iov_count(iov), at) },
        };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// Wraps an already open image. `direct` says whether it was opened with O_DIRECT.
    pub fn from_file(file: File, direct: bool) -> Result<Self, OpenError> {
        let metadata = file.metadata().map_err(OpenError::Probe)?;
        let file_type = metadata.file_type();
        let block_device = file_type.is_block_device();
        if !block_device && !file_type.is_file() {
            return Err(OpenError::UnsupportedKind);
        }
        let (logical_block_size, physical_block_size) = if block_device {
            let logical = block_device_u32(&file, libc::BLKSSZGET).map_err(OpenError::Probe)?;
            let physical = block_device_u32(&file, libc::BLKPBSZGET).map_err(OpenError::Probe)?;
            (logical, physical.max(logical))
        } else {
            let preferred = u32::try_from(metadata.blksize()).unwrap_or(0);
            let physical = if preferred.is_power_of_two() {
                preferred.clamp(512, 65536)
            } else {
                512
            };
            (512, physical)
        };
        if !logical_block_size.is_power_of_two() || logical_block_size < 512 {
            return Err(OpenError::Probe(io::Error::other(format!(
                "logical block size {logical_block_size}"
            ))));
        }
        let storage = FileStorage {
            file,
            block_device,
            capacity: AtomicU64::new(0),
            logical_block_size,
            physical_block_size,
            direct,
            guest_memory_pinnable: AtomicBool::new(true),
            engine: IoEngine::Sync,
        };
        storage.refresh_capacity().map_err(OpenError::Probe)?;
        Ok(storage)
    }

    /// Re-reads the image size, e.g. after the image was grown; returns the new capacity.
    pub fn refresh_capacity(&self) -> io::Result<u64> {
        let bytes = if self.block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which refers to `size`.
            let ret = unsafe { ioctl_with_mut_ref(&self.file, BLKGETSIZE64(), &mut size) };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            size
        } else {
            self.file.metadata()?.len()
        };
        if bytes % SECTOR_SIZE != 0 {
            warn!("Image size {bytes} is not a multiple of {SECTOR_SIZE}; the tail is not visible");
        }
        let capacity = bytes - bytes % SECTOR_SIZE;
        self.capacity.store(capacity, Ordering::Release);
        Ok(capacity)
    }

    /// O_DIRECT needs memory aligned to the logical block size that the kernel can pin;
    /// other buffers go through a bounce buffer.
    fn needs_bounce(&self, bufs: &[VolatileSlice<'_>]) -> bool {
        if !self.direct {
            return false;
        }
        if !self.guest_memory_pinnable.load(Ordering::Relaxed) {
            return true;
        }
        // The logical block size is a power of two (checked when opening).
        let mask = self.logical_block_size as usize - 1;
        bufs.iter()
            .any(|buf| (buf.ptr_guard().as_ptr() as usize | buf.len()) & mask != 0)
    }

    /// The safety net behind the memory table's up-front check: EFAULT from an O_DIRECT
    /// transfer on guest memory that passed the checks means get_user_pages refused it, so
    /// the memory cannot be pinned. The request is redone by `bounce` (a retried read or
    /// write moves the same bytes to the same place), and every later one bounces too.
    fn bounce_on_efault(
        &self,
        result: io::Result<()>,
        bounce: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        match result {
            Err(error) if self.direct && error.raw_os_error() == Some(libc::EFAULT) => {
                // Only the first EFAULT after a memory table is logged: the flag stays off
                // until the next memory table.
                if self.guest_memory_pinnable.swap(false, Ordering::Relaxed) {
                    warn!(
                        "O_DIRECT refused guest memory (EFAULT): it cannot be pinned; \
                         guest data goes through a bounce buffer from now on"
                    );
                }
                bounce()
            }
            other => other,
        }
    }

    fn bounce_read(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(VolatileSlice::len).sum();
        let mut bounce = AlignedBuffer::new(total.min(BOUNCE_CHUNK))?;
        let mut cursor = SliceCursor::new(bufs);
        let mut done = 0;
        while done < total {
            let chunk = &mut bounce.as_mut_slice()[..(total - done).min(BOUNCE_CHUNK)];
            self.file.read_exact_at(chunk, offset + done as u64)?;
            cursor.copy_in(chunk);
            done += chunk.len();
        }
        Ok(())
    }

    fn bounce_write(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let total: usize = bufs.iter().map(VolatileSlice::len).sum();
        let mut bounce = AlignedBuffer::new(total.min(BOUNCE_CHUNK))?;
        let mut cursor = SliceCursor::new(bufs);
        let mut done = 0;
        while done < total {
            let chunk = &mut bounce.as_mut_slice()[..(total - done).min(BOUNCE_CHUNK)];
            cursor.copy_out(chunk);
            self.file.write_all_at(chunk, offset + done as u64)?;
            done += chunk.len();
        }
        Ok(())
    }

    /// Reads into the guest buffers themselves.
    fn read_in_place(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard_mut).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(guard, buf)| libc::iovec {
                iov_base: guard.as_ptr().cast(),
                iov_len: buf.len(),
            })
            .collect();
        transfer_vectored(
            &mut iovecs,
            offset,
            io::ErrorKind::UnexpectedEof,
            |iov, at| {
                // SAFETY: every iovec covers a guest-memory slice that `bufs` keeps mapped and
                // `guards` keeps writable until this function returns.
                unsafe { self.transfer(Direction::Read, iov, at) }
            },
        )
    }

    /// Writes from the guest buffers themselves.
    fn write_in_place(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        let guards: Vec<_> = bufs.iter().map(VolatileSlice::ptr_guard).collect();
        let mut iovecs: Vec<libc::iovec> = guards
            .iter()
            .zip(bufs)
            .map(|(guard, buf)| libc::iovec {
                iov_base: guard.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            })
            .collect();
        transfer_vectored(&mut iovecs, offset, io::ErrorKind::WriteZero, |iov, at| {
            // SAFETY: as for reads; a write only reads through the iovecs.
            unsafe { self.transfer(Direction::Write, iov, at) }
        })
    }

    /// Writes zero bytes over the range, for filesystems without FALLOC_FL_ZERO_RANGE.
    fn write_zero_bytes(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk_len = usize::try_from(len).unwrap_or(usize::MAX).min(BOUNCE_CHUNK);
        let zeroes = AlignedBuffer::new(chunk_len)?;
        let mut done = 0;
        while done < len {
            let count = (len - done).min(chunk_len as u64) as usize;
            self.file
                .write_all_at(&zeroes.as_slice()[..count], offset + done)?;
            done += count as u64;
        }
        Ok(())
    }

    fn block_device_range_ioctl(
        &self,
        request: libc::c_ulong,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read a `u64[2]` range through the pointer, which
        // refers to `range`.
        let ret = unsafe { ioctl_with_ref(&self.file, request, &range) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl BlockStorage for FileStorage {
    fn capacity(&self) -> u64 {
        self.capacity.load(Ordering::Acquire)
    }

    fn logical_block_size(&self) -> u32 {
        self.logical_block_size
    }

    fn physical_block_size(&self) -> u32 {
        self.physical_block_size
    }

    fn read_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.needs_bounce(bufs) {
            return self.bounce_read(offset, bufs);
        }
        let result = self.read_in_place(offset, bufs);
        self.bounce_on_efault(result, || self.bounce_read(offset, bufs))
    }

    fn write_vectored_at(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> io::Result<()> {
        if self.needs_bounce(bufs) {
            return self.bounce_write(offset, bufs);
        }
        let result = self.write_in_place(offset, bufs);
        self.bounce_on_efault(result, || self.bounce_write(offset, bufs))
    }

    fn set_guest_memory_pinnable(&self, pinnable: bool) {
        if self.direct && !pinnable {
            info!("Guest memory cannot be pinned: O_DIRECT transfers go through a bounce buffer");
        }
        self.guest_memory_pinnable
            .store(pinnable, Ordering::Relaxed);
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn supports_discard(&self) -> bool {
        true
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let result = if self.block_device {
            self.block_device_range_ioctl(BLKDISCARD(), offset, len)
        } else {
            fallocate(&self.file, FallocateMode::PunchHole, true, offset, len)
                .map_err(io::Error::from)
        };
        match result {
            // Discard is a hint: storage that cannot deallocate simply keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            other => other,
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if self.block_device {
            return self.block_device_range_ioctl(BLKZEROOUT(), offset, len);
        }
        let mode = if unmap {
            FallocateMode::PunchHole
        } else {
            FallocateMode::ZeroRange
        };
        match fallocate(&self.file, mode, true, offset, len).map_err(io::Error::from) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                self.write_zero_bytes(offset, len)
            }
            other => other,
        }
    }
}

fn lock(file: &File, shared: bool, path: &Path) -> Result<(), OpenError> {
    let operation = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock only takes a descriptor, which `file` keeps open.
    let ret = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if ret == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(OpenError::Locked {
            path: path.to_owned(),
        })
    } else {
        Err(OpenError::Lock {
            path: path.to_owned(),
            source: error,
        })
    }
}

fn block_device_u32(file: &File, request: libc::Ioctl) -> io::Result<u32> {
    let mut value: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int through the pointer, which refers to
    // `value`.
    let ret = unsafe { ioctl_with_mut_ref(file, request as libc::c_ulong, &mut value) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    u32::try_from(value).map_err(|_| io::Error::other(format!("block size {value}")))
}

fn iov_count(iov: &[libc::iovec]) -> libc::c_int {
    // Callers pass at most IOV_MAX entries.
    libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX)
}

/// Runs `syscall` (preadv or pwritev) until every iovec is transferred, IOV_MAX at a time,
/// retrying on EINTR and resuming after short transfers.
fn transfer_vectored(
    iovecs: &mut [libc::iovec],
    mut offset: u64,
    no_progress: io::ErrorKind,
    mut syscall: impl FnMut(&[libc::iovec], u64) -> io::Result<usize>,
) -> io::Result<()> {
    let mut first = 0;
    while first < iovecs.len() {
        if iovecs[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let end = iovecs.len().min(first + IOV_MAX);
        let mut done = match syscall(&iovecs[first..end], offset) {
            Ok(done) => done,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if done == 0 {
            return Err(io::Error::from(no_progress));
        }
        offset += done as u64;
        while done > 0 {
            let iov = &mut iovecs[first];
            if done >= iov.iov_len {
                done -= iov.iov_len;
                first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
                iov.iov_len -= done;
                done = 0;
            }
        }
    }
    Ok(())
}

/// A heap buffer whose start is aligned for O_DIRECT.
struct AlignedBuffer {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuffer {
    fn new(len: usize) -> io::Result<Self> {
        let raw = vec![0u8; len + BOUNCE_ALIGN];
        let start = raw.as_ptr().align_offset(BOUNCE_ALIGN);
        if start >= BOUNCE_ALIGN {
            return Err(io::Error::other("cannot align the bounce buffer"));
        }
        Ok(AlignedBuffer { raw, start, len })
    }

    fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// A position in a list of guest slices, for copying through a bounce buffer.
struct SliceCursor<'a, 'b> {
    slices: &'b [VolatileSlice<'a>],
    index: usize,
    offset: usize,
}

impl<'a, 'b> SliceCursor<'a, 'b> {
    fn new(slices: &'b [VolatileSlice<'a>]) -> Self {
        SliceCursor {
            slices,
            index: 0,
            offset: 0,
        }
    }

    /// Calls `copy(slice_remainder, done)` until `len` bytes are consumed; `copy` returns
    /// how many bytes it moved.
    fn advance(&mut self, len: usize, mut copy: impl FnMut(&VolatileSlice<'a>, usize) -> usize) {
        let mut done = 0;
        while done < len && self.index < self.slices.len() {
            let Ok(rest) = self.slices[self.index].offset(self.offset) else {
                break;
            };
            let moved = copy(&rest, done);
            done += moved;
            self.offset += moved;
            if self.offset == self.slices[self.index].len() {
                self.index += 1;
                self.offset = 0;
            }
            if moved == 0 && !rest.is_empty() {
                break;
            }
        }
    }

    fn copy_in(&mut self, data: &[u8]) {
        self.advance(data.len(), |slice, done| {
            let count = slice.len().min(data.len() - done);
            slice.copy_from(&data[done..done + count]);
            count
        });
    }

    fn copy_out(&mut self, out: &mut [u8]) {
        let len = out.len();
        self.advance(len, |slice, done| slice.copy_to(&mut out[done..]));
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    const ENGINES: [IoEngine; 2] = [IoEngine::Sync, IoEngine::IoUring];

    fn image(len: usize) -> (TempFile, FileStorage) {
        image_with(len, IoEngine::Sync)
    }

    fn image_with(len: usize, engine: IoEngine) -> (TempFile, FileStorage) {
        let temp = TempFile::new().unwrap();
        let mut file = temp.as_file().try_clone().unwrap();
        let pattern: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
        file.write_all(&pattern).unwrap();
        let storage = FileStorage::from_file(temp.as_file().try_clone().unwrap(), false)
            .unwrap()
            .with_engine(engine)
            .unwrap();
        (temp, storage)
    }

    /// A 64 KiB image opened O_DIRECT with `engine`.
    fn direct_image(engine: IoEngine) -> (TempFile, FileStorage) {
        let temp = TempFile::new().unwrap();
        temp.as_file().set_len(1 << 16).unwrap();
        let options = StorageOptions {
            direct: true,
            engine,
            ..Default::default()
        };
        let storage = FileStorage::open(temp.as_path(), &options).unwrap();
        (temp, storage)
    }

    fn slices<'a>(mem: &'a GuestMemoryMmap, ranges: &[(u64, usize)]) -> Vec<VolatileSlice<'a>> {
        ranges
            .iter()
            .map(|&(addr, len)| mem.get_slice(GuestAddress(addr), len).unwrap())
            .collect()
    }

    #[test]
    fn capacity_rounds_down_to_sectors() {
        let (_temp, storage) = image(4096 + 100);
        assert_eq!(storage.capacity(), 4096);
        assert_eq!(storage.logical_block_size(), 512);
    }

    #[test]
    fn vectored_round_trip() {
        for engine in ENGINES {
            vectored_round_trip_with(engine);
        }
    }

    fn vectored_round_trip_with(engine: IoEngine) {
        let (temp, storage) = image_with(8192, engine);
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[7u8; 1000], GuestAddress(0x100)).unwrap();
        mem.write_slice(&[9u8; 24], GuestAddress(0x3000)).unwrap();
        let out = slices(&mem, &[(0x100, 1000), (0x3000, 24)]);
        storage.write_vectored_at(512, &out).unwrap();

        let mut on_disk = vec![0u8; 1024];
        temp.as_file().read_exact_at(&mut on_disk, 512).unwrap();
        assert_eq!(&on_disk[..1000], &[7u8; 1000][..]);
        assert_eq!(&on_disk[1000..], &[9u8; 24][..]);

        let back = slices(&mem, &[(0x5000, 24), (0x6000, 1000)]);
        storage.read_vectored_at(512, &back).unwrap();
        let mut first = [0u8; 24];
        mem.read_slice(&mut first, GuestAddress(0x5000)).unwrap();
        assert_eq!(first, on_disk[..24]);
        let mut second = vec![0u8; 1000];
        mem.read_slice(&mut second, GuestAddress(0x6000)).unwrap();
        assert_eq!(second, on_disk[24..]);
    }

    #[test]
    fn read_past_end_of_file_fails() {
        for engine in ENGINES {
            let (_temp, storage) = image_with(1024, engine);
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let bufs = slices(&mem, &[(0, 1024)]);
            let error = storage.read_vectored_at(512, &bufs).unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof, "{engine:?}");
        }
    }

    #[test]
    fn more_iovecs_than_iov_max() {
        for engine in ENGINES {
            let (temp, storage) = image_with(IOV_MAX * 2 * 8, engine);
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            let ranges: Vec<(u64, usize)> = (0..IOV_MAX * 2).map(|i| (i as u64 * 8, 8)).collect();
            let bufs = slices(&mem, &ranges);
            storage.read_vectored_at(0, &bufs).unwrap();
            let mut expected = vec![0u8; IOV_MAX * 16];
            temp.as_file().read_exact_at(&mut expected, 0).unwrap();
            let mut got = vec![0u8; IOV_MAX * 16];
            mem.read_slice(&mut got, GuestAddress(0)).unwrap();
            assert_eq!(got, expected, "{engine:?}");
        }
    }

    #[test]
    fn io_uring_errors_are_the_transfers_own() {
        // A write to a file opened read-only fails with EBADF from the kernel, through the
        // ring as through pwritev, and the ring stays usable for the next transfer.
        let (temp, _) = image(4096);
        let read_only = File::open(temp.as_path()).unwrap();
        let storage = FileStorage::from_file(read_only, false)
            .unwrap()
            .with_engine(IoEngine::IoUring)
            .unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let bufs = slices(&mem, &[(0, 512)]);
        let error = storage.write_vectored_at(0, &bufs).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));
        storage.read_vectored_at(0, &bufs).unwrap();
        let mut got = vec![0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        let expected: Vec<u8> = (0..512).map(|i| (i % 253) as u8).collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn bounce_path_matches_direct_path() {
        // Exercise the bounce buffer without O_DIRECT by forcing it on.
        let (temp, mut storage) = image(1 << 22);
        storage.direct = true;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x50_0000)]).unwrap();
        let len = (1 << 20) + 1536;
        let pattern: Vec<u8> = (0..len).map(|i| (i % 7) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(0x101)).unwrap();
        // Two misaligned slices, the first larger than one bounce chunk.
        let bufs = slices(
            &mem,
            &[(0x101, (1 << 20) + 1000), (0x101 + (1 << 20) + 1000, 536)],
        );
        assert!(storage.needs_bounce(&bufs));
        storage.write_vectored_at(4096, &bufs).unwrap();
        let mut on_disk = vec![0u8; len];
        temp.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
        assert_eq!(on_disk, pattern);

        let back = slices(&mem, &[(0x20_0003, 1000), (0x30_0000, len - 1000)]);
        storage.read_vectored_at(4096, &back).unwrap();
        let mut got = vec![0u8; 1000];
        mem.read_slice(&mut got, GuestAddress(0x20_0003)).unwrap();
        let mut rest = vec![0u8; len - 1000];
        mem.read_slice(&mut rest, GuestAddress(0x30_0000)).unwrap();
        got.extend(rest);
        assert_eq!(got, pattern);
    }

    fn anonymous_slices(mem: &GuestMemoryMmap) -> Vec<VolatileSlice<'_>> {
        slices(mem, &[(0x1000, 4096)])
    }

    #[test]
    fn unpinnable_guest_memory_always_bounces() {
        let (_temp, mut storage) = image(1 << 16);
        storage.direct = true;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let aligned = anonymous_slices(&mem);
        assert!(!storage.needs_bounce(&aligned));
        storage.set_guest_memory_pinnable(false);
        assert!(storage.needs_bounce(&aligned));
        // The next memory table decides again.
        storage.set_guest_memory_pinnable(true);
        assert!(!storage.needs_bounce(&aligned));
    }

    #[test]
    fn efault_from_direct_io_retries_through_the_bounce_buffer() {
        let (_temp, mut storage) = image(1 << 16);
        storage.direct = true;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let aligned = anonymous_slices(&mem);
        let efault = || Err(io::Error::from_raw_os_error(libc::EFAULT));

        // Another error is the request's own.
        let mut bounced = false;
        let eio = storage.bounce_on_efault(Err(io::Error::from_raw_os_error(libc::EIO)), || {
            bounced = true;
            Ok(())
        });
        assert_eq!(eio.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(!bounced && !storage.needs_bounce(&aligned));

        // EFAULT: the request is retried through the bounce buffer, and so are later ones.
        let result = storage.bounce_on_efault(efault(), || {
            bounced = true;
            Ok(())
        });
        result.unwrap();
        assert!(bounced);
        assert!(storage.needs_bounce(&aligned));
        // The retry's own result is the request's.
        let retry = storage.bounce_on_efault(efault(), efault);
        assert_eq!(retry.unwrap_err().raw_os_error(), Some(libc::EFAULT));

        // Without O_DIRECT the kernel only copies: EFAULT is a real fault, not retried.
        storage.direct = false;
        storage.set_guest_memory_pinnable(true);
        let mut bounced = false;
        let result = storage.bounce_on_efault(efault(), || {
            bounced = true;
            Ok(())
        });
        assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EFAULT));
        assert!(!bounced);
    }

    /// The first page of this process's `[vvar]`: a read-only `VM_PFNMAP` mapping that every
    /// Linux process has, the only unpinnable memory a test can get without a device.
    fn vvar_page() -> VolatileSlice<'static> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let line = maps
            .lines()
            .find(|line| line.ends_with("[vvar]"))
            .expect("a [vvar] mapping");
        let start = usize::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
        // SAFETY: [vvar] stays mapped and readable for the life of the process, and the
        // slice is only read from.
        unsafe { VolatileSlice::new(start as *mut u8, 4096) }
    }

    #[test]
    fn direct_write_from_pfnmap_memory_falls_back_to_the_bounce_buffer() {
        let page = vvar_page();
        for engine in ENGINES {
            let (temp, storage) = direct_image(engine);
            // What the engine meets on its own: the kernel cannot pin the page.
            let iov = [libc::iovec {
                iov_base: page.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: page.len(),
            }];
            // SAFETY: the iovec covers the readable vvar page; a write only reads it.
            let raw = unsafe { storage.transfer(Direction::Write, &iov, 0) };
            assert_eq!(
                raw.unwrap_err().raw_os_error(),
                Some(libc::EFAULT),
                "{engine:?}"
            );

            storage.write_vectored_at(4096, &[page]).unwrap();
            // The page holds the clock data, which moves: only check that it arrived.
            let mut on_disk = vec![0u8; 4096];
            temp.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
            assert!(on_disk.iter().any(|&b| b != 0), "{engine:?}");
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            assert!(storage.needs_bounce(&anonymous_slices(&mem)), "{engine:?}");
        }
    }

    #[test]
    fn write_zeroes_and_discard_on_a_file() {
        let (temp, storage) = image(1 << 16);
        storage.write_zeroes(4096, 8192, false).unwrap();
        storage.write_zeroes(20480, 4096, true).unwrap();
        storage.discard(32768, 4096).unwrap();
        let mut data = vec![0u8; 1 << 16];
        temp.as_file().read_exact_at(&mut data, 0).unwrap();
        assert!(data[4096..12288].iter().all(|&b| b == 0));
        assert!(data[20480..24576].iter().all(|&b| b == 0));
        assert_ne!(data[12288..12300], [0u8; 12]);
        assert_eq!(temp.as_file().metadata().unwrap().len(), 1 << 16);
    }

    #[test]
    fn refresh_sees_a_grown_file() {
        let (temp, storage) = image(4096);
        temp.as_file().set_len(1 << 20).unwrap();
        assert_eq!(storage.capacity(), 4096);
        assert_eq!(storage.refresh_capacity().unwrap(), 1 << 20);
        assert_eq!(storage.capacity(), 1 << 20);
    }

    #[test]
    fn second_writer_is_refused() {
        let temp = TempFile::new().unwrap();
        temp.as_file().set_len(4096).unwrap();
        let options = StorageOptions {
            lock: true,
            ..Default::default()
        };
        let first = FileStorage::open(temp.as_path(), &options).unwrap();
        let second = FileStorage::open(temp.as_path(), &options).unwrap_err();
        assert!(matches!(second, OpenError::Locked { .. }), "{second:?}");
        assert!(second.to_string().contains("in use by another process"));
        let reader = StorageOptions {
            read_only: true,
            lock: true,
            ..Default::default()
        };
        assert!(matches!(
            FileStorage::open(temp.as_path(), &reader),
            Err(OpenError::Locked { .. })
        ));
        drop(first);
        let _a = FileStorage::open(temp.as_path(), &reader).unwrap();
        let _b = FileStorage::open(temp.as_path(), &reader).unwrap();
        assert!(matches!(
            FileStorage::open(temp.as_path(), &options),
            Err(OpenError::Locked { .. })
        ));
        let unlocked = StorageOptions::default();
        FileStorage::open(temp.as_path(), &unlocked).unwrap();
    }

    #[test]
    fn directories_are_refused() {
        let dir = File::open(std::env::temp_dir()).unwrap();
        assert!(matches!(
            FileStorage::from_file(dir, false),
            Err(OpenError::UnsupportedKind)
        ));
    }

    #[test]
    fn direct_io_on_a_real_file() {
        for engine in ENGINES {
            let (temp, storage) = direct_image(engine);
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
            mem.write_slice(&[5u8; 1024], GuestAddress(0x1001)).unwrap();
            let unaligned = slices(&mem, &[(0x1001, 1024)]);
            storage.write_vectored_at(512, &unaligned).unwrap();
            let aligned = slices(&mem, &[(0x4000, 1024)]);
            storage.read_vectored_at(512, &aligned).unwrap();
            let mut got = vec![0u8; 1024];
            mem.read_slice(&mut got, GuestAddress(0x4000)).unwrap();
            assert_eq!(got, vec![5u8; 1024], "{engine:?}");
            // Aligned guest buffers take the engine's own path, without the bounce buffer.
            storage.write_vectored_at(2048, &aligned).unwrap();
            let mut on_disk = vec![0u8; 1024];
            temp.as_file().read_exact_at(&mut on_disk, 2048).unwrap();
            assert_eq!(on_disk, vec![5u8; 1024], "{engine:?}");
        }
    }
}
