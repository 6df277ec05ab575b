//! vhost-user-blk: serves a raw image file or block device to vhost-user frontends.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::builder::PossibleValue;
use clap::{Parser, ValueEnum};
use log::{debug, error, info, warn};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vhost_user_blk::blk::{BlockDevice, BlockStorage, SERIAL_LEN};
use vhost_user_blk::file_storage::{FileStorage, IoEngine, OpenError, StorageOptions};
use vhost_user_blk::stats::IoStats;
use vhost_user_blk::vhu_blk::{
    self, QueueConfig, VhostUserBlkBackend, MAX_COALESCE_WINDOW, MAX_QUEUES, MAX_QUEUE_SIZE,
};
use vhost_user_frontdoor::process::{self, error_chain, Listen, ListenArgs, SignalAction};
use vhost_user_frontdoor::{ConfigNotifier, Delivery};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Signals handled by the signal thread; blocked everywhere else.
const HANDLED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1];

#[derive(Parser, Debug)]
#[command(author, version, about = "vhost-user block device backend")]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// Raw disk image or block device to serve.
    #[arg(long, visible_aliases = ["img", "blk-file"], required = true)]
    image: Option<PathBuf>,
    /// Refuse writes and tell the driver the disk is read-only.
    #[arg(long)]
    read_only: bool,
    /// Serial number the driver reads with GET_ID (at most 20 bytes).
    #[arg(long, default_value = "hvisor-vhost-blk")]
    serial: String,
    /// Open the image with O_DIRECT, bypassing the host page cache.
    #[arg(long)]
    direct: bool,
    /// How guest data reaches the image: preadv/pwritev, or io_uring.
    #[arg(long, value_enum, default_value_t = IoEngine::Sync)]
    io_engine: IoEngine,
    /// Largest virtqueue size the frontend may configure (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Number of request queues, each served by its own thread.
    #[arg(long, default_value_t = 1)]
    num_queues: usize,
    /// Microseconds a queue thread waits for the driver's next request before signalling
    /// completions, when the driver keeps several requests in flight (0: signal at once).
    #[arg(long, default_value_t = vhu_blk::DEFAULT_COALESCE_WINDOW.as_micros() as u64)]
    coalesce_us: u64,
    /// Lock the image so that no second backend opens it (the default).
    #[arg(long, overrides_with = "no_lock")]
    lock: bool,
    /// Do not lock the image.
    #[arg(long, overrides_with = "lock")]
    no_lock: bool,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("Queue size {0} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    #[error("Number of queues {0} is not between 1 and {MAX_QUEUES}")]
    InvalidNumQueues(usize),
    #[error("Coalescing window of {0} µs is longer than {max} µs", max = MAX_COALESCE_WINDOW.as_micros())]
    InvalidCoalesceWindow(u64),
    #[error("Serial {0:?} is longer than {SERIAL_LEN} bytes")]
    SerialTooLong(String),
    #[error("Cannot open the image")]
    Image(#[source] OpenError),
    #[error("Cannot open the vhost-user socket")]
    Listen(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("Cannot wait for a frontend")]
    Accept(#[source] io::Error),
    #[error("Cannot connect the frontend to the backend")]
    Connect(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot create the backend")]
    Backend(#[source] vhu_blk::Error),
    #[error("Vhost-user daemon failed: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("Cannot flush the image")]
    Flush(#[source] io::Error),
}

/// Validated settings.
#[derive(Debug)]
struct Config {
    listen: Listen,
    image: PathBuf,
    storage: StorageOptions,
    serial: String,
    queues: QueueConfig,
    coalesce_window: Duration,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(Error::InvalidQueueSize(args.queue_size));
        }
        if !(1..=MAX_QUEUES).contains(&args.num_queues) {
            return Err(Error::InvalidNumQueues(args.num_queues));
        }
        let coalesce_window = Duration::from_micros(args.coalesce_us);
        if coalesce_window > MAX_COALESCE_WINDOW {
            return Err(Error::InvalidCoalesceWindow(args.coalesce_us));
        }
        if args.serial.len() > SERIAL_LEN {
            return Err(Error::SerialTooLong(args.serial));
        }
        Ok(Config {
            listen: args
                .listen
                .listen()
                .ok_or(Error::Missing("--socket-path or --fd"))?,
            image: args.image.ok_or(Error::Missing("--image"))?,
            storage: StorageOptions {
                read_only: args.read_only,
                direct: args.direct,
                lock: !args.no_lock,
                engine: args.io_engine,
            },
            serial: args.serial,
            queues: QueueConfig {
                num_queues: args.num_queues,
                queue_size: args.queue_size,
            },
            coalesce_window,
        })
    }
}

/// The connected frontend: how to end the connection and how to tell the frontend about
/// configuration changes.
struct Connection {
    shutdown: Option<ShutdownHandle>,
    notifier: ConfigNotifier,
}

/// State shared by the serve loop and the signal thread.
struct ServeState {
    shutdown_requested: AtomicBool,
    /// Wakes the serve loop while it waits for a frontend.
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

    /// Pushes a configuration change to the connected frontend, if it set up a backend
    /// channel; otherwise the driver sees the change on its next configuration read.
    fn announce_config_change(&self) {
        // Not under the lock: the frontend may take a while to acknowledge.
        let notifier = self.connection().as_ref().map(|c| c.notifier.clone());
        let Some(notifier) = notifier else {
            debug!("No frontend connected to notify");
            return;
        };
        match notifier.config_changed() {
            Ok(Delivery::Acknowledged) => {
                info!("The frontend acknowledged the configuration change")
            }
            Ok(Delivery::Sent) => info!("Configuration change sent to the frontend"),
            Ok(Delivery::NoChannel) => info!(
                "The frontend has no backend channel; it sees the change on its next configuration read"
            ),
            Err(e) => warn!(
                "Cannot notify the frontend of the configuration change: {}",
                error_chain(&e)
            ),
        }
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Logs each queue's I/O counters.
fn log_stats(stats: &IoStats) {
    for line in stats.lines() {
        info!("{line}");
    }
}

/// SIGTERM/SIGINT request a clean shutdown; SIGHUP re-reads the image size and tells the
/// frontend; SIGUSR1 logs the I/O counters.
fn spawn_signal_thread(
    state: Arc<ServeState>,
    storage: Arc<FileStorage>,
    stats: Arc<IoStats>,
) -> io::Result<()> {
    process::spawn_signal_thread(&HANDLED_SIGNALS, move |signal| {
        if signal == libc::SIGUSR1 {
            log_stats(&stats);
            return SignalAction::Continue;
        }
        if signal != libc::SIGHUP {
            state.request_shutdown();
            return SignalAction::Stop;
        }
        match storage.refresh_capacity() {
            Ok(capacity) => {
                info!("Image capacity is now {capacity} bytes");
                state.announce_config_change();
            }
            Err(e) => error!("Cannot re-read the image size: {e}"),
        }
        SignalAction::Continue
    })
}

fn serve(config: Config) -> Result<(), Error> {
    process::block_signals(&HANDLED_SIGNALS).map_err(Error::Signals)?;
    let storage =
        Arc::new(FileStorage::open(&config.image, &config.storage).map_err(Error::Image)?);
    // Frontends connect to the front door, which relays to a fresh daemon per connection,
    // tolerating padded memory tables and carrying configuration-change notifications.
    let door = config.listen.bind().map_err(Error::Listen)?;
    let state = Arc::new(ServeState::new().map_err(Error::Signals)?);
    // Counted across connections: a restored frontend adds to the same totals.
    let stats = Arc::new(IoStats::new(config.queues.num_queues));
    spawn_signal_thread(state.clone(), storage.clone(), stats.clone()).map_err(Error::Signals)?;
    // clap's value name, so the log spells the engine as `--io-engine` takes it.
    let engine = config.storage.engine.to_possible_value();
    info!(
        "Serving {} ({} bytes{}, {} I/O) on {}",
        config.image.display(),
        storage.capacity(),
        if config.storage.read_only {
            ", read-only"
        } else {
            ""
        },
        engine.as_ref().map_or("?", PossibleValue::get_name),
        config.listen
    );

    while process::wait_readable(door.as_raw_fd(), state.wake.as_raw_fd(), || {
        state.shutdown_requested()
    })
    .map_err(Error::Accept)?
    {
        let device = BlockDevice::new(
            storage.clone(),
            config.storage.read_only,
            config.serial.as_bytes(),
        );
        let backend = VhostUserBlkBackend::new(device, config.queues)
            .map_err(Error::Backend)?
            .with_coalesce_window(config.coalesce_window)
            .with_stats(stats.clone());
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-blk".into(),
            Arc::new(backend),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(Error::Daemon)?;
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
        // Dropping the daemon stops its queue threads once their current requests are done.
        drop(daemon);
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("Frontend disconnected"),
            Err(e) => warn!("Connection ended: {e}"),
        }
    }

    storage.flush().map_err(Error::Flush)?;
    log_stats(&stats);
    info!("Shut down");
    // Dropping the front door removes the socket.
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
        vhost_user_frontdoor::seccomp::install(&vhost_user_blk::file_storage::seccomp_ioctls())
    {
        error!("{}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    if args.listen.print_capabilities {
        // QEMU's vhost-user schema: a "block" backend that takes --read-only and --blk-file.
        println!(
            "{}",
            process::capabilities_json("block", &["read-only", "blk-file"])
        );
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

    fn parse(extra: &[&str]) -> Result<Config, Error> {
        let mut argv = vec![
            "vhost-user-blk",
            "-s",
            "/run/blk.sock",
            "--image",
            "disk.img",
        ];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.listen,
            Listen::Path("/run/blk.sock".into(), SocketAccess::default())
        );
        assert_eq!(config.image, PathBuf::from("disk.img"));
        assert_eq!(config.serial, "hvisor-vhost-blk");
        assert_eq!(config.queues.queue_size, 256);
        assert_eq!(config.queues.num_queues, 1);
        assert_eq!(config.coalesce_window, vhu_blk::DEFAULT_COALESCE_WINDOW);
        assert!(!config.storage.read_only);
        assert!(!config.storage.direct);
        assert!(config.storage.lock);
        assert_eq!(config.storage.engine, IoEngine::Sync);
    }

    #[test]
    fn options_are_parsed() {
        let config = parse(&[
            "--read-only",
            "--direct",
            "--serial",
            "abc",
            "--queue-size",
            "1024",
            "--num-queues",
            "4",
            "--coalesce-us",
            "0",
            "--no-lock",
            "--io-engine",
            "io_uring",
        ])
        .unwrap();
        assert!(config.storage.read_only && config.storage.direct && !config.storage.lock);
        assert_eq!(config.storage.engine, IoEngine::IoUring);
        // The start-up log names each engine as the option spells it.
        for engine in IoEngine::value_variants() {
            let name = engine
                .to_possible_value()
                .expect("every engine is selectable");
            assert_eq!(
                parse(&["--io-engine", name.get_name()])
                    .unwrap()
                    .storage
                    .engine,
                *engine
            );
        }
        assert_eq!(config.serial, "abc");
        assert_eq!(config.queues.queue_size, 1024);
        assert_eq!(config.queues.num_queues, 4);
        assert!(config.coalesce_window.is_zero());
        // The last of --lock / --no-lock wins.
        assert!(parse(&["--no-lock", "--lock"]).unwrap().storage.lock);
        let alias = Args::try_parse_from(["vhost-user-blk", "-s", "s", "--img", "x"]).unwrap();
        assert_eq!(alias.image, Some(PathBuf::from("x")));
    }

    #[test]
    fn invalid_values_are_rejected() {
        let argv = [
            "vhost-user-blk",
            "-s",
            "s",
            "--image",
            "x",
            "--io-engine",
            "aio",
        ];
        assert!(Args::try_parse_from(argv).is_err());
        assert!(matches!(
            parse(&["--queue-size", "100"]),
            Err(Error::InvalidQueueSize(100))
        ));
        assert!(matches!(
            parse(&["--queue-size", "2048"]),
            Err(Error::InvalidQueueSize(2048))
        ));
        assert!(matches!(
            parse(&["--queue-size", "0"]),
            Err(Error::InvalidQueueSize(0))
        ));
        assert!(matches!(
            parse(&["--num-queues", "0"]),
            Err(Error::InvalidNumQueues(0))
        ));
        assert!(matches!(
            parse(&["--num-queues", "65"]),
            Err(Error::InvalidNumQueues(65))
        ));
        assert!(parse(&["--coalesce-us", "10000"]).is_ok());
        assert!(matches!(
            parse(&["--coalesce-us", "10001"]),
            Err(Error::InvalidCoalesceWindow(10001))
        ));
        assert!(parse(&["--serial", "12345678901234567890"]).is_ok());
        assert!(matches!(
            parse(&["--serial", "123456789012345678901"]),
            Err(Error::SerialTooLong(_))
        ));
        assert!(Args::try_parse_from(["vhost-user-blk", "--image", "x"]).is_err());
        assert!(Args::try_parse_from(["vhost-user-blk", "-s", "x"]).is_err());
    }
}
