//! The front door's errors, and the two ends of a session they name.

use std::io;
use std::path::PathBuf;

use crate::message::MessageError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    #[error("Socket {} is in use by a running backend", .0.display())]
    SocketInUse(PathBuf),
    #[error("Socket path {} must be a UTF-8 path naming a file", .0.display())]
    InvalidPath(PathBuf),
    #[error("Cannot create the socket {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("File descriptor {fd} is not a listening UNIX stream socket")]
    InheritedSocket {
        fd: std::os::fd::RawFd,
        #[source]
        source: io::Error,
    },
    #[error("Cannot accept a connection")]
    Accept(#[source] io::Error),
    #[error("Cannot create the daemon's private socket")]
    PrivateSocket(#[source] io::Error),
    #[error("Cannot start the vhost-user daemon: {0}")]
    StartDaemon(vhost_user_backend::Error),
    #[error("The vhost-user daemon did not connect to the front door")]
    DaemonMissing,
    #[error("Cannot set up the session relay")]
    SessionSetup(#[source] io::Error),
    #[error("Cannot read a message from the {peer}")]
    Receive {
        peer: Peer,
        #[source]
        source: MessageError,
    },
    #[error("Cannot forward a message to the {peer}")]
    Forward {
        peer: Peer,
        #[source]
        source: io::Error,
    },
    #[error("Cannot create the backend channel relay")]
    Relay(#[source] io::Error),
    #[error("Cannot use the backend channel")]
    BackendChannel(#[source] MessageError),
    #[error("The frontend closed the backend channel")]
    BackendChannelClosed,
    #[error("Unexpected reply on the backend channel: {0}")]
    UnexpectedReply(String),
    #[error("The frontend answered the configuration change with error {0:#x}")]
    Refused(u64),
}

/// The two ends of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    Frontend,
    Daemon,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Peer::Frontend => "frontend",
            Peer::Daemon => "vhost-user daemon",
        })
    }
}

/// `error` followed by each of its sources, for one log line.
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
