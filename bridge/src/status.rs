//! What a running bridge can say about itself: a [`Snapshot`] of its zones, devices and loop
//! counters. The ring thread publishes it on a [`StatusBoard`] (when it goes to sleep, at
//! most every [`REFRESH_PERIOD`], and at once when asked); a [`StatusServer`] thread answers
//! each connection to the status socket with one JSON document; `hvisor-vhost-bridge status`
//! prints it ([`query`], [`render`]); SIGUSR1 logs the same table.
//!
//! The ring thread never waits for a reader: it only takes the board's lock to swap in a new
//! snapshot, and a reader that asks for a fresh one waits at most [`FRESH_WAIT`] before it is
//! served the last published one.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::event_loop::{LoopStats, RoundTrips};

/// The status socket's name in the runtime directory.
pub const SOCKET_NAME: &str = "status.sock";

/// While the ring thread sleeps, it republishes the snapshot at most this often.
pub const REFRESH_PERIOD: Duration = Duration::from_millis(50);

/// How long a reader waits for the snapshot it asked for before taking the last one.
pub const FRESH_WAIT: Duration = Duration::from_millis(500);

/// A client that does not read its answer is dropped after this long.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The bridge as the ring thread last saw it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The bridge's pid.
    pub pid: u32,
    /// The zones that have devices, in order.
    pub zones: Vec<u32>,
    /// Every device, in config order.
    pub devices: Vec<DeviceStatus>,
    /// The ring thread's counters.
    pub counters: LoopStats,
}

/// One device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceStatus {
    pub zone: u32,
    /// The name used in logs (`zoneN/type@base`).
    pub label: String,
    /// Guest-physical base of its register window.
    pub base: u64,
    pub irq: u32,
    /// The virtio device id (2: block, 1: net, 3: console).
    pub device_id: u32,
    /// The backend process, when the bridge started it.
    pub backend_pid: Option<u32>,
    pub state: DeviceState,
    /// The guest driver's Status register.
    pub driver_status: u32,
    /// The features the guest driver acknowledged.
    pub features: u64,
    /// One entry per queue.
    pub queues: Vec<QueueStatus>,
    /// From each QueueNotify to the backend's call that answered it.
    pub notify_to_call: RoundTrips,
}

/// One virtqueue as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QueueStatus {
    /// The size the driver chose (the maximum until it chooses).
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
}

/// What the bridge is doing with a device's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceState {
    /// Connected: guest accesses are served.
    Running,
    /// The backend went away and is being restarted or awaited.
    Restoring,
    /// The device told the guest it failed (DEVICE_NEEDS_RESET); a guest reset restores it.
    NeedsReset,
    /// The backend is gone and no restore runs.
    Disconnected,
}

impl DeviceState {
    fn name(self) -> &'static str {
        match self {
            DeviceState::Running => "running",
            DeviceState::Restoring => "restoring",
            DeviceState::NeedsReset => "needs-reset",
            DeviceState::Disconnected => "disconnected",
        }
    }
}

#[derive(Debug, Default)]
struct Published {
    snapshot: Snapshot,
    generation: u64,
}

/// Where the ring thread publishes its snapshot, and readers ask for a fresh one.
#[derive(Debug)]
pub struct StatusBoard {
    published: Mutex<Published>,
    refreshed: Condvar,
    /// Written by readers: the ring thread polls it and publishes at once.
    request: EventFd,
}

impl StatusBoard {
    pub fn new() -> std::io::Result<Arc<StatusBoard>> {
        Ok(Arc::new(StatusBoard {
            published: Mutex::default(),
            refreshed: Condvar::new(),
            request: EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?,
        }))
    }

    /// The fd the ring thread polls for requests.
    pub fn request_fd(&self) -> RawFd {
        self.request.as_raw_fd()
    }

    /// Clears pending requests (the ring thread, before publishing).
    pub fn take_request(&self) {
        let _ = self.request.read();
    }

    /// Replaces the snapshot and wakes the readers waiting for it.
    pub fn publish(&self, snapshot: Snapshot) {
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        published.snapshot = snapshot;
        published.generation += 1;
        drop(published);
        self.refreshed.notify_all();
    }

    /// Asks the ring thread for a new snapshot and returns it, or the last one published if
    /// none comes within `wait` (the ring thread is busy; a reader never stalls the bridge).
    pub fn fresh(&self, wait: Duration) -> Snapshot {
        let published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let asked_at = published.generation;
        // Counter overflow is impossible in practice; a failed write leaves the reader with
        // the last snapshot after `wait`.
        let _ = self.request.write(1);
        let (published, _) = self
            .refreshed
            .wait_timeout_while(published, wait, |p| p.generation == asked_at)
            .unwrap_or_else(PoisonError::into_inner);
        published.snapshot.clone()
    }
}

/// The status socket could not be served, or a status query failed.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot serve the status socket {}", path.display())]
    Serve {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("cannot query the bridge at {}", path.display())]
    Query {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the bridge at {} answered with an invalid document", path.display())]
    Document {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The thread that serves the status socket; stops it and removes the socket when dropped.
#[derive(Debug)]
pub struct StatusServer {
    path: PathBuf,
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl StatusServer {
    /// Listens on `path` (mode 0600) and answers each connection with a fresh snapshot from
    /// `board`. A socket left at `path` by a bridge that is gone is replaced.
    pub fn start(path: &Path, board: Arc<StatusBoard>) -> Result<StatusServer, StatusError> {
        let err = |source| StatusError::Serve {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(meta) if !meta.file_type().is_socket() => {
                return Err(StatusError::NotASocket(path.to_owned()))
            }
            Ok(_) => {
                if UnixStream::connect(path).is_ok() {
                    return Err(err(std::io::ErrorKind::AddrInUse.into()));
                }
                std::fs::remove_file(path).map_err(err)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        // The snapshot names processes and guest addresses: the bridge's user only.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(err)?;
        let stop_copy = stop.try_clone().map_err(err)?;
        let thread = std::thread::Builder::new()
            .name("status".into())
            .spawn(move || serve(&listener, &stop_copy, &board))
            .map_err(err)?;
        Ok(StatusServer {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StatusServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn serve(listener: &UnixListener, stop: &EventFd, board: &StatusBoard) {
    const LISTENER: u64 = 0;
    const STOP: u64 = 1;
    let watch = || -> std::io::Result<Epoll> {
        let epoll = Epoll::new()?;
        for (fd, token) in [(listener.as_raw_fd(), LISTENER), (stop.as_raw_fd(), STOP)] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(epoll)
    };
    let epoll = match watch() {
        Ok(epoll) => epoll,
        Err(e) => {
            log::warn!("status socket not served: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("status socket no longer served: {e}");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == STOP) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, board) {
                    log::debug!("status client: {e}");
                }
            }
            Err(e) => log::debug!("status socket: {e}"),
        }
    }
}

fn answer(mut stream: UnixStream, board: &StatusBoard) -> std::io::Result<()> {
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut document = serde_json::to_vec(&board.fresh(FRESH_WAIT))?;
    document.push(b'\n');
    stream.write_all(&document)
}

/// Asks the bridge at `socket` for its status.
pub fn query(socket: &Path) -> Result<Snapshot, StatusError> {
    let err = |source| StatusError::Query {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(err)?;
    let deadline = FRESH_WAIT + CLIENT_TIMEOUT;
    stream.set_read_timeout(Some(deadline)).map_err(err)?;
    let mut text = String::new();
    stream.read_to_string(&mut text).map_err(err)?;
    serde_json::from_str(&text).map_err(|source| StatusError::Document {
        path: socket.to_owned(),
        source,
    })
}

/// The snapshot as a table, one line per device, then the counters.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let zones: Vec<String> = s.zones.iter().map(u32::to_string).collect();
    let _ = writeln!(
        out,
        "bridge pid {}: zones {}, {} devices",
        s.pid,
        zones.join(" "),
        s.devices.len()
    );
    let _ = writeln!(
        out,
        "{:<28} {:>4} {:>4} {:>8} {:<12} {:>8} {:>18}  QUEUES",
        "DEVICE", "IRQ", "TYPE", "PID", "STATE", "STATUS", "FEATURES"
    );
    for d in &s.devices {
        let queues: Vec<String> = d
            .queues
            .iter()
            .map(|q| format!("{}{}", q.size, if q.ready { "" } else { "-" }))
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:>4} {:>4} {:>8} {:<12} {:>#8x} {:>#18x}  {}",
            d.label,
            d.irq,
            d.device_id,
            d.backend_pid.map_or("-".into(), |p| p.to_string()),
            d.state.name(),
            d.driver_status,
            d.features,
            queues.join(" ")
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        out,
        "requests {} interrupts {} reinjections {} sleeps {} lost-wakeups {} reconnects {} \
         zone-resets {} control-timeouts {}",
        c.requests,
        c.interrupts,
        c.reinjections,
        c.sleeps,
        c.guard_wakeups,
        c.reconnects,
        c.zone_resets,
        c.control_timeouts
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_gets_the_snapshot_published_after_it_asked() {
        let board = StatusBoard::new().unwrap();
        board.publish(Snapshot {
            pid: 1,
            ..Snapshot::default()
        });
        let ring = {
            let board = Arc::clone(&board);
            std::thread::spawn(move || {
                // The ring thread's side: wait for the request, then publish.
                let mut fds = [libc::pollfd {
                    fd: board.request_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd on the stack; -1 waits for the request.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
                board.take_request();
                board.publish(Snapshot {
                    pid: 2,
                    ..Snapshot::default()
                });
            })
        };
        assert_eq!(board.fresh(Duration::from_secs(60)).pid, 2);
        ring.join().unwrap();
    }

    #[test]
    fn a_reader_the_ring_thread_does_not_answer_gets_the_last_snapshot() {
        let board = StatusBoard::new().unwrap();
        board.publish(Snapshot {
            pid: 7,
            ..Snapshot::default()
        });
        assert_eq!(board.fresh(Duration::from_millis(1)).pid, 7);
    }
}
