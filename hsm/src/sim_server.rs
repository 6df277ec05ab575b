//! The simulator's provider socket: hands a [`SimHypervisor`]'s fds to bridges in other
//! processes (see [`crate::provider`]).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::provider::{parse_signal_target, send_handover_mode};
use crate::sim::{borrow_eventfd, wait_events, watch, Shared, EVENT_EXIT};
use crate::wakeup::WakeupKind;
use crate::{HsmError, SimHypervisor};

const EVENT_LISTENER: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

impl SimHypervisor {
    /// Listens on `socket` and hands the fds to every bridge that connects (provider
    /// protocol). A stale socket file at that path is replaced.
    pub fn serve(self: &Arc<Self>, socket: &Path) -> Result<ProviderServer, HsmError> {
        let setup = |what| move |e| HsmError::io(what, e);
        if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(socket).map_err(setup("removing a stale provider socket"))?;
        }
        let listener = UnixListener::bind(socket).map_err(setup("binding the provider socket"))?;
        let server = (|| {
            listener.set_nonblocking(true)?;
            let exit = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
            let exit_for_thread = exit.try_clone()?;
            let epoll = Epoll::new()?;
            watch(&epoll, borrow_eventfd(&exit), EventSet::IN, EVENT_EXIT)?;
            watch(&epoll, listener.as_fd(), EventSet::IN, EVENT_LISTENER)?;
            let shared = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("sim-provider".into())
                .spawn(move || serve_loop(&shared, &listener, &epoll, &exit_for_thread))?;
            Ok(ProviderServer {
                path: socket.to_owned(),
                exit,
                thread: Some(thread),
            })
        })();
        server.map_err(|e| {
            let _ = std::fs::remove_file(socket);
            HsmError::io("starting the provider server", e)
        })
    }
}

/// The provider thread: hands the fds to each connection and keeps it open until the peer
/// leaves or the server stops.
fn serve_loop(shared: &Shared, listener: &UnixListener, epoll: &Epoll, exit: &EventFd) {
    let mut connections: HashMap<u64, Connection> = HashMap::new();
    let mut next_token = FIRST_CONNECTION;
    let mut events = [EpollEvent::default(); 16];
    loop {
        let ready = match wait_events(epoll, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::error!("sim: provider epoll failed: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            match event.data() {
                EVENT_EXIT => {
                    let _ = exit.read();
                    return;
                }
                EVENT_LISTENER => loop {
                    let stream = match listener.accept() {
                        Ok((stream, _)) => stream,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => {
                            log::warn!("sim: accept failed: {e}");
                            break;
                        }
                    };
                    let mode = shared.handover_mode();
                    let handed = send_handover_mode(&stream, &shared.handover(), mode)
                        .and_then(|()| {
                            stream
                                .set_nonblocking(true)
                                .map_err(|e| HsmError::io("provider socket setup", e))
                        })
                        .and_then(|()| {
                            let events = EventSet::IN | EventSet::READ_HANG_UP;
                            watch(epoll, stream.as_fd(), events, next_token)
                                .map_err(|e| HsmError::io("provider socket setup", e))
                        });
                    match handed {
                        Ok(()) => {
                            log::debug!("sim: handed the fds to a bridge");
                            // In signal mode the bridge answers with the thread to signal.
                            let target = (mode.wakeup == WakeupKind::Signal).then(Vec::new);
                            connections.insert(next_token, Connection { stream, target });
                            next_token += 1;
                        }
                        Err(e) => log::warn!("sim: handover failed: {e}"),
                    }
                },
                token => {
                    let gone = connections
                        .get_mut(&token)
                        .is_some_and(|connection| connection.read(shared));
                    if gone {
                        if let Some(connection) = connections.remove(&token) {
                            let _ = epoll.ctl(
                                ControlOperation::Delete,
                                connection.stream.as_raw_fd(),
                                EpollEvent::default(),
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A bridge's connection to the provider socket.
struct Connection {
    stream: UnixStream,
    /// Signal mode: the bytes of the bridge's signal-target message received so far, until
    /// it is complete.
    target: Option<Vec<u8>>,
}

impl Connection {
    /// Reads what the bridge sent: its signal target in signal mode, then nothing (data is
    /// discarded). Returns true when the connection is over (EOF, an error, a bad message).
    fn read(&mut self, shared: &Shared) -> bool {
        let mut buf = [0u8; 256];
        let n = match io::Read::read(&mut self.stream, &mut buf) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(e) => {
                return !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                )
            }
        };
        let Some(received) = &mut self.target else {
            return false;
        };
        received.extend_from_slice(&buf[..n]);
        match parse_signal_target(received) {
            Ok(None) => false,
            Ok(Some(target)) => {
                log::debug!("sim: wakeups go to thread {} of {}", target.tid, target.pid);
                shared.set_signal_target(target.pid, target.tid);
                self.target = None;
                false
            }
            Err(e) => {
                log::warn!("sim: {e}");
                true
            }
        }
    }
}

/// A running provider socket; dropping it stops the thread, closes the bridges' connections
/// and removes the socket file.
#[derive(Debug)]
pub struct ProviderServer {
    path: PathBuf,
    exit: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl ProviderServer {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ProviderServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            if self.exit.write(1).is_ok() {
                let _ = thread.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}
