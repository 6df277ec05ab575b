//! Console device logic, independent of vhost-user: the host side of each port
//! ([`ConsoleHost`], with pty, UNIX socket, file and stdio implementations), the readiness
//! plumbing that wakes the device when a host can make progress ([`HostEvents`]), and the
//! MULTIPORT control protocol ([`ConsoleDevice`]).
//!
//! Hosts never block and never drop bytes. A host that cannot take output or has no input
//! says so with [`io::ErrorKind::WouldBlock`]; the device then leaves the guest's buffers
//! where they are and tries again after the host's next readiness event.

use std::collections::VecDeque;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::virtio_console::{event, ControlHeader, CONTROL_HEADER_LEN};

/// The ioctls this backend makes, for its seccomp filter: terminal attributes and window
/// size, and opening a pty (TIOCGPTN and TIOCSPTLCK from grantpt, unlockpt and ptsname,
/// TIOCGPTPEER from newer C libraries).
// The constants are c_ulong on some targets and c_int on others.
#[allow(clippy::unnecessary_cast)]
pub const SECCOMP_IOCTLS: &[u64] = &[
    libc::TCSETS as u64,
    libc::TCSETSW as u64,
    libc::TCSETSF as u64,
    libc::TIOCGWINSZ as u64,
    libc::TIOCSWINSZ as u64,
    libc::TIOCGPTN as u64,
    libc::TIOCSPTLCK as u64,
    libc::TIOCGPTPEER as u64,
];

/// What a console reports as its size when the host has no terminal.
pub const DEFAULT_WINDOW: WindowSize = WindowSize { cols: 80, rows: 25 };

/// Guest output kept for a socket client that is not attached.
pub const DEFAULT_SOCKET_BUFFER: usize = 1 << 20;

/// Longest port name sent in PORT_NAME.
pub const MAX_PORT_NAME: usize = 255;

/// A console's size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

/// The host side of one console port: where guest output goes and where host input comes
/// from. Every call returns at once; see the module documentation.
pub trait ConsoleHost: Send + Sync + fmt::Debug {
    /// Registers the host's descriptors; called once, before any other method.
    fn attach(&mut self, events: HostEvents) -> io::Result<()>;

    /// Reads host input into `buf`. `WouldBlock` when there is none now, including after
    /// the input ended.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Offers guest output; returns how many leading bytes of `data` the host took.
    /// `WouldBlock` when it can take none now. Other errors mean the output is broken.
    fn write(&mut self, data: &[u8]) -> io::Result<usize>;

    /// Handles readiness of the descriptor registered as `slot`.
    fn handle_event(&mut self, slot: u8, events: EventSet);

    /// The terminal size, when the host has a terminal with a size set.
    fn window_size(&self) -> Option<WindowSize> {
        None
    }
}

/// The registry where a host's descriptors are watched: edge-triggered, for input, output
/// and hang-ups, and reported back to the host through [`ConsoleHost::handle_event`].
#[derive(Clone, Debug)]
pub struct HostEvents {
    epoll: Arc<Epoll>,
    port: u16,
}

impl HostEvents {
    /// Watches `fd`, reporting its readiness as `slot`.
    pub fn watch(&self, fd: RawFd, slot: u8) -> io::Result<()> {
        let events =
            EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(events, token(self.port, slot)),
        )
    }

    /// Stops watching `fd` (before it is closed).
    pub fn unwatch(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

fn token(port: u16, slot: u8) -> u64 {
    u64::from(port) << 8 | u64::from(slot)
}

fn would_block() -> io::Error {
    io::ErrorKind::WouldBlock.into()
}

/// Treats a descriptor that epoll refuses (a regular file or /dev/null, which are always
/// ready) as needing no watch.
fn watch_if_pollable(events: &HostEvents, fd: RawFd, slot: u8) -> io::Result<()> {
    match events.watch(fd, slot) {
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
        result => result,
    }
}

fn set_nonblocking(fd: RawFd) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFL on a descriptor this process owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL with flags read just above; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// The size of the terminal behind `fd`, if it is one with a size set.
fn terminal_size(fd: RawFd) -> Option<WindowSize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass; an fd that is not a
    // terminal just fails.
    let ret = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut size) };
    (ret == 0 && size.ws_col != 0 && size.ws_row != 0).then_some(WindowSize {
        cols: size.ws_col,
        rows: size.ws_row,
    })
}

fn get_termios(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; all-zero is a valid value that tcgetattr overwrites.
    let mut termios: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into the struct we pass.
    if unsafe { libc::tcgetattr(fd, &mut termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(termios)
}

fn set_termios(fd: RawFd, termios: &libc::termios) -> io::Result<()> {
    // SAFETY: tcsetattr only reads the termios we pass.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, termios) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Raw mode: bytes pass unchanged in both directions, with no echo and no line editing.
fn make_raw(termios: &mut libc::termios) {
    // SAFETY: cfmakeraw only edits the flags of the termios we pass.
    unsafe { libc::cfmakeraw(termios) };
}

/// A pseudo-terminal: the guest's console is the slave side, which `screen`, `minicom` or
/// `cat` open by path.
#[derive(Debug)]
pub struct PtyHost {
    master: File,
    /// Held open so that the master never reports a hang-up while no one has the slave
    /// open: guest output then waits in the pty, and then in the guest, until someone reads.
    _slave: File,
    path: PathBuf,
    link: Option<PathBuf>,
}

impl PtyHost {
    /// Opens a new pty in raw mode and, if asked, points `link` at its slave.
    pub fn open(link: Option<&Path>) -> io::Result<Self> {
        // SAFETY: posix_openpt takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by posix_openpt and nothing else owns it.
        let master = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        // SAFETY: grantpt and unlockpt act on the master descriptor we own.
        if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut name = [0u8; 128];
        // SAFETY: ptsname_r writes a NUL-terminated path of at most `name.len()` bytes.
        let ret = unsafe { libc::ptsname_r(fd, name.as_mut_ptr().cast(), name.len()) };
        if ret != 0 {
            return Err(io::Error::from_raw_os_error(ret));
        }
        let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let path = PathBuf::from(std::str::from_utf8(&name[..len]).map_err(io::Error::other)?);
        let slave = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(&path)?;
        let mut termios = get_termios(slave.as_raw_fd())?;
        make_raw(&mut termios);
        set_termios(slave.as_raw_fd(), &termios)?;
        set_nonblocking(master.as_raw_fd())?;
        if let Some(link) = link {
            replace_symlink(&path, link)?;
        }
        Ok(PtyHost {
            master,
            _slave: slave,
            path,
            link: link.map(Path::to_path_buf),
        })
    }

    /// The slave's path (`/dev/pts/N`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Points `link` at `target`, replacing an older link but never another kind of file.
fn replace_symlink(target: &Path, link: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(metadata) if metadata.file_type().is_symlink() => std::fs::remove_file(link)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a symbolic link", link.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::os::unix::fs::symlink(target, link)
}

impl Drop for PtyHost {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            // Only our own link: another backend may have replaced it since.
            if std::fs::read_link(link).is_ok_and(|target| target == self.path) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
}

impl ConsoleHost for PtyHost {
    fn attach(&mut self, events: HostEvents) -> io::Result<()> {
        events.watch(self.master.as_raw_fd(), 0)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.master.read(buf) {
            Ok(0) => Err(would_block()),
            result => result,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.master.write(data)
    }

    fn handle_event(&mut self, _slot: u8, _events: EventSet) {}

    fn window_size(&self) -> Option<WindowSize> {
        terminal_size(self.master.as_raw_fd())
    }
}

/// A file that guest output is appended to; there is no input.
#[derive(Debug)]
pub struct FileHost {
    file: File,
}

impl FileHost {
    /// Opens (or creates, mode 0600) `path` for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(FileHost { file })
    }
}

impl ConsoleHost for FileHost {
    fn attach(&mut self, _events: HostEvents) -> io::Result<()> {
        Ok(())
    }

    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(would_block())
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.file.write(data)
    }

    fn handle_event(&mut self, _slot: u8, _events: EventSet) {}
}

/// Saved state of a standard stream, restored on drop.
#[derive(Debug)]
struct SavedStream {
    fd: RawFd,
    flags: libc::c_int,
    termios: Option<libc::termios>,
}

/// The backend's own standard input and output. A terminal on stdin is put in raw mode
/// except for signals, so Ctrl-C still stops the backend.
#[derive(Debug)]
pub struct StdioHost {
    input_open: bool,
    saved: Vec<SavedStream>,
}

const STDIN_SLOT: u8 = 0;
const STDOUT_SLOT: u8 = 1;

impl StdioHost {
    /// Makes stdin and stdout non-blocking (and a stdin terminal raw) until dropped.
    pub fn new() -> io::Result<Self> {
        let mut host = StdioHost {
            input_open: true,
            saved: Vec::new(),
        };
        for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
            let termios = if fd == libc::STDIN_FILENO {
                get_termios(fd).ok()
            } else {
                None
            };
            let flags = set_nonblocking(fd)?;
            host.saved.push(SavedStream { fd, flags, termios });
            if let Some(original) = termios {
                let mut raw = original;
                make_raw(&mut raw);
                raw.c_lflag |= libc::ISIG;
                set_termios(fd, &raw)?;
            }
        }
        Ok(host)
    }

    fn stdin() -> std::mem::ManuallyDrop<File> {
        // SAFETY: fd 0 stays open for the life of the process; ManuallyDrop keeps this
        // temporary File from closing it.
        std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(libc::STDIN_FILENO) })
    }

    fn stdout() -> std::mem::ManuallyDrop<File> {
        // SAFETY: as for stdin, with fd 1.
        std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(libc::STDOUT_FILENO) })
    }
}

impl Drop for StdioHost {
    fn drop(&mut self) {
        for saved in &self.saved {
            if let Some(termios) = &saved.termios {
                let _ = set_termios(saved.fd, termios);
            }
            // SAFETY: restores flags read from this descriptor at start-up.
            unsafe { libc::fcntl(saved.fd, libc::F_SETFL, saved.flags) };
        }
    }
}

impl ConsoleHost for StdioHost {
    fn attach(&mut self, events: HostEvents) -> io::Result<()> {
        watch_if_pollable(&events, libc::STDIN_FILENO, STDIN_SLOT)?;
        watch_if_pollable(&events, libc::STDOUT_FILENO, STDOUT_SLOT)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.input_open {
            return Err(would_block());
        }
        match Self::stdin().read(buf) {
            Ok(0) => {
                info!("Standard input closed");
                self.input_open = false;
                Err(would_block())
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(would_block()),
            result => result,
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        Self::stdout().write(data)
    }

    fn handle_event(&mut self, _slot: u8, _events: EventSet) {}

    fn window_size(&self) -> Option<WindowSize> {
        terminal_size(libc::STDOUT_FILENO).or_else(|| terminal_size(libc::STDIN_FILENO))
    }
}

/// Bytes received on `stream` and not read yet.
fn unread_bytes(stream: &UnixStream) -> usize {
    let mut count: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into the variable we pass.
    let ret = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut count) };
    if ret == 0 {
        usize::try_from(count).unwrap_or(0)
    } else {
        // Unknown: keep the client until a read finds the end of its input.
        usize::MAX
    }
}

/// The attached client of a [`SocketHost`].
#[derive(Debug)]
struct SocketClient {
    stream: UnixStream,
    /// False once the client shut down its sending side (or went away).
    input_open: bool,
    /// False once the client can no longer receive.
    output_open: bool,
}

const LISTENER_SLOT: u8 = 0;
const CLIENT_SLOT: u8 = 1;

/// A UNIX stream socket that a terminal client (`socat`, `screen`) attaches to, one at a
/// time and any number of times. Guest output produced while no client is attached is kept,
/// up to a bound, and handed to the next client before anything newer.
#[derive(Debug)]
pub struct SocketHost {
    listener: UnixListener,
    path: PathBuf,
    client: Option<SocketClient>,
    /// Guest output waiting for a client.
    pending: VecDeque<u8>,
    limit: usize,
    events: Option<HostEvents>,
}

impl SocketHost {
    /// Listens on `path` (mode 0600), keeping up to `limit` bytes of output for an absent
    /// client. A stale socket at `path` is replaced; a live one, or another kind of file, is
    /// an error.
    ///
    /// The socket's mode comes from a temporarily restrictive umask, which is process-wide:
    /// call this before other threads create files.
    pub fn bind(path: &Path, limit: usize) -> io::Result<Self> {
        if let Ok(metadata) = std::fs::symlink_metadata(path) {
            if !metadata.file_type().is_socket() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        // SAFETY: umask only swaps the process file-mode mask; see the caller contract above.
        let previous = unsafe { libc::umask(0o177) };
        let listener = UnixListener::bind(path);
        // SAFETY: as above; restores the previous mask.
        unsafe { libc::umask(previous) };
        let listener = listener?;
        listener.set_nonblocking(true)?;
        Ok(SocketHost {
            listener,
            path: path.to_path_buf(),
            client: None,
            pending: VecDeque::new(),
            limit,
            events: None,
        })
    }

    /// Bytes of guest output waiting for a client.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether a client is attached.
    pub fn has_client(&self) -> bool {
        self.client.is_some()
    }

    /// Takes a waiting client, if there is none attached yet, and gives it the kept output.
    fn accept(&mut self) {
        if self.client.is_some() {
            return;
        }
        let stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                warn!("Cannot accept a console client: {e}");
                return;
            }
        };
        if let Err(e) = stream.set_nonblocking(true) {
            warn!("Cannot make the console client non-blocking: {e}");
            return;
        }
        if let Some(events) = &self.events {
            if let Err(e) = events.watch(stream.as_raw_fd(), CLIENT_SLOT) {
                warn!("Cannot watch the console client: {e}");
                return;
            }
        }
        info!(
            "Console client attached to {} ({} bytes kept for it)",
            self.path.display(),
            self.pending.len()
        );
        self.client = Some(SocketClient {
            stream,
            input_open: true,
            output_open: true,
        });
        self.flush_pending();
    }

    /// Drops the client once neither direction is usable, then takes the next one.
    fn drop_client_if_done(&mut self) {
        let done = self
            .client
            .as_ref()
            .is_some_and(|c| !c.input_open && !c.output_open);
        if !done {
            return;
        }
        if let Some(client) = self.client.take() {
            if let Some(events) = &self.events {
                let _ = events.unwatch(client.stream.as_raw_fd());
            }
            info!("Console client detached from {}", self.path.display());
        }
        self.accept();
    }

    fn output_closed(&mut self) {
        if let Some(client) = self.client.as_mut() {
            client.output_open = false;
        }
        self.drop_client_if_done();
    }

    /// Writes kept output to the client; true when nothing is left.
    fn flush_pending(&mut self) -> bool {
        while !self.pending.is_empty() {
            let Some(client) = self.client.as_mut().filter(|c| c.output_open) else {
                return false;
            };
            let (front, _) = self.pending.as_slices();
            match client.stream.write(front) {
                Ok(written) => {
                    self.pending.drain(..written);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    debug!("Console client stopped receiving: {e}");
                    self.output_closed();
                }
            }
        }
        true
    }
}

impl Drop for SocketHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ConsoleHost for SocketHost {
    fn attach(&mut self, events: HostEvents) -> io::Result<()> {
        events.watch(self.listener.as_raw_fd(), LISTENER_SLOT)?;
        self.events = Some(events);
        self.accept();
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(client) = self.client.as_mut().filter(|c| c.input_open) else {
            return Err(would_block());
        };
        match client.stream.read(buf) {
            Ok(0) => {
                client.input_open = false;
                self.drop_client_if_done();
                Err(would_block())
            }
            Ok(count) => Ok(count),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Err(would_block())
            }
            Err(e) => {
                debug!("Console client connection failed: {e}");
                client.input_open = false;
                client.output_open = false;
                self.drop_client_if_done();
                Err(would_block())
            }
        }
    }

    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let drained = self.flush_pending();
        if let Some(client) = self.client.as_mut().filter(|c| c.output_open) {
            if !drained {
                return Err(would_block());
            }
            match client.stream.write(data) {
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    return Err(would_block())
                }
                Err(e) => {
                    debug!("Console client stopped receiving: {e}");
                    self.output_closed();
                }
                written => return written,
            }
        }
        // No client can take it: keep it for the next one, up to the bound.
        let room = self.limit.saturating_sub(self.pending.len());
        if room == 0 {
            return Err(would_block());
        }
        let taken = room.min(data.len());
        self.pending.extend(&data[..taken]);
        Ok(taken)
    }

    fn handle_event(&mut self, slot: u8, events: EventSet) {
        match slot {
            LISTENER_SLOT => self.accept(),
            CLIENT_SLOT => {
                if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                    // Gone. Input it sent before leaving is still read before the client
                    // is dropped; with none, the next client can attach at once.
                    if let Some(client) = self.client.as_mut() {
                        if unread_bytes(&client.stream) == 0 {
                            client.input_open = false;
                        }
                    }
                    self.output_closed();
                } else if events.contains(EventSet::OUT) {
                    self.flush_pending();
                }
            }
            _ => {}
        }
    }
}

/// One port of the device.
#[derive(Debug)]
pub struct Port {
    name: String,
    host: Box<dyn ConsoleHost>,
    /// The guest has this port open (PORT_OPEN from the driver).
    guest_open: bool,
}

impl Port {
    /// A port named `name` (at most [`MAX_PORT_NAME`] bytes are sent) served by `host`.
    pub fn new(name: impl Into<String>, host: Box<dyn ConsoleHost>) -> Self {
        Port {
            name: name.into(),
            host,
            guest_open: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn host(&mut self) -> &mut dyn ConsoleHost {
        self.host.as_mut()
    }

    /// Whether the guest reported the port open.
    pub fn guest_open(&self) -> bool {
        self.guest_open
    }
}

/// The device: its ports and, with MULTIPORT, the control protocol state.
#[derive(Debug)]
pub struct ConsoleDevice {
    epoll: Arc<Epoll>,
    ports: Vec<Port>,
    /// Control messages for the driver, waiting for control receive buffers.
    control_out: VecDeque<Vec<u8>>,
}

impl ConsoleDevice {
    /// A device with `ports` (at least one); attaches every host.
    pub fn new(ports: Vec<Port>) -> io::Result<Self> {
        if ports.is_empty() || ports.len() > usize::from(u16::MAX) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a console needs 1..=65535 ports",
            ));
        }
        let epoll = Arc::new(Epoll::new()?);
        let mut device = ConsoleDevice {
            epoll,
            ports,
            control_out: VecDeque::new(),
        };
        for (index, port) in device.ports.iter_mut().enumerate() {
            let events = HostEvents {
                epoll: device.epoll.clone(),
                port: index as u16,
            };
            port.host.attach(events)?;
        }
        Ok(device)
    }

    /// A descriptor that is readable while some host has readiness to report: register it
    /// in the event loop and call [`ConsoleDevice::dispatch_host_events`] when it fires.
    pub fn event_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn num_ports(&self) -> usize {
        self.ports.len()
    }

    pub fn port(&mut self, index: usize) -> Option<&mut Port> {
        self.ports.get_mut(index)
    }

    /// Hands every pending readiness event to its host.
    pub fn dispatch_host_events(&mut self) -> io::Result<()> {
        let mut events = [EpollEvent::default(); 16];
        loop {
            let count = match self.epoll.wait(0, &mut events) {
                Ok(count) => count,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ready in &events[..count] {
                let port = (ready.data() >> 8) as usize;
                let slot = ready.data() as u8;
                if let Some(port) = self.ports.get_mut(port) {
                    port.host.handle_event(slot, ready.event_set());
                }
            }
            if count < events.len() {
                return Ok(());
            }
        }
    }

    /// The console size reported in the configuration space: port 0's terminal, or
    /// [`DEFAULT_WINDOW`].
    pub fn window_size(&self) -> WindowSize {
        self.ports[0].host.window_size().unwrap_or(DEFAULT_WINDOW)
    }

    /// Forgets what the last driver told us (a new driver starts from DEVICE_READY).
    /// Output kept for absent clients stays.
    pub fn reset(&mut self) {
        self.control_out.clear();
        for port in &mut self.ports {
            port.guest_open = false;
        }
    }

    /// Bound on waiting control messages: a driver repeating DEVICE_READY cannot make them
    /// grow without limit.
    fn control_limit(&self) -> usize {
        4 * self.ports.len() + 16
    }

    fn send_control(&mut self, id: u32, event: u16, value: u16, payload: &[u8]) {
        if self.control_out.len() >= self.control_limit() {
            warn!("Dropping control event {event} for port {id}: the driver reads none");
            return;
        }
        let header = ControlHeader::new(id, event, value).to_le();
        let mut message = Vec::with_capacity(CONTROL_HEADER_LEN + payload.len());
        message.extend_from_slice(vm_memory::ByteValued::as_slice(&header));
        message.extend_from_slice(payload);
        self.control_out.push_back(message);
    }

    /// Acts on one control message from the driver, queueing the replies.
    pub fn handle_control(&mut self, message: ControlHeader) {
        let ControlHeader { id, event, value } = message;
        match event {
            event::DEVICE_READY if value == 1 => {
                for port in 0..self.ports.len() as u32 {
                    self.send_control(port, event::DEVICE_ADD, 1, &[]);
                }
            }
            event::DEVICE_READY => warn!("The driver failed to set up the device"),
            event::PORT_READY | event::PORT_OPEN if id as usize >= self.ports.len() => {
                warn!("Control event {event} for port {id}, which does not exist");
            }
            event::PORT_READY if value == 1 => {
                if id == 0 {
                    self.send_control(id, event::CONSOLE_PORT, 1, &[]);
                }
                let name = self.ports[id as usize].name.as_bytes();
                let name = name[..name.len().min(MAX_PORT_NAME)].to_vec();
                self.send_control(id, event::PORT_NAME, 1, &name);
                // The host end is always open: output is accepted (or kept) whether or not
                // a client is attached.
                self.send_control(id, event::PORT_OPEN, 1, &[]);
            }
            event::PORT_READY => warn!("The driver failed to set up port {id}"),
            event::PORT_OPEN => {
                let open = value != 0;
                debug!("Guest {} port {id}", if open { "opened" } else { "closed" });
                self.ports[id as usize].guest_open = open;
            }
            other => debug!("Ignoring control event {other} for port {id}"),
        }
    }

    /// The next control message for the driver.
    pub fn next_control(&mut self) -> Option<Vec<u8>> {
        self.control_out.pop_front()
    }

    /// Puts back a message [`ConsoleDevice::next_control`] returned, when no receive buffer
    /// was there for it.
    pub fn unsend_control(&mut self, message: Vec<u8>) {
        self.control_out.push_front(message);
    }
}

/// A scriptable host for tests.
#[cfg(test)]
pub(crate) mod mock {
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::*;

    #[derive(Debug, Default)]
    pub struct MockState {
        /// Input the host will hand out.
        pub input: VecDeque<u8>,
        /// Output the host took.
        pub output: Vec<u8>,
        /// How many more output bytes the host takes before it would block; None: no limit.
        pub output_room: Option<usize>,
        /// Make writes fail as broken.
        pub broken: bool,
        pub reads: usize,
        pub writes: usize,
        pub events: Vec<(u8, EventSet)>,
        pub size: Option<WindowSize>,
    }

    /// A host whose state the test keeps a handle on.
    #[derive(Debug, Clone, Default)]
    pub struct MockHost(pub Arc<Mutex<MockState>>);

    impl MockHost {
        pub fn state(&self) -> MutexGuard<'_, MockState> {
            self.0.lock().unwrap()
        }
    }

    impl ConsoleHost for MockHost {
        fn attach(&mut self, _events: HostEvents) -> io::Result<()> {
            Ok(())
        }

        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let mut state = self.state();
            state.reads += 1;
            if state.input.is_empty() {
                return Err(would_block());
            }
            let count = buf.len().min(state.input.len());
            for (slot, byte) in buf.iter_mut().zip(state.input.drain(..count)) {
                *slot = byte;
            }
            Ok(count)
        }

        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            let mut state = self.state();
            state.writes += 1;
            if state.broken {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let count = state.output_room.unwrap_or(usize::MAX).min(data.len());
            if count == 0 {
                return Err(would_block());
            }
            if let Some(room) = state.output_room.as_mut() {
                *room -= count;
            }
            state.output.extend_from_slice(&data[..count]);
            Ok(count)
        }

        fn handle_event(&mut self, slot: u8, events: EventSet) {
            self.state().events.push((slot, events));
        }

        fn window_size(&self) -> Option<WindowSize> {
            self.state().size
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::mock::MockHost;
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vhost-user-console-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn device(names: &[&str]) -> (ConsoleDevice, Vec<MockHost>) {
        let hosts: Vec<MockHost> = names.iter().map(|_| MockHost::default()).collect();
        let ports = names
            .iter()
            .zip(&hosts)
            .map(|(name, host)| Port::new(*name, Box::new(host.clone())))
            .collect();
        (ConsoleDevice::new(ports).unwrap(), hosts)
    }

    fn messages(device: &mut ConsoleDevice) -> Vec<(ControlHeader, Vec<u8>)> {
        std::iter::from_fn(|| device.next_control())
            .map(|message| {
                let mut header = ControlHeader::default();
                vm_memory::ByteValued::as_mut_slice(&mut header)
                    .copy_from_slice(&message[..CONTROL_HEADER_LEN]);
                (header.to_native(), message[CONTROL_HEADER_LEN..].to_vec())
            })
            .collect()
    }

    fn header(id: u32, event: u16, value: u16) -> ControlHeader {
        ControlHeader::new(id, event, value)
    }

    #[test]
    fn device_ready_announces_every_port() {
        let (mut device, _) = device(&["port0", "port1", "port2"]);
        device.handle_control(header(0, event::DEVICE_READY, 1));
        let announced = messages(&mut device);
        assert_eq!(
            announced,
            (0..3)
                .map(|id| (header(id, event::DEVICE_ADD, 1), vec![]))
                .collect::<Vec<_>>()
        );
        // A failed driver gets nothing.
        device.handle_control(header(0, event::DEVICE_READY, 0));
        assert!(messages(&mut device).is_empty());
    }

    #[test]
    fn port_ready_makes_port_zero_the_console_and_names_ports() {
        let (mut device, _) = device(&["con", "org.example.data"]);
        device.handle_control(header(0, event::PORT_READY, 1));
        assert_eq!(
            messages(&mut device),
            vec![
                (header(0, event::CONSOLE_PORT, 1), vec![]),
                (header(0, event::PORT_NAME, 1), b"con".to_vec()),
                (header(0, event::PORT_OPEN, 1), vec![]),
            ]
        );
        device.handle_control(header(1, event::PORT_READY, 1));
        assert_eq!(
            messages(&mut device),
            vec![
                (header(1, event::PORT_NAME, 1), b"org.example.data".to_vec()),
                (header(1, event::PORT_OPEN, 1), vec![]),
            ]
        );
        device.handle_control(header(1, event::PORT_READY, 0));
        assert!(messages(&mut device).is_empty());
    }

    #[test]
    fn guest_open_follows_port_open() {
        let (mut device, _) = device(&["a", "b"]);
        assert!(!device.port(1).unwrap().guest_open());
        device.handle_control(header(1, event::PORT_OPEN, 1));
        assert!(device.port(1).unwrap().guest_open());
        assert!(!device.port(0).unwrap().guest_open());
        device.handle_control(header(1, event::PORT_OPEN, 0));
        assert!(!device.port(1).unwrap().guest_open());
        device.handle_control(header(0, event::PORT_OPEN, 7));
        assert!(device.port(0).unwrap().guest_open());
        device.reset();
        assert!(!device.port(0).unwrap().guest_open());
    }

    #[test]
    fn hostile_control_messages_are_ignored_and_bounded() {
        let (mut device, _) = device(&["a", "b"]);
        for message in [
            header(2, event::PORT_READY, 1),
            header(u32::MAX, event::PORT_OPEN, 1),
            header(0, 5, 1),
            header(0, u16::MAX, 1),
            header(0, event::DEVICE_ADD, 1),
        ] {
            device.handle_control(message);
        }
        assert!(messages(&mut device).is_empty());
        // A driver repeating DEVICE_READY cannot grow the queue without bound.
        for _ in 0..1000 {
            device.handle_control(header(0, event::DEVICE_READY, 1));
        }
        assert_eq!(messages(&mut device).len(), device.control_limit());
        // Put back, a message comes out first again.
        device.handle_control(header(0, event::DEVICE_READY, 1));
        let first = device.next_control().unwrap();
        device.unsend_control(first.clone());
        assert_eq!(device.next_control(), Some(first));
    }

    #[test]
    fn long_port_names_are_truncated() {
        let long = "n".repeat(MAX_PORT_NAME + 10);
        let (mut device, _) = device(&["a", &long]);
        device.handle_control(header(1, event::PORT_READY, 1));
        let name = &messages(&mut device)[0].1;
        assert_eq!(name.len(), MAX_PORT_NAME);
    }

    #[test]
    fn window_size_comes_from_port_zero() {
        let (device, hosts) = device(&["a"]);
        assert_eq!(device.window_size(), DEFAULT_WINDOW);
        hosts[0].state().size = Some(WindowSize {
            cols: 132,
            rows: 43,
        });
        assert_eq!(
            device.window_size(),
            WindowSize {
                cols: 132,
                rows: 43
            }
        );
    }

    #[test]
    fn file_host_appends_and_has_no_input() {
        let dir = temp_dir("file");
        let path = dir.join("out.log");
        std::fs::write(&path, b"before\n").unwrap();
        let mut host = FileHost::open(&path).unwrap();
        assert_eq!(host.write(b"guest\n").unwrap(), 6);
        let mut buf = [0u8; 8];
        assert_eq!(
            host.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"before\nguest\n");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A device with one socket host, for the socket tests.
    fn socket_device(dir: &Path, limit: usize) -> (ConsoleDevice, PathBuf) {
        let path = dir.join("console.sock");
        let host = SocketHost::bind(&path, limit).unwrap();
        let device = ConsoleDevice::new(vec![Port::new("port0", Box::new(host))]).unwrap();
        (device, path)
    }

    /// Waits until the device's event descriptor is readable, then dispatches.
    fn dispatch(device: &mut ConsoleDevice) {
        let mut poll = libc::pollfd {
            fd: device.event_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes the one pollfd we pass.
        let ready = unsafe { libc::poll(&mut poll, 1, 5000) };
        assert_eq!(ready, 1, "no host event within 5 s");
        device.dispatch_host_events().unwrap();
    }

    fn write_all(host: &mut dyn ConsoleHost, mut data: &[u8]) {
        while !data.is_empty() {
            let written = host.write(data).unwrap();
            data = &data[written..];
        }
    }

    fn read_exactly(stream: &mut UnixStream, len: usize) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut data = vec![0u8; len];
        stream.read_exact(&mut data).unwrap();
        data
    }

    #[test]
    fn socket_keeps_output_for_an_absent_client_up_to_the_bound() {
        let dir = temp_dir("socket-bound");
        let (mut device, path) = socket_device(&dir, 10);
        let host = device.port(0).unwrap().host();
        // No client: output is kept, up to 10 bytes, then the host pushes back.
        assert_eq!(host.write(b"0123456").unwrap(), 7);
        assert_eq!(host.write(b"789abc").unwrap(), 3);
        assert_eq!(
            host.write(b"x").unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A client attaches and gets the kept bytes first, then newer output.
        let mut client = UnixStream::connect(&path).unwrap();
        dispatch(&mut device);
        let host = device.port(0).unwrap().host();
        write_all(host, b"new");
        assert_eq!(read_exactly(&mut client, 13), b"0123456789new");
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        drop(device);
        assert!(!path.exists(), "the socket is removed on drop");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_reattach_loses_nothing_written_in_between() {
        let dir = temp_dir("socket-reattach");
        let (mut device, path) = socket_device(&dir, DEFAULT_SOCKET_BUFFER);
        for round in 0..3u8 {
            let mut client = UnixStream::connect(&path).unwrap();
            dispatch(&mut device);
            let host = device.port(0).unwrap().host();
            write_all(host, &[b'a' + round; 100]);
            assert_eq!(read_exactly(&mut client, 100), vec![b'a' + round; 100]);
            // The client types, then goes away.
            client.write_all(&[b'0' + round; 3]).unwrap();
            drop(client);
            dispatch(&mut device);
            let host = device.port(0).unwrap().host();
            let mut input = [0u8; 8];
            assert_eq!(
                host.read(&mut input).unwrap(),
                3,
                "input sent before leaving"
            );
            assert_eq!(&input[..3], &[b'0' + round; 3]);
            assert_eq!(
                host.read(&mut input).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            // Written while detached: kept for the next round's client.
            write_all(host, b"between");
            let mut next = UnixStream::connect(&path).unwrap();
            dispatch(&mut device);
            assert_eq!(read_exactly(&mut next, 7), b"between");
        }
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_serves_one_client_at_a_time() {
        let dir = temp_dir("socket-one");
        let (mut device, path) = socket_device(&dir, DEFAULT_SOCKET_BUFFER);
        let mut first = UnixStream::connect(&path).unwrap();
        dispatch(&mut device);
        let mut second = UnixStream::connect(&path).unwrap();
        // The second waits: output goes to the first only.
        write_all(device.port(0).unwrap().host(), b"one");
        assert_eq!(read_exactly(&mut first, 3), b"one");
        drop(first);
        dispatch(&mut device);
        // Reading the closed client's end of input detaches it and takes the next.
        let mut input = [0u8; 4];
        let host = device.port(0).unwrap().host();
        assert_eq!(
            host.read(&mut input).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        write_all(device.port(0).unwrap().host(), b"two");
        assert_eq!(read_exactly(&mut second, 3), b"two");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_client_that_stops_reading_pushes_back() {
        let dir = temp_dir("socket-slow");
        let path = dir.join("console.sock");
        // A bare host, driven by hand: the listener is non-blocking, so a connection made
        // before the accept event is taken at once.
        let mut host = SocketHost::bind(&path, 10).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        host.handle_event(LISTENER_SLOT, EventSet::IN);
        assert!(host.has_client());
        // An attached client that does not read fills the socket; the host then refuses
        // more instead of keeping it (the bound is for absent clients only).
        let chunk = [7u8; 4096];
        let mut accepted = 0usize;
        loop {
            match host.write(&chunk) {
                Ok(count) => accepted += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(accepted < 64 << 20, "the socket never filled");
        }
        assert_eq!(host.pending(), 0);
        assert_eq!(read_exactly(&mut client, accepted), vec![7u8; accepted]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_client_that_stops_receiving_gets_the_rest_on_return() {
        let dir = temp_dir("socket-shut");
        let path = dir.join("console.sock");
        let mut host = SocketHost::bind(&path, 1 << 16).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        host.handle_event(LISTENER_SLOT, EventSet::IN);
        write_all(&mut host, b"seen");
        // The client stops receiving but keeps the connection: what it has not been sent is
        // kept rather than written into a socket no one reads.
        client.shutdown(std::net::Shutdown::Read).unwrap();
        assert_eq!(read_exactly(&mut client, 4), b"seen");
        write_all(&mut host, b"kept");
        assert_eq!(host.pending(), 4);
        assert!(host.has_client(), "still attached for input");
        client.write_all(b"in").unwrap();
        let mut input = [0u8; 4];
        assert_eq!(host.read(&mut input).unwrap(), 2);
        drop(client);
        assert_eq!(
            host.read(&mut input).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        assert!(!host.has_client());
        let mut next = UnixStream::connect(&path).unwrap();
        host.handle_event(LISTENER_SLOT, EventSet::IN);
        assert_eq!(read_exactly(&mut next, 4), b"kept");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn socket_refuses_a_live_socket_and_other_files() {
        let dir = temp_dir("socket-busy");
        let path = dir.join("busy.sock");
        let _live = SocketHost::bind(&path, 10).unwrap();
        assert_eq!(
            SocketHost::bind(&path, 10).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            SocketHost::bind(&file, 10).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        // A stale socket (nobody listening) is replaced.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        assert!(stale.exists());
        SocketHost::bind(&stale, 10).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pty_passes_bytes_both_ways_and_keeps_its_link() {
        let dir = temp_dir("pty");
        let link = dir.join("console");
        let mut host = PtyHost::open(Some(&link)).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), host.path());
        let mut slave = OpenOptions::new()
            .read(true)
            .write(true)
            .open(host.path())
            .unwrap();
        write_all(&mut host, b"guest\n");
        let mut out = [0u8; 6];
        slave.read_exact(&mut out).unwrap();
        assert_eq!(&out, b"guest\n", "raw mode: bytes unchanged");
        slave.write_all(b"typed").unwrap();
        let mut input = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..500 {
            match host.read(&mut input) {
                Ok(count) => got.extend_from_slice(&input[..count]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if got.len() == 5 {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(got, b"typed", "no echo of our own output either");
        assert_eq!(host.window_size(), None, "a fresh pty has no size");
        let size = libc::winsize {
            ws_row: 50,
            ws_col: 120,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads the winsize we pass.
        let ret = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(ret, 0);
        assert_eq!(
            host.window_size(),
            Some(WindowSize {
                cols: 120,
                rows: 50
            })
        );
        drop(host);
        assert!(!link.exists(), "the link goes with the pty");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn pty_without_a_reader_pushes_back_instead_of_dropping() {
        let mut host = PtyHost::open(None).unwrap();
        let chunk = [b'x'; 1024];
        let mut accepted = 0usize;
        loop {
            match host.write(&chunk) {
                Ok(count) => accepted += count,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(accepted < 16 << 20, "the pty never filled");
        }
        // Everything accepted is there for a reader that comes later.
        let mut slave = File::open(host.path()).unwrap();
        let mut back = vec![0u8; accepted];
        slave.read_exact(&mut back).unwrap();
        assert!(back.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn symlink_never_replaces_a_regular_file() {
        let dir = temp_dir("link");
        let file = dir.join("taken");
        std::fs::write(&file, b"keep").unwrap();
        assert_eq!(
            PtyHost::open(Some(&file)).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
