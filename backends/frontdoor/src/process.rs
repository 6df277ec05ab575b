//! Process scaffolding every backend shares: where it listens and what it tells a
//! management tool ([`ListenArgs`], after QEMU's vhost-user "backend program conventions");
//! the stop signals, read by one thread with `sigwait`; waiting for a frontend or a
//! shutdown; and error chains on one log line.

use std::fmt;
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::thread;

use log::{error, info};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::signal::{block_signal, create_sigset};

/// The options that say where a backend listens for its frontend, shared by every backend.
#[derive(Debug, Clone, clap::Args)]
pub struct ListenArgs {
    /// Unix socket to listen on for vhost-user frontends.
    #[arg(short = 's', long, value_name = "PATH", required_unless_present = "fd")]
    pub socket_path: Option<PathBuf>,
    /// Listen on this inherited file descriptor instead: a UNIX stream socket that is
    /// already listening (for a manager that creates the socket itself).
    #[arg(long, value_name = "FD", conflicts_with = "socket_path")]
    pub fd: Option<RawFd>,
    /// Print the backend's type and optional features as JSON, for management tools, and
    /// exit.
    #[arg(long, exclusive = true)]
    pub print_capabilities: bool,
    /// Mode of the socket created at --socket-path, in octal (e.g. 660 to let a group of
    /// frontends connect, such as a QEMU that does not run as root).
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = parse_mode, conflicts_with = "fd")]
    pub socket_mode: u32,
    /// Owner of the socket created at --socket-path: USER[:GROUP], names or numeric ids.
    #[arg(long, value_name = "USER[:GROUP]", value_parser = parse_owner, conflicts_with = "fd")]
    pub socket_owner: Option<SocketOwner>,
}

/// Who owns a socket the backend creates; `None` keeps the backend's own id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SocketOwner {
    /// User id.
    pub uid: Option<u32>,
    /// Group id.
    pub gid: Option<u32>,
}

/// Who may connect to a socket the backend creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits.
    pub mode: u32,
    /// Owner and group, when not the backend's own.
    pub owner: SocketOwner,
}

impl Default for SocketAccess {
    /// Only the backend's user may connect.
    fn default() -> Self {
        Self {
            mode: 0o600,
            owner: SocketOwner::default(),
        }
    }
}

fn parse_mode(text: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(text, 8).map_err(|e| format!("not an octal mode: {e}"))?;
    if mode & !0o777 != 0 {
        return Err(format!(
            "{text}: only permission bits (at most 777) may be given"
        ));
    }
    if mode & 0o600 != 0o600 {
        return Err(format!(
            "{text}: the backend's own user must keep read and write"
        ));
    }
    Ok(mode)
}

fn parse_owner(text: &str) -> Result<SocketOwner, String> {
    let (user, group) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    let uid = (!user.is_empty())
        .then(|| lookup_id(user, Database::User))
        .transpose()?;
    let gid = group
        .filter(|g| !g.is_empty())
        .map(|g| lookup_id(g, Database::Group))
        .transpose()?;
    Ok(SocketOwner { uid, gid })
}

#[derive(Clone, Copy)]
enum Database {
    User,
    Group,
}

/// A numeric id as is, else the id of the user or group of that name.
fn lookup_id(name: &str, database: Database) -> Result<u32, String> {
    if let Ok(id) = name.parse::<u32>() {
        return Ok(id);
    }
    let c_name = std::ffi::CString::new(name).map_err(|_| format!("{name:?}: not a name"))?;
    let mut buf = vec![0u8; 16 * 1024];
    let mut result: *mut libc::c_void = std::ptr::null_mut();
    let (rc, id) = match database {
        Database::User => {
            // SAFETY: a zeroed passwd is a valid out-parameter for getpwnam_r.
            let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
            // SAFETY: every pointer is valid for the call; `buf` outlives `entry`'s strings,
            // which are not used after it.
            let rc = unsafe {
                libc::getpwnam_r(
                    c_name.as_ptr(),
                    &mut entry,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    (&raw mut result).cast(),
                )
            };
            (rc, entry.pw_uid)
        }
        Database::Group => {
            // SAFETY: a zeroed group is a valid out-parameter for getgrnam_r.
            let mut entry: libc::group = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let rc = unsafe {
                libc::getgrnam_r(
                    c_name.as_ptr(),
                    &mut entry,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    (&raw mut result).cast(),
                )
            };
            (rc, entry.gr_gid)
        }
    };
    let what = match database {
        Database::User => "user",
        Database::Group => "group",
    };
    match (rc, result.is_null()) {
        (0, false) => Ok(id),
        (0, true) => Err(format!("no {what} named {name:?}")),
        (errno, _) => Err(format!(
            "cannot look up {what} {name:?}: {}",
            io::Error::from_raw_os_error(errno)
        )),
    }
}

/// Where a backend listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A socket it creates at this path, with this access.
    Path(PathBuf, SocketAccess),
    /// An inherited listening socket.
    Fd(RawFd),
}

impl ListenArgs {
    /// Where to listen; `None` only with `--print-capabilities`, which the caller handles
    /// first (clap requires one of the two otherwise).
    pub fn listen(&self) -> Option<Listen> {
        match (&self.socket_path, self.fd) {
            (_, Some(fd)) => Some(Listen::Fd(fd)),
            (Some(path), None) => Some(Listen::Path(
                path.clone(),
                SocketAccess {
                    mode: self.socket_mode,
                    owner: self.socket_owner.unwrap_or_default(),
                },
            )),
            (None, None) => None,
        }
    }
}

impl Listen {
    /// Opens the front door there.
    pub fn bind(&self) -> Result<crate::FrontDoor, crate::Error> {
        match self {
            Listen::Path(path, access) => crate::FrontDoor::bind_with(path, access),
            Listen::Fd(fd) => crate::FrontDoor::from_listening_fd(*fd),
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Path(path, _) => write!(f, "{}", path.display()),
            Listen::Fd(fd) => write!(f, "inherited fd {fd}"),
        }
    }
}

/// The `--print-capabilities` document: `{"type": ..., "features": [...]}`, where the type
/// and the feature names are those of QEMU's vhost-user schema (plain lower-case words, so
/// they need no escaping).
pub fn capabilities_json(device_type: &str, features: &[&str]) -> String {
    let features: Vec<String> = features.iter().map(|f| format!("\"{f}\"")).collect();
    format!(
        "{{\n  \"type\": \"{device_type}\",\n  \"features\": [{}]\n}}",
        features.join(", ")
    )
}

/// What the signal thread does after a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalAction {
    /// Keep waiting for signals.
    Continue,
    /// The backend is stopping; the thread ends.
    Stop,
}

/// Blocks `signals` in this thread and every thread spawned after it, so that only the
/// signal thread's `sigwait` sees them. Call it before spawning any thread.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    for &signal in signals {
        match block_signal(signal) {
            Ok(()) | Err(vmm_sys_util::signal::Error::SignalAlreadyBlocked(_)) => {}
            Err(e) => return Err(io::Error::other(e.to_string())),
        }
    }
    Ok(())
}

/// Starts the thread that waits for `signals` and hands each to `on_signal`, until it
/// answers [`SignalAction::Stop`].
pub fn spawn_signal_thread<F>(signals: &[libc::c_int], mut on_signal: F) -> io::Result<()>
where
    F: FnMut(libc::c_int) -> SignalAction + Send + 'static,
{
    let set = create_sigset(signals).map_err(io::Error::from)?;
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set and `signal` a writable int.
            let ret = unsafe { libc::sigwait(&set, &mut signal) };
            if ret != 0 {
                error!("sigwait failed: {}", io::Error::from_raw_os_error(ret));
                continue;
            }
            if on_signal(signal) == SignalAction::Stop {
                info!("Signal {signal}: shutting down");
                return;
            }
        })?;
    Ok(())
}

/// Waits until `fd` is readable (true) or `stopping()` holds (false). `wake` is an eventfd
/// the shutdown path writes so that the wait notices it.
pub fn wait_readable(fd: RawFd, wake: RawFd, stopping: impl Fn() -> bool) -> io::Result<bool> {
    const READY: u64 = 0;
    const WAKE: u64 = 1;
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, READY),
    )?;
    epoll.ctl(
        ControlOperation::Add,
        wake,
        EpollEvent::new(EventSet::IN, WAKE),
    )?;
    let mut events = [EpollEvent::default(); 2];
    loop {
        if stopping() {
            return Ok(false);
        }
        match epoll.wait(-1, &mut events) {
            Ok(count) => {
                if events[..count].iter().any(|event| event.data() == READY) {
                    return Ok(!stopping());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// "error: cause: cause", for one log line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

/// One exit event per worker thread of a vhost-user-backend daemon: the backend keeps the
/// originals and hands out duplicates from `VhostUserBackend::exit_event`.
#[derive(Debug)]
pub struct WorkerExitEvents(Vec<(EventConsumer, EventNotifier)>);

impl WorkerExitEvents {
    /// Events for `threads` worker threads.
    pub fn new(threads: usize) -> io::Result<Self> {
        (0..threads)
            .map(|_| new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC))
            .collect::<io::Result<Vec<_>>>()
            .map(Self)
    }

    /// Duplicates of thread `index`'s event, for `VhostUserBackend::exit_event`.
    pub fn for_thread(&self, index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // VUB 0.24 registers the consumer by raw fd and never closes it, so each connection
        // leaks this duplicate (one descriptor per worker thread); the originals close with
        // the backend.
        let (consumer, notifier) = self.0.get(index)?;
        match (consumer.try_clone(), notifier.try_clone()) {
            (Ok(consumer), Ok(notifier)) => Some((consumer, notifier)),
            (Err(e), _) | (_, Err(e)) => {
                error!("Cannot duplicate the exit event of worker {index}: {e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_modes_are_octal_permission_bits_that_keep_the_owner() {
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert!(parse_mode("1777").is_err(), "sticky and other bits");
        assert!(
            parse_mode("066").is_err(),
            "the backend's user must keep rw"
        );
        assert!(parse_mode("rw").is_err());
    }

    #[test]
    fn socket_owners_are_names_or_ids() {
        let ids = |uid, gid| SocketOwner { uid, gid };
        assert_eq!(
            parse_owner("65534:65534"),
            Ok(ids(Some(65534), Some(65534)))
        );
        assert_eq!(parse_owner("root"), Ok(ids(Some(0), None)));
        assert_eq!(parse_owner(":root"), Ok(ids(None, Some(0))));
        assert!(parse_owner("no-such-user-here").is_err());
        assert!(parse_owner("root:no-such-group-here").is_err());
    }
}
