//! One frontend connection relayed to one daemon connection by two threads, one per direction.

use std::io;
use std::mem::size_of;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use log::{debug, error};
use vhost::vhost_user::message::{FrontendReq, VhostUserMemory, VhostUserMemoryRegion};
use vm_memory::ByteValued;

use crate::message::{read_message, write_message, Message, MessageError};
use crate::notifier::{self, BackendChannel, ConfigNotifier};
use crate::{Error, Peer};

/// State shared by the relay threads of a session and its [`ConfigNotifier`]s.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    pub(crate) channel: BackendChannel,
    ended: AtomicBool,
    /// A handle on every socket of the session, all shut down together when it ends.
    sockets: Mutex<Vec<UnixStream>>,
    /// Threads relaying the daemon's own backend requests (see `notifier`).
    relays: Mutex<Vec<JoinHandle<()>>>,
}

impl SessionState {
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Ends the session: every socket is shut down, so that every thread blocked on one
    /// returns. True for the caller that ended it, false if it had already ended.
    fn end(&self) -> bool {
        if self.ended.swap(true, Ordering::AcqRel) {
            return false;
        }
        for socket in lock(&self.sockets).iter() {
            // Already disconnected sockets report ENOTCONN; nothing more to do for them.
            let _ = socket.shutdown(Shutdown::Both);
        }
        true
    }

    /// Adds `socket` to the ones shut down at the end (at once if the session has ended).
    pub(crate) fn track(&self, socket: &UnixStream) -> io::Result<()> {
        let handle = socket.try_clone()?;
        let mut sockets = lock(&self.sockets);
        if self.ended() {
            let _ = handle.shutdown(Shutdown::Both);
        }
        sockets.push(handle);
        Ok(())
    }

    pub(crate) fn add_relay(&self, relay: JoinHandle<()>) {
        lock(&self.relays).push(relay);
    }
}

/// A frontend connected through the front door. Dropping it leaves the relay running; call
/// [`Session::wait`] to learn when the session is over.
#[derive(Debug)]
pub struct Session {
    state: Arc<SessionState>,
    pumps: Vec<JoinHandle<Result<(), Error>>>,
}

impl Session {
    /// Starts relaying between `frontend` and `daemon`.
    pub(crate) fn start(frontend: UnixStream, daemon: UnixStream) -> Result<Session, Error> {
        let state = Arc::new(SessionState::default());
        let handles = (|| {
            state.track(&frontend)?;
            state.track(&daemon)?;
            Ok((frontend.try_clone()?, daemon.try_clone()?))
        })();
        let (to_frontend, to_daemon) = handles.map_err(Error::SessionSetup)?;
        let mut session = Session {
            state: state.clone(),
            pumps: Vec::with_capacity(2),
        };
        let inbound_state = state.clone();
        let inbound = move || {
            let state = inbound_state;
            pump(&state, &frontend, &to_daemon, Peer::Frontend, |message| {
                inspect_request(&state, message)
            })
        };
        let outbound = move || pump(&state, &daemon, &to_frontend, Peer::Daemon, |_| Ok(()));
        for (name, body) in [
            (
                "frontdoor-in",
                Box::new(inbound) as Box<dyn FnOnce() -> Result<(), Error> + Send>,
            ),
            ("frontdoor-out", Box::new(outbound)),
        ] {
            match thread::Builder::new().name(name.into()).spawn(body) {
                Ok(pump) => session.pumps.push(pump),
                Err(e) => {
                    session.state.end();
                    let _ = session.wait();
                    return Err(Error::SessionSetup(e));
                }
            }
        }
        Ok(session)
    }

    /// A handle that pushes configuration changes to this session's frontend.
    pub fn notifier(&self) -> ConfigNotifier {
        ConfigNotifier::new(self.state.clone())
    }

    /// Waits until the frontend or the daemon hangs up; the front door then closes the other
    /// side too. A hang-up is `Ok`; a malformed message or a socket failure, which end the
    /// session as well (and are logged), is the error.
    pub fn wait(self) -> Result<(), Error> {
        let mut outcome = Ok(());
        for pump in self.pumps {
            let result = pump.join().unwrap_or_else(|_| {
                error!("A front-door thread panicked");
                Ok(())
            });
            if outcome.is_ok() {
                outcome = result;
            }
        }
        // The pumps have ended the session, which stops the relays.
        let relays: Vec<_> = lock(&self.state.relays).drain(..).collect();
        for relay in relays {
            let _ = relay.join();
        }
        self.state.channel.close();
        outcome
    }
}

/// Relays whole messages from `from` to `to` until either side hangs up or a message is
/// malformed, then ends the session. Reports the error only if it is what ended the session.
fn pump(
    state: &SessionState,
    from: &UnixStream,
    to: &UnixStream,
    from_peer: Peer,
    mut inspect: impl FnMut(&mut Message) -> Result<(), Error>,
) -> Result<(), Error> {
    let to_peer = match from_peer {
        Peer::Frontend => Peer::Daemon,
        Peer::Daemon => Peer::Frontend,
    };
    let outcome = loop {
        let mut message = match read_message(from) {
            Ok(Some(message)) => message,
            Ok(None) => break Ok(()),
            Err(MessageError::Io(e)) if is_hang_up(&e) => break Ok(()),
            Err(source) => {
                break Err(Error::Receive {
                    peer: from_peer,
                    source,
                })
            }
        };
        if let Err(e) = inspect(&mut message) {
            break Err(e);
        }
        if let Err(source) = write_message(to, &message) {
            break if is_hang_up(&source) {
                Ok(())
            } else {
                Err(Error::Forward {
                    peer: to_peer,
                    source,
                })
            };
        }
    };
    let ended_here = state.end();
    match outcome {
        Err(e) if ended_here => {
            error!("Ending the vhost-user session: {}", error_chain(&e));
            Err(e)
        }
        _ => Ok(()),
    }
}

/// The one place where frontend requests are looked at: everything else passes unchanged.
fn inspect_request(state: &Arc<SessionState>, message: &mut Message) -> Result<(), Error> {
    match FrontendReq::try_from(message.header.request) {
        Ok(FrontendReq::SET_MEM_TABLE) => trim_mem_table_padding(message),
        Ok(FrontendReq::SET_PROTOCOL_FEATURES) => {
            if let Ok(value) = <[u8; 8]>::try_from(message.body.as_slice()) {
                state.channel.set_acked_features(u64::from_ne_bytes(value));
            }
        }
        Ok(FrontendReq::SET_BACKEND_REQ_FD) if message.fds.len() == 1 => {
            notifier::take_over_backend_channel(state, message)?;
        }
        _ => {}
    }
    Ok(())
}

/// Cuts a SET_MEM_TABLE body down to its `num_regions` entries. User-mode Linux always sends
/// room for two regions; the vhost crate accepts only the exact size.
fn trim_mem_table_padding(message: &mut Message) {
    let table_size = size_of::<VhostUserMemory>();
    let Some(table_bytes) = message.body.get(..table_size) else {
        return;
    };
    let mut table = VhostUserMemory::default();
    table.as_mut_slice().copy_from_slice(table_bytes);
    let regions = table.num_regions as usize;
    // An empty table is invalid either way; leave the daemon to refuse it.
    let exact_size = regions
        .checked_mul(size_of::<VhostUserMemoryRegion>())
        .and_then(|size| size.checked_add(table_size))
        .filter(|_| regions > 0);
    if let Some(exact_size) = exact_size.filter(|&size| size < message.body.len()) {
        debug!(
            "Trimming a padded SET_MEM_TABLE from {} to {exact_size} bytes (num_regions {regions})",
            message.body.len()
        );
        message.truncate_body(exact_size);
    }
}

/// Errors that mean the peer went away rather than misbehaved.
fn is_hang_up(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
    )
}

/// "error: cause: cause" for one log line.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use vhost::vhost_user::message::VhostUserHeaderFlag;

    use super::*;
    use crate::message::Header;

    fn mem_table(num_regions: u32, slots: usize) -> Message {
        let mut body = VhostUserMemory::new(num_regions).as_slice().to_vec();
        for slot in 0..slots {
            let base = 0x1000_0000 * (slot as u64 + 1);
            let region = VhostUserMemoryRegion::new(0, 0x10_0000, base, 0);
            body.extend_from_slice(region.as_slice());
        }
        let mut header = Header::request(
            FrontendReq::SET_MEM_TABLE.into(),
            VhostUserHeaderFlag::empty(),
        );
        header.size = body.len() as u32;
        Message {
            header,
            body,
            fds: Vec::new(),
        }
    }

    #[test]
    fn uml_padding_is_trimmed() {
        let mut message = mem_table(1, 2);
        assert_eq!(message.header.size, 72);
        let first_region = message.body[8..40].to_vec();
        trim_mem_table_padding(&mut message);
        assert_eq!(message.header.size, 40);
        assert_eq!(message.body.len(), 40);
        assert_eq!(&message.body[8..], &first_region[..]);
    }

    #[test]
    fn exact_and_invalid_tables_are_left_alone() {
        for (regions, slots) in [(1, 1), (2, 2), (0, 2), (3, 2), (u32::MAX, 2)] {
            let mut message = mem_table(regions, slots);
            let before = message.body.clone();
            trim_mem_table_padding(&mut message);
            assert_eq!(message.body, before, "{regions} regions in {slots} slots");
            assert_eq!(message.header.size as usize, before.len());
        }
        let mut short = mem_table(1, 0);
        short.truncate_body(4);
        trim_mem_table_padding(&mut short);
        assert_eq!(short.body.len(), 4);
    }

    #[test]
    fn protocol_features_are_tracked_as_they_pass() {
        let state = Arc::new(SessionState::default());
        let mut message = Message {
            header: Header::request(
                FrontendReq::SET_PROTOCOL_FEATURES.into(),
                VhostUserHeaderFlag::empty(),
            ),
            body: 0x2du64.to_ne_bytes().to_vec(),
            fds: Vec::new(),
        };
        message.header.size = 8;
        inspect_request(&state, &mut message).unwrap();
        assert_eq!(state.channel.acked_features(), 0x2d);
        // A malformed one is passed on for the daemon to refuse, and not tracked.
        message.body.push(0);
        message.header.size = 9;
        inspect_request(&state, &mut message).unwrap();
        assert_eq!(state.channel.acked_features(), 0x2d);
    }

    #[test]
    fn ending_shuts_down_every_socket_once() {
        let state = SessionState::default();
        let (a, b) = UnixStream::pair().unwrap();
        state.track(&a).unwrap();
        assert!(state.end());
        assert!(!state.end());
        assert!(state.ended());
        // The peer sees the hang-up.
        assert!(read_message(&b).unwrap().is_none());
        // A socket tracked after the end is shut down at once.
        let (c, d) = UnixStream::pair().unwrap();
        state.track(&c).unwrap();
        assert!(read_message(&d).unwrap().is_none());
    }
}
