//! `hvisor-vhost-bridge`: the daemon. It reads an hvisor-tool `virtio_cfg.json`, opens the
//! HSM (`/dev/hvisor`, or a provider socket such as the simulated hypervisor), starts or
//! connects the vhost-user backends, and serves the guest's virtio-mmio traps until SIGTERM.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hvisor_bridge::affinity::{pin_current_thread, pin_process, ProcessCpus, RingCpu};
use hvisor_bridge::config::{Config, ConfigError};
use hvisor_bridge::control::CONTROL_TIMEOUT_DEFAULT;
use hvisor_bridge::event_loop::{
    LoopOptions, ACK_GAP_BOUNDS_US, AWAIT_SPIN_DEFAULT_US, SPIN_MAX_DEFAULT_US,
};
use hvisor_bridge::logging::LogTarget;
use hvisor_bridge::status;
use hvisor_bridge::supervisor::{BackendPolicy, BackendPrograms, RunAs};
use hvisor_bridge::BridgeOptions;
use hvisor_hsm::{DevHvisor, Hsm, HvisorAbi, ProviderHsm, WakeupKind, SIGHVI};

/// hvisor virtio-mmio to vhost-user bridge.
#[derive(Debug, Parser)]
#[command(
    name = "hvisor-vhost-bridge",
    version,
    about,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// hvisor-tool style virtio_cfg.json (with optional backend fields).
    #[arg(short, long, required = true)]
    config: Option<PathBuf>,
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
    /// Poll up to this many microseconds while an answer is certain to come: after a queue
    /// notify the backend has not answered yet, and after an interrupt the guest has not
    /// acknowledged yet. The poll yields the CPU to anything runnable on it (0: no such poll).
    #[arg(long, default_value_t = AWAIT_SPIN_DEFAULT_US)]
    await_spin_us: u64,
    /// Widen the ring spin adaptively up to this many microseconds while work keeps
    /// arriving shortly after the bridge went to sleep, and narrow it back after long idle
    /// periods (0, or --spin-us 0: the spin stays at --spin-us).
    #[arg(long, default_value_t = SPIN_MAX_DEFAULT_US)]
    spin_max_us: u64,
    /// Run the bridge and every backend it spawns on these CPUs of root Linux: `irq` for the
    /// CPU that takes hvisor's virtio interrupt (a request's hops, hvisor to bridge to
    /// backend and back, then stay on one CPU), `all` for no pinning, or a list such as
    /// `0` or `1-3`. [default: irq on /dev/hvisor, all with --hsm-socket]
    #[arg(long, value_name = "irq|all|LIST")]
    cpus: Option<ProcessCpus>,
    /// Run the ring thread alone on this CPU of root Linux: a number, or `irq` for the CPU
    /// that takes hvisor's virtio interrupt. For the ring thread, it overrides `--cpus`.
    #[arg(long, value_name = "CPU|irq")]
    ring_cpu: Option<RingCpu>,
    /// Longest sleep without a wakeup (guards against a lost hypervisor wakeup).
    #[arg(long, default_value_t = 100)]
    guard_timeout_ms: u64,
    /// Inject an interrupt again when the guest has not acknowledged it this many
    /// milliseconds after the last injection, and whenever the device signals again before
    /// the acknowledgement: hvisor drops an injection that finds the interrupt still active
    /// in the guest. 0: inject once per assertion.
    #[arg(long, default_value_t = 10)]
    reinject_ms: u64,
    /// Directory for the sockets of spawned backends [default: /run/hvisor-vhost as root,
    /// else $XDG_RUNTIME_DIR/hvisor-vhost]. A missing one is created (mode 0700, its parent
    /// must exist); an existing one must be a directory, not a symlink, owned by the bridge's
    /// user and closed to group and others.
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
    /// A user (uid) whose processes may serve an external backend's socket, besides root and
    /// the bridge's own user; repeat for more. The bridge hands every backend guest memory.
    #[arg(long = "backend-uid", value_name = "UID")]
    backend_uids: Vec<u32>,
    /// Run the backends the bridge spawns as this user (a name or a uid) instead of the
    /// bridge's own. Their runtime directory then belongs to that user.
    #[arg(long, value_name = "USER")]
    backend_user: Option<String>,
    /// With --backend-user: the group (a name or a gid) instead of the user's primary group.
    #[arg(long, value_name = "GROUP", requires = "backend_user")]
    backend_group: Option<String>,
    /// Seconds to wait for an external backend's socket to appear.
    #[arg(long, default_value_t = 10)]
    connect_timeout_s: u64,
    /// Seconds to keep trying to restore a backend that died before failing its device.
    #[arg(long, default_value_t = 30)]
    reconnect_timeout_s: u64,
    /// Milliseconds a backend may take to answer one control operation (activation, reset,
    /// config write or refresh, restore). Past it the backend is treated as hung: its device
    /// alone needs a reset and the backend is restarted (or awaited, if external).
    #[arg(long, default_value_t = CONTROL_TIMEOUT_DEFAULT.as_millis() as u64)]
    backend_timeout_ms: u64,
    /// Write the bridge's pid to this file once every device is ready to serve (and log
    /// "ready" at that moment); removed when the bridge exits. Start zones after it appears.
    #[arg(long)]
    pid_file: Option<PathBuf>,
    /// Ask the hypervisor which zones run at most this often (only while idle), and reset the
    /// devices of a zone that shut down. 0: never ask.
    #[arg(long, default_value_t = 1000)]
    zone_poll_ms: u64,
    /// The hvisor build's bridge-page limits, MAX_REQ/MAX_DEVS/MAX_CPUS (e.g. 32/8/32, the
    /// default, or 32/4/32). They size the ring and bound the devices and pending IRQs a
    /// config may have.
    #[arg(long)]
    hvisor_abi: Option<HvisorAbi>,
    /// The status socket, answered with one JSON document per connection (see the `status`
    /// command) [default: status.sock in the runtime directory].
    #[arg(long)]
    status_socket: Option<PathBuf>,
    /// Validate the config, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Where the log goes: stderr, syslog (/dev/log, facility daemon) or journald. Spawned
    /// backends' lines go there too, marked with their zone, device and pid.
    #[arg(long, value_enum, default_value_t)]
    log_target: LogTarget,
    /// error, warn, info, debug or trace, for the bridge and the backends it spawns
    /// (default: RUST_LOG, else info).
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<log::LevelFilter>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the zones, devices and counters of a running bridge (SIGUSR1 logs the same,
    /// unless hvisor.ko wakes the bridge with signal 10).
    Status {
        /// The bridge's status socket [default: status.sock in the default runtime
        /// directory].
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Only in host builds made for the board tarball's man pages and completions.
    #[cfg(feature = "docgen")]
    if let Some(dir) = hvisor_vhost_docgen::requested() {
        return hvisor_vhost_docgen::run::<Args>(&dir);
    }
    let args = Args::parse();
    if let Some(Command::Status { socket, json }) = &args.command {
        return print_status(socket.as_deref(), *json);
    }
    if let Err(e) = hvisor_bridge::logging::init(args.log_target, args.log_level) {
        eprintln!(
            "hvisor-vhost-bridge: {}",
            hvisor_bridge::control::error_chain(&e)
        );
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{}", hvisor_bridge::control::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `status`: asks a running bridge and prints its answer.
fn print_status(socket: Option<&std::path::Path>, json: bool) -> ExitCode {
    let socket = socket.map_or_else(
        || hvisor_bridge::supervisor::default_runtime_dir().join(status::SOCKET_NAME),
        std::path::Path::to_path_buf,
    );
    match status::query(&socket) {
        Ok(snapshot) if json => match serde_json::to_string_pretty(&snapshot) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("hvisor-vhost-bridge status: {e}");
                ExitCode::FAILURE
            }
        },
        Ok(snapshot) => {
            print!("{}", status::render(&snapshot));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "hvisor-vhost-bridge status: {}",
                hvisor_bridge::control::error_chain(&e)
            );
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    // clap requires --config unless a command is given, and commands return before this.
    let config_path = args.config.clone().ok_or("--config is required")?;
    if args.check {
        // `--check` never touches the hypervisor device.
        let config = load_config(&config_path, args.hvisor_abi.unwrap_or_default())?;
        println!(
            "{}: {} zones, {} devices: OK",
            config_path.display(),
            config.zones.len(),
            config.devices().count()
        );
        return Ok(());
    }
    // Block the stop signals before any thread or child exists, and read them from a signalfd
    // inside the event loop.
    let signals = block_stop_signals()?;
    // Before any thread or backend starts, so that they all inherit the CPU set.
    pin_bridge(args.cpus.as_ref(), args.hsm_socket.is_some())?;
    // The HSM is opened (INIT_VIRTIO on /dev/hvisor) before the config is read, as
    // hvisor-tool's daemon does: the usual start order is `bridge &` then `hvisor zone
    // start`, and a zone's first virtio access panics hvisor ("VirtioBridge not enabled") when
    // no daemon ever did INIT_VIRTIO. With the bridge page in place, a config the bridge
    // rejects leaves the zone waiting for a daemon instead.
    //
    // The event loop must run on this thread, the one that opens /dev/hvisor: an hvisor.ko
    // without SET_EVENTFD wakes the daemon with a signal directed at the thread that did
    // INIT_VIRTIO.
    let (hsm, control, wakeup): (Arc<dyn Hsm>, Option<Arc<ProviderHsm>>, WakeupKind) =
        match &args.hsm_socket {
            Some(socket) => {
                let provider = Arc::new(ProviderHsm::connect(socket)?);
                log::info!(
                    "HSM: provider at {} connected; reading the config next",
                    socket.display()
                );
                let wakeup = provider.wakeup_kind();
                (provider.clone(), Some(provider), wakeup)
            }
            None => {
                let dev = DevHvisor::open_abi(&args.hsm_dev, args.hvisor_abi)?;
                log::info!(
                    "HSM: {} initialised (INIT_VIRTIO); reading the config next",
                    args.hsm_dev.display()
                );
                let wakeup = dev.wakeup_kind();
                (Arc::new(dev), None, wakeup)
            }
        };
    if wakeup == WakeupKind::Signal && SIGHVI == libc::SIGUSR1 {
        // The module wakes this thread with SIGHVI, the same number as SIGUSR1. Left in the
        // stop signalfd, each wakeup would be read there as a status request: a status dump
        // per request, and a wakeup the ring never sees (its guard timeout finds the work).
        leave_sigusr1_to_the_hsm(&signals)?;
        log::info!(
            "SIGUSR1 is this hvisor.ko's wakeup signal: it does not log the status; use \
             `hvisor-vhost-bridge status`"
        );
    }
    // The limits of the page the HSM mapped: what was stated, or what hvisor implies.
    let abi = hsm.bridge().abi();
    if let Some(stated) = args.hvisor_abi.filter(|&stated| stated != abi) {
        return Err(
            format!("--hvisor-abi {stated} was stated, but the HSM's page is {abi}").into(),
        );
    }
    let config = load_config(&config_path, abi).inspect_err(|_| {
        log::error!(
            "the config was rejected after the HSM was initialised: zones wait for a daemon \
             instead of faulting; fix the config and start the bridge again"
        );
    })?;
    let runtime_dir = args
        .runtime_dir
        .unwrap_or_else(hvisor_bridge::supervisor::default_runtime_dir);
    let options = BridgeOptions {
        runtime_dir: runtime_dir.clone(),
        programs: {
            let mut programs = BackendPrograms::beside_bridge();
            programs.blk = args.blk_backend.unwrap_or(programs.blk);
            programs.net = args.net_backend.unwrap_or(programs.net);
            programs.console = args.console_backend.unwrap_or(programs.console);
            programs
        },
        backends: BackendPolicy {
            external_uids: args.backend_uids,
            run_as: args
                .backend_user
                .as_deref()
                .map(|user| RunAs::lookup(user, args.backend_group.as_deref()))
                .transpose()?,
        },
        connect_timeout: Duration::from_secs(args.connect_timeout_s),
        reconnect_timeout: Duration::from_secs(args.reconnect_timeout_s),
        loop_options: LoopOptions {
            spin: Duration::from_micros(args.spin_us),
            spin_max: Duration::from_micros(args.spin_max_us),
            await_spin: Duration::from_micros(args.await_spin_us),
            guard_timeout: Duration::from_millis(args.guard_timeout_ms.max(1)),
            zone_poll: (args.zone_poll_ms > 0).then(|| Duration::from_millis(args.zone_poll_ms)),
            reinject: (args.reinject_ms > 0).then(|| Duration::from_millis(args.reinject_ms)),
            control_timeout: Duration::from_millis(args.backend_timeout_ms.max(1)),
        },
    };
    let control_fd: Option<BorrowedFd<'_>> = control.as_deref().map(|c| c.control_fd());
    let mut running =
        hvisor_bridge::build(&config, hsm, &options, Some(signals.as_fd()), control_fd)?;
    let status_server = {
        let board = status::StatusBoard::new()?;
        running.bridge.publish_status(Arc::clone(&board))?;
        let path = args
            .status_socket
            .clone()
            .unwrap_or_else(|| runtime_dir.join(status::SOCKET_NAME));
        let server = status::StatusServer::start(&path, board)?;
        log::info!("status socket {}", server.path().display());
        server
    };
    // Once every other thread is started: only the ring thread (this one) is pinned.
    if let Some(target) = args.ring_cpu {
        let cpu = pin_current_thread(target)?;
        log::info!("ring thread pinned to CPU {cpu}");
    }
    // Every backend is started and negotiated and the loop is built: requests that arrive
    // from now on are served (those queued meanwhile are drained when the loop starts).
    let _pid_file = args.pid_file.as_deref().map(PidFile::create).transpose()?;
    log::info!(
        "ready: serving {} devices{}",
        running.bridge.devices().len(),
        args.pid_file
            .as_ref()
            .map(|p| format!("; pid file {}", p.display()))
            .unwrap_or_default()
    );
    let status = format!("serving {} devices", running.bridge.devices().len());
    match hvisor_bridge::service::notify_ready(&status) {
        Ok(told) => log::debug!("service manager notified: {told}"),
        // A Type=notify unit then fails its start timeout: say why in the log.
        Err(e) => log::warn!("{}", hvisor_bridge::control::error_chain(&e)),
    }
    let stats = loop {
        let stats = running.bridge.run()?;
        if !running.bridge.reload_requested() {
            break stats;
        }
        report_config_changes(&config_path, &config, abi);
    };
    log::info!(
        "stopping: {} requests, {} interrupts, {} sleeps, {} guard wakeups, {} zone resets, \
         {} re-injections, {} answered kicks, kick-to-call {} µs in all, injection-to-ACK gaps {}",
        stats.requests,
        stats.interrupts,
        stats.sleeps,
        stats.guard_wakeups,
        stats.zone_resets,
        stats.reinjections,
        stats.notify_to_call.count,
        stats.notify_to_call.total_us,
        ack_gap_summary(&stats.ack_gaps)
    );
    drop(status_server);
    drop(running);
    let _ = std::fs::remove_dir(&runtime_dir);
    Ok(())
}

/// "<100µs:3 <250µs:10 ... >=8000µs:1": every bucket, so that scripts see the same keys.
fn ack_gap_summary(gaps: &[u64]) -> String {
    let labels = ACK_GAP_BOUNDS_US
        .iter()
        .map(|bound| format!("<{bound}µs"))
        .chain(std::iter::once(format!(
            ">={}µs",
            ACK_GAP_BOUNDS_US[ACK_GAP_BOUNDS_US.len() - 1]
        )));
    labels
        .zip(gaps)
        .map(|(label, count)| format!("{label}:{count}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `--pid-file`, removed when dropped.
struct PidFile(PathBuf);

impl PidFile {
    /// Writes our pid atomically: a reader never sees a partial file.
    fn create(path: &std::path::Path) -> Result<PidFile, PidFileError> {
        let err = |source| PidFileError {
            path: path.to_owned(),
            source,
        };
        let name = path
            .file_name()
            .ok_or_else(|| err(std::io::ErrorKind::InvalidInput.into()))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".{}.tmp", std::process::id()));
        let temp = path.with_file_name(temp_name);
        std::fs::write(&temp, format!("{}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&temp, path))
            .map_err(|e| {
                let _ = std::fs::remove_file(&temp);
                err(e)
            })?;
        Ok(PidFile(path.to_owned()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The pid file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the pid file {}", path.display())]
struct PidFileError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Parses and validates the config and logs its devices.
fn load_config(path: &std::path::Path, abi: HvisorAbi) -> Result<Config, ConfigError> {
    let config = Config::from_file_for(path, abi)?;
    for warning in &config.warnings {
        log::warn!("{warning}");
    }
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
    Ok(config)
}

/// SIGHUP: re-reads the config and says what would change. Devices are not hot-plugged:
/// applying a change needs a bridge restart.
fn report_config_changes(path: &std::path::Path, running: &Config, abi: HvisorAbi) {
    let new = match Config::from_file_for(path, abi) {
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

/// Applies `--cpus` to this thread (and so to every thread and backend started later). The
/// default, the hvisor interrupt's CPU on /dev/hvisor, only warns when that CPU cannot be
/// found; a CPU set that was asked for and cannot be applied is an error.
fn pin_bridge(
    cpus: Option<&ProcessCpus>,
    simulated: bool,
) -> Result<(), hvisor_bridge::affinity::AffinityError> {
    let (cpus, stated) = match cpus {
        Some(cpus) => (cpus.clone(), true),
        None if simulated => (ProcessCpus::All, false),
        None => (ProcessCpus::HvisorIrq, false),
    };
    match pin_process(&cpus) {
        Ok(Some(list)) => log::info!("the bridge and its backends run on CPUs {list:?}"),
        Ok(None) => log::debug!("not pinned to CPUs"),
        Err(e) if !stated => log::warn!(
            "not pinned to the hvisor interrupt's CPU: {}; requests cross CPUs (--cpus all \
             silences this)",
            hvisor_bridge::control::error_chain(&e)
        ),
        Err(e) => return Err(e),
    }
    Ok(())
}

/// The signals the bridge reads from its stop signalfd: SIGTERM, SIGINT, SIGHUP, and, with
/// `status`, SIGUSR1 (log the status).
fn stop_signal_set(status: bool) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        if status {
            libc::sigaddset(&mut set, libc::SIGUSR1);
        }
    }
    set
}

/// Takes SIGUSR1 out of the stop signalfd `fd`, so that only the HSM's wakeup signalfd reads
/// it. It stays blocked: a signalfd reads only blocked signals.
fn leave_sigusr1_to_the_hsm(fd: &OwnedFd) -> std::io::Result<()> {
    let set = stop_signal_set(false);
    // SAFETY: `fd` is a signalfd this process owns; `set` is initialised. Passing an existing
    // signalfd replaces its mask.
    if unsafe { libc::signalfd(fd.as_raw_fd(), &set, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Blocks SIGTERM, SIGINT, SIGHUP and SIGUSR1 (log the status) in this thread (and so in
/// every thread it starts) and returns a signalfd that reads them.
fn block_stop_signals() -> std::io::Result<OwnedFd> {
    let set = stop_signal_set(true);
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
