//! Whether the kernel can pin guest memory, which O_DIRECT needs.
//!
//! O_DIRECT (and io_uring on an O_DIRECT file) hands guest buffers to get_user_pages, which
//! refuses memory without struct pages. hvisor's `/dev/hvisor` maps zone RAM with
//! `remap_pfn_range`, a `VM_IO | VM_PFNMAP` mapping of raw physical memory: every O_DIRECT
//! transfer on it fails with EFAULT. Such memory is recognised by the file it was mapped from.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Whether get_user_pages can pin every region of `mem`. Anonymous memory and memory mapped
/// from a regular file (a memfd, tmpfs, hugetlbfs, a file on disk) or a block device lives in
/// pages the kernel can pin. A character device such as `/dev/hvisor`, or any other kind of
/// file (an anonymous inode such as a dma-buf), may map raw physical memory: it is taken as
/// unpinnable, which costs a copy at worst.
pub fn guest_memory_pinnable(mem: &GuestMemoryMmap) -> bool {
    mem.iter()
        .all(|region| region.file_offset().is_none_or(|f| file_pinnable(f.file())))
}

/// Whether memory mapped from `file` can be pinned; false when `file` cannot be examined.
pub fn file_pinnable(file: &File) -> bool {
    file.metadata().is_ok_and(|metadata| {
        let kind = metadata.file_type();
        kind.is_file() || kind.is_block_device()
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;

    use vm_memory::{FileOffset, GuestAddress};

    use super::*;

    fn memfd(len: u64) -> File {
        let name = c"pinning-test";
        // SAFETY: memfd_create takes a NUL-terminated name and returns a new descriptor.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn read_write(path: &str) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn character_devices_cannot_be_pinned_and_memfds_can() {
        assert!(!file_pinnable(&File::open("/dev/null").unwrap()));
        assert!(file_pinnable(&memfd(4096)));
        let dir = File::open(std::env::temp_dir()).unwrap();
        assert!(!file_pinnable(&dir));
    }

    #[test]
    fn one_unpinnable_region_makes_the_memory_unpinnable() {
        let anonymous = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert!(guest_memory_pinnable(&anonymous));
        let from_memfd = (
            GuestAddress(0),
            0x1000,
            Some(FileOffset::new(memfd(0x2000), 0x1000)),
        );
        let memory = GuestMemoryMmap::<()>::from_ranges_with_files([from_memfd]).unwrap();
        assert!(guest_memory_pinnable(&memory));
        // /dev/zero is a character device that can be mapped, like /dev/hvisor.
        let from_device = (
            GuestAddress(0x10_0000),
            0x1000,
            Some(FileOffset::new(read_write("/dev/zero"), 0)),
        );
        let from_memfd = (
            GuestAddress(0),
            0x1000,
            Some(FileOffset::new(memfd(0x1000), 0)),
        );
        let mixed =
            GuestMemoryMmap::<()>::from_ranges_with_files([from_memfd, from_device]).unwrap();
        assert!(!guest_memory_pinnable(&mixed));
    }
}
