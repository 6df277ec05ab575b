//! TAP devices (`/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) as [`NetPort`]s.
//!
//! Each queue of a multiqueue TAP is its own file descriptor; frames read from one carry a
//! virtio-net header, and frames written to one start with it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iow_nr};

use crate::net::NetPort;

const TUN_DEVICE: &str = "/dev/net/tun";
/// Interface names are at most 15 bytes plus the terminating NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

const TUNTAP: std::os::raw::c_uint = 0x54; // 'T'
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, std::os::raw::c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, std::os::raw::c_uint);
ioctl_ior_nr!(TUNGETIFF, TUNTAP, 210, std::os::raw::c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, std::os::raw::c_int);
ioctl_iow_nr!(TUNSETQUEUE, TUNTAP, 217, std::os::raw::c_int);
ioctl_iow_nr!(TUNSETVNETLE, TUNTAP, 220, std::os::raw::c_int);

/// The ioctls this backend makes, for its seccomp filter: the TAP's own, and its link's
/// index, MTU and flags.
// The constants are c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
pub fn seccomp_ioctls() -> Vec<u64> {
    let mut ioctls: Vec<u64> = [
        TUNSETIFF(),
        TUNSETOFFLOAD(),
        TUNGETIFF(),
        TUNSETVNETHDRSZ(),
        TUNSETQUEUE(),
        TUNSETVNETLE(),
    ]
    .into_iter()
    .map(|request| request as u64)
    .collect();
    ioctls.extend(
        [
            libc::SIOCGIFMTU,
            libc::SIOCSIFMTU,
            libc::SIOCGIFFLAGS,
            libc::SIOCSIFFLAGS,
            // if_nametoindex
            libc::SIOCGIFINDEX,
        ]
        .map(|request| request as u64),
    );
    ioctls
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("Invalid interface name {0:?}: 1 to {MAX_NAME_LEN} bytes, no '/', ':' or spaces")]
    InvalidName(String),
    #[error("Cannot open {TUN_DEVICE}")]
    OpenTun(#[source] io::Error),
    #[error("Cannot attach queue {queue} of {name}")]
    Attach {
        name: String,
        queue: usize,
        #[source]
        source: io::Error,
    },
    #[error("Cannot {action} {name}")]
    Interface {
        action: &'static str,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// Whether `name` can name a network interface.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An `ifreq` naming `name`, which [`valid_name`] accepted.
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: `ifreq` is plain C data (a name array and a union of integers and addresses),
    // for which all-zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    request
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One queue of a TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    multi_queue: bool,
    /// Whether this queue takes part in delivering frames (multiqueue only).
    enabled: AtomicBool,
}

/// The queues of a TAP interface, opened together.
#[derive(Debug)]
pub struct TapQueues {
    pub queues: Vec<Tap>,
    /// True if the interface did not exist and opening it created it.
    pub created: bool,
}

impl Tap {
    /// Opens `count` queues of the TAP interface `name`, creating it if it does not exist. The
    /// queues are non-blocking; more than one makes the interface multiqueue.
    pub fn open(name: &str, count: usize) -> Result<TapQueues, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let created = !interface_exists(name);
        let multi_queue = count > 1;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let queues = (0..count.max(1))
            .map(|queue| {
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(TUN_DEVICE)
                    .map_err(TapError::OpenTun)?;
                let mut request = ifreq(name);
                // The kernel's flags field is a short; every flag used here fits.
                request.ifr_ifru.ifru_flags = flags as libc::c_short;
                // SAFETY: TUNSETIFF reads (and updates) the ifreq we own, on our own fd.
                check(unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut request) }).map_err(
                    |source| TapError::Attach {
                        name: name.to_string(),
                        queue,
                        source,
                    },
                )?;
                Ok(Tap {
                    file,
                    name: name.to_string(),
                    multi_queue,
                    enabled: AtomicBool::new(true),
                })
            })
            .collect::<Result<Vec<_>, TapError>>()?;
        Ok(TapQueues { queues, created })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The flags the kernel reports for this queue (TUNGETIFF).
    pub fn flags(&self) -> io::Result<libc::c_short> {
        let mut request = ifreq(&self.name);
        // SAFETY: TUNGETIFF fills the ifreq we own.
        check(unsafe { ioctl_with_mut_ref(&self.file, TUNGETIFF(), &mut request) })?;
        // SAFETY: TUNGETIFF stores the flags in `ifru_flags`; reading a union field of
        // integer type is valid for any bytes.
        Ok(unsafe { request.ifr_ifru.ifru_flags })
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetPort for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the kernel writes at most `buf.len()` bytes into the buffer we own.
        let ret = unsafe { libc::read(self.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        // Non-negative and at most buf.len().
        Ok(ret as usize)
    }

    fn write_frame(&self, header: &[u8], payload: &[VolatileSlice<'_>]) -> io::Result<usize> {
        // The guards keep each slice's mapping valid until writev has returned.
        let guards: Vec<_> = payload.iter().map(|slice| slice.ptr_guard()).collect();
        let mut iovecs = Vec::with_capacity(payload.len() + 1);
        iovecs.push(libc::iovec {
            iov_base: header.as_ptr() as *mut libc::c_void,
            iov_len: header.len(),
        });
        iovecs.extend(guards.iter().map(|guard| libc::iovec {
            iov_base: guard.as_ptr() as *mut libc::c_void,
            iov_len: guard.len(),
        }));
        let count = libc::c_int::try_from(iovecs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into memory that stays mapped for the call: `header` is
        // borrowed, and the guest-memory guards live until the end of this function. The
        // kernel only reads through them.
        let ret = unsafe { libc::writev(self.as_raw_fd(), iovecs.as_ptr(), count) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ret as usize)
    }

    fn set_header_len(&self, len: usize) -> io::Result<()> {
        let len =
            libc::c_int::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the reference.
        check(unsafe { ioctl_with_ref(&self.file, TUNSETVNETHDRSZ(), &len) })?;
        // virtio 1.x headers are little endian whatever the host; on little-endian hosts
        // this is already the TAP's byte order.
        let little_endian: libc::c_int = 1;
        // SAFETY: TUNSETVNETLE reads one int from the reference.
        let ret = unsafe { ioctl_with_ref(&self.file, TUNSETVNETLE(), &little_endian) };
        if ret < 0 && cfg!(target_endian = "big") {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_offloads(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        check(unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD(), libc::c_ulong::from(flags)) })
    }

    fn set_queue_enabled(&self, enabled: bool) -> io::Result<()> {
        if !self.multi_queue || self.enabled.load(Ordering::Acquire) == enabled {
            return Ok(());
        }
        let mut request = ifreq(&self.name);
        let flag = if enabled {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        request.ifr_ifru.ifru_flags = flag as libc::c_short;
        // SAFETY: TUNSETQUEUE reads the ifreq we own.
        check(unsafe { ioctl_with_ref(&self.file, TUNSETQUEUE(), &request) })?;
        self.enabled.store(enabled, Ordering::Release);
        Ok(())
    }
}

fn interface_exists(name: &str) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    // SAFETY: `name` is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Link settings of an interface, changed through a datagram socket in the current network
/// namespace.
#[derive(Debug)]
pub struct Interface {
    name: String,
    socket: OwnedFd,
}

impl Interface {
    pub fn new(name: &str) -> Result<Self, TapError> {
        if !valid_name(name) {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let error = |action, source| TapError::Interface {
            action,
            name: name.to_string(),
            source,
        };
        // SAFETY: socket() takes no pointers; the result is checked before use.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(error(
                "open a control socket for",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Interface {
            name: name.to_string(),
            socket,
        })
    }

    fn error(&self, action: &'static str, source: io::Error) -> TapError {
        TapError::Interface {
            action,
            name: self.name.clone(),
            source,
        }
    }

    pub fn mtu(&self) -> Result<u16, TapError> {
        let mut request = ifreq(&self.name);
        // SAFETY: SIOCGIFMTU fills the ifreq we own.
        check(unsafe { ioctl_with_mut_ref(&self.socket, libc::SIOCGIFMTU, &mut request) })
            .map_err(|e| self.error("read the MTU of", e))?;
        // SAFETY: SIOCGIFMTU stores an int in `ifru_mtu`; any bytes are a valid int.
        let mtu = unsafe { request.ifr_ifru.ifru_mtu };
        u16::try_from(mtu).map_err(|_| {
            self.error(
                "use the MTU of",
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("MTU {mtu} is not 16-bit"),
                ),
            )
        })
    }

    pub fn set_mtu(&self, mtu: u16) -> Result<(), TapError> {
        let mut request = ifreq(&self.name);
        request.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
        // SAFETY: SIOCSIFMTU reads the ifreq we own.
        check(unsafe { ioctl_with_ref(&self.socket, libc::SIOCSIFMTU, &request) })
            .map_err(|e| self.error("set the MTU of", e))
    }

    /// Brings the link up (IFF_UP), keeping the other flags.
    pub fn set_up(&self) -> Result<(), TapError> {
        let mut request = ifreq(&self.name);
        // SAFETY: SIOCGIFFLAGS fills the ifreq we own.
        check(unsafe { ioctl_with_mut_ref(&self.socket, libc::SIOCGIFFLAGS, &mut request) })
            .map_err(|e| self.error("read the flags of", e))?;
        // SAFETY: SIOCGIFFLAGS stored the flags in `ifru_flags`, a plain short.
        let flags = unsafe { request.ifr_ifru.ifru_flags };
        request.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
        // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
        check(unsafe { ioctl_with_ref(&self.socket, libc::SIOCSIFFLAGS, &request) })
            .map_err(|e| self.error("bring up", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_checked() {
        for good in ["tap0", "t", "vhost-net.1", "abcdefghijklmno"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:1",
            "a b",
            "abcdefghijklmnop",
            "tab\t",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
            assert!(matches!(Tap::open(bad, 1), Err(TapError::InvalidName(_))));
        }
        let request = ifreq("tap7");
        assert_eq!(
            request.ifr_name[..5],
            [b't', b'a', b'p', b'7', 0].map(|b| b as libc::c_char)
        );
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_abi() {
        // From <linux/if_tun.h> with the generic _IOC encoding (x86, arm, riscv).
        if cfg!(any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        )) {
            assert_eq!(TUNSETIFF(), 0x4004_54ca);
            assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
            assert_eq!(TUNGETIFF(), 0x8004_54d2);
            assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
            assert_eq!(TUNSETQUEUE(), 0x4004_54d9);
            assert_eq!(TUNSETVNETLE(), 0x4004_54dc);
        }
    }
}
