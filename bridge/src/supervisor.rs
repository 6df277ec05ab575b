//! Starts the in-repo backends that a config entry written in hvisor-tool style implies
//! (`"img": ...` spawns `vhost-user-blk`), and stops them when the bridge exits.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;

use crate::config::{BackendSpec, Config, DeviceConfig};
use crate::peer::{self, ExpectedPeer, PeerError};

/// Errors while starting a backend.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// The runtime directory could not be created or examined.
    #[error("Cannot prepare runtime directory {}", .0.display())]
    RuntimeDir(PathBuf, #[source] std::io::Error),
    /// The runtime directory exists but others could reach it: whoever can create a file
    /// in it can serve the bridge a socket and receive guest memory.
    #[error("Refusing runtime directory {}: {why}", .dir.display())]
    UnsafeRuntimeDir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// A backend program the config needs was not found.
    #[error("Backend program {}: {why}", .program.display())]
    Program {
        /// The program as given.
        program: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A `--backend-user` or `--backend-group` that names no user or group.
    #[error("No such {kind}: {name}")]
    NoSuchId {
        /// "user" or "group".
        kind: &'static str,
        /// The name given.
        name: String,
    },
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

impl SpawnedBackend {
    /// Stops a hung backend at once: it may never run again to handle SIGTERM (stopped, or
    /// stuck), and it still maps zone RAM. Dropping it then only reaps it.
    pub fn kill(&mut self) {
        // Child::kill checks that the child is not reaped yet, so the pid is still ours.
        let _ = self.child.kill();
    }
}

impl Drop for SpawnedBackend {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            // Already reaped: its pid may belong to another process by now.
            let _ = std::fs::remove_file(&self.socket);
            return;
        }
        // SIGTERM lets the backend flush; SIGKILL only if it does not exit in time. The
        // signals go to its process group, so that what a wrapper started stops too.
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: kill(2) on the process group our child leads; the child is not reaped yet
        // (checked above), so the group id is still ours. No memory is touched.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_file(&self.socket);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // SAFETY: as above; the child is still not reaped.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Where spawned backends' sockets live and which programs serve them.
#[derive(Debug, Clone)]
pub struct Supervisor {
    runtime_dir: PathBuf,
    /// The runtime directory, locked (flock) for as long as the bridge runs: a second bridge
    /// on the same directory would replace this one's sockets.
    _runtime_lock: Arc<std::fs::File>,
    programs: BackendPrograms,
    policy: BackendPolicy,
    start_timeout: Duration,
}

/// Whom the bridge lets serve it, beyond the backends it starts.
#[derive(Debug, Clone, Default)]
pub struct BackendPolicy {
    /// Users whose processes may serve an external backend's socket, besides root and the
    /// bridge's own user.
    pub external_uids: Vec<u32>,
    /// The user and group spawned backends run as; `None`: the bridge's own.
    pub run_as: Option<RunAs>,
}

/// An unprivileged identity for spawned backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    /// The uid.
    pub uid: u32,
    /// The gid (supplementary groups are dropped).
    pub gid: u32,
}

impl RunAs {
    /// `user` (a name or a uid) and `group` (a name or a gid; default: the user's primary
    /// group).
    pub fn lookup(user: &str, group: Option<&str>) -> Result<RunAs, SupervisorError> {
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (uid, passwd_entry(Lookup::Uid(uid)).map(|(_, gid)| gid)),
            Err(_) => {
                let (uid, gid) =
                    passwd_entry(Lookup::Name(user)).ok_or_else(|| SupervisorError::NoSuchId {
                        kind: "user",
                        name: user.into(),
                    })?;
                (uid, Some(gid))
            }
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => group_id(group).ok_or_else(|| SupervisorError::NoSuchId {
                    kind: "group",
                    name: group.into(),
                })?,
            },
            None => primary.ok_or_else(|| SupervisorError::NoSuchId {
                kind: "user (give --backend-group for a bare uid)",
                name: user.into(),
            })?,
        };
        Ok(RunAs { uid, gid })
    }
}

enum Lookup<'a> {
    Name(&'a str),
    Uid(u32),
}

/// The uid and primary gid of a passwd entry.
fn passwd_entry(key: Lookup<'_>) -> Option<(u32, u32)> {
    // SAFETY: passwd is plain data; getpwnam_r/getpwuid_r fill it in.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let rc = match key {
        Lookup::Name(name) => {
            let name = std::ffi::CString::new(name).ok()?;
            // SAFETY: every pointer is valid for the call and `buf` is as long as stated;
            // the results point into `entry` and `buf`, which outlive their use here.
            unsafe {
                libc::getpwnam_r(
                    name.as_ptr(),
                    &mut entry,
                    buf.as_mut_ptr(),
                    buf.len(),
                    &mut found,
                )
            }
        }
        // SAFETY: as above.
        Lookup::Uid(uid) => unsafe {
            libc::getpwuid_r(uid, &mut entry, buf.as_mut_ptr(), buf.len(), &mut found)
        },
    };
    (rc == 0 && !found.is_null()).then_some((entry.pw_uid, entry.pw_gid))
}

/// The gid of group `name`.
fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: group is plain data; getgrnam_r fills it in.
    let mut entry: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 64 * 1024];
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call and `buf` is as long as stated.
    let rc = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut entry,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (rc == 0 && !found.is_null()).then_some(entry.gr_gid)
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

impl BackendPrograms {
    /// Makes the program of every backend kind `config` spawns an absolute path, found once
    /// now: a later respawn runs the same file whatever appears on `PATH` or the working
    /// directory meanwhile, and a missing program is an error at start-up.
    pub fn resolve_for(&self, config: &Config) -> Result<BackendPrograms, SupervisorError> {
        let mut resolved = self.clone();
        for (_, device) in config.devices() {
            let program = match device.backend {
                BackendSpec::External { .. } => continue,
                BackendSpec::SpawnBlk { .. } => &mut resolved.blk,
                BackendSpec::SpawnNet { .. } => &mut resolved.net,
                BackendSpec::SpawnConsole => &mut resolved.console,
            };
            if !program.is_absolute() {
                *program = resolve_program(program)?;
            }
        }
        Ok(resolved)
    }
}

/// `program` as an absolute path: a path with a slash from the working directory, a bare
/// name from `PATH`, as exec would. It must be an executable file.
fn resolve_program(program: &Path) -> Result<PathBuf, SupervisorError> {
    let err = |why: String| SupervisorError::Program {
        program: program.to_path_buf(),
        why,
    };
    let executable = |path: &Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf()).filter(|p| executable(p))
    } else {
        let path = std::env::var_os("PATH").unwrap_or_default();
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| executable(candidate))
    };
    let found = found.ok_or_else(|| {
        err(
            "not found, or not an executable file (give its path with --blk-backend, \
             --net-backend or --console-backend)"
                .into(),
        )
    })?;
    std::path::absolute(&found).map_err(|e| err(e.to_string()))
}

impl Supervisor {
    /// Makes `runtime_dir` private (see [`prepare_runtime_dir`]) and remembers the backend
    /// program paths.
    pub fn new(
        runtime_dir: PathBuf,
        programs: BackendPrograms,
        policy: BackendPolicy,
    ) -> Result<Self, SupervisorError> {
        // The backends create their sockets there, so the directory is theirs.
        let owner = match policy.run_as {
            Some(run_as) => (run_as.uid, run_as.gid),
            // SAFETY: geteuid and getegid cannot fail and touch no memory.
            None => unsafe { (libc::geteuid(), libc::getegid()) },
        };
        let handle = prepare_runtime_dir(&runtime_dir, owner)?;
        // SAFETY: flock on an fd we own; no memory is touched.
        if unsafe { libc::flock(handle.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let error = std::io::Error::last_os_error();
            return Err(match error.raw_os_error() {
                Some(libc::EWOULDBLOCK) => SupervisorError::UnsafeRuntimeDir {
                    dir: runtime_dir,
                    why: "another bridge is using it".into(),
                },
                _ => SupervisorError::RuntimeDir(runtime_dir, error),
            });
        }
        Ok(Self {
            runtime_dir,
            _runtime_lock: Arc::new(handle),
            programs,
            policy,
            start_timeout: Duration::from_secs(10),
        })
    }

    /// Checks the process that serves `frontend`'s connection to `socket`: the backend the
    /// bridge started, when `spawned`; otherwise a process of root, of the bridge's user, or
    /// of a user the policy allows.
    pub fn check_peer(
        &self,
        frontend: &Frontend,
        socket: &Path,
        spawned: Option<&SpawnedBackend>,
    ) -> Result<(), PeerError> {
        let expected = match spawned {
            Some(backend) => ExpectedPeer::Spawned { pid: backend.pid() },
            None => {
                // SAFETY: geteuid cannot fail and touches no memory.
                let mut uids = vec![0, unsafe { libc::geteuid() }];
                uids.extend(&self.policy.external_uids);
                uids.sort_unstable();
                uids.dedup();
                ExpectedPeer::External { uids }
            }
        };
        // SAFETY: the fd is the connection `frontend` owns, which outlives this call.
        let connection = unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) };
        peer::check(connection, socket, &expected)
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
        if let Some(run_as) = self.policy.run_as {
            // std drops the supplementary groups too when root changes the uid.
            cmd.uid(run_as.uid).gid(run_as.gid);
        }
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

/// Where spawned backends' sockets go by default: `/run/hvisor-vhost` for root, else
/// `hvisor-vhost` in `$XDG_RUNTIME_DIR` (the user's private runtime directory), else
/// `hvisor-vhost-<uid>` in the temporary directory.
pub fn default_runtime_dir() -> PathBuf {
    // SAFETY: geteuid cannot fail and touches no memory.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/hvisor-vhost");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("hvisor-vhost"),
        None => std::env::temp_dir().join(format!("hvisor-vhost-{uid}")),
    }
}

/// Makes `dir` a directory that only `owner` can reach (`group` is its group if it is
/// created for a user other than the bridge's). A missing one is created with
/// mkdir (its parent must exist), so an attacker's file, directory or symlink of that name
/// makes it fail instead of being reused. An existing one is used only when it is a
/// directory itself, not a symlink, owned by `owner` and closed to group and others: only
/// `owner` (or root) can have made it so, and a directory left by an earlier bridge that
/// was killed is then reused. Returns the directory, opened.
pub fn prepare_runtime_dir(
    dir: &Path,
    (owner, group): (libc::uid_t, libc::gid_t),
) -> Result<std::fs::File, SupervisorError> {
    let io_err = |e| SupervisorError::RuntimeDir(dir.to_path_buf(), e);
    let refuse = |why: String| SupervisorError::UnsafeRuntimeDir {
        dir: dir.to_path_buf(),
        why,
    };
    let created = match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => return Err(io_err(e)),
    };
    // Examine what the path names now through an fd opened without following a symlink,
    // so the checks and the fixes below apply to one and the same directory.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            // Linux says ENOTDIR for a symlink opened this way, ELOOP elsewhere.
            Some(libc::ELOOP | libc::ENOTDIR) => {
                if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
                    refuse("it is a symbolic link".into())
                } else {
                    refuse("it is not a directory".into())
                }
            }
            _ => io_err(e),
        })?;
    if created && handle.metadata().map_err(io_err)?.uid() != owner {
        // Made for backends that run as another user.
        std::os::unix::fs::fchown(&handle, Some(owner), Some(group)).map_err(io_err)?;
    }
    let meta = handle.metadata().map_err(io_err)?;
    if meta.uid() != owner {
        return Err(refuse(format!(
            "it belongs to uid {}, not to uid {owner}; remove it or choose another \
             --runtime-dir",
            meta.uid()
        )));
    }
    if created {
        // mkdir's mode went through the umask, which may have taken the owner's bits too.
        handle
            .set_permissions(std::fs::Permissions::from_mode(0o700))
            .map_err(io_err)?;
    } else if meta.mode() & 0o077 != 0 {
        return Err(refuse(format!(
            "its mode is {:04o}, open to group or others; it must be 0700",
            meta.mode() & 0o7777
        )));
    }
    Ok(handle)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh scratch directory, removed at the end.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let path =
                std::env::temp_dir().join(format!("hvv-supervisor-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).unwrap();
            Scratch(path)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn euid() -> libc::uid_t {
        // SAFETY: geteuid cannot fail and touches no memory.
        unsafe { libc::geteuid() }
    }

    fn supervisor(dir: &Path) -> Result<Supervisor, SupervisorError> {
        Supervisor::new(
            dir.to_path_buf(),
            BackendPrograms::beside_bridge(),
            BackendPolicy::default(),
        )
    }

    fn refusal(dir: &Path) -> String {
        match supervisor(dir) {
            Err(e @ SupervisorError::UnsafeRuntimeDir { .. }) => e.to_string(),
            other => panic!("{} was not refused: {other:?}", dir.display()),
        }
    }

    #[test]
    fn a_missing_runtime_dir_is_created_private() {
        let scratch = Scratch::new("create");
        let dir = scratch.0.join("run");
        supervisor(&dir).unwrap();
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert!(meta.is_dir());
        assert_eq!(meta.mode() & 0o7777, 0o700);
        assert_eq!(meta.uid(), euid());
        // A directory the bridge made before (it was killed) is used again.
        supervisor(&dir).unwrap();
    }

    #[test]
    fn two_bridges_cannot_share_a_runtime_dir() {
        let scratch = Scratch::new("shared");
        let dir = scratch.0.join("run");
        let first = supervisor(&dir).unwrap();
        assert!(refusal(&dir).contains("another bridge is using it"));
        // Clones (reconnect plans) hold the same lock; it goes with the last of them.
        let clone = first.clone();
        drop(first);
        assert!(refusal(&dir).contains("another bridge is using it"));
        drop(clone);
        supervisor(&dir).unwrap();
    }

    #[test]
    fn a_runtime_dir_under_a_missing_parent_is_not_created() {
        let scratch = Scratch::new("parent");
        let dir = scratch.0.join("missing").join("run");
        assert!(matches!(
            supervisor(&dir),
            Err(SupervisorError::RuntimeDir(..))
        ));
        assert!(!scratch.0.join("missing").exists());
    }

    #[test]
    fn a_symlink_is_refused_even_to_a_private_directory() {
        let scratch = Scratch::new("symlink");
        let target = scratch.0.join("target");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .unwrap();
        let link = scratch.0.join("run");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(refusal(&link).contains("symbolic link"));
        // A dangling one too: mkdir does not create through it.
        let dangling = scratch.0.join("dangling");
        std::os::unix::fs::symlink(scratch.0.join("nowhere"), &dangling).unwrap();
        assert!(refusal(&dangling).contains("symbolic link"));
        assert!(!scratch.0.join("nowhere").exists());
    }

    #[test]
    fn a_file_is_refused() {
        let scratch = Scratch::new("file");
        let file = scratch.0.join("run");
        std::fs::write(&file, "").unwrap();
        assert!(refusal(&file).contains("not a directory"));
    }

    #[test]
    fn a_pre_created_open_directory_is_refused_and_left_alone() {
        let scratch = Scratch::new("open");
        let dir = scratch.0.join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(refusal(&dir).contains("mode is 1777"));
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o1777, "the refused directory was changed");
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        let scratch = Scratch::new("foreign");
        let dir = scratch.0.join("run");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        if euid() == 0 {
            // A private directory that a local user (nobody) made.
            let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path; chown touches no memory of ours.
            assert_eq!(unsafe { libc::chown(path.as_ptr(), 65534, 65534) }, 0);
            assert!(refusal(&dir).contains("belongs to uid 65534, not to uid 0"));
        } else {
            // Without root, no directory can be given away: the same check, seen from
            // another user.
            let other = euid().wrapping_add(1);
            let e = prepare_runtime_dir(&dir, (other, other)).unwrap_err();
            assert!(
                e.to_string().contains(&format!("not to uid {other}")),
                "{e}"
            );
        }
    }

    #[test]
    fn programs_become_absolute_once() {
        let programs = BackendPrograms {
            blk: PathBuf::from("sh"),
            net: PathBuf::from("no-such-backend-program"),
            console: PathBuf::from("./relative"),
        };
        let config = Config::parse(
            r#"{"zones":[{"id":1,"memory_region":[{"zone0_ipa":"0x50000000",
                "zonex_ipa":"0x50000000","size":"0x1000000"}],"devices":[
                {"type":"blk","addr":"0xa003c00","len":"0x200","irq":78,
                 "img":"Cargo.toml","status":"enable"}]}]}"#,
            Path::new(env!("CARGO_MANIFEST_DIR")),
        )
        .unwrap();
        let resolved = programs.resolve_for(&config).unwrap();
        // Found on PATH, as exec would.
        assert!(resolved.blk.is_absolute(), "{}", resolved.blk.display());
        assert!(resolved.blk.ends_with("sh"));
        // Programs of backends the config does not spawn are not looked for.
        assert_eq!(resolved.net, programs.net);
        assert_eq!(resolved.console, programs.console);
        let missing = BackendPrograms {
            blk: PathBuf::from("no-such-backend-program"),
            ..programs
        };
        let e = missing.resolve_for(&config).unwrap_err();
        assert!(e.to_string().contains("not found"), "{e}");
    }

    #[test]
    fn a_relative_program_is_taken_from_the_working_directory() {
        let here = std::env::current_dir().unwrap();
        let scratch = Scratch::new("relative");
        let script = scratch.0.join("backend.sh");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        // The same file, named from the working directory: up to / and down again.
        let mut given = PathBuf::new();
        for _ in here.components().skip(1) {
            given.push("..");
        }
        given.push(script.strip_prefix("/").unwrap());
        assert!(given.is_relative());
        let resolved = resolve_program(&given).unwrap();
        assert!(resolved.is_absolute(), "{}", resolved.display());
        assert_eq!(resolved.canonicalize().unwrap(), script);
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(resolve_program(&given).is_err(), "a file that cannot run");
    }

    #[test]
    fn backend_users_and_groups_by_name_or_number() {
        assert_eq!(
            RunAs::lookup("root", None).unwrap(),
            RunAs { uid: 0, gid: 0 }
        );
        assert_eq!(
            RunAs::lookup("0", Some("0")).unwrap(),
            RunAs { uid: 0, gid: 0 }
        );
        assert!(RunAs::lookup("no-such-user-here", None).is_err());
        assert!(RunAs::lookup("root", Some("no-such-group-here")).is_err());
    }
}
