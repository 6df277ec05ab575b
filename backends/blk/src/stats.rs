//! Per-queue I/O counters: what each request queue has served since the backend started,
//! across frontend connections. Queue threads add to them with relaxed atomics (one
//! uncontended add per request); the signal thread reads them for the log.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// One queue's counters.
#[derive(Debug, Default)]
pub struct QueueCounters {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
}

/// A copy of one queue's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Descriptor chains taken from the queue.
    pub requests: u64,
    /// Bytes read from the disk into the guest (VIRTIO_BLK_T_IN).
    pub bytes_read: u64,
    /// Bytes written from the guest to the disk (VIRTIO_BLK_T_OUT).
    pub bytes_written: u64,
    /// Requests completed with a status other than OK, or with no status byte to write.
    pub errors: u64,
}

impl QueueCounters {
    pub(crate) fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn read(&self, bytes: usize) {
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn written(&self, bytes: usize) {
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }

    pub(crate) fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn counts(&self) -> QueueCounts {
        QueueCounts {
            requests: self.requests.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

impl fmt::Display for QueueCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} requests, {} bytes read, {} bytes written, {} errors",
            self.requests, self.bytes_read, self.bytes_written, self.errors
        )
    }
}

/// The counters of every request queue.
#[derive(Debug)]
pub struct IoStats(Vec<QueueCounters>);

impl IoStats {
    pub fn new(num_queues: usize) -> Self {
        Self((0..num_queues).map(|_| QueueCounters::default()).collect())
    }

    /// Queue `queue`'s counters; `None` for a queue the backend does not have.
    pub fn queue(&self, queue: usize) -> Option<&QueueCounters> {
        self.0.get(queue)
    }

    /// "queue N: ..." for each queue, for the log.
    pub fn lines(&self) -> impl Iterator<Item = String> + '_ {
        self.0
            .iter()
            .enumerate()
            .map(|(q, counters)| format!("queue {q}: {}", counters.counts()))
    }
}
