//! Runs the real `hvisor-vhost-bridge` and backends against the simulated hypervisor: the
//! test process plays hvisor and the guest; the bridge and backends are separate processes,
//! exactly as on a board.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hvisor_bridge::config::Config;
use hvisor_hsm::sim::ProviderServer;
use hvisor_hsm::{SimHypervisor, SimOptions, SimRam, SimRegion, SimVcpu, SimZoneSpec};

use crate::blk_backend::BlkBackend;
use crate::driver::{GuestMemory, Interrupts, MmioBus};

/// How long a synchronous register access may wait for the bridge before the test fails.
/// Generous: the first access waits for the bridge to start and negotiate with backends.
pub const ACCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// A private directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Makes a fresh directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("hvv-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A workspace binary (`hvisor-vhost-bridge`, `vhost-user-blk`, ...), built beside the test
/// executable; `HVV_BIN_DIR` overrides the directory.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("HVV_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("current_exe");
            let mut dir = exe.parent().expect("exe dir").to_path_buf();
            if dir.ends_with("deps") {
                dir.pop();
            }
            dir
        }
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins)",
        path.display()
    );
    path
}

/// The simulator's view of a bridge config: the same file drives both sides.
pub fn sim_zones(config: &Config) -> Vec<SimZoneSpec> {
    config
        .zones
        .iter()
        .map(|z| SimZoneSpec {
            id: z.id,
            regions: z
                .memory_regions
                .iter()
                .map(|r| SimRegion {
                    zone0_ipa: r.zone0_ipa,
                    zonex_ipa: r.zonex_ipa,
                    size: r.size,
                })
                .collect(),
            windows: z.windows.iter().map(|w| (w.base, w.size)).collect(),
        })
        .collect()
}

/// A guest vCPU of the simulated zone.
#[derive(Debug)]
pub struct Vcpu(pub SimVcpu);

impl MmioBus for Vcpu {
    fn read(&self, addr: u64, size: u8) -> u64 {
        self.0
            .read_within(addr, size, ACCESS_TIMEOUT)
            .unwrap_or_else(|e| panic!("read {addr:#x}/{size}: {e}"))
    }

    fn write(&self, addr: u64, size: u8, value: u64) {
        self.0
            .write_within(addr, size, value, ACCESS_TIMEOUT)
            .unwrap_or_else(|e| panic!("write {addr:#x}/{size} = {value:#x}: {e}"))
    }
}

/// A zone's guest RAM.
#[derive(Debug)]
pub struct Ram(pub SimRam);

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        self.0
            .read(gpa, buf)
            .unwrap_or_else(|e| panic!("guest RAM read {gpa:#x}: {e}"))
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        self.0
            .write(gpa, data)
            .unwrap_or_else(|e| panic!("guest RAM write {gpa:#x}: {e}"))
    }
}

/// One device's interrupt line, delivered by the simulator's result-ring drain.
///
/// It counts the completions drivers report published without an interrupt (lost
/// interrupts, see [`Interrupts::lost`]); clones share the count, and the lines of a
/// [`SimBridge`] share the bridge's.
#[derive(Debug, Clone)]
pub struct Irq {
    sim: Arc<SimHypervisor>,
    zone: u32,
    irq: u32,
    lost: Arc<AtomicU64>,
    swallow: Arc<AtomicU32>,
}

impl Irq {
    /// The line `irq` of `zone`, with a count of its own.
    pub fn new(sim: &Arc<SimHypervisor>, zone: u32, irq: u32) -> Irq {
        Irq::counted_in(sim, zone, irq, Arc::new(AtomicU64::new(0)))
    }

    fn counted_in(sim: &Arc<SimHypervisor>, zone: u32, irq: u32, lost: Arc<AtomicU64>) -> Irq {
        Irq {
            sim: Arc::clone(sim),
            zone,
            irq,
            lost,
            swallow: Arc::new(AtomicU32::new(0)),
        }
    }

    /// Completions reported without an interrupt on every line sharing this one's count.
    pub fn lost_interrupts(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Makes the guest miss the next `count` deliveries on this line, as if the hypervisor
    /// had dropped them: it checks that a lost interrupt is seen, and by the right tests.
    pub fn swallow_next(&self, count: u32) {
        self.swallow.fetch_add(count, Ordering::Relaxed);
    }
}

impl Interrupts for Irq {
    fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !self.sim.wait_irq(self.zone, self.irq, left) {
                return false;
            }
            let swallowed = self
                .swallow
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            if swallowed.is_err() {
                return true;
            }
        }
    }

    fn lost(&self, completions: u64) {
        self.lost.fetch_add(completions, Ordering::Relaxed);
    }
}

/// A child process stopped with SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    /// Starts `cmd` with stdin closed; its log goes to the test's stderr unless `cmd` redirects it.
    pub fn spawn(name: &str, cmd: &mut Command) -> Process {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            child,
            name: name.to_string(),
        }
    }

    /// The pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child; no memory is touched.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    /// Waits up to `timeout` for exit; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGTERM, then wait for a clean exit; returns the status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        match self.wait_timeout(Duration::from_secs(10)) {
            Some(status) => status,
            None => {
                let _ = self.child.kill();
                panic!("{} did not exit within 10 s of SIGTERM", self.name)
            }
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal(libc::SIGTERM);
            if self.wait_timeout(Duration::from_secs(5)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// A simulated hypervisor with zones from a config, serving its fds to a real bridge process.
#[derive(Debug)]
pub struct SimBridge {
    /// The simulated hypervisor (guest side of every test).
    pub sim: Arc<SimHypervisor>,
    /// The parsed config both sides use.
    pub config: Config,
    /// The bridge process.
    pub bridge: Process,
    /// External backends the test started for this bridge; they stop after it.
    pub extra: Vec<Process>,
    _server: ProviderServer,
    /// Scratch directory: config, sockets, images.
    pub dir: Arc<TempDir>,
    /// Shared by the lines [`SimBridge::irq`] hands out.
    lost_interrupts: Arc<AtomicU64>,
    /// Why this test may see lost interrupts, if it may.
    lost_interrupts_allowed: Option<&'static str>,
}

impl SimBridge {
    /// Writes `config_json` into `dir`, starts the simulator from it and the bridge on it.
    /// `extra_args` go to the bridge (e.g. `--spin-us 0`; a `--blk-backend` of its own replaces
    /// our `vhost-user-blk`).
    pub fn start(dir: Arc<TempDir>, config_json: &str, extra_args: &[&str]) -> SimBridge {
        SimBridge::start_with(dir, config_json, extra_args, None)
    }

    /// [`SimBridge::start`] with the bridge's stderr (its log, and that of the backends it
    /// spawns) sent to `stderr` instead of the test's. A captured log is written at the
    /// bridge's default level (`RUST_LOG=info`) whatever the test's environment says, so a
    /// test can count its lines.
    pub fn start_with(
        dir: Arc<TempDir>,
        config_json: &str,
        extra_args: &[&str],
        stderr: Option<File>,
    ) -> SimBridge {
        let options = SimOptions::from_env().expect("simulator options");
        SimBridge::start_with_options(dir, config_json, extra_args, stderr, options)
    }

    /// [`SimBridge::start_with`] with the simulator in `options` whatever the environment
    /// says: for a test that needs one mode (the environment is process-wide, and tests
    /// run in parallel threads).
    pub fn start_with_options(
        dir: Arc<TempDir>,
        config_json: &str,
        extra_args: &[&str],
        stderr: Option<File>,
        options: SimOptions,
    ) -> SimBridge {
        let config_path = dir.path().join("virtio_cfg.json");
        std::fs::write(&config_path, config_json).expect("write config");
        let config = Config::from_file(&config_path).unwrap_or_else(|e| panic!("test config: {e}"));
        let sim =
            SimHypervisor::with_options(sim_zones(&config), options).expect("simulated hypervisor");
        let socket = dir.path().join("hsm.sock");
        let server = sim.serve(&socket).expect("provider socket");
        let mut cmd = bridge_command(&config_path, &socket, dir.path(), extra_args);
        // The simulator delivers every injection, so the bridge's re-injection (its remedy
        // for hvisor dropping one) would only turn a lost interrupt, which these tests count
        // as a bug, into a late one. A test that wants it passes its own `--reinject-ms`.
        if !extra_args.contains(&"--reinject-ms") {
            cmd.args(["--reinject-ms", "0"]);
        }
        cmd.args(extra_args);
        if let Some(file) = stderr {
            cmd.env("RUST_LOG", "info").stderr(file);
        }
        let bridge = Process::spawn("hvisor-vhost-bridge", &mut cmd);
        SimBridge {
            sim,
            config,
            bridge,
            extra: Vec::new(),
            _server: server,
            dir,
            lost_interrupts: Arc::new(AtomicU64::new(0)),
            lost_interrupts_allowed: None,
        }
    }

    /// [`SimBridge::start`] with the blk devices served by `backend`: for an external one,
    /// the test starts it first (see [`BlkBackend::prepare`]) and it lives as long as the
    /// returned bridge.
    pub fn start_blk(
        dir: Arc<TempDir>,
        config_json: &str,
        extra_args: &[&str],
        backend: BlkBackend,
    ) -> SimBridge {
        let (config_json, daemons) = backend.prepare(config_json, dir.path());
        let mut sb = SimBridge::start(dir, &config_json, extra_args);
        sb.extra = daemons;
        sb
    }

    /// vCPU `cpu` of `zone`.
    pub fn vcpu(&self, zone: u32, cpu: u64) -> Vcpu {
        Vcpu(self.sim.vcpu(zone, cpu))
    }

    /// Guest RAM of `zone`.
    pub fn ram(&self, zone: u32) -> Ram {
        Ram(self.sim.ram(zone))
    }

    /// The interrupt line `irq` of `zone`; its lost interrupts count in
    /// [`SimBridge::lost_interrupts`].
    pub fn irq(&self, zone: u32, irq: u32) -> Irq {
        Irq::counted_in(&self.sim, zone, irq, Arc::clone(&self.lost_interrupts))
    }

    /// Completions the drivers on this bridge's lines found without their interrupt.
    pub fn lost_interrupts(&self) -> u64 {
        self.lost_interrupts.load(Ordering::Relaxed)
    }

    /// Lets this test end with lost interrupts; `why` says what in the scenario may
    /// legitimately lose one. Otherwise dropping the bridge fails the test if any was lost.
    pub fn allow_lost_interrupts(&mut self, why: &'static str) {
        self.lost_interrupts_allowed = Some(why);
    }
}

impl Drop for SimBridge {
    /// Every end-to-end test on a [`SimBridge`] checks, at its end, that no interrupt was
    /// lost: drivers go on after one (they poll once their wait times out), so only this
    /// count shows it, and a Linux guest would have hung.
    fn drop(&mut self) {
        let lost = self.lost_interrupts();
        if lost == 0 || std::thread::panicking() {
            return;
        }
        match self.lost_interrupts_allowed {
            Some(why) => log::warn!("{lost} lost interrupt(s), allowed: {why}"),
            None => panic!(
                "{lost} completion(s) came without their interrupt (lost interrupts): a Linux \
                 guest would have hung"
            ),
        }
    }
}

/// The bridge on `config` and the provider `socket`, its runtime directory under `dir`, and
/// our `vhost-user-blk` unless `extra_args` names a `--blk-backend` of its own (e.g. a wrapper
/// that adds options). `extra_args` are not added: the caller adds them last.
pub fn bridge_command(config: &Path, socket: &Path, dir: &Path, extra_args: &[&str]) -> Command {
    let mut cmd = Command::new(bin_path("hvisor-vhost-bridge"));
    cmd.arg("--config")
        .arg(config)
        .arg("--hsm-socket")
        .arg(socket)
        .arg("--runtime-dir")
        .arg(dir.join("run"));
    if !extra_args.contains(&"--blk-backend") {
        cmd.arg("--blk-backend").arg(bin_path("vhost-user-blk"));
    }
    cmd
}

/// `hvisor-vhost-bridge status --json` against the bridge whose runtime directory is
/// `dir/run` (as [`bridge_command`] sets it), parsed.
pub fn bridge_status(dir: &Path) -> hvisor_bridge::status::Snapshot {
    let out = Command::new(bin_path("hvisor-vhost-bridge"))
        .arg("status")
        .arg("--socket")
        .arg(dir.join("run").join(hvisor_bridge::status::SOCKET_NAME))
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "status --json printed no snapshot ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Live (not zombie) children of process `parent`, from any of its threads, whose command
/// line contains `program`.
pub fn children_running(parent: u32, program: &str) -> Vec<u32> {
    // A process forks from any thread: read every thread's children.
    let children: String = std::fs::read_dir(format!("/proc/{parent}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .collect::<Vec<_>>()
        .join(" ");
    children
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.contains(program))
        })
        .filter(|pid| {
            // A killed child stays a zombie until its parent reaps it.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        })
        .collect()
}

/// A file of `size` bytes filled with a deterministic pattern, for images.
pub fn make_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// A small deterministic PRNG (xorshift64*), so failures reproduce from the printed seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator; a zero seed is replaced.
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
