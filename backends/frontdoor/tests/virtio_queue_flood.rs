//! `virtio-queue` logs an `error!` line each time a guest's avail index runs more than a
//! ring ahead, at every kick; the backends' logger must thin that out like our own warnings.
//! (A test binary of its own: it installs the process-wide logger.)

use std::sync::{Arc, Mutex};

use log::{Level, Log, Metadata, Record};
use vhost_user_frontdoor::ratelimit::RateLimitedLogger;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Keeps the error lines it is given.
#[derive(Debug, Clone, Default)]
struct Capture(Arc<Mutex<Vec<String>>>);

impl Log for Capture {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= Level::Warn
    }

    fn log(&self, record: &Record<'_>) {
        if record.level() == Level::Error {
            self.0.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

#[test]
fn a_runaway_avail_index_costs_a_handful_of_lines() {
    let capture = Capture::default();
    log::set_boxed_logger(Box::new(RateLimitedLogger::new(capture.clone()))).unwrap();
    log::set_max_level(log::LevelFilter::Warn);

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    // More than a ring ahead of the device's next index (0).
    vq.avail().idx().store(17);
    for _ in 0..1000 {
        // Each kick: the backend looks for chains and finds the index invalid.
        assert!(queue.pop_descriptor_chain(&mem).is_none());
    }
    let lines = capture.0.lock().unwrap();
    assert_eq!(lines.len(), 12, "{lines:#?}");
    assert!(lines[0].starts_with("Iterator error"), "{}", lines[0]);
    assert!(
        lines[11].ends_with("(1000 times so far, rate-limited)"),
        "{}",
        lines[11]
    );
}
