//! The real hypervisor: hvisor-tool's `/dev/hvisor` kernel module.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_val};

use crate::abi::MMAP_SIZE;
use crate::{BridgePage, Hsm, HsmError, RamFd};

/// ioctl numbers of hvisor-tool's `include/hvisor.h` (type 1).
mod nr {
    use std::os::raw::c_int;

    vmm_sys_util::ioctl_io_nr!(HVISOR_INIT_VIRTIO, 1, 0);
    vmm_sys_util::ioctl_io_nr!(HVISOR_FINISH_REQ, 1, 2);
    vmm_sys_util::ioctl_iow_nr!(HVISOR_SET_EVENTFD, 1, 7, c_int);
}

/// `/dev/hvisor`: INIT_VIRTIO, SET_EVENTFD, the bridge page at offset 0, FINISH_REQ, and zone
/// RAM mapped at its physical address.
#[derive(Debug)]
pub struct DevHvisor {
    bridge: BridgePage,
    wakeup: EventFd,
    device: OwnedFd,
}

impl DevHvisor {
    /// Opens the device and sets up virtio: allocates a fresh bridge page in the kernel,
    /// registers the wakeup eventfd and maps the page.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, HsmError> {
        let path = path.as_ref();
        let device: OwnedFd = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| HsmError::Open {
                path: path.to_owned(),
                source,
            })?
            .into();

        // SAFETY: INIT_VIRTIO takes no argument and touches no user memory.
        let ret = unsafe { ioctl(&device, nr::HVISOR_INIT_VIRTIO()) };
        if ret < 0 {
            return Err(HsmError::Ioctl {
                name: "HVISOR_INIT_VIRTIO",
                source: io::Error::last_os_error(),
            });
        }
        if ret > 0 {
            return Err(HsmError::InitVirtio(ret));
        }

        let wakeup = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)
            .map_err(|e| HsmError::io("eventfd creation", e))?;
        let eventfd_arg = libc::c_ulong::try_from(wakeup.as_raw_fd())
            .map_err(|_| HsmError::io("eventfd creation", io::ErrorKind::InvalidData.into()))?;
        // SAFETY: SET_EVENTFD takes the eventfd number by value; no user memory is involved.
        let ret = unsafe { ioctl_with_val(&device, nr::HVISOR_SET_EVENTFD(), eventfd_arg) };
        if ret < 0 {
            return Err(HsmError::Ioctl {
                name: "HVISOR_SET_EVENTFD",
                source: io::Error::last_os_error(),
            });
        }

        let bridge = BridgePage::map(device.as_fd(), 0)?;
        Ok(DevHvisor {
            bridge,
            wakeup,
            device,
        })
    }
}

impl Hsm for DevHvisor {
    fn bridge(&self) -> &BridgePage {
        &self.bridge
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the eventfd is owned by `self` and stays open for the borrow's lifetime.
        unsafe { BorrowedFd::borrow_raw(self.wakeup.as_raw_fd()) }
    }

    fn ack_wakeup(&self) {
        // Non-blocking: EAGAIN just means the counter was already clear.
        let _ = self.wakeup.read();
    }

    fn finish_req(&self) -> Result<(), HsmError> {
        loop {
            // SAFETY: FINISH_REQ takes no argument and touches no user memory.
            let ret = unsafe { ioctl(&self.device, nr::HVISOR_FINISH_REQ()) };
            if ret >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(HsmError::Ioctl {
                    name: "HVISOR_FINISH_REQ",
                    source: err,
                });
            }
        }
    }

    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError> {
        // Offset 0 is the bridge page, and the module maps whole pages by physical address.
        let page = MMAP_SIZE as u64;
        if zone0_ipa == 0
            || zone0_ipa & (page - 1) != 0
            || size == 0
            || zone0_ipa.checked_add(size).is_none()
        {
            return Err(HsmError::NoRamRegion { zone0_ipa, size });
        }
        let fd = self
            .device
            .try_clone()
            .map_err(|e| HsmError::io("dup of the hvisor device", e))?;
        Ok(RamFd {
            fd: Arc::new(fd),
            offset: zone0_ipa,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_hvisor_tool() {
        assert_eq!(nr::HVISOR_INIT_VIRTIO(), 0x100);
        assert_eq!(nr::HVISOR_FINISH_REQ(), 0x102);
        assert_eq!(nr::HVISOR_SET_EVENTFD(), 0x4004_0107);
    }

    #[test]
    fn missing_device_is_a_clear_error() {
        let err = DevHvisor::open("/nonexistent/hvisor-vhost/dev/hvisor").unwrap_err();
        assert!(
            matches!(&err, HsmError::Open { source, .. } if source.kind() == io::ErrorKind::NotFound)
        );
        assert_eq!(
            err.to_string(),
            "cannot open /nonexistent/hvisor-vhost/dev/hvisor"
        );
    }

    #[test]
    fn non_device_file_fails_init_virtio() {
        // A regular file opens but rejects the ioctl (ENOTTY), before anything is mapped.
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let err = DevHvisor::open(file.as_path()).unwrap_err();
        assert!(matches!(
            err,
            HsmError::Ioctl {
                name: "HVISOR_INIT_VIRTIO",
                ..
            }
        ));
    }
}
