//! One frontend connection relayed to one daemon connection by two threads, one per direction.

use std::collections::BTreeMap;
use std::io;
use std::mem::size_of;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};

use log::{debug, error};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserHeaderFlag, VhostUserMemory, VhostUserMemoryRegion, VhostUserU64,
    VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;

use crate::error::{error_chain, Error, Peer};
use crate::message::{read_message, write_message, Header, Message, MessageError};
use crate::notifier::{self, ConfigNotifier};
use crate::state::{lock, SessionState};

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
        // Both directions write to the frontend: replies, and the front door's own acks.
        let to_frontend = Arc::new(Mutex::new(to_frontend));
        let mut session = Session {
            state: state.clone(),
            pumps: Vec::with_capacity(2),
        };
        let inbound_state = state.clone();
        let ack_writer = to_frontend.clone();
        let inbound = move || {
            let state = inbound_state;
            let mut enables = VringEnables::default();
            let to_daemon = Mutex::new(to_daemon);
            pump(
                &state,
                &frontend,
                &to_daemon,
                Peer::Frontend,
                |mut message| {
                    inspect_request(&state, &mut message)?;
                    let routed = enables.route(&state, message);
                    if let Some(ack) = routed.ack {
                        send_ack(&ack_writer, &ack)?;
                    }
                    Ok(routed.forward)
                },
            )
        };
        let outbound = move || {
            pump(&state, &daemon, &to_frontend, Peer::Daemon, |reply| {
                Ok(if state.take_replayed_ack(&reply) {
                    Vec::new()
                } else {
                    vec![reply]
                })
            })
        };
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
        for relay in self.state.take_relays() {
            let _ = relay.join();
        }
        self.state.channel.close();
        outcome
    }
}

/// Relays whole messages from `from` to `to` until either side hangs up or a message is
/// malformed, then ends the session. `route` turns each message into the ones to write on
/// (usually just itself). Reports the error only if it is what ended the session.
fn pump(
    state: &SessionState,
    from: &UnixStream,
    to: &Mutex<UnixStream>,
    from_peer: Peer,
    mut route: impl FnMut(Message) -> Result<Vec<Message>, Error>,
) -> Result<(), Error> {
    let to_peer = match from_peer {
        Peer::Frontend => Peer::Daemon,
        Peer::Daemon => Peer::Frontend,
    };
    let outcome = loop {
        let message = match read_message(from) {
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
        let forward = match route(message) {
            Ok(forward) => forward,
            Err(e) => break Err(e),
        };
        let written = forward
            .iter()
            .try_for_each(|message| write_message(&lock(to), message));
        if let Err(source) = written {
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

/// Writes the front door's own acknowledgement to the frontend. A frontend that has gone is
/// noticed by the next read.
fn send_ack(to_frontend: &Mutex<UnixStream>, ack: &Message) -> Result<(), Error> {
    match write_message(&lock(to_frontend), ack) {
        Err(source) if !is_hang_up(&source) => Err(Error::Forward {
            peer: Peer::Frontend,
            source,
        }),
        _ => Ok(()),
    }
}

/// What becomes of one frontend request.
#[derive(Debug, Default)]
struct Routed {
    /// Messages for the daemon, in order.
    forward: Vec<Message>,
    /// The front door's own answer to the frontend.
    ack: Option<Message>,
}

impl Routed {
    fn forward(message: Message) -> Self {
        Routed {
            forward: vec![message],
            ack: None,
        }
    }
}

/// Holds back SET_VRING_ENABLE until the daemon can take it.
///
/// QEMU's virtio-net enables rings after SET_PROTOCOL_FEATURES but before SET_FEATURES. The
/// `vhost` crate refuses SET_VRING_ENABLE until VHOST_USER_F_PROTOCOL_FEATURES is acked in
/// SET_FEATURES, and ends the connection. So such requests are remembered (acked to the
/// frontend if it asks) and replayed right after the SET_FEATURES that acks the feature. The
/// daemon handles its messages in order, so they reach it after SET_FEATURES and its reply
/// precedes their acknowledgements, which the front door consumes. Without the feature the
/// daemon enables every ring on SET_FEATURES, so the remembered requests are dropped. After a
/// reset the daemon needs SET_FEATURES again, and so requests are held back again.
#[derive(Debug, Default)]
struct VringEnables {
    protocol_features_set: bool,
    /// Whether the last SET_FEATURES acked VHOST_USER_F_PROTOCOL_FEATURES.
    protocol_features_acked: bool,
    /// Queue index to the last `num` (enable) asked for.
    held: BTreeMap<u32, u32>,
}

impl VringEnables {
    fn route(&mut self, state: &SessionState, message: Message) -> Routed {
        let request = FrontendReq::try_from(message.header.request);
        match request {
            Ok(FrontendReq::SET_PROTOCOL_FEATURES) => self.protocol_features_set = true,
            // The daemon forgets the acked features (RESET_DEVICE keeps protocol features).
            Ok(FrontendReq::RESET_OWNER) => *self = VringEnables::default(),
            Ok(FrontendReq::RESET_DEVICE) => {
                self.protocol_features_acked = false;
                self.held.clear();
            }
            Ok(FrontendReq::SET_FEATURES) => {
                if let Some(features) = body_as::<VhostUserU64>(&message) {
                    return self.features_set(state, features.value, message);
                }
            }
            Ok(FrontendReq::SET_VRING_ENABLE)
                if self.protocol_features_set
                    && !self.protocol_features_acked
                    && message.fds.is_empty() =>
            {
                if let Some(vring) = body_as::<VhostUserVringState>(&message) {
                    let (index, num) = (vring.index, vring.num);
                    debug!(
                        "Holding back SET_VRING_ENABLE {num} for queue {index} until SET_FEATURES"
                    );
                    self.held.insert(index, num);
                    let ack = message
                        .header
                        .has_flag(VhostUserHeaderFlag::NEED_REPLY)
                        .then(|| Message::ack(message.header.request, 0));
                    return Routed {
                        forward: Vec::new(),
                        ack,
                    };
                }
            }
            _ => {}
        }
        Routed::forward(message)
    }

    /// Forwards SET_FEATURES, followed by the held-back requests if the daemon can take them.
    fn features_set(&mut self, state: &SessionState, features: u64, message: Message) -> Routed {
        self.protocol_features_acked =
            features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        let mut routed = Routed::forward(message);
        let held = std::mem::take(&mut self.held);
        if !self.protocol_features_acked {
            if !held.is_empty() {
                debug!("SET_FEATURES enables every ring: dropping held-back SET_VRING_ENABLE");
            }
            return routed;
        }
        let reply_ack =
            state.channel.acked_features() & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
        let flags = || {
            if reply_ack {
                VhostUserHeaderFlag::NEED_REPLY
            } else {
                VhostUserHeaderFlag::empty()
            }
        };
        for (index, num) in held {
            let header = Header::request(FrontendReq::SET_VRING_ENABLE.into(), flags());
            let body = VhostUserVringState::new(index, num).as_slice().to_vec();
            routed.forward.push(Message::new(header, body));
            if reply_ack {
                state.expect_replayed_ack();
            }
        }
        routed
    }
}

/// The body of `message` as a `T`, if it is exactly that size.
fn body_as<T: ByteValued>(message: &Message) -> Option<T> {
    T::from_slice(&message.body).copied()
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

    fn request(request: FrontendReq, flags: VhostUserHeaderFlag, body: &[u8]) -> Message {
        Message::new(Header::request(request.into(), flags), body.to_vec())
    }

    fn vring_enable(index: u32, num: u32) -> Message {
        let body = VhostUserVringState::new(index, num);
        request(
            FrontendReq::SET_VRING_ENABLE,
            VhostUserHeaderFlag::NEED_REPLY,
            body.as_slice(),
        )
    }

    fn set_features(features: u64) -> Message {
        let flags = VhostUserHeaderFlag::empty();
        request(FrontendReq::SET_FEATURES, flags, &features.to_ne_bytes())
    }

    #[test]
    fn early_vring_enables_wait_for_set_features() {
        let state = SessionState::default();
        state
            .channel
            .set_acked_features(VhostUserProtocolFeatures::REPLY_ACK.bits());
        let mut enables = VringEnables::default();
        // Before SET_PROTOCOL_FEATURES nothing is held back.
        assert_eq!(enables.route(&state, vring_enable(0, 1)).forward.len(), 1);
        let protocol = request(
            FrontendReq::SET_PROTOCOL_FEATURES,
            VhostUserHeaderFlag::empty(),
            &VhostUserProtocolFeatures::REPLY_ACK.bits().to_ne_bytes(),
        );
        enables.route(&state, protocol);
        for (index, num) in [(1, 1), (0, 0), (1, 0), (0, 1)] {
            let routed = enables.route(&state, vring_enable(index, num));
            assert!(routed.forward.is_empty());
            let ack = routed.ack.unwrap();
            assert_eq!(ack.header.request, u32::from(FrontendReq::SET_VRING_ENABLE));
            assert!(ack.header.has_flag(VhostUserHeaderFlag::REPLY));
            assert_eq!(ack.body, 0u64.to_ne_bytes());
        }
        let routed = enables.route(
            &state,
            set_features(VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()),
        );
        let replayed: Vec<_> = routed.forward[1..]
            .iter()
            .map(|message| {
                assert!(message.header.has_flag(VhostUserHeaderFlag::NEED_REPLY));
                let vring = body_as::<VhostUserVringState>(message).unwrap();
                (vring.index, vring.num)
            })
            .collect();
        // The last request per queue, in queue order, right after SET_FEATURES.
        assert_eq!(
            routed.forward[0].header.request,
            u32::from(FrontendReq::SET_FEATURES)
        );
        assert_eq!(replayed, [(0, 1), (1, 0)]);
        assert_eq!(state.owed_replayed_acks(), 2);
        // Their acks are consumed, other replies pass.
        let ack = Message::ack(FrontendReq::SET_VRING_ENABLE.into(), 0);
        let other = Message::ack(FrontendReq::SET_FEATURES.into(), 0);
        assert!(!state.take_replayed_ack(&other));
        assert!(state.take_replayed_ack(&ack));
        assert!(state.take_replayed_ack(&ack));
        assert!(!state.take_replayed_ack(&ack));

        // Once the features are acked, requests pass; after a device reset they wait again.
        assert_eq!(enables.route(&state, vring_enable(0, 1)).forward.len(), 1);
        let reset = request(FrontendReq::RESET_DEVICE, VhostUserHeaderFlag::empty(), &[]);
        enables.route(&state, reset);
        assert!(enables.route(&state, vring_enable(0, 1)).forward.is_empty());
        // Without PROTOCOL_FEATURES in SET_FEATURES they are dropped.
        assert_eq!(enables.route(&state, set_features(0)).forward.len(), 1);
        assert_eq!(state.owed_replayed_acks(), 0);
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
