//! A tolerant front door for vhost-user backends built on `vhost-user-backend` (VUB).
//!
//! [`FrontDoor`] owns the public UNIX socket that frontends connect to. For each frontend it
//! starts the VUB daemon on a private socket and relays messages between the two, so that the
//! backend can:
//!
//! * accept frontends that pad SET_MEM_TABLE (user-mode Linux sends two region slots with
//!   `num_regions` 1, which the `vhost` crate rejects): the padding is cut off on the way in;
//! * accept QEMU's virtio-net, which enables rings before SET_FEATURES (refused by the
//!   `vhost` crate): such SET_VRING_ENABLE requests are held back and replayed after it;
//! * push backend requests to the frontend, such as a configuration change after a resize
//!   ([`ConfigNotifier::config_changed`]), which VUB has no way to send.
//!
//! Every other message passes through unchanged, with its file descriptors. See the README
//! for the design.

mod error;
mod message;
mod notifier;
pub mod process;
pub mod ratelimit;
pub mod seccomp;
mod session;
mod state;

use std::ffi::OsString;
use std::fs::{self, Permissions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use log::debug;
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::mmap::NewBitmap;
use vmm_sys_util::tempdir::TempDir;

pub use error::{Error, Peer};
pub use message::MessageError;
pub use notifier::{ConfigNotifier, Delivery};
pub use process::{SocketAccess, SocketOwner};
pub use session::Session;

/// The public socket frontends connect to.
///
/// Dropping it removes the socket.
#[derive(Debug)]
pub struct FrontDoor {
    public: UnixListener,
    /// The public socket's path and its device and inode, so that drop removes only our own
    /// socket; none for an inherited socket, which is not ours to remove.
    public_path: Option<(PathBuf, (u64, u64))>,
    /// `DIR/.NAME.`: private directories for sockets not meant for frontends start with it.
    private_prefix: PathBuf,
}

impl FrontDoor {
    /// Creates the public socket at `path` with mode 0600, replacing a stale socket. A socket
    /// that a live process serves, or a file that is not a socket, is left alone.
    ///
    /// The socket is bound in a private directory (`.NAME.XXXXXX` beside it, mode 0700), given
    /// its mode and renamed into place, so it never exists with a looser mode.
    pub fn bind(path: &Path) -> Result<FrontDoor, Error> {
        Self::bind_with(path, &SocketAccess::default())
    }

    /// [`FrontDoor::bind`] with the socket's mode and owner from `access` (`--socket-mode`,
    /// `--socket-owner`), set before the socket appears at `path`.
    pub fn bind_with(path: &Path, access: &SocketAccess) -> Result<FrontDoor, Error> {
        if let Ok(metadata) = fs::symlink_metadata(path) {
            if !metadata.file_type().is_socket() {
                return Err(Error::NotASocket(path.to_owned()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::SocketInUse(path.to_owned()));
            }
        }
        let invalid = || Error::InvalidPath(path.to_owned());
        let name = path.file_name().ok_or_else(invalid)?;
        // The daemon gets its socket path as a string, and the directory template must be a
        // C string.
        if path.to_str().is_none() || path.as_os_str().as_bytes().contains(&0) {
            return Err(invalid());
        }
        let parent = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut hidden_name = OsString::from(".");
        hidden_name.push(name);
        hidden_name.push(".");
        let private_prefix = parent.join(hidden_name);

        let listen_error = |source: io::Error| Error::Listen {
            path: path.to_owned(),
            source,
        };
        let staging = private_dir(&private_prefix).map_err(listen_error)?;
        let staged = staging.as_path().join("public");
        let public = UnixListener::bind(&staged).map_err(listen_error)?;
        fs::set_permissions(&staged, Permissions::from_mode(access.mode)).map_err(listen_error)?;
        if access.owner != SocketOwner::default() {
            std::os::unix::fs::chown(&staged, access.owner.uid, access.owner.gid)
                .map_err(listen_error)?;
        }
        fs::rename(&staged, path).map_err(listen_error)?;
        let metadata = fs::symlink_metadata(path).map_err(listen_error)?;
        Ok(FrontDoor {
            public,
            public_path: Some((path.to_owned(), (metadata.dev(), metadata.ino()))),
            private_prefix,
        })
    }

    /// Takes `fd`, a listening UNIX stream socket the process inherited (`--fd`, QEMU's
    /// backend program convention), as the public socket. The caller must own `fd`: nothing
    /// else in the process may use or close it. It is closed on exec, and never unlinked.
    pub fn from_listening_fd(fd: RawFd) -> Result<FrontDoor, Error> {
        let err = |source| Error::InheritedSocket { fd, source };
        if sockopt(fd, libc::SO_DOMAIN).map_err(err)? != libc::AF_UNIX
            || sockopt(fd, libc::SO_TYPE).map_err(err)? != libc::SOCK_STREAM
            || sockopt(fd, libc::SO_ACCEPTCONN).map_err(err)? != 1
        {
            return Err(err(io::ErrorKind::InvalidInput.into()));
        }
        // SAFETY: fcntl on a descriptor checked above to be open; no memory is touched.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(err(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is an open listening socket (checked above) that the caller hands over
        // to us alone, per this function's contract.
        let public = UnixListener::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(FrontDoor {
            public,
            public_path: None,
            // No directory of our own: the daemon's private socket goes under the temporary
            // directory, in a new directory of mode 0700 as usual.
            private_prefix: std::env::temp_dir()
                .join(format!(".vhost-user-{}.", std::process::id())),
        })
    }

    /// The public socket's path; none for an inherited socket.
    pub fn path(&self) -> Option<&Path> {
        self.public_path.as_ref().map(|(path, _)| path.as_path())
    }

    /// Waits for a frontend on the public socket, has `daemon` connect to a private socket
    /// and relays between the two until either side hangs up (see [`Session::wait`]).
    ///
    /// Use [`AsRawFd`] on the front door to wait for a frontend with a timeout or alongside
    /// other events before calling this.
    pub fn accept_into<T>(&self, daemon: &mut VhostUserDaemon<T>) -> Result<Session, Error>
    where
        T: VhostUserBackend + Clone + 'static,
        T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
        T::Vring: Clone + Send + Sync,
    {
        let frontend = loop {
            match self.public.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Accept(e)),
            }
        };
        let daemon_stream = self.connect_daemon(daemon)?;
        Session::start(frontend, daemon_stream)
    }

    /// Has the daemon connect to a private socket that exists only for this: a new directory
    /// (mode 0700) that is removed as soon as the connection is made, so that nothing is left
    /// behind even if the process is killed later.
    fn connect_daemon<T>(&self, daemon: &mut VhostUserDaemon<T>) -> Result<UnixStream, Error>
    where
        T: VhostUserBackend + Clone + 'static,
        T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
        T::Vring: Clone + Send + Sync,
    {
        let dir = private_dir(&self.private_prefix).map_err(Error::PrivateSocket)?;
        let path = dir.as_path().join("daemon");
        // Checked in bind: the prefix is UTF-8, and so is what mkdtemp and we appended.
        let path_str = path
            .to_str()
            .ok_or_else(|| Error::InvalidPath(path.clone()))?;
        let listener = UnixListener::bind(&path).map_err(Error::PrivateSocket)?;
        // start_client returns once connected, so the connection is already queued; a
        // non-blocking accept cannot wait for anyone else.
        listener
            .set_nonblocking(true)
            .map_err(Error::PrivateSocket)?;
        daemon.start_client(path_str).map_err(Error::StartDaemon)?;
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Error::DaemonMissing),
            Err(e) => return Err(Error::Accept(e)),
        };
        stream.set_nonblocking(false).map_err(Error::Accept)?;
        debug!("Vhost-user daemon connected through {}", path.display());
        Ok(stream)
    }
}

/// An integer socket option of `fd` (SOL_SOCKET level).
fn sockopt(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given; a bad fd or a
    // non-socket fails with -1.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// A new directory `PREFIXxxxxxx` with mode 0700, removed when dropped.
fn private_dir(prefix: &Path) -> io::Result<TempDir> {
    TempDir::new_with_prefix(prefix).map_err(|e| io::Error::from_raw_os_error(e.errno()))
}

impl AsRawFd for FrontDoor {
    /// The public listening socket: readable when a frontend is waiting.
    fn as_raw_fd(&self) -> RawFd {
        self.public.as_raw_fd()
    }
}

impl Drop for FrontDoor {
    fn drop(&mut self) {
        // Only remove the socket if it is still ours (not replaced by another backend).
        let Some((path, id)) = &self.public_path else {
            return;
        };
        if let Ok(metadata) = fs::symlink_metadata(path) {
            if (metadata.dev(), metadata.ino()) == *id {
                let _ = fs::remove_file(path);
            }
        }
    }
}
