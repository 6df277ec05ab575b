//! How the hypervisor side wakes a sleeping daemon: an eventfd (hvisor.ko with
//! `HVISOR_SET_EVENTFD`), or signal 10 directed at one thread (older hvisor.ko), read through
//! a signalfd so that the event loop polls a file descriptor either way.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

/// hvisor-tool's `SIGHVI`: the signal number older hvisor.ko modules send. It is `SIGUSR1` on
/// every architecture hvisor supports (aarch64, riscv64, loongarch64, x86_64).
pub const SIGHVI: libc::c_int = 10;

/// Which wakeup the hypervisor side uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WakeupKind {
    /// An eventfd the hypervisor side writes.
    #[default]
    Eventfd,
    /// Signal [`SIGHVI`], sent to the one thread that set the wakeup up.
    Signal,
}

impl fmt::Display for WakeupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WakeupKind::Eventfd => "eventfd",
            WakeupKind::Signal => "signal 10 (SIGHVI) to the daemon thread",
        })
    }
}

/// The daemon's end of a wakeup: a pollable fd and a way to clear it.
#[derive(Debug)]
pub(crate) enum Wakeup {
    Eventfd(EventFd),
    Signal(SignalWakeup),
}

impl Wakeup {
    pub(crate) fn eventfd() -> io::Result<Wakeup> {
        EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map(Wakeup::Eventfd)
    }

    pub(crate) fn kind(&self) -> WakeupKind {
        match self {
            Wakeup::Eventfd(_) => WakeupKind::Eventfd,
            Wakeup::Signal(_) => WakeupKind::Signal,
        }
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        match self {
            // SAFETY: the eventfd is owned by `self` and stays open for the borrow's lifetime.
            Wakeup::Eventfd(evt) => unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) },
            Wakeup::Signal(sig) => sig.fd(),
        }
    }

    /// Clears the fd after it polled readable. Never blocks.
    pub(crate) fn ack(&self) {
        match self {
            // EAGAIN just means the counter was already clear.
            Wakeup::Eventfd(evt) => {
                let _ = evt.read();
            }
            Wakeup::Signal(sig) => sig.drain(),
        }
    }
}

/// Signal [`SIGHVI`] blocked in the thread that created this, and a non-blocking,
/// close-on-exec signalfd that reads it.
///
/// The signal is thread-directed (the older hvisor.ko's `send_sig_info` to the task that did
/// `HVISOR_INIT_VIRTIO`), and a signalfd only sees the signals pending for the thread that
/// reads or polls it, plus the process-wide ones. So the thread that created this must be
/// the one that polls the fd; any other thread would never see it readable.
#[derive(Debug)]
pub(crate) struct SignalWakeup {
    fd: OwnedFd,
}

impl SignalWakeup {
    /// Blocks [`SIGHVI`] in the calling thread (its default action would kill the process)
    /// and opens the signalfd.
    pub(crate) fn new() -> io::Result<SignalWakeup> {
        // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, SIGHVI);
        }
        // SAFETY: `set` is initialised; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: `set` is initialised; -1 asks for a new fd.
        let raw = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(SignalWakeup { fd })
    }

    /// The signalfd.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads every queued [`SIGHVI`] (each interrupt may have queued one).
    pub(crate) fn drain(&self) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        loop {
            // SAFETY: `info` is writable for its whole length; the fd is ours.
            let n =
                unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
            // EAGAIN (empty) or any error ends the drain; the next poll tells the truth.
            if n <= 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return;
            }
        }
    }
}

/// The calling thread's kernel thread id.
pub(crate) fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Sends [`SIGHVI`] to thread `tid` of process `pid`, as the older hvisor.ko does to the
/// daemon thread (a thread-directed signal). Async-signal-safe: one system call.
pub(crate) fn send_sighvi(pid: libc::pid_t, tid: libc::pid_t) -> io::Result<()> {
    // SAFETY: tgkill takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, SIGHVI) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn readable(fd: BorrowedFd<'_>) -> bool {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    fn blocked_in_this_thread(sig: libc::c_int) -> bool {
        // SAFETY: sigset_t is plain data, filled by pthread_sigmask below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: a null new set only queries the mask into `set`.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut set) };
        assert_eq!(rc, 0);
        // SAFETY: `set` was initialised by pthread_sigmask.
        unsafe { libc::sigismember(&set, sig) == 1 }
    }

    /// Runs `f` on a fresh thread, so that the signal mask it changes dies with it.
    fn on_own_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn thread_directed_signal_makes_the_fd_readable_and_ack_drains_it() {
        on_own_thread(|| {
            let wakeup = Wakeup::Signal(SignalWakeup::new().unwrap());
            assert_eq!(wakeup.kind(), WakeupKind::Signal);
            assert!(blocked_in_this_thread(SIGHVI));
            assert!(!readable(wakeup.fd()));
            // Twice, as two interrupts would: the process survives, one ack drains both.
            // SAFETY: getpid has no arguments and cannot fail.
            let pid = unsafe { libc::getpid() };
            send_sighvi(pid, gettid()).unwrap();
            send_sighvi(pid, gettid()).unwrap();
            assert!(readable(wakeup.fd()));
            wakeup.ack();
            assert!(!readable(wakeup.fd()));
            wakeup.ack();
            send_sighvi(pid, gettid()).unwrap();
            assert!(readable(wakeup.fd()));
        });
    }

    #[test]
    fn the_signal_is_seen_only_by_its_thread() {
        on_own_thread(|| {
            let wakeup = SignalWakeup::new().unwrap();
            let tid = gettid();
            // SAFETY: getpid has no arguments and cannot fail.
            let pid = unsafe { libc::getpid() };
            send_sighvi(pid, tid).unwrap();
            // Another thread polling the same signalfd does not see this thread's signal.
            let fd = wakeup.fd.try_clone().unwrap();
            let elsewhere = std::thread::spawn(move || readable(fd.as_fd()))
                .join()
                .unwrap();
            assert!(!elsewhere);
            assert!(readable(wakeup.fd.as_fd()));
            Wakeup::Signal(wakeup).ack();
        });
    }

    #[test]
    fn eventfd_wakeup_acks() {
        let wakeup = Wakeup::eventfd().unwrap();
        assert_eq!(wakeup.kind(), WakeupKind::Eventfd);
        let Wakeup::Eventfd(evt) = &wakeup else {
            unreachable!()
        };
        evt.write(1).unwrap();
        assert!(readable(wakeup.fd()));
        wakeup.ack();
        assert!(!readable(wakeup.fd()));
    }
}
