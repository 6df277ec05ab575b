//! Host side of the arm64 EL2 trap rig (tests/rig/arm64): the HSM provider that stands in
//! for hvisor's kernel module and IPIs.
//!
//! The guest RAM is a QEMU `memory-backend-file` (file offset = GPA − RAM base); the rig's EL2
//! stub keeps the bridge page in a page of that RAM hidden from Linux. This program:
//! - creates (or opens) the RAM file and hands the bridge the bridge page and one region per
//!   configured zone RAM region over the provider protocol (`hvisor_hsm::provider`);
//! - watches the page and writes the wakeup eventfd when requests are pending while the bridge
//!   asked for a wakeup (hvisor's wakeup IPI); the stub also sends a byte on the `--doorbell`
//!   socket after a push that found `need_wakeup` set, so the wakeup does not wait for the poll;
//! - turns FINISH_REQ (the finish eventfd) into a doorbell byte on the socket behind QEMU's
//!   second UART (`--doorbell`), which wakes the stub from its idle WFI to drain `res_list`;
//! - with `--echo-test`, consumes the ring itself and answers every device window as an empty
//!   virtio-mmio transport (DeviceID 0): a ring self-test with a real guest and no bridge.

use std::fs::{File, OpenOptions};
use std::io;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use clap::Parser;
use hvisor_bridge::config::{Config, ZoneConfig};
use hvisor_hsm::abi::DeviceReq;
use hvisor_hsm::provider::{send_handover, Handover, RegionHandover};
use hvisor_hsm::BridgePage;
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

const PAGE_SIZE: u64 = 4096;
const VIRTIO_MMIO_MAGIC: u64 = 0x7472_6976;

#[derive(Parser, Debug)]
#[command(about = "HSM provider for the arm64 EL2 trap rig (guest RAM file + bridge page)")]
struct Args {
    /// Guest RAM file (QEMU memory-backend-file with share=on); created or extended as needed.
    #[arg(long)]
    ram: PathBuf,
    /// The rig's virtio config: the same file the bridge reads.
    #[arg(long)]
    config: PathBuf,
    /// Guest-physical address of the bridge page (from the rig's gen.py).
    #[arg(long, value_parser = parse_u64)]
    bridge_gpa: u64,
    /// Guest RAM base (file offset 0).
    #[arg(long, value_parser = parse_u64, default_value = "0x40000000")]
    ram_base: u64,
    /// UNIX socket on which the bridge fetches its fds.
    #[arg(long, required_unless_present = "echo_test")]
    socket: Option<PathBuf>,
    /// File created once the bridge has published its devices (mmio_avail).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// UNIX socket for QEMU's second serial port (`-chardev socket,path=...`): one byte is
    /// written to it on every FINISH_REQ.
    #[arg(long)]
    doorbell: Option<PathBuf>,
    /// Serve the ring here instead of a bridge: every window reads as an empty transport.
    #[arg(long)]
    echo_test: bool,
    /// Watcher poll period in microseconds (with `--doorbell`, the stub's kicks wake the
    /// watcher at once and the poll is only a guard).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
}

fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?}: {e}"))
}

#[derive(Debug, thiserror::Error)]
enum ProviderError {
    #[error("config {}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Hsm(#[from] hvisor_hsm::HsmError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ProviderError {
    let what = what.into();
    move |source| ProviderError::Io { what, source }
}

/// One zone RAM region as a window of the RAM file.
#[derive(Debug, Clone, Copy)]
struct RamRegion {
    zone0_ipa: u64,
    size: u64,
    file_offset: u64,
}

/// Everything handed to each connecting bridge.
#[derive(Debug)]
struct Shared {
    ram: File,
    bridge_offset: u64,
    wakeup: EventFd,
    finish: EventFd,
    regions: Vec<RamRegion>,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    if let Err(err) = run(Args::parse()) {
        let mut chain = format!("hvisor-rig-provider: {err}");
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            chain.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        eprintln!("{chain}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), ProviderError> {
    let config = Config::from_file(&args.config).map_err(|e| ProviderError::Config {
        path: args.config.clone(),
        reason: e.to_string(),
    })?;
    let zone = match config.zones.as_slice() {
        [zone] => zone.clone(),
        _ => {
            return Err(ProviderError::Config {
                path: args.config.clone(),
                reason: "the rig runs exactly one zone".into(),
            })
        }
    };
    let regions = ram_regions(&zone, args.ram_base).map_err(|reason| ProviderError::Config {
        path: args.config.clone(),
        reason,
    })?;
    let file_len = regions
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0);
    let bridge_offset = args
        .bridge_gpa
        .checked_sub(args.ram_base)
        .filter(|off| off % PAGE_SIZE == 0 && off + PAGE_SIZE <= file_len)
        .ok_or_else(|| ProviderError::Config {
            path: args.config.clone(),
            reason: format!(
                "bridge page {:#x} is not a page of the zone RAM",
                args.bridge_gpa
            ),
        })?;

    let ram = open_ram(&args.ram, file_len)?;
    let bridge = BridgePage::map(ram.as_fd(), bridge_offset)?;
    let new_eventfd = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(io_err("eventfd"));
    let shared = Arc::new(Shared {
        ram,
        bridge_offset,
        wakeup: new_eventfd()?,
        finish: new_eventfd()?,
        regions,
    });
    // The stop signals are read from a signalfd in the watcher loop; block them before any
    // thread exists so every thread inherits the mask.
    let signals = block_stop_signals()?;
    set_fine_timer_slack();

    let doorbell = Arc::new(Doorbell::default());
    if let Some(path) = &args.doorbell {
        let _ = std::fs::remove_file(path);
        let listener =
            UnixListener::bind(path).map_err(io_err(format!("bind {}", path.display())))?;
        let doorbell = doorbell.clone();
        thread::spawn(move || doorbell.accept(&listener));
    }
    if let Some(socket) = &args.socket {
        if !args.echo_test {
            let _ = std::fs::remove_file(socket);
            let listener =
                UnixListener::bind(socket).map_err(io_err(format!("bind {}", socket.display())))?;
            log::info!("serving the provider protocol on {}", socket.display());
            let shared = shared.clone();
            thread::spawn(move || accept_loop(&listener, &shared));
        }
    }
    let mut watcher = Watcher {
        bridge: &bridge,
        shared: &shared,
        echo: args.echo_test.then_some(&zone),
        ready_file: args.ready_file.as_deref(),
        doorbell: &doorbell,
        stats: Stats::default(),
    };
    watcher.run(signals.as_fd(), Duration::from_micros(args.poll_us.max(1)))
}

fn ram_regions(zone: &ZoneConfig, ram_base: u64) -> Result<Vec<RamRegion>, String> {
    zone.memory_regions
        .iter()
        .map(|r| {
            let file_offset = r.zonex_ipa.checked_sub(ram_base).ok_or_else(|| {
                format!(
                    "region {:#x} lies below the RAM base {ram_base:#x}",
                    r.zonex_ipa
                )
            })?;
            Ok(RamRegion {
                zone0_ipa: r.zone0_ipa,
                size: r.size,
                file_offset,
            })
        })
        .collect()
}

fn open_ram(path: &Path, len: u64) -> Result<File, ProviderError> {
    let what = || format!("guest RAM file {}", path.display());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(what()))?;
    let current = file.metadata().map_err(io_err(what()))?.len();
    if current < len {
        file.set_len(len).map_err(io_err(what()))?;
    }
    Ok(file)
}

fn accept_loop(listener: &UnixListener, shared: &Arc<Shared>) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let shared = shared.clone();
                thread::spawn(move || serve_bridge(stream, &shared));
            }
            Err(e) => log::warn!("accept: {e}"),
        }
    }
}

/// Hands the fds to one bridge, then holds the connection until the bridge goes away.
fn serve_bridge(stream: UnixStream, shared: &Shared) {
    let handover = Handover {
        bridge: (shared.ram.as_fd(), shared.bridge_offset),
        wakeup: borrow_eventfd(&shared.wakeup),
        finish: borrow_eventfd(&shared.finish),
        regions: shared
            .regions
            .iter()
            .map(|r| RegionHandover {
                zone0_ipa: r.zone0_ipa,
                size: r.size,
                fd: shared.ram.as_fd(),
                offset: r.file_offset,
            })
            .collect(),
    };
    if let Err(e) = send_handover(&stream, &handover) {
        log::warn!("handover to a bridge failed: {e}");
        return;
    }
    log::info!(
        "bridge connected: handed over the bridge page and {} RAM regions",
        shared.regions.len()
    );
    // The bridge never sends anything after the handover; EOF means it is gone.
    let mut sink = [0u8; 64];
    loop {
        match io::Read::read(&mut &stream, &mut sink) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("bridge connection: {e}");
                break;
            }
        }
    }
    log::info!("bridge disconnected");
}

/// The connection from QEMU's second serial port, once QEMU has connected.
#[derive(Debug, Default)]
struct Doorbell {
    stream: Mutex<Option<UnixStream>>,
}

impl Doorbell {
    fn accept(&self, listener: &UnixListener) {
        for stream in listener.incoming() {
            match stream.and_then(|s| s.set_nonblocking(true).map(|()| s)) {
                Ok(stream) => {
                    log::info!("doorbell connected");
                    *self.lock() = Some(stream);
                }
                Err(e) => log::warn!("doorbell accept: {e}"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection's fd, for the watcher's poll set.
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.lock().as_ref().map(|s| s.as_raw_fd())
    }

    /// Reads the stub's pending kicks (one byte each); returns how many.
    fn take_kicks(&self) -> u64 {
        let mut guard = self.lock();
        let Some(stream) = guard.as_mut() else {
            return 0;
        };
        let mut kicks = 0;
        let mut buf = [0u8; 256];
        loop {
            match io::Read::read(stream, &mut buf) {
                Ok(0) => {
                    log::info!("doorbell closed by QEMU");
                    *guard = None;
                    return kicks;
                }
                Ok(n) => kicks += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return kicks,
                Err(e) => {
                    log::info!("doorbell closed: {e}");
                    *guard = None;
                    return kicks;
                }
            }
        }
    }

    /// Writes one byte; a full socket already holds an unread ring, which is just as good.
    fn ring(&self) -> bool {
        let mut guard = self.lock();
        let Some(stream) = guard.as_mut() else {
            return false;
        };
        match stream.write(&[1]) {
            Ok(_) => true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
            Err(e) => {
                log::info!("doorbell closed: {e}");
                *guard = None;
                false
            }
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    wakeups: u64,
    finishes: u64,
    doorbells: u64,
    kicks: u64,
    echoed: u64,
}

struct Watcher<'a> {
    bridge: &'a BridgePage,
    shared: &'a Shared,
    echo: Option<&'a ZoneConfig>,
    ready_file: Option<&'a Path>,
    doorbell: &'a Doorbell,
    stats: Stats,
}

impl Watcher<'_> {
    fn run(&mut self, signals: BorrowedFd<'_>, period: Duration) -> Result<(), ProviderError> {
        let mut ready = false;
        loop {
            if let Some(zone) = self.echo {
                while let Some(req) = self.bridge.pop_request() {
                    self.echo_reply(zone, &req)?;
                }
            } else if self.bridge.has_requests()
                && self.bridge.need_wakeup()
                && !self.wakeup_pending()?
            {
                // hvisor's wakeup IPI. A kick the bridge has not read yet still stands.
                self.shared
                    .wakeup
                    .write(1)
                    .map_err(io_err("writing the wakeup eventfd"))?;
                self.stats.wakeups += 1;
            }
            if !ready && self.bridge.mmio_addrs().is_some() {
                ready = true;
                log::info!("bridge published its devices");
                if let Some(path) = self.ready_file {
                    std::fs::write(path, b"ready\n")
                        .map_err(io_err(format!("writing {}", path.display())))?;
                }
            }
            if self.wait(signals, period)? {
                log::info!(
                    "stopping: {} wakeups sent, {} FINISH_REQ, {} doorbells, {} kicks, {} requests answered locally",
                    self.stats.wakeups,
                    self.stats.finishes,
                    self.stats.doorbells,
                    self.stats.kicks,
                    self.stats.echoed
                );
                return Ok(());
            }
        }
    }

    /// Whether the wakeup eventfd still holds a kick the bridge has not consumed.
    fn wakeup_pending(&self) -> Result<bool, ProviderError> {
        poll_readable(borrow_eventfd(&self.shared.wakeup))
            .map_err(io_err("poll of the wakeup eventfd"))
    }

    /// Sleeps for `period` or until FINISH_REQ, a kick from the stub or a stop signal; returns
    /// true on a stop signal.
    fn wait(&mut self, signals: BorrowedFd<'_>, period: Duration) -> Result<bool, ProviderError> {
        let pollin = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // Without a doorbell connection yet, -1 makes poll skip the entry.
        let mut fds = [
            pollin(signals.as_raw_fd()),
            pollin(self.shared.finish.as_raw_fd()),
            pollin(self.doorbell.raw_fd().unwrap_or(-1)),
        ];
        ppoll(&mut fds, period).map_err(io_err("ppoll"))?;
        if fds[2].revents != 0 {
            // The caller's loop checks the ring and need_wakeup next.
            self.stats.kicks += self.doorbell.take_kicks();
        }
        if fds[1].revents & libc::POLLIN != 0 {
            // The stub drains res_list on every trap; the doorbell wakes it from an idle WFI.
            if let Ok(n) = self.shared.finish.read() {
                self.stats.finishes += n;
                if self.doorbell.ring() {
                    self.stats.doorbells += 1;
                }
            }
        }
        Ok(fds[0].revents & libc::POLLIN != 0)
    }

    /// `--echo-test`: an empty virtio-mmio v2 transport (magic, version 2, DeviceID 0).
    fn echo_reply(&mut self, zone: &ZoneConfig, req: &DeviceReq) -> Result<(), ProviderError> {
        self.stats.echoed += 1;
        let offset = zone
            .devices
            .iter()
            .find(|d| d.contains(req.address))
            .map(|d| req.address - d.addr);
        let value = match (req.is_write, offset) {
            (0, Some(0)) => VIRTIO_MMIO_MAGIC,
            (0, Some(4)) => 2,
            _ => 0,
        };
        log::info!(
            "echo: cpu {} zone {} {} {:#x} size {} value {:#x}{}",
            req.src_cpu,
            req.src_zone,
            if req.is_write != 0 { "write" } else { "read" },
            req.address,
            req.size,
            if req.is_write != 0 { req.value } else { value },
            if req.need_interrupt != 0 {
                " (async)"
            } else {
                ""
            }
        );
        if req.need_interrupt == 0 {
            self.bridge.reply(req.src_cpu, value)?;
        }
        Ok(())
    }
}

fn borrow_eventfd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns the fd and outlives the returned borrow.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

/// Whether `fd` is readable right now.
fn poll_readable(fd: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    ppoll(&mut fds, Duration::ZERO)?;
    Ok(fds[0].revents & libc::POLLIN != 0)
}

/// `ppoll` with a relative timeout, retried on EINTR.
fn ppoll(fds: &mut [libc::pollfd], timeout: Duration) -> io::Result<usize> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().try_into().unwrap_or(libc::time_t::MAX),
        tv_nsec: timeout.subsec_nanos().into(),
    };
    loop {
        // SAFETY: `fds` is a valid slice of pollfd and `ts` a timespec, both outliving the
        // call; no signal mask is passed.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP and returns a signalfd that reads them.
fn block_stop_signals() -> Result<OwnedFd, ProviderError> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before use.
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
        return Err(io_err("blocking the stop signals")(
            io::Error::from_raw_os_error(rc),
        ));
    }
    // SAFETY: `set` is initialised; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io_err("signalfd")(io::Error::last_os_error()));
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The watcher sleeps for tens of microseconds; the default 50 µs timer slack would double that.
fn set_fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and affects only this thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    if rc != 0 {
        log::warn!("PR_SET_TIMERSLACK: {}", io::Error::last_os_error());
    }
}
