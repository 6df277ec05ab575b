//! The backends' seccomp filter. A backend holds the fd of guest memory, which on hvisor is
//! `/dev/hvisor` itself: its ioctls start and stop zones, inject interrupts and
//! re-initialise the virtio bridge. A backend needs none of them, so the filter refuses
//! (EPERM) every ioctl outside the short list each backend gives, on any fd, and a few
//! system calls no backend makes that would reach beyond its process (ptrace, loading
//! kernel code, mounts, namespaces, reboot). Other system calls are allowed: a full
//! allow-list would have to be kept exact for every architecture and every path of
//! `vhost-user-backend`, `virtio-queue` and io_uring, and a missing entry kills a guest's
//! device.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors while building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the filter or the kernel refused to install it.
    #[error("Cannot install the seccomp filter")]
    Filter(#[source] seccompiler::Error),
    /// seccompiler refused a rule or condition.
    #[error("Cannot build the seccomp filter")]
    Backend(#[source] seccompiler::BackendError),
}

/// ioctls every backend may make: non-blocking and close-on-exec switches (std's
/// `set_nonblocking` is FIONBIO), bytes waiting (FIONREAD) and the terminal check of the
/// logger (TCGETS).
// The constants are c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
const COMMON_IOCTLS: &[u64] = &[
    libc::FIONBIO as u64,
    libc::FIONREAD as u64,
    libc::FIOCLEX as u64,
    libc::FIONCLEX as u64,
    libc::TCGETS as u64,
];

/// System calls no backend makes, refused whatever their arguments.
fn refused_syscalls() -> Vec<libc::c_long> {
    vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
    ]
}

/// The filter for a backend that also needs `ioctls`, or `None` on an architecture
/// seccompiler does not support (such as loongarch64).
pub fn filter(ioctls: &[u64]) -> Result<Option<BpfProgram>, SeccompError> {
    let Ok(arch) = TargetArch::try_from(std::env::consts::ARCH) else {
        return Ok(None);
    };
    let mut allowed: Vec<u64> = COMMON_IOCTLS.iter().chain(ioctls).copied().collect();
    allowed.sort_unstable();
    allowed.dedup();
    // One rule whose conditions all hold (the request is none of the allowed ones) refuses
    // the call. The kernel reads the request as a 32-bit int, so 32 bits are compared.
    let not_allowed = allowed
        .iter()
        .map(|&request| {
            SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, request)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(SeccompError::Backend)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(
        libc::SYS_ioctl,
        vec![SeccompRule::new(not_allowed).map_err(SeccompError::Backend)?],
    );
    for syscall in refused_syscalls() {
        // No rule: refused whatever the arguments.
        rules.insert(syscall, Vec::new());
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(SeccompError::Backend)?;
    let program: BpfProgram = filter.try_into().map_err(SeccompError::Backend)?;
    Ok(Some(program))
}

/// Installs the filter of [`filter`] on every thread of the process (and so on every
/// thread and child it starts later). Logs once, and goes on, when the architecture has no
/// filter or the kernel no seccomp filter support.
pub fn install(ioctls: &[u64]) -> Result<(), SeccompError> {
    match filter(ioctls)? {
        Some(program) => match seccompiler::apply_filter_all_threads(&program) {
            // A root Linux built without CONFIG_SECCOMP(_FILTER), as some boards' are: the
            // backend still serves its guest rather than leave the device dead.
            Err(seccompiler::Error::Seccomp(e))
                if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EINVAL)) =>
            {
                log::warn!(
                    "The kernel refuses seccomp filters ({e}): ioctls on guest memory are not \
                     restricted"
                );
                Ok(())
            }
            result => result.map_err(SeccompError::Filter),
        },
        None => {
            log::warn!(
                "No seccomp filter on {}: ioctls on guest memory are not restricted",
                std::env::consts::ARCH
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// hvisor's HVISOR_ZONE_START (`_IOW(1, 2, ...)` on its `/dev/hvisor`): what a
    /// compromised backend would try on the memory fd it holds.
    const HVISOR_ZONE_START: u64 = 0x4008_0102;

    #[test]
    // The constants are c_ulong on some targets and c_int on others.
    #[allow(clippy::unnecessary_cast)]
    fn ioctls_outside_the_list_are_refused_and_listed_ones_pass() {
        let Some(program) = filter(&[libc::TIOCGWINSZ as u64]).unwrap() else {
            eprintln!("skipped: no seccomp support for {}", std::env::consts::ARCH);
            return;
        };
        // On a thread of its own: the filter stays with that thread.
        std::thread::spawn(move || {
            let (ours, _theirs) = std::os::unix::net::UnixStream::pair().unwrap();
            let fd = ours.as_raw_fd();
            let ioctl = |request: u64| {
                let mut arg = [0u8; 64];
                // SAFETY: `arg` is large enough for what any of these requests writes.
                let ret = unsafe { libc::ioctl(fd, request as _, arg.as_mut_ptr()) };
                if ret == 0 {
                    0
                } else {
                    std::io::Error::last_os_error().raw_os_error().unwrap()
                }
            };
            // Before the filter: the kernel itself answers (not a tty, or not this fd).
            assert_ne!(ioctl(HVISOR_ZONE_START), libc::EPERM);
            seccompiler::apply_filter(&program).unwrap();
            assert_eq!(ioctl(HVISOR_ZONE_START), libc::EPERM);
            // The same number with other upper bits is the same request to the kernel.
            assert_eq!(ioctl(HVISOR_ZONE_START | 1 << 32), libc::EPERM);
            // Listed ones reach the kernel, which answers for this fd.
            assert_eq!(ioctl(libc::FIONREAD as u64), 0);
            assert_eq!(ioctl(libc::TIOCGWINSZ as u64), libc::ENOTTY);
            // Refused outright.
            // SAFETY: unshare with no flags changes nothing, if allowed at all.
            let ret = unsafe { libc::unshare(0) };
            assert_eq!(ret, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EPERM)
            );
        })
        .join()
        .unwrap();
    }
}
