//! Starts the in-repo backends that a config entry written in hvisor-tool style implies
//! (`"img": ...` spawns `vhost-user-blk`), and stops them when the bridge exits.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::config::{BackendSpec, DeviceConfig};

/// Errors while starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The runtime directory could not be made private.
    #[error("Cannot prepare runtime directory {}", .0.display())]
    RuntimeDir(PathBuf, #[source] std::io::Error),
    /// The backend program could not be started.
    #[error("Cannot start {}", .0.display())]
    Spawn(PathBuf, #[source] std::io::Error),
    /// The backend exited before its socket appeared.
    #[error("{program} exited before creating its socket ({status})")]
    EarlyExit {
        /// The program.
        program: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// The socket did not appear in time.
    #[error("{} did not appear within {timeout:?}", .socket.display())]
    Timeout {
        /// The socket path.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
}

/// A backend process the bridge started.
#[derive(Debug)]
pub struct SpawnedBackend {
    child: Child,
    socket: PathBuf,
    program: String,
}

impl SpawnedBackend {
    /// The backend's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The backend's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedBackend {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            // Already reaped: its pid may belong to another process by now.
            let _ = std::fs::remove_file(&self.socket);
            return;
        }
        // SIGTERM lets the backend flush; SIGKILL only if it does not exit in time.
        // SAFETY: kill(2) on our own child, not reaped yet (checked above), so the pid is
        // still ours; no memory is touched.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Where spawned backends' sockets live and which programs serve them.
#[derive(Debug, Clone)]
pub struct Supervisor {
    runtime_dir: PathBuf,
    programs: BackendPrograms,
    start_timeout: Duration,
}

/// The in-repo backend programs.
#[derive(Debug, Clone)]
pub struct BackendPrograms {
    /// `vhost-user-blk`.
    pub blk: PathBuf,
    /// `vhost-user-net`.
    pub net: PathBuf,
    /// `vhost-user-console`.
    pub console: PathBuf,
}

impl BackendPrograms {
    /// Each program beside the bridge binary, else from `PATH`.
    pub fn beside_bridge() -> Self {
        Self {
            blk: Supervisor::default_program("vhost-user-blk"),
            net: Supervisor::default_program("vhost-user-net"),
            console: Supervisor::default_program("vhost-user-console"),
        }
    }
}

impl Supervisor {
    /// Makes `runtime_dir` (mode 0700) and remembers the backend program paths.
    pub fn new(runtime_dir: PathBuf, programs: BackendPrograms) -> Result<Self, SupervisorError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&runtime_dir)
            .and_then(|()| {
                std::fs::set_permissions(&runtime_dir, std::fs::Permissions::from_mode(0o700))
            })
            .map_err(|e| SupervisorError::RuntimeDir(runtime_dir.clone(), e))?;
        Ok(Self {
            runtime_dir,
            programs,
            start_timeout: Duration::from_secs(10),
        })
    }

    /// The default backend program: next to the bridge binary, else from `PATH`.
    pub fn default_program(name: &str) -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join(name)))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from(name))
    }

    /// Starts the backend a device needs, if it is one we spawn. Returns `None` for external
    /// backends.
    pub fn spawn(
        &self,
        zone: u32,
        device: &DeviceConfig,
    ) -> Result<Option<SpawnedBackend>, SupervisorError> {
        let socket = self.runtime_dir.join(format!(
            "zone{zone}-{}-{:x}.sock",
            device.device_type.name, device.addr
        ));
        let (program, args): (&Path, Vec<String>) = match &device.backend {
            BackendSpec::External { .. } => return Ok(None),
            BackendSpec::SpawnBlk {
                image,
                read_only,
                serial,
                direct,
                io_engine,
            } => {
                let mut args = vec!["--image".to_string(), image.display().to_string()];
                args.extend(["--num-queues".into(), device.num_queues.to_string()]);
                args.extend(["--queue-size".into(), device.queue_size.to_string()]);
                if *read_only {
                    args.push("--read-only".into());
                }
                if *direct {
                    args.push("--direct".into());
                }
                if let Some(serial) = serial {
                    args.extend(["--serial".into(), serial.clone()]);
                }
                if let Some(engine) = io_engine {
                    args.extend(["--io-engine".into(), engine.as_arg().into()]);
                }
                (&self.programs.blk, args)
            }
            BackendSpec::SpawnNet { tap, mac } => {
                let mut args = vec!["--tap".to_string(), tap.clone()];
                if let Some(m) = mac {
                    let text = m
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    args.extend(["--mac".into(), text]);
                }
                args.extend(["--queue-size".into(), device.queue_size.to_string()]);
                (&self.programs.net, args)
            }
            BackendSpec::SpawnConsole => {
                let link = socket.with_extension("pty");
                let args = vec![
                    "--pty".to_string(),
                    "--pty-link".into(),
                    link.display().to_string(),
                ];
                (&self.programs.console, args)
            }
        };
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new(program);
        cmd.arg("--socket-path")
            .arg(&socket)
            .args(&args)
            .stdin(Stdio::null())
            // Its log goes through the bridge's, marked with the zone, device and pid.
            .stderr(Stdio::piped())
            // Its own process group: a signal to the bridge's group (Ctrl-C, `kill %1`, a
            // service manager) must reach the bridge alone, which then stops its backends
            // itself; a backend killed by it would otherwise be restarted by the bridge.
            .process_group(0);
        let bridge_pid = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls (prctl, getppid), allocating nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The backend must not outlive a bridge that is killed (SIGKILL, OOM, a
                // panic): no Drop runs then.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The bridge may have died before the prctl took effect.
                if libc::getppid() as u32 != bridge_pid {
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                Ok(())
            });
        }
        let mut child = spawn_from_spawner(cmd)
            .map_err(|e| SupervisorError::Spawn(program.to_path_buf(), e))?;
        if let Some(stderr) = child.stderr.take() {
            let name = program.file_name().unwrap_or(program.as_os_str());
            let prefix = format!(
                "zone {zone} {} {} pid {}",
                device.label(),
                name.to_string_lossy(),
                child.id()
            );
            if let Err(e) = crate::logging::forward_backend_output(stderr, prefix) {
                // The pipe's read end is closed with the thread that never ran: the backend's
                // log writes fail and it serves on.
                log::warn!("{}: cannot forward the backend's log: {e}", device.label());
            }
        }
        let mut backend = SpawnedBackend {
            child,
            socket,
            program: program.display().to_string(),
        };
        log::info!(
            "{}: started {} (pid {}) on {}",
            device.label(),
            backend.program,
            backend.pid(),
            backend.socket.display()
        );
        self.wait_for_socket(&mut backend)?;
        Ok(Some(backend))
    }

    fn wait_for_socket(&self, backend: &mut SpawnedBackend) -> Result<(), SupervisorError> {
        let deadline = Instant::now() + self.start_timeout;
        let mut delay = Duration::from_millis(2);
        while !backend.socket.exists() {
            if let Ok(Some(status)) = backend.child.try_wait() {
                return Err(SupervisorError::EarlyExit {
                    program: backend.program.clone(),
                    status,
                });
            }
            if Instant::now() >= deadline {
                return Err(SupervisorError::Timeout {
                    socket: backend.socket.clone(),
                    timeout: self.start_timeout,
                });
            }
            // The only signal that another process bound a socket is the path appearing.
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// A spawn request for the spawner thread: the command and where to send the child.
type SpawnRequest = (Command, Sender<std::io::Result<Child>>);

/// Forks `cmd` from one thread that lives as long as the bridge process.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process:
/// a backend forked by a short-lived reconnect thread would get its SIGTERM as soon as that
/// thread ended. The spawner thread never returns (its request sender lives in a static), so
/// the signal comes only when the whole bridge exits.
fn spawn_from_spawner(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: OnceLock<Option<Sender<SpawnRequest>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = channel::<SpawnRequest>();
        let started = std::thread::Builder::new()
            .name("spawner".into())
            .spawn(move || {
                while let Ok((mut cmd, reply)) = rx.recv() {
                    let _ = reply.send(cmd.spawn());
                }
            });
        match started {
            Ok(_) => Some(tx),
            Err(e) => {
                log::error!("cannot start the backend spawner thread: {e}");
                None
            }
        }
    });
    let unavailable = || std::io::Error::other("the backend spawner thread is not running");
    let spawner = spawner.as_ref().ok_or_else(unavailable)?;
    let (reply_tx, reply_rx) = channel();
    spawner.send((cmd, reply_tx)).map_err(|_| unavailable())?;
    reply_rx.recv().map_err(|_| unavailable())?
}
