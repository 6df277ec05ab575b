//! What one session's threads share: the frontend's backend channel and the session's
//! sockets. A leaf below `notifier` and `session`, so that neither needs the other for it.

use std::io;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use log::{debug, error};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};

use crate::error::Error;
use crate::message::{read_message, write_message, Message, MessageError};

/// The frontend's end of the backend channel, plus what the frontend negotiated.
#[derive(Debug, Default)]
pub(crate) struct BackendChannel {
    /// Protocol features from the frontend's SET_PROTOCOL_FEATURES.
    acked_features: AtomicU64,
    /// The outer lock only swaps channels; the inner one is held for a request and its reply.
    stream: Mutex<Option<Arc<Mutex<UnixStream>>>>,
}

/// What came of one request on the channel.
#[derive(Debug)]
pub(crate) enum Exchange {
    NoChannel,
    Sent,
    Replied(Message),
}

impl BackendChannel {
    pub(crate) fn set_acked_features(&self, features: u64) {
        self.acked_features.store(features, Ordering::Release);
    }

    pub(crate) fn acked_features(&self) -> u64 {
        self.acked_features.load(Ordering::Acquire)
    }

    pub(crate) fn install(&self, stream: UnixStream) {
        *lock(&self.stream) = Some(Arc::new(Mutex::new(stream)));
    }

    pub(crate) fn close(&self) {
        *lock(&self.stream) = None;
    }

    /// Sends `request` and, if it asks for one, waits for the reply. A channel that fails
    /// is dropped: after a lost or garbled reply it can no longer pair replies with requests.
    pub(crate) fn request(&self, request: &Message) -> Result<Exchange, Error> {
        let Some(channel) = lock(&self.stream).clone() else {
            return Ok(Exchange::NoChannel);
        };
        let result = exchange(&lock(&channel), request);
        if result.is_err() {
            let mut current = lock(&self.stream);
            if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, &channel)) {
                *current = None;
            }
        }
        result
    }
}

fn exchange(stream: &UnixStream, request: &Message) -> Result<Exchange, Error> {
    write_message(stream, request).map_err(|e| Error::BackendChannel(MessageError::Io(e)))?;
    if !request.header.has_flag(VhostUserHeaderFlag::NEED_REPLY) {
        return Ok(Exchange::Sent);
    }
    match read_message(stream) {
        Ok(Some(reply)) => Ok(Exchange::Replied(reply)),
        Ok(None) => Err(Error::BackendChannelClosed),
        Err(e) => Err(Error::BackendChannel(e)),
    }
}

/// State shared by the relay threads of a session and its [`ConfigNotifier`]s.
#[derive(Debug, Default)]
pub(crate) struct SessionState {
    pub(crate) channel: BackendChannel,
    ended: AtomicBool,
    /// A handle on every socket of the session, all shut down together when it ends.
    sockets: Mutex<Vec<UnixStream>>,
    /// Threads relaying the daemon's own backend requests (see `notifier`).
    relays: Mutex<Vec<JoinHandle<()>>>,
    /// Acknowledgements the daemon owes for SET_VRING_ENABLE requests the front door replayed
    /// (see `VringEnables` in `session`): consumed, never forwarded to the frontend.
    replayed_acks: AtomicUsize,
}

impl SessionState {
    pub(crate) fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Ends the session: every socket is shut down, so that every thread blocked on one
    /// returns. True for the caller that ended it, false if it had already ended.
    pub(crate) fn end(&self) -> bool {
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

    /// The relay threads started so far, for the caller to join once the session ended.
    pub(crate) fn take_relays(&self) -> Vec<JoinHandle<()>> {
        lock(&self.relays).drain(..).collect()
    }

    /// The front door replayed a SET_VRING_ENABLE with REPLY_ACK: the daemon owes one more
    /// acknowledgement that is not the frontend's (see [`Self::take_replayed_ack`]).
    pub(crate) fn expect_replayed_ack(&self) {
        self.replayed_acks.fetch_add(1, Ordering::AcqRel);
    }

    #[cfg(test)]
    pub(crate) fn owed_replayed_acks(&self) -> usize {
        self.replayed_acks.load(Ordering::Acquire)
    }

    /// Consumes `reply` if it acknowledges a SET_VRING_ENABLE that the front door replayed.
    /// The daemon answers in order, so the next such replies are ours.
    pub(crate) fn take_replayed_ack(&self, reply: &Message) -> bool {
        let is_enable_ack = reply.header.request == u32::from(FrontendReq::SET_VRING_ENABLE)
            && reply.header.has_flag(VhostUserHeaderFlag::REPLY);
        if !is_enable_ack
            || self
                .replayed_acks
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_err()
        {
            return false;
        }
        match <[u8; 8]>::try_from(reply.body.as_slice()).map(u64::from_ne_bytes) {
            Ok(0) => debug!("The daemon enabled a ring held back for SET_FEATURES"),
            status => error!("The daemon refused a held-back SET_VRING_ENABLE: {status:?}"),
        }
        true
    }
}

pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
