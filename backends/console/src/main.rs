//! vhost-user-console: serves a virtio console to vhost-user frontends, with a pty, a UNIX
//! socket, a file or its own standard streams as the host side.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread;

use clap::{ArgGroup, Parser};
use log::{debug, error, info, warn};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vhost_user_console::console::{
    ConsoleDevice, ConsoleHost, FileHost, Port, PtyHost, SocketHost, StdioHost,
    DEFAULT_SOCKET_BUFFER, MAX_PORT_NAME,
};
use vhost_user_console::vhu_console::{self, VhostUserConsoleBackend, MAX_PORTS, MAX_QUEUE_SIZE};
use vhost_user_frontdoor::process::{self, error_chain, Listen, ListenArgs, SignalAction};
use vhost_user_frontdoor::{ConfigNotifier, Delivery};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Signals handled by the signal thread; blocked everywhere else. SIGWINCH reaches the
/// backend when it runs in the foreground of the terminal it serves (`--stdio`).
const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGWINCH];

type SharedBackend = Arc<RwLock<VhostUserConsoleBackend>>;

#[derive(Parser, Debug)]
#[command(author, version, about = "vhost-user console device backend")]
// At most one mode; that one is given is checked after parsing, so that
// --print-capabilities alone parses (clap does not exempt a required group from it).
#[command(group(ArgGroup::new("mode").args(["pty", "socket", "file", "stdio"])))]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// Serve the console on a new pty; its path is printed as `pty: /dev/pts/N`.
    #[arg(long)]
    pty: bool,
    /// Keep a symbolic link to the pty here (ports after the first get `.N` appended).
    #[arg(long, value_name = "PATH")]
    pty_link: Option<PathBuf>,
    /// Serve the console on a UNIX stream socket for `socat` or `screen` to attach to
    /// (ports after the first get `.N` appended).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Bytes of guest output kept while no client is attached to --socket [default: 1 MiB].
    #[arg(long, value_name = "BYTES")]
    socket_buffer: Option<usize>,
    /// Append guest output to this file; there is no input (ports after the first get `.N`
    /// appended).
    #[arg(long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Use this program's standard input and output (one port only).
    #[arg(long)]
    stdio: bool,
    /// Number of ports; more than one enables VIRTIO_CONSOLE_F_MULTIPORT.
    #[arg(long, default_value_t = 1)]
    ports: usize,
    /// Name of the next port, as the guest sees it in /sys/class/virtio-ports/*/name
    /// (repeat for several ports; unnamed ports are `portN`).
    #[arg(long = "port-name", value_name = "NAME")]
    port_names: Vec<String>,
    /// Largest virtqueue size the frontend may configure (a power of two). User-mode Linux
    /// always asks for 256.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("Queue size {0} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    #[error("Number of ports {0} is not between 1 and {MAX_PORTS}")]
    InvalidPorts(usize),
    #[error("{0} port names given for {1} ports")]
    TooManyNames(usize, usize),
    #[error("Port name {0:?} is empty or longer than {MAX_PORT_NAME} bytes")]
    InvalidName(String),
    #[error("--stdio serves one port")]
    StdioPorts,
    #[error("{0} needs {1}")]
    OptionWithoutMode(&'static str, &'static str),
    #[error("--socket-buffer must be at least 1 byte")]
    EmptySocketBuffer,
    #[error("Cannot set up the console of port {port}")]
    Host {
        port: usize,
        #[source]
        source: io::Error,
    },
    #[error("Cannot open the vhost-user socket")]
    Listen(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("Cannot start the configuration change thread")]
    ConfigThread(#[source] io::Error),
    #[error("Cannot wait for a frontend")]
    Accept(#[source] io::Error),
    #[error("Cannot connect the frontend to the backend")]
    Connect(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot create the backend")]
    Backend(#[source] vhu_console::Error),
    #[error("Cannot create the console device")]
    Device(#[source] io::Error),
    #[error("Cannot watch the console hosts")]
    RegisterHosts(#[source] io::Error),
    #[error("Vhost-user daemon failed: {0}")]
    Daemon(vhost_user_backend::Error),
}

/// Where port 0's console lives; other ports derive theirs from it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    Pty { link: Option<PathBuf> },
    Socket { path: PathBuf, buffer: usize },
    File(PathBuf),
    Stdio,
}

/// Validated settings.
#[derive(Debug)]
struct Config {
    listen: Listen,
    mode: Mode,
    names: Vec<String>,
    queue_size: u16,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(Error::InvalidQueueSize(args.queue_size));
        }
        if !(1..=MAX_PORTS).contains(&args.ports) {
            return Err(Error::InvalidPorts(args.ports));
        }
        if args.port_names.len() > args.ports {
            return Err(Error::TooManyNames(args.port_names.len(), args.ports));
        }
        if let Some(bad) = args
            .port_names
            .iter()
            .find(|name| name.is_empty() || name.len() > MAX_PORT_NAME)
        {
            return Err(Error::InvalidName(bad.clone()));
        }
        if args.pty_link.is_some() && !args.pty {
            return Err(Error::OptionWithoutMode("--pty-link", "--pty"));
        }
        if args.socket_buffer.is_some() && args.socket.is_none() {
            return Err(Error::OptionWithoutMode("--socket-buffer", "--socket"));
        }
        let mode = if args.pty {
            Mode::Pty {
                link: args.pty_link,
            }
        } else if let Some(path) = args.socket {
            let buffer = args.socket_buffer.unwrap_or(DEFAULT_SOCKET_BUFFER);
            if buffer == 0 {
                return Err(Error::EmptySocketBuffer);
            }
            Mode::Socket { path, buffer }
        } else if let Some(path) = args.file {
            Mode::File(path)
        } else if args.stdio {
            if args.ports != 1 {
                return Err(Error::StdioPorts);
            }
            Mode::Stdio
        } else {
            return Err(Error::Missing("one of --pty, --socket, --file and --stdio"));
        };
        let names = (0..args.ports)
            .map(|port| {
                args.port_names
                    .get(port)
                    .cloned()
                    .unwrap_or_else(|| format!("port{port}"))
            })
            .collect();
        Ok(Config {
            listen: args
                .listen
                .listen()
                .ok_or(Error::Missing("--socket-path or --fd"))?,
            mode,
            names,
            queue_size: args.queue_size,
        })
    }
}

/// `path` for port 0, `path.N` for port N.
fn port_path(path: &Path, port: usize) -> PathBuf {
    if port == 0 {
        return path.to_path_buf();
    }
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{port}"));
    PathBuf::from(name)
}

/// Opens the host side of every port. A pty's path goes to stdout, where a supervisor (or
/// the user) picks it up.
fn open_hosts(config: &Config) -> Result<Vec<Port>, Error> {
    let mut ports = Vec::new();
    for (index, name) in config.names.iter().enumerate() {
        let host_error = |source| Error::Host {
            port: index,
            source,
        };
        let host: Box<dyn ConsoleHost> = match &config.mode {
            Mode::Pty { link } => {
                let link = link.as_deref().map(|link| port_path(link, index));
                let pty = PtyHost::open(link.as_deref()).map_err(host_error)?;
                let label = if index == 0 {
                    "pty".to_string()
                } else {
                    format!("pty{index}")
                };
                let mut stdout = io::stdout().lock();
                let _ = writeln!(stdout, "{label}: {}", pty.path().display());
                let _ = stdout.flush();
                info!("Port {index} ({name}) is {}", pty.path().display());
                Box::new(pty)
            }
            Mode::Socket { path, buffer } => {
                let path = port_path(path, index);
                let socket = SocketHost::bind(&path, *buffer).map_err(host_error)?;
                info!("Port {index} ({name}) listens on {}", path.display());
                Box::new(socket)
            }
            Mode::File(path) => {
                let path = port_path(path, index);
                let file = FileHost::open(&path).map_err(host_error)?;
                info!("Port {index} ({name}) appends to {}", path.display());
                Box::new(file)
            }
            Mode::Stdio => Box::new(StdioHost::new().map_err(host_error)?),
        };
        ports.push(Port::new(name.clone(), host));
    }
    Ok(ports)
}

/// The connected frontend: how to end the connection and how to tell the frontend about
/// configuration changes.
struct Connection {
    shutdown: Option<ShutdownHandle>,
    notifier: ConfigNotifier,
}

/// State shared by the serve loop, the signal thread and the configuration change thread.
struct ServeState {
    shutdown_requested: AtomicBool,
    /// Wakes the serve loop and the configuration change thread at shutdown.
    wake: EventFd,
    /// The live connection, if any.
    connection: Mutex<Option<Connection>>,
}

impl ServeState {
    fn new() -> io::Result<Self> {
        Ok(ServeState {
            shutdown_requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            connection: Mutex::new(None),
        })
    }

    fn request_shutdown(&self) {
        self.shutdown_requested.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            error!("Cannot wake the serve loop: {e}");
        }
        if let Some(handle) = self.connection().as_ref().and_then(|c| c.shutdown.as_ref()) {
            handle.shutdown();
        }
    }

    fn shutdown_requested(&self) -> bool {
        self.shutdown_requested.load(Ordering::Acquire)
    }

    /// Records the live connection; closes it at once if shutdown was already requested.
    fn track(&self, connection: Option<Connection>) {
        let mut current = self.connection();
        *current = connection;
        if self.shutdown_requested() {
            if let Some(handle) = current.as_ref().and_then(|c| c.shutdown.as_ref()) {
                handle.shutdown();
            }
        }
    }

    /// Tells the connected frontend that the configuration changed, if it set up a backend
    /// channel; otherwise the driver sees the new size on its next configuration read.
    fn announce_config_change(&self) {
        // Not under the lock: the frontend may take a while to acknowledge.
        let notifier = self.connection().as_ref().map(|c| c.notifier.clone());
        let Some(notifier) = notifier else {
            debug!("No frontend connected to notify of the new console size");
            return;
        };
        match notifier.config_changed() {
            Ok(Delivery::Acknowledged) => debug!("The frontend acknowledged the new console size"),
            Ok(Delivery::Sent) => debug!("New console size sent to the frontend"),
            Ok(Delivery::NoChannel) => info!(
                "The frontend has no backend channel; it sees the new console size on its next configuration read"
            ),
            Err(e) => warn!(
                "Cannot notify the frontend of the new console size: {}",
                error_chain(&e)
            ),
        }
    }

    fn connection(&self) -> MutexGuard<'_, Option<Connection>> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// SIGTERM, SIGINT and SIGHUP request a clean shutdown; SIGWINCH has the console size
/// looked at again.
fn spawn_signal_thread(state: Arc<ServeState>, backend: SharedBackend) -> io::Result<()> {
    process::spawn_signal_thread(&HANDLED_SIGNALS, move |signal| {
        if signal != libc::SIGWINCH {
            state.request_shutdown();
            return SignalAction::Stop;
        }
        // A change is signalled to the configuration change thread.
        backend
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .refresh_window_size();
        SignalAction::Continue
    })
}

/// Pushes each console size change the worker or the signal thread noticed to the frontend.
/// A thread of its own: the frontend's acknowledgement is waited for without holding up the
/// queues, and the frontend re-reads the configuration while the worker runs.
fn spawn_config_thread(state: Arc<ServeState>, changes: EventFd) -> io::Result<()> {
    thread::Builder::new()
        .name("config-change".into())
        .spawn(move || loop {
            match process::wait_readable(changes.as_raw_fd(), state.wake.as_raw_fd(), || {
                state.shutdown_requested()
            }) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    error!("Cannot wait for console size changes: {e}");
                    return;
                }
            }
            // Several changes since the last push make one notification.
            match changes.read() {
                Ok(_) => state.announce_config_change(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    error!("Cannot read the console size change event: {e}");
                    return;
                }
            }
        })?;
    Ok(())
}

fn serve(config: Config) -> Result<(), Error> {
    process::block_signals(&HANDLED_SIGNALS).map_err(Error::Signals)?;
    // Before any thread exists: the console sockets are created under a restrictive umask.
    let ports = open_hosts(&config)?;
    // Frontends connect to the front door, which relays to a fresh daemon per connection,
    // tolerating padded memory tables (user-mode Linux) and carrying configuration changes.
    let door = config.listen.bind().map_err(Error::Listen)?;
    let device = ConsoleDevice::new(ports).map_err(Error::Device)?;
    let backend: SharedBackend = Arc::new(RwLock::new(
        VhostUserConsoleBackend::new(device, config.queue_size).map_err(Error::Backend)?,
    ));
    let state = Arc::new(ServeState::new().map_err(Error::Signals)?);
    spawn_signal_thread(state.clone(), backend.clone()).map_err(Error::Signals)?;
    let changes = backend
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .config_change_event()
        .try_clone()
        .map_err(Error::ConfigThread)?;
    spawn_config_thread(state.clone(), changes).map_err(Error::ConfigThread)?;
    info!(
        "Serving {} port(s) on {}",
        config.names.len(),
        config.listen
    );

    while process::wait_readable(door.as_raw_fd(), state.wake.as_raw_fd(), || {
        state.shutdown_requested()
    })
    .map_err(Error::Accept)?
    {
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-console".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(Error::Daemon)?;
        let (host_fd, host_event) = {
            let backend = backend.read().unwrap_or_else(|p| p.into_inner());
            (backend.host_event_fd(), backend.host_event())
        };
        for handler in daemon.get_epoll_handlers() {
            handler
                .register_listener(host_fd, EventSet::IN, u64::from(host_event))
                .map_err(Error::RegisterHosts)?;
        }
        let session = door.accept_into(&mut daemon).map_err(Error::Connect)?;
        info!("Frontend connected");
        state.track(Some(Connection {
            shutdown: daemon.shutdown_handle(),
            notifier: session.notifier(),
        }));
        let result = daemon.wait();
        // The front door has logged a malformed message; the daemon's view follows.
        if let Err(e) = session.wait() {
            debug!("Front door: {}", error_chain(&e));
        }
        state.track(None);
        // Dropping the daemon stops its worker before the backend forgets the connection.
        drop(daemon);
        backend
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .disconnected();
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("Frontend disconnected"),
            Err(e) => warn!("Connection ended: {e}"),
        }
    }

    info!("Shut down");
    // Dropping the front door and the hosts removes the sockets and the pty links, and
    // restores the terminal.
    Ok(())
}

fn main() -> ExitCode {
    // Only in host builds made for the board tarball's man pages and completions.
    #[cfg(feature = "docgen")]
    if let Some(dir) = hvisor_vhost_docgen::requested() {
        return hvisor_vhost_docgen::run::<Args>(&dir);
    }
    // Rate-limited: the guest can trigger most warnings, virtio-queue's errors included.
    vhost_user_frontdoor::ratelimit::init_logger();
    // Before any thread or guest memory exists: no ioctl outside this backend's own list
    // reaches the kernel, so none of hvisor's can be made on the guest memory fd.
    if let Err(e) =
        vhost_user_frontdoor::seccomp::install(vhost_user_console::console::SECCOMP_IOCTLS)
    {
        error!("{}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    if args.listen.print_capabilities {
        // QEMU's vhost-user schema defines no optional features for "console".
        println!("{}", process::capabilities_json("console", &[]));
        return ExitCode::SUCCESS;
    }
    let result = Config::try_from(args).and_then(serve);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost_user_frontdoor::SocketAccess;

    fn parse(args: &[&str]) -> Result<Config, Error> {
        let mut argv = vec!["vhost-user-console", "-s", "/run/console.sock"];
        argv.extend_from_slice(args);
        Config::try_from(
            Args::try_parse_from(argv).map_err(|e| Error::Device(io::Error::other(e)))?,
        )
    }

    #[test]
    fn defaults_and_modes() {
        let config = parse(&["--pty"]).unwrap();
        assert_eq!(
            config.listen,
            Listen::Path("/run/console.sock".into(), SocketAccess::default())
        );
        assert_eq!(config.mode, Mode::Pty { link: None });
        assert_eq!(config.names, ["port0"]);
        assert_eq!(config.queue_size, 256);
        assert_eq!(
            parse(&["--pty", "--pty-link", "/run/con"]).unwrap().mode,
            Mode::Pty {
                link: Some("/run/con".into())
            }
        );
        assert_eq!(
            parse(&["--socket", "/run/c.sock"]).unwrap().mode,
            Mode::Socket {
                path: "/run/c.sock".into(),
                buffer: DEFAULT_SOCKET_BUFFER
            }
        );
        assert_eq!(
            parse(&["--socket", "c", "--socket-buffer", "4096"])
                .unwrap()
                .mode,
            Mode::Socket {
                path: "c".into(),
                buffer: 4096
            }
        );
        assert_eq!(
            parse(&["--file", "out.log"]).unwrap().mode,
            Mode::File("out.log".into())
        );
        assert_eq!(parse(&["--stdio"]).unwrap().mode, Mode::Stdio);
    }

    #[test]
    fn exactly_one_mode() {
        assert!(parse(&[]).is_err());
        assert!(parse(&["--pty", "--stdio"]).is_err());
        assert!(parse(&["--socket", "a", "--file", "b"]).is_err());
        assert!(matches!(
            parse(&["--file", "b", "--pty-link", "x"]),
            Err(Error::OptionWithoutMode("--pty-link", "--pty"))
        ));
        assert!(matches!(
            parse(&["--pty", "--socket-buffer", "10"]),
            Err(Error::OptionWithoutMode("--socket-buffer", "--socket"))
        ));
    }

    #[test]
    fn ports_and_names() {
        let config = parse(&[
            "--socket",
            "s",
            "--ports",
            "3",
            "--port-name",
            "org.example.log",
        ])
        .unwrap();
        assert_eq!(config.names, ["org.example.log", "port1", "port2"]);
        assert!(matches!(
            parse(&["--pty", "--ports", "0"]),
            Err(Error::InvalidPorts(0))
        ));
        assert!(matches!(
            parse(&["--pty", "--ports", "32"]),
            Err(Error::InvalidPorts(32))
        ));
        assert!(matches!(
            parse(&["--pty", "--port-name", "a", "--port-name", "b"]),
            Err(Error::TooManyNames(2, 1))
        ));
        assert!(matches!(
            parse(&["--pty", "--port-name", ""]),
            Err(Error::InvalidName(_))
        ));
        assert!(matches!(
            parse(&["--stdio", "--ports", "2"]),
            Err(Error::StdioPorts)
        ));
        assert!(matches!(
            parse(&["--socket", "s", "--socket-buffer", "0"]),
            Err(Error::EmptySocketBuffer)
        ));
    }

    #[test]
    fn queue_size_is_validated() {
        assert_eq!(
            parse(&["--pty", "--queue-size", "1024"])
                .unwrap()
                .queue_size,
            1024
        );
        for bad in ["100", "0", "1"] {
            assert!(matches!(
                parse(&["--pty", "--queue-size", bad]),
                Err(Error::InvalidQueueSize(_))
            ));
        }
    }

    #[test]
    fn later_ports_get_numbered_paths() {
        assert_eq!(
            port_path(Path::new("/run/c.sock"), 0),
            Path::new("/run/c.sock")
        );
        assert_eq!(
            port_path(Path::new("/run/c.sock"), 2),
            Path::new("/run/c.sock.2")
        );
    }
}
