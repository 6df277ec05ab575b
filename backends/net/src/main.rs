//! vhost-user-net: serves a TAP device to vhost-user frontends.

use std::io;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use clap::Parser;
use log::{debug, error, info, warn};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vhost_user_frontdoor::process::{self, error_chain, Listen, ListenArgs, SignalAction};
use vhost_user_net::tap::{self, Interface, Tap, TapError};
use vhost_user_net::vhu_net::{
    self, NetConfig, VhostUserNetBackend, MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE,
};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Signals handled by the signal thread; blocked everywhere else.
const HANDLED_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

/// The MTU range a TAP accepts (IPv4's minimum, and 64 KiB less the Ethernet header).
const MIN_MTU: u16 = 68;
const MAX_MTU: u16 = 65_521;

#[derive(Parser, Debug)]
#[command(
    author,
    version,
    about = "vhost-user net device backend over a TAP interface"
)]
struct Args {
    #[command(flatten)]
    listen: ListenArgs,
    /// TAP interface to attach to; created (and brought up) if it does not exist.
    #[arg(long, required = true)]
    tap: Option<String>,
    /// MAC address the driver reads [default: derived from the TAP name, locally administered].
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// MTU offered to the driver, also set on the TAP [default: the TAP's MTU].
    #[arg(long)]
    mtu: Option<u16>,
    /// Receive/transmit queue pairs, each with its own TAP queue and thread.
    #[arg(long, default_value_t = 1)]
    queue_pairs: u16,
    /// Largest virtqueue size the frontend may configure (a power of two).
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("Queue size {0} is not a power of two between 2 and {MAX_QUEUE_SIZE}")]
    InvalidQueueSize(u16),
    #[error("Number of queue pairs {0} is not between 1 and {MAX_QUEUE_PAIRS}")]
    InvalidQueuePairs(u16),
    #[error("MTU {0} is not between {MIN_MTU} and {MAX_MTU}")]
    InvalidMtu(u16),
    #[error("Invalid TAP name {0:?}")]
    InvalidTapName(String),
    #[error("Cannot set up the TAP")]
    Tap(#[source] TapError),
    #[error("Cannot listen for frontends")]
    Listen(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot connect a frontend to the vhost-user daemon")]
    Connect(#[source] vhost_user_frontdoor::Error),
    #[error("Cannot set up signal handling")]
    Signals(#[source] io::Error),
    #[error("Cannot wait for a frontend")]
    Accept(#[source] io::Error),
    #[error("Cannot create the backend")]
    Backend(#[source] vhu_net::Error),
    #[error("Vhost-user daemon failed: {0}")]
    Daemon(vhost_user_backend::Error),
}

/// Parses `aa:bb:cc:dd:ee:ff`; the address must be unicast and not all zero.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts
            .next()
            .ok_or("expected six bytes: aa:bb:cc:dd:ee:ff")?;
        if part.len() != 2 {
            return Err(format!("{part:?} is not a two-digit hex byte"));
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| format!("{part:?} is not hex"))?;
    }
    if parts.next().is_some() {
        return Err("expected six bytes: aa:bb:cc:dd:ee:ff".into());
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a device's address".into());
    }
    if mac == [0; 6] {
        return Err("the all-zero address is not a device's address".into());
    }
    Ok(mac)
}

/// A stable MAC for `tap`: FNV-1a of the name, with the locally administered bit set and the
/// multicast bit clear, so that the same TAP gets the same address on every start.
fn mac_for(tap: &str) -> [u8; 6] {
    let hash = tap.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let bytes = hash.to_le_bytes();
    [
        (bytes[0] & 0xfc) | 0x02,
        bytes[1],
        bytes[2],
        bytes[3],
        bytes[4],
        bytes[5],
    ]
}

fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// Validated settings.
#[derive(Debug)]
struct Config {
    listen: Listen,
    tap: String,
    mac: [u8; 6],
    mtu: Option<u16>,
    queue_pairs: u16,
    queue_size: u16,
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if !args.queue_size.is_power_of_two() || !(2..=MAX_QUEUE_SIZE).contains(&args.queue_size) {
            return Err(Error::InvalidQueueSize(args.queue_size));
        }
        if !(1..=MAX_QUEUE_PAIRS).contains(&args.queue_pairs) {
            return Err(Error::InvalidQueuePairs(args.queue_pairs));
        }
        if let Some(mtu) = args.mtu.filter(|mtu| !(MIN_MTU..=MAX_MTU).contains(mtu)) {
            return Err(Error::InvalidMtu(mtu));
        }
        let tap = args.tap.ok_or(Error::Missing("--tap"))?;
        if !tap::valid_name(&tap) {
            return Err(Error::InvalidTapName(tap));
        }
        Ok(Config {
            listen: args
                .listen
                .listen()
                .ok_or(Error::Missing("--socket-path or --fd"))?,
            mac: args.mac.unwrap_or_else(|| mac_for(&tap)),
            tap,
            mtu: args.mtu,
            queue_pairs: args.queue_pairs,
            queue_size: args.queue_size,
        })
    }
}

/// Shutdown state shared by the serve loop and the signal thread.
struct Shutdown {
    requested: AtomicBool,
    /// Wakes the serve loop while it waits for a frontend.
    wake: EventFd,
    /// The live connection, closed to end it early.
    connection: Mutex<Option<ShutdownHandle>>,
}

impl Shutdown {
    fn new() -> io::Result<Self> {
        Ok(Shutdown {
            requested: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK)?,
            connection: Mutex::new(None),
        })
    }

    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        if let Err(e) = self.wake.write(1) {
            error!("Cannot wake the serve loop: {e}");
        }
        if let Some(connection) = self.connection().as_ref() {
            connection.shutdown();
        }
    }

    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Records the live connection; closes it at once if shutdown was already requested.
    fn track(&self, handle: Option<ShutdownHandle>) {
        let mut connection = self.connection();
        *connection = handle;
        if self.requested() {
            if let Some(handle) = connection.as_ref() {
                handle.shutdown();
            }
        }
    }

    fn connection(&self) -> std::sync::MutexGuard<'_, Option<ShutdownHandle>> {
        self.connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// SIGTERM/SIGINT request a clean shutdown.
fn spawn_signal_thread(shutdown: Arc<Shutdown>) -> io::Result<()> {
    process::spawn_signal_thread(&HANDLED_SIGNALS, move |_| {
        shutdown.request();
        SignalAction::Stop
    })
}

/// Opens the TAP queues and applies the link settings; returns the queues and the MTU.
fn open_tap(config: &Config) -> Result<(Vec<Arc<Tap>>, u16), TapError> {
    let opened = Tap::open(&config.tap, usize::from(config.queue_pairs))?;
    let interface = Interface::new(&config.tap)?;
    if let Some(mtu) = config.mtu {
        interface.set_mtu(mtu)?;
    }
    if opened.created {
        interface.set_up()?;
        info!("Created TAP {}", config.tap);
    }
    let mtu = interface.mtu()?;
    Ok((opened.queues.into_iter().map(Arc::new).collect(), mtu))
}

fn serve(config: Config) -> Result<(), Error> {
    process::block_signals(&HANDLED_SIGNALS).map_err(Error::Signals)?;
    let (ports, mtu) = open_tap(&config).map_err(Error::Tap)?;
    // Frontends connect to the front door, which relays to a fresh daemon per connection. It
    // accepts user-mode Linux's padded memory table and QEMU's early SET_VRING_ENABLE.
    let door = config.listen.bind().map_err(Error::Listen)?;
    let shutdown = Arc::new(Shutdown::new().map_err(Error::Signals)?);
    spawn_signal_thread(shutdown.clone()).map_err(Error::Signals)?;
    let net_config = NetConfig {
        mac: config.mac,
        mtu,
        queue_pairs: config.queue_pairs,
        queue_size: config.queue_size,
    };
    info!(
        "Serving TAP {} (MAC {}, MTU {mtu}, {} queue pairs) on {}",
        config.tap,
        format_mac(&config.mac),
        config.queue_pairs,
        config.listen
    );

    while process::wait_readable(door.as_raw_fd(), shutdown.wake.as_raw_fd(), || {
        shutdown.requested()
    })
    .map_err(Error::Accept)?
    {
        let backend =
            Arc::new(VhostUserNetBackend::new(net_config, ports.clone()).map_err(Error::Backend)?);
        let mut daemon = VhostUserDaemon::new(
            "vhost-user-net".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(Error::Daemon)?;
        backend
            .register_ports(&daemon.get_epoll_handlers())
            .map_err(Error::Backend)?;
        let session = door.accept_into(&mut daemon).map_err(Error::Connect)?;
        info!("Frontend connected");
        shutdown.track(daemon.shutdown_handle());
        let result = daemon.wait();
        // The front door has logged a malformed message; the daemon's view follows.
        if let Err(e) = session.wait() {
            debug!("Front door: {}", error_chain(&e));
        }
        shutdown.track(None);
        // Dropping the daemon stops its worker threads and unregisters the TAP queues.
        drop(daemon);
        match result {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => info!("Frontend disconnected: {}", backend.stats()),
            Err(e) => warn!("Connection ended: {e}; {}", backend.stats()),
        }
    }

    info!("Shut down");
    // Dropping the front door removes the socket; closing the TAP queues removes a TAP this
    // process created.
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
    if let Err(e) = vhost_user_frontdoor::seccomp::install(&vhost_user_net::tap::seccomp_ioctls()) {
        error!("{}", error_chain(&e));
        return ExitCode::FAILURE;
    }
    let args = Args::parse();
    if args.listen.print_capabilities {
        // QEMU's vhost-user schema defines no optional features for "net".
        println!("{}", process::capabilities_json("net", &[]));
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
        let mut argv = vec!["vhost-user-net", "-s", "/run/net.sock", "--tap", "tap0"];
        argv.extend_from_slice(extra);
        Config::try_from(Args::try_parse_from(argv).unwrap())
    }

    #[test]
    fn defaults() {
        let config = parse(&[]).unwrap();
        assert_eq!(
            config.listen,
            Listen::Path("/run/net.sock".into(), SocketAccess::default())
        );
        assert_eq!(config.tap, "tap0");
        assert_eq!(config.mac, mac_for("tap0"));
        assert_eq!(config.mtu, None);
        assert_eq!(config.queue_pairs, 1);
        assert_eq!(config.queue_size, 256);
    }

    #[test]
    fn derived_mac_is_stable_unicast_and_local() {
        let mac = mac_for("tap0");
        assert_eq!(mac, mac_for("tap0"));
        assert_ne!(mac, mac_for("tap1"));
        for name in ["tap0", "tap1", "x", "vhost-net-12345"] {
            let mac = mac_for(name);
            assert_eq!(mac[0] & 0x03, 0x02, "{name}: {}", format_mac(&mac));
        }
    }

    #[test]
    fn options_are_parsed() {
        let config = parse(&[
            "--mac",
            "52:54:00:AB:cd:01",
            "--mtu",
            "9000",
            "--queue-pairs",
            "4",
            "--queue-size",
            "1024",
        ])
        .unwrap();
        assert_eq!(config.mac, [0x52, 0x54, 0x00, 0xab, 0xcd, 0x01]);
        assert_eq!(format_mac(&config.mac), "52:54:00:ab:cd:01");
        assert_eq!(config.mtu, Some(9000));
        assert_eq!(config.queue_pairs, 4);
        assert_eq!(config.queue_size, 1024);
    }

    #[test]
    fn invalid_values_are_rejected() {
        for mac in [
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52:54:00:ab:cd:1",
            "52-54-00-ab-cd-01",
            "zz:54:00:ab:cd:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
        ] {
            assert!(parse_mac(mac).is_err(), "{mac}");
            assert!(Args::try_parse_from(["n", "-s", "s", "--tap", "t", "--mac", mac]).is_err());
        }
        assert!(matches!(
            parse(&["--queue-size", "100"]),
            Err(Error::InvalidQueueSize(100))
        ));
        assert!(matches!(
            parse(&["--queue-size", "2048"]),
            Err(Error::InvalidQueueSize(2048))
        ));
        assert!(matches!(
            parse(&["--queue-pairs", "0"]),
            Err(Error::InvalidQueuePairs(0))
        ));
        assert!(matches!(
            parse(&["--queue-pairs", "32"]),
            Err(Error::InvalidQueuePairs(32))
        ));
        assert!(matches!(
            parse(&["--mtu", "67"]),
            Err(Error::InvalidMtu(67))
        ));
        assert!(matches!(
            parse(&["--mtu", "65522"]),
            Err(Error::InvalidMtu(65522))
        ));
        assert!(parse(&["--mtu", "68"]).is_ok());
        let long_name = Args::try_parse_from(["n", "-s", "s", "--tap", "a-very-long-tap-name"]);
        assert!(matches!(
            Config::try_from(long_name.unwrap()),
            Err(Error::InvalidTapName(_))
        ));
        assert!(Args::try_parse_from(["n", "-s", "s"]).is_err());
        assert!(Args::try_parse_from(["n", "--tap", "t"]).is_err());
    }
}
