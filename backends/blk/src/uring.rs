//! The io_uring engine: each transfer is one READV or WRITEV on a ring owned by the calling
//! thread, submitted and reaped in a single `io_uring_enter`.
//!
//! Every queue has its own worker thread, so a ring per thread needs no lock between queues.
//! A transfer waits for its completion before returning, which keeps the guest buffers and
//! the iovec array alive for as long as the kernel may use them.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// One transfer is in flight per ring at a time.
const RING_ENTRIES: u32 = 4;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

/// Whether this process may create io_uring instances (the kernel may have them disabled
/// through `kernel.io_uring_disabled`, or a seccomp filter may refuse them).
pub fn probe() -> io::Result<()> {
    IoUring::new(RING_ENTRIES).map(drop)
}

/// Which way a transfer goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the file into the buffers.
    Read,
    /// From the buffers into the file.
    Write,
}

/// Reads or writes at `offset` through `iov`, like `preadv` or `pwritev`: returns the bytes
/// moved, which may be fewer than asked for.
///
/// # Safety
///
/// Every iovec in `iov` must cover memory that is valid for the transfer's direction until
/// the call returns.
pub unsafe fn transfer(
    fd: RawFd,
    direction: Direction,
    iov: &[libc::iovec],
    offset: u64,
) -> io::Result<usize> {
    let count =
        u32::try_from(iov.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let entry = match direction {
        Direction::Read => opcode::Readv::new(types::Fd(fd), iov.as_ptr(), count)
            .offset(offset)
            .build(),
        Direction::Write => opcode::Writev::new(types::Fd(fd), iov.as_ptr(), count)
            .offset(offset)
            .build(),
    };
    RING.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ring = match slot.as_mut() {
            Some(ring) => ring,
            None => slot.insert(IoUring::new(RING_ENTRIES)?),
        };
        // SAFETY: `entry` points to `iov` and its buffers, which the caller keeps valid
        // until this function returns.
        let result = unsafe { submit_and_reap(ring, &entry) };
        if result.is_err() {
            // A ring that failed may still hold the entry: the next transfer starts on a
            // fresh one rather than reap a stale completion.
            *slot = None;
        }
        result?
    })
}

/// Submits `entry` on an idle ring and waits for its completion. The outer error is the
/// ring's; the inner one is the transfer's.
///
/// # Safety
///
/// The buffers and iovec array that `entry` points to must stay valid until it returns.
unsafe fn submit_and_reap(
    ring: &mut IoUring,
    entry: &io_uring::squeue::Entry,
) -> io::Result<io::Result<usize>> {
    // SAFETY: the entry's iovec array and buffers stay valid (the caller's contract) until
    // its completion is reaped below. Should the ring fail first, the kernel has imported the
    // iovec array at submission, and the buffers are guest memory, mapped for as long as
    // the backend holds the memory table.
    unsafe { ring.submission().push(entry) }
        .map_err(|_| io::Error::other("io_uring submission queue is full"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            // Interrupted while waiting: the entry is submitted or still queued; either
            // way the next call picks it up.
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
        if let Some(completion) = ring.completion().next() {
            let result = completion.result();
            return Ok(usize::try_from(result).map_err(|_| io::Error::from_raw_os_error(-result)));
        }
    }
}
