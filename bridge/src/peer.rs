//! Who serves a vhost-user socket: the bridge hands every backend the fd of guest memory
//! (on hvisor, `/dev/hvisor`), so it checks the process at the other end (`SO_PEERCRED`)
//! before it sends anything.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};

/// Who may serve a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// A backend the bridge started: that very process (a wrapper script must `exec` it).
    Spawned {
        /// The pid the bridge started.
        pid: u32,
    },
    /// A backend someone else runs: any process of these users.
    External {
        /// The allowed uids.
        uids: Vec<u32>,
    },
}

/// The socket is served by a process the bridge must not talk to.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The kernel did not say who is at the other end.
    #[error("Cannot learn which process serves {}", .socket.display())]
    Credentials {
        /// The socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process than the backend the bridge started serves the socket.
    #[error(
        "{} is served by process {pid}, not by the backend the bridge started (pid {expected}); \
         a wrapper program must exec the backend",
        .socket.display()
    )]
    NotSpawned {
        /// The socket.
        socket: PathBuf,
        /// Who serves it (0: a process outside the bridge's pid namespace).
        pid: u32,
        /// Whom the bridge started.
        expected: u32,
    },
    /// An external backend runs as a user the bridge does not trust.
    #[error(
        "{} is served by process {pid} of uid {uid}, which may not serve the bridge \
         (allowed: {}; allow more with --backend-uid)",
        .socket.display(),
        .allowed.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
    )]
    UidNotAllowed {
        /// The socket.
        socket: PathBuf,
        /// Who serves it.
        pid: u32,
        /// Its uid.
        uid: u32,
        /// The uids that may.
        allowed: Vec<u32>,
    },
}

/// The pid and uid of the process that created the other end of `socket`: for a backend,
/// the process that listens on its socket.
pub fn credentials(socket: BorrowedFd<'_>) -> io::Result<libc::ucred> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED writes at most `len` bytes into `credentials`, which is a ucred
    // of that size; the descriptor is borrowed for the call.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::addr_of_mut!(credentials).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials)
}

/// Checks that the process at the other end of `connection` (to `socket`) is `expected`.
pub fn check(
    connection: BorrowedFd<'_>,
    socket: &Path,
    expected: &ExpectedPeer,
) -> Result<(), PeerError> {
    let peer = credentials(connection).map_err(|source| PeerError::Credentials {
        socket: socket.to_path_buf(),
        source,
    })?;
    // A peer in a pid namespace this process cannot see reads as pid 0.
    let pid = u32::try_from(peer.pid).unwrap_or(0);
    match expected {
        ExpectedPeer::Spawned { pid: expected } if pid != *expected => Err(PeerError::NotSpawned {
            socket: socket.to_path_buf(),
            pid,
            expected: *expected,
        }),
        ExpectedPeer::External { uids } if !uids.contains(&peer.uid) => {
            Err(PeerError::UidNotAllowed {
                socket: socket.to_path_buf(),
                pid,
                uid: peer.uid,
                allowed: uids.clone(),
            })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_peer_of_a_socket_pair_is_this_process() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let socket = Path::new("pair");
        let me = std::process::id();
        // SAFETY: getuid cannot fail and touches no memory.
        let uid = unsafe { libc::getuid() };
        check(ours.as_fd(), socket, &ExpectedPeer::Spawned { pid: me }).unwrap();
        let e = check(ours.as_fd(), socket, &ExpectedPeer::Spawned { pid: me + 1 }).unwrap_err();
        assert!(
            matches!(e, PeerError::NotSpawned { pid, .. } if pid == me),
            "{e}"
        );
        check(
            ours.as_fd(),
            socket,
            &ExpectedPeer::External { uids: vec![uid] },
        )
        .unwrap();
        let others = vec![uid.wrapping_add(1), uid.wrapping_add(2)];
        let e = check(
            ours.as_fd(),
            socket,
            &ExpectedPeer::External { uids: others },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("of uid {uid}, which may not serve")),
            "{e}"
        );
    }
}
