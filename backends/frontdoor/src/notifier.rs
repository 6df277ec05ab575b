//! The backend channel: requests from the backend to the frontend (BACKEND_REQ).
//!
//! When the frontend hands over its end of the channel (SET_BACKEND_REQ_FD), the front door
//! keeps it and gives the daemon one end of a new socket pair instead. The front door is
//! then the only writer on the frontend's channel: [`ConfigNotifier`] sends its own requests
//! there, and a relay thread forwards the daemon's requests (VUB's `Backend`, used for
//! shared objects and memory maps). One lock per channel keeps every request and its
//! acknowledgement together.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::warn;
use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag};
use vhost::vhost_user::VhostUserProtocolFeatures;

use crate::error::{error_chain, Error};
use crate::message::{read_message, write_message, Header, Message};
use crate::state::{Exchange, SessionState};

/// How long the frontend may take to acknowledge a backend request. Past that the channel
/// is out of step (a late reply would answer the next request), so it is dropped.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a configuration change notification went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The frontend acknowledged it (REPLY_ACK negotiated).
    Acknowledged,
    /// Sent without asking for an acknowledgement (REPLY_ACK not negotiated).
    Sent,
    /// Not sent: the frontend has not negotiated BACKEND_REQ and CONFIG, has not set up the
    /// channel yet, or has gone. It sees the change on its next configuration read.
    NoChannel,
}

/// Pushes configuration-change notifications to one session's frontend. Cheap to clone and
/// usable from any thread; after the session ends it reports [`Delivery::NoChannel`].
#[derive(Clone, Debug)]
pub struct ConfigNotifier {
    state: Arc<SessionState>,
}

impl ConfigNotifier {
    pub(crate) fn new(state: Arc<SessionState>) -> Self {
        ConfigNotifier { state }
    }

    /// Tells the frontend that the device configuration space changed (CONFIG_CHANGE_MSG),
    /// so that it re-reads it and raises a configuration interrupt. Update what GET_CONFIG
    /// returns first. With REPLY_ACK this waits for the frontend's acknowledgement.
    pub fn config_changed(&self) -> Result<Delivery, Error> {
        let features =
            VhostUserProtocolFeatures::from_bits_truncate(self.state.channel.acked_features());
        let needed = VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::CONFIG;
        if self.state.ended() || !features.contains(needed) {
            return Ok(Delivery::NoChannel);
        }
        let flags = if features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        let request = Message {
            header: Header::request(BackendReq::CONFIG_CHANGE_MSG.into(), flags),
            ..Message::default()
        };
        match self.state.channel.request(&request)? {
            Exchange::NoChannel => Ok(Delivery::NoChannel),
            Exchange::Sent => Ok(Delivery::Sent),
            Exchange::Replied(reply) => check_ack(&reply),
        }
    }
}

fn check_ack(reply: &Message) -> Result<Delivery, Error> {
    let header = reply.header;
    if header.request != u32::from(BackendReq::CONFIG_CHANGE_MSG)
        || !header.has_flag(VhostUserHeaderFlag::REPLY)
    {
        return Err(Error::UnexpectedReply(format!(
            "request {} with flags {:#x}",
            header.request, header.flags
        )));
    }
    let Ok(status) = <[u8; 8]>::try_from(reply.body.as_slice()) else {
        return Err(Error::UnexpectedReply(format!(
            "{} bytes instead of a status",
            reply.body.len()
        )));
    };
    match u64::from_ne_bytes(status) {
        0 => Ok(Delivery::Acknowledged),
        status => Err(Error::Refused(status)),
    }
}

/// Keeps the frontend's channel from a SET_BACKEND_REQ_FD (one descriptor) and puts the
/// daemon's end of a relayed socket pair in the message in its place.
pub(crate) fn take_over_backend_channel(
    state: &Arc<SessionState>,
    message: &mut Message,
) -> Result<(), Error> {
    let Some(fd) = message.fds.pop() else {
        return Ok(());
    };
    let frontend_end = UnixStream::from(fd);
    if let Err(e) = frontend_end.set_read_timeout(Some(ACK_TIMEOUT)) {
        // Not a socket: pass it on unchanged for the daemon to judge.
        warn!("SET_BACKEND_REQ_FD carries an unusable descriptor: {e}");
        message.fds.push(OwnedFd::from(frontend_end));
        return Ok(());
    }
    let (daemon_end, relay_end) = UnixStream::pair().map_err(Error::Relay)?;
    state.track(&frontend_end).map_err(Error::Relay)?;
    state.track(&relay_end).map_err(Error::Relay)?;
    let relay_state = state.clone();
    let relay = thread::Builder::new()
        .name("frontdoor-relay".into())
        .spawn(move || relay_daemon_requests(&relay_state, &relay_end))
        .map_err(Error::SessionSetup)?;
    state.add_relay(relay);
    state.channel.install(frontend_end);
    message.fds.push(OwnedFd::from(daemon_end));
    Ok(())
}

/// Forwards the daemon's backend requests to the frontend, and the replies back, until the
/// daemon drops its end or the session ends.
fn relay_daemon_requests(state: &SessionState, from_daemon: &UnixStream) {
    loop {
        let request = match read_message(from_daemon) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                warn!(
                    "Backend request from the daemon dropped: {}",
                    error_chain(&e)
                );
                return;
            }
        };
        match state.channel.request(&request) {
            Ok(Exchange::Replied(reply)) => {
                if let Err(e) = write_message(from_daemon, &reply) {
                    warn!("Cannot pass a backend-channel reply to the daemon: {e}");
                    return;
                }
            }
            Ok(Exchange::Sent) => {}
            Ok(Exchange::NoChannel) => return,
            Err(e) => {
                warn!("Cannot relay a backend request: {}", error_chain(&e));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BackendChannel;

    fn reply(request: BackendReq, flags: u32, body: &[u8]) -> Message {
        Message {
            header: Header {
                request: request.into(),
                flags,
                size: body.len() as u32,
            },
            body: body.to_vec(),
            fds: Vec::new(),
        }
    }

    #[test]
    fn acknowledgements_are_checked() {
        let ok = reply(BackendReq::CONFIG_CHANGE_MSG, 0x5, &0u64.to_ne_bytes());
        assert_eq!(check_ack(&ok).unwrap(), Delivery::Acknowledged);
        let refused = reply(BackendReq::CONFIG_CHANGE_MSG, 0x5, &22u64.to_ne_bytes());
        assert!(matches!(check_ack(&refused), Err(Error::Refused(22))));
        let not_a_reply = reply(BackendReq::CONFIG_CHANGE_MSG, 0x1, &0u64.to_ne_bytes());
        assert!(matches!(
            check_ack(&not_a_reply),
            Err(Error::UnexpectedReply(_))
        ));
        let other = reply(BackendReq::VRING_CALL, 0x5, &0u64.to_ne_bytes());
        assert!(matches!(check_ack(&other), Err(Error::UnexpectedReply(_))));
        let short = reply(BackendReq::CONFIG_CHANGE_MSG, 0x5, &[0; 4]);
        assert!(matches!(check_ack(&short), Err(Error::UnexpectedReply(_))));
    }

    #[test]
    fn a_failed_channel_is_dropped() {
        let channel = BackendChannel::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        channel.install(ours);
        drop(theirs);
        let request = Message {
            header: Header::request(
                BackendReq::CONFIG_CHANGE_MSG.into(),
                VhostUserHeaderFlag::NEED_REPLY,
            ),
            ..Message::default()
        };
        assert!(channel.request(&request).is_err());
        assert!(matches!(channel.request(&request), Ok(Exchange::NoChannel)));
    }

    #[test]
    fn notifications_need_backend_req_and_config() {
        let state = Arc::new(SessionState::default());
        let notifier = ConfigNotifier::new(state.clone());
        let (ours, theirs) = UnixStream::pair().unwrap();
        state.channel.install(ours);
        for features in [
            VhostUserProtocolFeatures::CONFIG,
            VhostUserProtocolFeatures::BACKEND_REQ,
        ] {
            state.channel.set_acked_features(features.bits());
            assert_eq!(notifier.config_changed().unwrap(), Delivery::NoChannel);
        }
        // Without REPLY_ACK the message goes out without NEED_REPLY and nothing is awaited.
        state.channel.set_acked_features(
            (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::BACKEND_REQ).bits(),
        );
        assert_eq!(notifier.config_changed().unwrap(), Delivery::Sent);
        let sent = read_message(&theirs).unwrap().unwrap();
        assert_eq!(
            sent.header,
            Header::request(
                BackendReq::CONFIG_CHANGE_MSG.into(),
                VhostUserHeaderFlag::empty()
            )
        );
        assert!(sent.body.is_empty() && sent.fds.is_empty());
    }
}
