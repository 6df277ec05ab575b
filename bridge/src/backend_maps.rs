//! Refuses a backend that maps guest memory outside the regions it was given.
//!
//! SET_MEM_TABLE hands each zone RAM region to the backend as an fd and an `mmap_offset`
//! into it. On hvisor the fd is `/dev/hvisor`: offset 0 maps the bridge page followed by
//! whatever physical memory comes after it (root Linux's own RAM), and any other offset is a
//! physical address. A backend that maps the fd from offset 0 with `size + mmap_offset`
//! bytes and uses the tail (libvhost-user before QEMU 9.0, DPDK and SPDK do) therefore
//! reads and writes root Linux's memory as if it were the guest's.
//!
//! Once the backend has applied a memory table, the bridge reads `/proc/PID/maps` of the
//! process at the other end of the socket and looks at every mapping of a memory file (same
//! device and inode as a region's fd): its file offsets must lie inside zone RAM that the
//! bridge hands out. Every zone counts, because one backend process may serve devices of
//! several zones, all mapped from the same `/dev/hvisor`.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Mutex;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// A file guest memory is mapped from, and the ranges of it that are zone RAM.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MemoryFile {
    /// Major and minor number of the device holding the file, as `/proc/PID/maps` shows them.
    device: (u32, u32),
    inode: u64,
    /// Sorted, disjoint and not adjacent.
    ranges: Vec<Range<u64>>,
}

impl MemoryFile {
    fn add(&mut self, range: Range<u64>) {
        self.ranges.push(range);
        self.ranges.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(self.ranges.len());
        for range in self.ranges.drain(..) {
            match merged.last_mut() {
                Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
                _ => merged.push(range),
            }
        }
        self.ranges = merged;
    }

    fn covers(&self, range: &Range<u64>) -> bool {
        self.ranges
            .iter()
            .any(|r| r.start <= range.start && range.end <= r.end)
    }
}

/// The files zone RAM is mapped from, with the ranges of each that are zone RAM.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct MemoryFiles {
    files: Vec<MemoryFile>,
}

impl MemoryFiles {
    /// An empty set.
    const fn new() -> Self {
        MemoryFiles { files: Vec::new() }
    }

    /// Adds the file ranges behind every region of `memory`. Regions without a file cannot
    /// be given to a backend and are skipped.
    fn add_memory(&mut self, memory: &GuestMemoryMmap) -> io::Result<()> {
        for region in memory.iter() {
            let Some(file_offset) = region.file_offset() else {
                continue;
            };
            let start = file_offset.start();
            self.add(file_offset.file(), start..start + region.len())?;
        }
        Ok(())
    }

    /// Adds `range` of `file`.
    fn add(&mut self, file: &File, range: Range<u64>) -> io::Result<()> {
        let metadata = file.metadata()?;
        let device = (libc::major(metadata.dev()), libc::minor(metadata.dev()));
        let inode = metadata.ino();
        match self
            .files
            .iter_mut()
            .find(|f| f.device == device && f.inode == inode)
        {
            Some(known) => known.add(range),
            None => self.files.push(MemoryFile {
                device,
                inode,
                ranges: vec![range],
            }),
        }
        Ok(())
    }

    fn file(&self, device: (u32, u32), inode: u64) -> Option<&MemoryFile> {
        self.files
            .iter()
            .find(|f| f.device == device && f.inode == inode)
    }
}

/// Zone RAM of every zone the bridge serves: each device registers its zone's memory when
/// it is created, which is before any guest can activate a device.
static ZONE_MEMORY: Mutex<MemoryFiles> = Mutex::new(MemoryFiles::new());

/// Records `memory` as zone RAM that backends may map.
pub fn register_zone_memory(memory: &GuestMemoryMmap) -> io::Result<()> {
    ZONE_MEMORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .add_memory(memory)
}

/// A mapping of guest memory that covers more than zone RAM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "backend process {pid} maps file offsets {start:#x}..{end:#x} of the guest memory fd, \
     outside zone RAM: it does not map regions at their mmap_offset (libvhost-user before \
     QEMU 9.0, DPDK and SPDK map from offset 0), and on hvisor that range is the bridge page \
     and root Linux's own memory"
)]
pub struct StrayMapping {
    /// The backend's pid.
    pub pid: u32,
    /// First file offset of the mapping.
    pub start: u64,
    /// File offset after its end.
    pub end: u64,
}

/// What a check found, when it found nothing wrong.
#[derive(Debug)]
pub enum Checked {
    /// The backend maps `mappings` pieces of guest memory, all inside zone RAM.
    Clean {
        /// The backend's pid.
        pid: u32,
        /// How many mappings of memory files it has.
        mappings: usize,
    },
    /// The check could not be made.
    Skipped(io::Error),
}

/// Checks the mappings of the process at the other end of `socket` against zone RAM. Call it
/// once the backend has applied SET_MEM_TABLE.
pub fn check_backend(socket: BorrowedFd<'_>) -> Result<Checked, StrayMapping> {
    let pid = match peer_pid(socket) {
        Ok(pid) => pid,
        Err(error) => return Ok(Checked::Skipped(error)),
    };
    let maps = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
        Ok(maps) => maps,
        Err(error) => return Ok(Checked::Skipped(error)),
    };
    let zone_memory = ZONE_MEMORY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mappings = check_maps(pid, &maps, &zone_memory)?;
    Ok(Checked::Clean { pid, mappings })
}

/// The pid of the process that created the other end of `socket` (for a backend, the
/// process that listens on its socket).
fn peer_pid(socket: BorrowedFd<'_>) -> io::Result<u32> {
    let credentials = crate::peer::credentials(socket)?;
    // A peer in a pid namespace this process cannot see reads as pid 0.
    u32::try_from(credentials.pid)
        .ok()
        .filter(|&pid| pid != 0)
        .ok_or_else(|| io::Error::other("the backend's pid is not visible from here"))
}

/// Counts the mappings of memory files in `maps` (the text of `/proc/PID/maps`), failing on
/// the first one that covers more than zone RAM.
fn check_maps(pid: u32, maps: &str, zone_memory: &MemoryFiles) -> Result<usize, StrayMapping> {
    let mut mappings = 0;
    for mapping in maps.lines().filter_map(parse_line) {
        let Some(file) = zone_memory.file(mapping.device, mapping.inode) else {
            continue;
        };
        mappings += 1;
        if !file.covers(&mapping.offsets) {
            return Err(StrayMapping {
                pid,
                start: mapping.offsets.start,
                end: mapping.offsets.end,
            });
        }
    }
    Ok(mappings)
}

/// One line of `/proc/PID/maps`, as far as the check needs it.
#[derive(Debug, PartialEq, Eq)]
struct Mapping {
    device: (u32, u32),
    inode: u64,
    /// The file offsets the mapping covers.
    offsets: Range<u64>,
}

/// Parses `START-END PERMS OFFSET MAJOR:MINOR INODE [PATH]` (numbers in hex but the inode);
/// None for a line without a file or that does not parse.
fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.split_ascii_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let _perms = fields.next()?;
    let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode: u64 = fields.next()?.parse().ok()?;
    if inode == 0 {
        return None;
    }
    let len = u64::from_str_radix(end, 16)
        .ok()?
        .checked_sub(u64::from_str_radix(start, 16).ok()?)?;
    Some(Mapping {
        device: (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        ),
        inode,
        offsets: offset..offset.checked_add(len)?,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::net::UnixStream;
    use std::ptr::NonNull;

    use super::*;

    fn memfd(len: u64) -> File {
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor.
        let fd = unsafe { libc::memfd_create(c"backend-maps-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    /// A shared mapping of `len` bytes of `file` from `offset`, unmapped on drop.
    struct Map(NonNull<libc::c_void>, usize);

    impl Map {
        fn new(file: &File, offset: u64, len: usize) -> Map {
            // SAFETY: a fresh shared mapping of a file this test owns; nothing else is
            // touched.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            Map(NonNull::new(ptr).unwrap(), len)
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made.
            unsafe { libc::munmap(self.0.as_ptr(), self.1) };
        }
    }

    fn maps_line(start: u64, len: u64, offset: u64, device: &str, inode: u64) -> String {
        format!(
            "{start:x}-{:x} rw-s {offset:08x} {device} {inode}    /memfd:ram (deleted)",
            start + len
        )
    }

    fn zone_memory(ranges: &[Range<u64>]) -> MemoryFiles {
        MemoryFiles {
            files: vec![MemoryFile {
                device: (0, 1),
                inode: 42,
                ranges: ranges.to_vec(),
            }],
        }
    }

    #[test]
    fn maps_lines_parse() {
        let line = "7f00aa000000-7f00aa200000 rw-s 50000000 00:05 1234   /dev/hvisor";
        assert_eq!(
            parse_line(line),
            Some(Mapping {
                device: (0, 5),
                inode: 1234,
                offsets: 0x5000_0000..0x5020_0000,
            })
        );
        let big_major = "1000-2000 r--p 00001000 103:0a 77 /usr/lib/x";
        assert_eq!(parse_line(big_major).unwrap().device, (0x103, 0xa));
        // Anonymous memory and garbage are not mappings of a file.
        assert_eq!(parse_line("1000-2000 rw-p 00000000 00:00 0 [heap]"), None);
        assert_eq!(parse_line("1000-2000 rw-p"), None);
        assert_eq!(parse_line("2000-1000 rw-p 00000000 00:05 3"), None);
    }

    #[test]
    fn mappings_inside_zone_ram_pass_and_others_are_refused() {
        let memory = zone_memory(&[0x5000_0000..0x5100_0000, 0x6000_0000..0x6100_0000]);
        let good = [
            maps_line(0x7f00_0000_0000, 0x100_0000, 0x5000_0000, "00:01", 42),
            maps_line(0x7f10_0000_0000, 0x1000, 0x6000_f000, "00:01", 42),
            // Another file, and the same inode on another device: not guest memory.
            maps_line(0x7f20_0000_0000, 0x1000, 0, "00:01", 43),
            maps_line(0x7f30_0000_0000, 0x1000, 0, "00:02", 42),
        ]
        .join("\n");
        assert_eq!(check_maps(7, &good, &memory), Ok(2));

        // Mapped from offset 0 with size + mmap_offset bytes.
        let legacy = maps_line(0x7f00_0000_0000, 0x5100_0000, 0, "00:01", 42);
        assert_eq!(
            check_maps(7, &format!("{good}\n{legacy}"), &memory),
            Err(StrayMapping {
                pid: 7,
                start: 0,
                end: 0x5100_0000
            })
        );
        // Across the gap between two regions.
        let across = maps_line(0x7f00_0000_0000, 0x1100_0000, 0x5000_0000, "00:01", 42);
        assert!(check_maps(7, &across, &memory).is_err());
        // One byte past a region's end.
        let past = maps_line(0x7f00_0000_0000, 0x1000, 0x5100_0000, "00:01", 42);
        assert!(check_maps(7, &past, &memory).is_err());
    }

    #[test]
    fn adjacent_regions_of_one_file_merge() {
        let file = memfd(0x4000);
        let mut memory = MemoryFiles::new();
        memory.add(&file, 0x2000..0x3000).unwrap();
        memory.add(&file, 0x1000..0x2000).unwrap();
        memory.add(&memfd(0x1000), 0..0x1000).unwrap();
        assert_eq!(memory.files.len(), 2);
        assert_eq!(memory.files[0].ranges, vec![0x1000..0x3000]);
        assert!(memory.files[0].covers(&(0x1800..0x2800)));
        assert!(!memory.files[0].covers(&(0x0..0x1800)));
    }

    #[test]
    fn this_process_maps_are_read_and_matched_by_device_and_inode() {
        // Zone RAM is 2 pages at offset 0x1000 of a 3-page memfd.
        let file = memfd(0x3000);
        let mut memory = MemoryFiles::new();
        memory.add(&file, 0x1000..0x3000).unwrap();
        let pid = std::process::id();
        let maps = || std::fs::read_to_string("/proc/self/maps").unwrap();

        let at_offset = Map::new(&file, 0x1000, 0x2000);
        assert_eq!(check_maps(pid, &maps(), &memory), Ok(1));
        let from_zero = Map::new(&file, 0, 0x3000);
        assert_eq!(
            check_maps(pid, &maps(), &memory),
            Err(StrayMapping {
                pid,
                start: 0,
                end: 0x3000
            })
        );
        drop(from_zero);
        drop(at_offset);
        assert_eq!(check_maps(pid, &maps(), &memory), Ok(0));
    }

    #[test]
    fn the_peer_is_the_process_at_the_other_end() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        // SAFETY: the descriptor belongs to `ours`, which outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(ours.as_raw_fd()) };
        assert_eq!(peer_pid(fd).unwrap(), std::process::id());
    }
}
