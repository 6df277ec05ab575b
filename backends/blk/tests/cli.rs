//! Runs the `vhost-user-blk` binary: socket permissions, re-serving after a disconnect,
//! image locking, clean shutdown on SIGTERM, and QEMU's backend program conventions
//! (`--fd`, `--print-capabilities`).

mod common;

use std::io::{BufRead, BufReader, Lines};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};

use common::{socket_path, Guest};
use vhost::vhost_user::VhostUserFrontend;
use vmm_sys_util::tempfile::TempFile;

const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-blk");

struct Backend {
    child: Child,
    log: Lines<BufReader<ChildStderr>>,
    socket: PathBuf,
}

impl Backend {
    fn spawn(socket: &Path, image: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(BINARY)
            .arg("--socket-path")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .args(extra)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = BufReader::new(child.stderr.take().unwrap()).lines();
        Backend {
            child,
            log,
            socket: socket.to_owned(),
        }
    }

    /// Reads log lines until one contains `needle`; panics if the process exits first.
    fn wait_for_log(&mut self, needle: &str) -> String {
        for line in self.log.by_ref() {
            let line = line.unwrap();
            if line.contains(needle) {
                return line;
            }
        }
        panic!("backend exited before logging {needle:?}");
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: kill only sends a signal to the child this test started.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        // Still running only if the test failed or left it serving: clean up after it.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
            let _ = std::fs::remove_file(&self.socket);
        }
    }
}

fn image(len: u64) -> TempFile {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(len).unwrap();
    image
}

fn capacity(path: &Path) -> u64 {
    let (mut frontend, _) = Guest::negotiate(path);
    let config = Guest::config(&mut frontend, 0, 8);
    u64::from_le_bytes(config.try_into().unwrap())
}

#[test]
fn serves_again_after_disconnect_and_stops_on_sigterm() {
    let image = image(1 << 20);
    let socket = socket_path("cli");
    let mut backend = Backend::spawn(&socket, image.as_path(), &[]);
    backend.wait_for_log("Serving");

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // Each connection gets a fresh device: SET_OWNER would fail on a reused one.
    assert_eq!(capacity(&socket), 2048);
    backend.wait_for_log("Frontend disconnected");
    assert_eq!(capacity(&socket), 2048);
    backend.wait_for_log("Frontend disconnected");

    // SIGHUP picks up a grown image.
    image.as_file().set_len(2 << 20).unwrap();
    backend.signal(libc::SIGHUP);
    backend.wait_for_log("capacity is now 2097152");
    assert_eq!(capacity(&socket), 4096);

    // SIGTERM with a frontend still connected.
    let (mut frontend, _) = Guest::negotiate(&socket);
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    backend.signal(libc::SIGTERM);
    let status = backend.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
}

#[test]
fn sigterm_while_idle_exits_cleanly() {
    let image = image(1 << 20);
    let socket = socket_path("idle");
    let mut backend = Backend::spawn(&socket, image.as_path(), &["--read-only"]);
    backend.wait_for_log("read-only");
    backend.signal(libc::SIGINT);
    let status = backend.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists());
}

#[test]
fn a_second_backend_cannot_take_the_image_or_the_socket() {
    let image = image(1 << 20);
    let socket = socket_path("lock");
    let mut first = Backend::spawn(&socket, image.as_path(), &[]);
    first.wait_for_log("Serving");

    let other_socket = socket_path("lock2");
    let mut second = Backend::spawn(&other_socket, image.as_path(), &[]);
    second.wait_for_log("in use by another process");
    assert!(!second.child.wait().unwrap().success());

    // Another image on the same socket is refused too, and the first backend keeps serving.
    let other_image = self::image(1 << 20);
    let mut third = Backend::spawn(&socket, other_image.as_path(), &[]);
    third.wait_for_log("in use by a running backend");
    assert!(!third.child.wait().unwrap().success());
    first.wait_for_log("Frontend disconnected");
    assert_eq!(capacity(&socket), 2048);

    // Without locking, a read-only second backend may share the image.
    let mut shared = Backend::spawn(
        &other_socket,
        image.as_path(),
        &["--no-lock", "--read-only"],
    );
    shared.wait_for_log("Serving");
}

#[test]
fn invalid_arguments_fail() {
    let image = image(4096);
    let socket = socket_path("args");
    let mut long_serial = Backend::spawn(
        &socket,
        image.as_path(),
        &["--serial", "123456789012345678901"],
    );
    long_serial.wait_for_log("longer than 20 bytes");
    assert!(!long_serial.child.wait().unwrap().success());
    let mut missing = Backend::spawn(&socket, Path::new("/nonexistent/image"), &[]);
    missing.wait_for_log("Cannot open the image");
    assert!(!missing.child.wait().unwrap().success());
    assert!(!socket.exists());
    // A regular file where the socket should go is not deleted.
    let mut not_socket = Backend::spawn(image.as_path(), image.as_path(), &["--no-lock"]);
    not_socket.wait_for_log("is not a socket");
    assert!(!not_socket.child.wait().unwrap().success());
    assert_eq!(image.as_file().metadata().unwrap().len(), 4096);
}

/// The backend command with `fd` handed over as its fd 3, as a manager that created the
/// socket does.
fn with_fd3(fd: std::os::fd::RawFd, args: &[&std::ffi::OsStr]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(BINARY);
    cmd.args(["--fd", "3"]).args(args).env("RUST_LOG", "info");
    // SAFETY: dup2 is async-signal-safe; fd 3 gets no close-on-exec flag.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

#[test]
fn serves_an_inherited_listening_socket_given_by_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixListener;

    let image = image(1 << 20);
    let socket = socket_path("fd");
    let listener = UnixListener::bind(&socket).unwrap();
    let mut child = with_fd3(
        listener.as_raw_fd(),
        &["--blk-file".as_ref(), image.as_path().as_os_str()],
    )
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    drop(listener);
    let mut backend = Backend {
        log: BufReader::new(child.stderr.take().unwrap()).lines(),
        child,
        socket: socket.clone(),
    };
    backend.wait_for_log("on inherited fd 3");
    assert_eq!(capacity(&socket), 2048);
    backend.wait_for_log("Frontend disconnected");
    backend.signal(libc::SIGTERM);
    let status = backend.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // The socket belongs to whoever created it: the backend leaves it in place.
    assert!(socket.exists());
    std::fs::remove_file(&socket).unwrap();
}

#[test]
fn an_fd_that_is_not_a_listening_socket_is_refused() {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    let image = image(1 << 20);
    // A connected stream socket and a file: neither can take frontends.
    let (connected, _peer) = UnixStream::pair().unwrap();
    let file = TempFile::new().unwrap();
    for fd in [connected.as_raw_fd(), file.as_file().as_raw_fd()] {
        let out = with_fd3(fd, &["--image".as_ref(), image.as_path().as_os_str()])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            log.contains("File descriptor 3 is not a listening UNIX stream socket"),
            "{log}"
        );
    }
}

#[test]
fn print_capabilities_names_the_block_type_and_its_options() {
    let out = Command::new(BINARY)
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    // The document QEMU's vhost-user schema defines for a block backend.
    assert_eq!(
        text,
        "{\n  \"type\": \"block\",\n  \"features\": [\"read-only\", \"blk-file\"]\n}\n"
    );
    // --read-only is taken (--blk-file too: see the --fd test).
    let image = image(1 << 20);
    let socket = socket_path("caps");
    let mut backend = Backend::spawn(&socket, image.as_path(), &["--read-only"]);
    backend.wait_for_log("read-only");
    backend.signal(libc::SIGTERM);
    assert!(backend.child.wait().unwrap().success());
}
