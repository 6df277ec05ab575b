//! `hvisor-vhost-bridge`: the daemon. It reads an hvisor-tool `virtio_cfg.json`, opens the
//! HSM (`/dev/hvisor`, or a provider socket such as the simulated hypervisor), starts or
//! connects the vhost-user backends, and serves the guest's virtio-mmio traps until SIGTERM.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hvisor_bridge::config::Config;
use hvisor_bridge::event_loop::LoopOptions;
use hvisor_bridge::supervisor::BackendPrograms;
use hvisor_bridge::BridgeOptions;
use hvisor_hsm::{DevHvisor, Hsm, ProviderHsm};

/// hvisor virtio-mmio to vhost-user bridge.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// hvisor-tool style virtio_cfg.json (with optional backend fields).
    #[arg(short, long)]
    config: PathBuf,
    /// The hvisor kernel module device.
    #[arg(long, default_value = "/dev/hvisor", conflicts_with = "hsm_socket")]
    hsm_dev: PathBuf,
    /// Take the bridge page and zone RAM from a provider socket (the simulated hypervisor or
    /// a test rig) instead of /dev/hvisor.
    #[arg(long)]
    hsm_socket: Option<PathBuf>,
    /// Busy-poll the request ring this many microseconds after the last request before sleeping.
    #[arg(long, default_value_t = 50)]
    spin_us: u64,
    /// Longest sleep without a wakeup (guards against a lost hypervisor wakeup).
    #[arg(long, default_value_t = 100)]
    guard_timeout_ms: u64,
    /// Directory for the sockets of spawned backends (created with mode 0700).
    #[arg(long)]
    runtime_dir: Option<PathBuf>,
    /// The vhost-user-blk program for devices with "img" (default: beside this binary, else PATH).
    #[arg(long)]
    blk_backend: Option<PathBuf>,
    /// The vhost-user-net program for devices with "tap" (default: beside this binary, else PATH).
    #[arg(long)]
    net_backend: Option<PathBuf>,
    /// The vhost-user-console program for consoles without "socket" (default: beside this
    /// binary, else PATH).
    #[arg(long)]
    console_backend: Option<PathBuf>,
    /// Seconds to wait for an external backend's socket to appear.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// Seconds to keep trying to restore a backend that died before failing its device.
    #[arg(long, default_value_t = 30)]
    reconnect_timeout_s: u64,
    /// Validate the config, print a summary and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", hvisor_bridge::event_loop::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let config = Config::from_file(&args.config)?;
    for (zone, dev) in config.devices() {
        log::info!(
            "zone {}: {} irq {} queues {}x{} backend {:?}",
            zone.id,
            dev.label(),
            dev.irq,
            dev.num_queues,
            dev.queue_size,
            dev.backend
        );
    }
    if args.check {
        println!(
            "{}: {} zones, {} devices: OK",
            args.config.display(),
            config.zones.len(),
            config.devices().count()
        );
        return Ok(());
    }
    // Block the stop signals before any thread or child exists, and read them from a signalfd
    // inside the event loop.
    let signals = block_stop_signals()?;
    let (hsm, control): (Arc<dyn Hsm>, Option<Arc<ProviderHsm>>) = match &args.hsm_socket {
        Some(socket) => {
            let provider = Arc::new(ProviderHsm::connect(socket)?);
            log::info!("HSM: provider at {}", socket.display());
            (provider.clone(), Some(provider))
        }
        None => {
            log::info!("HSM: {}", args.hsm_dev.display());
            (Arc::new(DevHvisor::open(&args.hsm_dev)?), None)
        }
    };
    let runtime_dir = args.runtime_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("hvisor-vhost-{}", std::process::id()))
    });
    let options = BridgeOptions {
        runtime_dir: runtime_dir.clone(),
        programs: {
            let mut programs = BackendPrograms::beside_bridge();
            programs.blk = args.blk_backend.unwrap_or(programs.blk);
            programs.net = args.net_backend.unwrap_or(programs.net);
            programs.console = args.console_backend.unwrap_or(programs.console);
            programs
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
        reconnect_timeout: Duration::from_secs(args.reconnect_timeout_s),
        loop_options: LoopOptions {
            spin: Duration::from_micros(args.spin_us),
            guard_timeout: Duration::from_millis(args.guard_timeout_ms.max(1)),
        },
    };
    let control_fd: Option<BorrowedFd<'_>> = control.as_deref().map(|c| c.control_fd());
    let mut running =
        hvisor_bridge::build(&config, hsm, &options, Some(signals.as_fd()), control_fd)?;
    log::info!("serving {} devices", running.bridge.devices().len());
    let stats = loop {
        let stats = running.bridge.run()?;
        if !running.bridge.reload_requested() {
            break stats;
        }
        report_config_changes(&args.config, &config);
    };
    log::info!(
        "stopping: {} requests, {} interrupts, {} sleeps, {} guard wakeups",
        stats.requests,
        stats.interrupts,
        stats.sleeps,
        stats.guard_wakeups
    );
    drop(running);
    let _ = std::fs::remove_dir(&runtime_dir);
    Ok(())
}

/// SIGHUP: re-reads the config and says what would change. Devices are not hot-plugged:
/// applying a change needs a bridge restart.
fn report_config_changes(path: &std::path::Path, running: &Config) {
    let new = match Config::from_file(path) {
        Ok(new) => new,
        Err(e) => {
            log::warn!(
                "SIGHUP: {} is invalid, keeping the running config: {e}",
                path.display()
            );
            return;
        }
    };
    let describe = |c: &Config| -> Vec<String> {
        c.devices()
            .map(|(z, d)| {
                format!(
                    "zone {} {} irq {} backend {:?}",
                    z.id,
                    d.label(),
                    d.irq,
                    d.backend
                )
            })
            .collect()
    };
    let (old, new) = (describe(running), describe(&new));
    let removed: Vec<_> = old.iter().filter(|d| !new.contains(d)).collect();
    let added: Vec<_> = new.iter().filter(|d| !old.contains(d)).collect();
    if removed.is_empty() && added.is_empty() {
        log::info!("SIGHUP: {} unchanged", path.display());
        return;
    }
    for d in removed {
        log::info!("SIGHUP: would remove {d}");
    }
    for d in added {
        log::info!("SIGHUP: would add {d}");
    }
    log::info!("SIGHUP: restart the bridge to apply these changes");
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and so in every thread it starts) and
/// returns a signalfd that reads them.
fn block_stop_signals() -> std::io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    // SAFETY: `set` is initialised; the old mask is not needed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
