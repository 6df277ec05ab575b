//! The real hypervisor: hvisor-tool's `/dev/hvisor` kernel module.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_val};

use crate::abi::{HvisorAbi, MMAP_SIZE};
use crate::wakeup::{SignalWakeup, Wakeup, WakeupKind};
use crate::{BridgePage, Hsm, HsmError, RamFd};

/// ioctl numbers of hvisor-tool's `include/hvisor.h` (type 1).
mod nr {
    use std::os::raw::c_int;

    vmm_sys_util::ioctl_io_nr!(HVISOR_INIT_VIRTIO, 1, 0);
    vmm_sys_util::ioctl_io_nr!(HVISOR_FINISH_REQ, 1, 2);
    // The header declares the argument as `__u64 *`, so the size field is a pointer's.
    vmm_sys_util::ioctl_ior_nr!(HVISOR_CONFIG_CHECK, 1, 6, *mut u64);
    vmm_sys_util::ioctl_iow_nr!(HVISOR_SET_EVENTFD, 1, 7, c_int);
    // `_IOR(1, 5, zone_list_args_t *)`: the size field is a pointer's.
    vmm_sys_util::ioctl_ior_nr!(HVISOR_ZONE_LIST, 1, 5, *mut u64);
}

/// hvisor-tool's `zone_info_t` (`include/zone_config.h`), one per running zone. The kernel
/// fills every field; the bridge only reads `zone_id`, the rest is there for the layout.
#[repr(C)]
#[derive(Clone, Copy)]
#[allow(dead_code)]
struct ZoneInfo {
    zone_id: u32,
    cpus: u64,
    name: [u8; 32],
    is_err: u8,
}

/// hvisor-tool's `zone_list_args_t`: room for `cnt` entries at `zones`.
#[repr(C)]
struct ZoneListArgs {
    cnt: u64,
    zones: *mut ZoneInfo,
}

/// hvisor-tool's `CONFIG_MAX_ZONES`: the most zones hvisor-tool ever asks about.
const MAX_ZONES: usize = 32;

const _: () = assert!(std::mem::size_of::<ZoneInfo>() == 56);
const _: () = assert!(std::mem::size_of::<ZoneListArgs>() == 16);

/// The two ioctls that start virtio, as [`start_virtio`] sees them: the real device, or a
/// test's stand-in.
trait VirtioStart {
    /// `HVISOR_SET_EVENTFD` with `fd`.
    fn set_eventfd(&self, fd: RawFd) -> io::Result<()>;
    /// `HVISOR_INIT_VIRTIO`: the ioctl's non-negative return value.
    fn init_virtio(&self) -> io::Result<i32>;
}

impl VirtioStart for OwnedFd {
    fn set_eventfd(&self, fd: RawFd) -> io::Result<()> {
        let arg = libc::c_ulong::try_from(fd)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: SET_EVENTFD takes the eventfd number by value; no user memory is involved.
        let ret = unsafe { ioctl_with_val(self, nr::HVISOR_SET_EVENTFD(), arg) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn init_virtio(&self) -> io::Result<i32> {
        // SAFETY: INIT_VIRTIO takes no argument and touches no user memory.
        let ret = unsafe { ioctl(self, nr::HVISOR_INIT_VIRTIO()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret)
    }
}

/// Sets up the wakeup, then does INIT_VIRTIO, in the only order that works with both
/// generations of hvisor.ko:
///
/// 1. `HVISOR_SET_EVENTFD` first. A module that has it stores the eventfd whether or not
///    virtio is initialised yet, and wakes the daemon through it.
/// 2. A module without it answers EINVAL (its default case) or ENOTTY. Such a module wakes
///    the task that did INIT_VIRTIO with a thread-directed signal 10, whose default action
///    kills the process: so the signal is blocked in this thread, and a signalfd made for it,
///    before INIT_VIRTIO.
/// 3. `HVISOR_INIT_VIRTIO`, which also records this thread as the signal's target.
fn start_virtio(device: &impl VirtioStart) -> Result<Wakeup, HsmError> {
    let eventfd = Wakeup::eventfd().map_err(|e| HsmError::io("eventfd creation", e))?;
    let wakeup = match device.set_eventfd(eventfd.fd().as_raw_fd()) {
        Ok(()) => eventfd,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY)) => {
            log::debug!("HVISOR_SET_EVENTFD: {e}: an hvisor.ko that wakes with a signal");
            let signal =
                SignalWakeup::new().map_err(|e| HsmError::io("setting up the signal wakeup", e))?;
            Wakeup::Signal(signal)
        }
        Err(source) => {
            return Err(HsmError::Ioctl {
                name: "HVISOR_SET_EVENTFD",
                source,
            })
        }
    };
    match device.init_virtio() {
        Ok(0) => {}
        Ok(positive) => return Err(HsmError::InitVirtio(positive)),
        Err(source) => {
            return Err(HsmError::Ioctl {
                name: "HVISOR_INIT_VIRTIO",
                source,
            })
        }
    }
    Ok(wakeup)
}

/// hvisor's `CONFIG_MAGIC_VERSION` through `HVISOR_CONFIG_CHECK`, or `None` when the module
/// or hvisor cannot tell (the ioctl exists since 2025; on a failed hypercall the module still
/// copies out an uninitialised value, so that value is ignored).
fn config_version(device: &OwnedFd) -> Option<u64> {
    let mut magic: u64 = 0;
    // SAFETY: CONFIG_CHECK writes one u64 through the pointer, which points at `magic`.
    let ret = unsafe { ioctl_with_mut_ref(device, nr::HVISOR_CONFIG_CHECK(), &mut magic) };
    if ret != 0 {
        let err = io::Error::last_os_error();
        log::warn!("HVISOR_CONFIG_CHECK failed ({err}): hvisor's config version is unknown");
        return None;
    }
    Some(magic)
}

/// The bridge-page layout to use: the one stated, checked against what hvisor's config
/// version implies, or, when none was stated, the implied one (32/8/32 when nothing is
/// implied, with a warning).
fn resolve_abi(stated: Option<HvisorAbi>, magic: Option<u64>) -> Result<HvisorAbi, HsmError> {
    let implied = magic.and_then(HvisorAbi::implied_by_magic);
    match (stated, magic) {
        (Some(abi), Some(magic)) => {
            abi.check_magic(magic)?;
            Ok(abi)
        }
        (Some(abi), None) => Ok(abi),
        (None, _) => Ok(implied.unwrap_or_else(|| {
            log::warn!(
                "hvisor's config version ({}) does not tell its bridge-page layout; assuming \
                 {} (MAX_REQ/MAX_DEVS/MAX_CPUS). If hvisor was built with other values, state \
                 them, or every access will hang",
                magic.map_or("unknown".to_owned(), |m| format!("{m:#x}")),
                HvisorAbi::CURRENT
            );
            HvisorAbi::CURRENT
        })),
    }
}

/// `/dev/hvisor`: SET_EVENTFD (or the signal of older modules), INIT_VIRTIO, CONFIG_CHECK,
/// the bridge page at offset 0, FINISH_REQ, and zone RAM mapped at its physical address.
///
/// With a module that wakes the daemon by signal ([`DevHvisor::wakeup_kind`] is
/// [`WakeupKind::Signal`]), the signal goes to the thread that called [`DevHvisor::open`],
/// and only that thread sees [`Hsm::wakeup_fd`] readable: it must be the thread that polls it.
#[derive(Debug)]
pub struct DevHvisor {
    bridge: BridgePage,
    wakeup: Wakeup,
    device: OwnedFd,
    config_version: Option<u64>,
}

impl DevHvisor {
    /// [`DevHvisor::open_abi`] with no stated layout.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, HsmError> {
        DevHvisor::open_abi(path, None)
    }

    /// Opens the device and sets up virtio: registers the wakeup (see [`DevHvisor`] for the
    /// signal case), allocates a fresh bridge page in the kernel (INIT_VIRTIO), reads
    /// hvisor's config version and maps the page with the layout `abi` (or the one the
    /// version implies). A stated layout that the version contradicts is an error, after
    /// INIT_VIRTIO: zones then wait for a daemon instead of faulting hvisor.
    pub fn open_abi(path: impl AsRef<Path>, abi: Option<HvisorAbi>) -> Result<Self, HsmError> {
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

        let wakeup = start_virtio(&device)?;
        let config_version = config_version(&device);
        let abi = resolve_abi(abi, config_version)?;
        log::info!(
            "hvisor config version {}, bridge page {abi} (MAX_REQ/MAX_DEVS/MAX_CPUS), wakeup: {}",
            config_version.map_or("unknown".to_owned(), |m| format!("{m:#x}")),
            wakeup.kind()
        );
        let bridge = BridgePage::map_abi(device.as_fd(), 0, abi)?;
        Ok(DevHvisor {
            bridge,
            wakeup,
            device,
            config_version,
        })
    }

    /// How the module wakes the daemon.
    pub fn wakeup_kind(&self) -> WakeupKind {
        self.wakeup.kind()
    }

    /// hvisor's `CONFIG_MAGIC_VERSION`, when the module could read it.
    pub fn config_version(&self) -> Option<u64> {
        self.config_version
    }
}

impl Hsm for DevHvisor {
    fn live_zones(&self) -> Option<Vec<u32>> {
        let empty = ZoneInfo {
            zone_id: 0,
            cpus: 0,
            name: [0; 32],
            is_err: 0,
        };
        let mut zones = [empty; MAX_ZONES];
        let mut args = ZoneListArgs {
            cnt: MAX_ZONES as u64,
            zones: zones.as_mut_ptr(),
        };
        // SAFETY: the module reads `args` and writes at most `args.cnt` entries to
        // `args.zones`, which points at `zones`, alive and that long for the whole call.
        let ret = unsafe { ioctl_with_mut_ref(&self.device, nr::HVISOR_ZONE_LIST(), &mut args) };
        let count = usize::try_from(ret).ok()?.min(MAX_ZONES);
        Some(zones[..count].iter().map(|z| z.zone_id).collect())
    }

    fn bridge(&self) -> &BridgePage {
        &self.bridge
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        self.wakeup.fd()
    }

    fn ack_wakeup(&self) {
        self.wakeup.ack();
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
        assert_eq!(nr::HVISOR_CONFIG_CHECK(), 0x8008_0106);
        assert_eq!(nr::HVISOR_ZONE_LIST(), 0x8008_0105);
    }

    /// Records the order of the ioctls, and whether signal 10 was blocked in the calling
    /// thread when INIT_VIRTIO came.
    struct FakeModule {
        set_eventfd: Option<i32>,
        init_virtio: Result<i32, i32>,
        calls: std::cell::RefCell<Vec<&'static str>>,
        blocked_at_init: std::cell::Cell<bool>,
    }

    impl FakeModule {
        /// `set_eventfd`: None = supported, Some(errno) = fails with it.
        fn new(set_eventfd: Option<i32>, init_virtio: Result<i32, i32>) -> FakeModule {
            FakeModule {
                set_eventfd,
                init_virtio,
                calls: Default::default(),
                blocked_at_init: Default::default(),
            }
        }
    }

    impl VirtioStart for FakeModule {
        fn set_eventfd(&self, _fd: RawFd) -> io::Result<()> {
            self.calls.borrow_mut().push("SET_EVENTFD");
            match self.set_eventfd {
                None => Ok(()),
                Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            }
        }

        fn init_virtio(&self) -> io::Result<i32> {
            self.calls.borrow_mut().push("INIT_VIRTIO");
            self.blocked_at_init.set(sighvi_blocked());
            self.init_virtio.map_err(io::Error::from_raw_os_error)
        }
    }

    fn sighvi_blocked() -> bool {
        // SAFETY: sigset_t is plain data, filled by pthread_sigmask below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a null new set only queries the mask into `set`.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set) };
        assert_eq!(rc, 0);
        // SAFETY: `set` was initialised by pthread_sigmask.
        unsafe { libc::sigismember(&set, crate::wakeup::SIGHVI) == 1 }
    }

    /// Runs `f` on a fresh thread, so that the signal mask it changes dies with it.
    fn on_own_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::spawn(f).join().unwrap()
    }

    #[test]
    fn eventfd_module_gets_the_eventfd_before_init_virtio() {
        on_own_thread(|| {
            let module = FakeModule::new(None, Ok(0));
            let wakeup = start_virtio(&module).unwrap();
            assert_eq!(wakeup.kind(), WakeupKind::Eventfd);
            assert_eq!(*module.calls.borrow(), ["SET_EVENTFD", "INIT_VIRTIO"]);
            assert!(!module.blocked_at_init.get());
        });
    }

    #[test]
    fn older_module_falls_back_to_the_signal_blocked_before_init_virtio() {
        for errno in [libc::EINVAL, libc::ENOTTY] {
            on_own_thread(move || {
                let module = FakeModule::new(Some(errno), Ok(0));
                let wakeup = start_virtio(&module).unwrap();
                assert_eq!(wakeup.kind(), WakeupKind::Signal);
                assert_eq!(*module.calls.borrow(), ["SET_EVENTFD", "INIT_VIRTIO"]);
                assert!(
                    module.blocked_at_init.get(),
                    "signal 10 blocked before INIT_VIRTIO"
                );
                // The module's signal to this thread now wakes the fd instead of killing us.
                // SAFETY: getpid has no arguments and cannot fail.
                let pid = unsafe { libc::getpid() };
                crate::wakeup::send_sighvi(pid, crate::wakeup::gettid()).unwrap();
                let mut poll = libc::pollfd {
                    fd: wakeup.fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, zero timeout.
                assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 1);
                wakeup.ack();
                // SAFETY: as above.
                assert_eq!(unsafe { libc::poll(&mut poll, 1, 0) }, 0);
            });
        }
    }

    #[test]
    fn other_set_eventfd_errors_stop_before_init_virtio() {
        on_own_thread(|| {
            let module = FakeModule::new(Some(libc::EBADF), Ok(0));
            let err = start_virtio(&module).unwrap_err();
            assert!(matches!(
                err,
                HsmError::Ioctl {
                    name: "HVISOR_SET_EVENTFD",
                    ..
                }
            ));
            assert_eq!(*module.calls.borrow(), ["SET_EVENTFD"]);
        });
    }

    #[test]
    fn init_virtio_errors_are_reported() {
        on_own_thread(|| {
            let module = FakeModule::new(None, Ok(libc::ENOTTY));
            let err = start_virtio(&module).unwrap_err();
            assert!(matches!(err, HsmError::InitVirtio(libc::ENOTTY)));
            let module = FakeModule::new(None, Err(libc::EPERM));
            let err = start_virtio(&module).unwrap_err();
            assert!(matches!(
                err,
                HsmError::Ioctl {
                    name: "HVISOR_INIT_VIRTIO",
                    ..
                }
            ));
        });
    }

    #[test]
    fn layout_follows_the_config_version() {
        let old = HvisorAbi::new(32, 4, 4);
        assert_eq!(resolve_abi(None, Some(5)).unwrap(), HvisorAbi::CURRENT);
        assert_eq!(resolve_abi(None, None).unwrap(), HvisorAbi::CURRENT);
        assert_eq!(resolve_abi(None, Some(1)).unwrap(), HvisorAbi::CURRENT);
        assert_eq!(resolve_abi(Some(old), Some(1)).unwrap(), old);
        assert_eq!(resolve_abi(Some(old), None).unwrap(), old);
        assert_eq!(resolve_abi(Some(old), Some(0x99)).unwrap(), old);
        let err = resolve_abi(Some(old), Some(5)).unwrap_err();
        assert!(matches!(
            err,
            HsmError::Abi(crate::abi::AbiError::Mismatch { magic: 5, .. })
        ));
        assert!(err.to_string().contains("32/8/32"), "{err}");
        assert!(err.to_string().contains("32/4/4"), "{err}");
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
        // A regular file opens but rejects every ioctl with ENOTTY: SET_EVENTFD's looks like
        // an older module's, INIT_VIRTIO's is fatal, before anything is mapped.
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = file.as_path().to_owned();
        let err = on_own_thread(move || DevHvisor::open(path).unwrap_err());
        assert!(matches!(
            err,
            HsmError::Ioctl {
                name: "HVISOR_INIT_VIRTIO",
                ..
            }
        ));
    }
}
