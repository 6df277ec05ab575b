//! Telling a service manager that the bridge is ready: systemd's notification protocol
//! (sd_notify(3)). It is one datagram on the unix socket that `$NOTIFY_SOCKET` names, so it
//! needs no library. Sent once every device is ready to serve, when the pid file is written,
//! so that a `Type=notify` unit orders `hvisor zone start` after the moment the guest's
//! first access can be answered.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The environment variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// The notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is neither a path nor an abstract (`@`) address.
    #[error("{NOTIFY_SOCKET}={0:?} is not a unix socket address (a path or @name)")]
    Address(OsString),
    /// The socket could not be created or the datagram not sent.
    #[error("cannot notify the service manager at {address:?}")]
    Send {
        /// The value of `$NOTIFY_SOCKET`.
        address: OsString,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Sends `READY=1` (with `status` as the unit's status line) when `$NOTIFY_SOCKET` is set.
/// Returns whether a service manager was told.
pub fn notify_ready(status: &str) -> Result<bool, NotifyError> {
    let Some(address) = std::env::var_os(NOTIFY_SOCKET).filter(|a| !a.is_empty()) else {
        return Ok(false);
    };
    // A status line ends at the first newline: the message is newline-separated assignments.
    let status = status.lines().next().unwrap_or_default();
    notify(&address, &format!("READY=1\nSTATUS={status}\n"))?;
    Ok(true)
}

/// Sends `message` to the notification socket `address`: a filesystem path, or `@name` for
/// Linux's abstract namespace.
pub fn notify(address: &OsStr, message: &str) -> Result<(), NotifyError> {
    let bytes = address.as_bytes();
    let addr = match bytes.first() {
        Some(b'/') => SocketAddr::from_pathname(address),
        Some(b'@') => abstract_address(&bytes[1..]),
        _ => return Err(NotifyError::Address(address.to_owned())),
    };
    let send_err = |source| NotifyError::Send {
        address: address.to_owned(),
        source,
    };
    let addr = addr.map_err(send_err)?;
    let socket = UnixDatagram::unbound().map_err(send_err)?;
    let sent = socket
        .send_to_addr(message.as_bytes(), &addr)
        .map_err(send_err)?;
    if sent != message.len() {
        // A datagram is sent whole or not at all; this only guards the protocol's assumption.
        return Err(send_err(std::io::ErrorKind::WriteZero.into()));
    }
    Ok(())
}

fn abstract_address(name: &[u8]) -> std::io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStringExt;
    use std::path::PathBuf;

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("hvv-notify-{tag}-{}", std::process::id()))
    }

    #[test]
    fn a_path_socket_gets_the_message_as_one_datagram() {
        let path = temp_path("path");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.as_os_str(), "READY=1\nSTATUS=x\n").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x\n");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn an_abstract_socket_gets_the_message() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hvv-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        notify(OsStr::new(&format!("@{name}")), "READY=1\n").unwrap();
        let mut buf = [0u8; 16];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");
    }

    #[test]
    fn other_addresses_are_refused_with_the_value() {
        for bad in ["", "relative/sock", "vsock:2:1234"] {
            let err = notify(OsStr::new(bad), "READY=1\n").unwrap_err();
            assert!(matches!(err, NotifyError::Address(_)), "{bad}: {err}");
        }
        let err = notify(&OsString::from_vec(b"/nonexistent/notify".to_vec()), "x").unwrap_err();
        assert!(matches!(err, NotifyError::Send { .. }), "{err}");
    }
}
