//! A resized image reaches the frontend: SIGHUP makes the `vhost-user-blk` binary re-read the
//! size and push CONFIG_CHANGE_MSG on the backend channel, and the frontend's handler reads
//! the new capacity with GET_CONFIG, as QEMU does.

mod common;

use std::io::{BufRead, BufReader, Lines};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{Arc, Mutex};

use common::{socket_path, Guest};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::VhostBackend;
use vmm_sys_util::tempfile::TempFile;

const BINARY: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
const IMAGE_SIZE: u64 = 1 << 20;
/// How long the test waits for the backend's notification.
const TIMEOUT_MS: i32 = 10_000;

struct Backend {
    child: Child,
    log: Lines<BufReader<ChildStderr>>,
}

impl Backend {
    fn spawn(socket: &Path, image: &Path) -> Self {
        let mut child = Command::new(BINARY)
            .arg("--socket-path")
            .arg(socket)
            .arg("--image")
            .arg(image)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = BufReader::new(child.stderr.take().unwrap()).lines();
        Backend { child, log }
    }

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
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The frontend's end of the backend channel: on a configuration change it re-reads the
/// capacity through the main channel before acknowledging.
struct ConfigWatcher {
    frontend: Mutex<Frontend>,
    capacities: Mutex<Vec<u64>>,
}

impl VhostUserFrontendReqHandler for ConfigWatcher {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        let mut frontend = self.frontend.lock().unwrap();
        let config = Guest::config(&mut frontend, 0, 8);
        let capacity = u64::from_le_bytes(config.try_into().unwrap());
        self.capacities.lock().unwrap().push(capacity);
        Ok(0)
    }
}

fn capacity(frontend: &mut Frontend) -> u64 {
    u64::from_le_bytes(Guest::config(frontend, 0, 8).try_into().unwrap())
}

#[test]
fn sighup_pushes_the_new_capacity_to_the_frontend() {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(IMAGE_SIZE).unwrap();
    let socket = socket_path("config-change");
    let mut backend = Backend::spawn(&socket, image.as_path());
    backend.wait_for_log("Serving");

    let mut frontend = Frontend::connect(&socket, 1).unwrap();
    frontend.set_owner().unwrap();
    frontend.get_features().unwrap();
    let wanted = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ;
    let offered = frontend.get_protocol_features().unwrap();
    assert!(offered.contains(wanted), "{offered:?}");
    frontend.set_protocol_features(wanted).unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    assert_eq!(capacity(&mut frontend), IMAGE_SIZE / 512);

    let watcher = Arc::new(ConfigWatcher {
        frontend: Mutex::new(frontend.clone()),
        capacities: Mutex::new(Vec::new()),
    });
    let mut handler = FrontendReqHandler::new(watcher.clone()).unwrap();
    handler.set_reply_ack_flag(true);
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .unwrap();

    image.as_file().set_len(2 * IMAGE_SIZE).unwrap();
    backend.signal(libc::SIGHUP);
    let mut channel = libc::pollfd {
        fd: handler.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut channel, 1, TIMEOUT_MS) };
    assert_eq!(ready, 1, "no configuration change within {TIMEOUT_MS} ms");
    assert_eq!(handler.handle_request().unwrap(), 0);
    assert_eq!(*watcher.capacities.lock().unwrap(), [2 * IMAGE_SIZE / 512]);
    backend.wait_for_log("capacity is now 2097152");
    backend.wait_for_log("acknowledged the configuration change");

    // The next frontend sets up no backend channel: the change is visible on its next read.
    drop((frontend, handler, watcher));
    backend.wait_for_log("Frontend disconnected");
    let mut plain = Guest::negotiate(&socket).0;
    image.as_file().set_len(3 * IMAGE_SIZE).unwrap();
    backend.signal(libc::SIGHUP);
    backend.wait_for_log("no backend channel");
    assert_eq!(capacity(&mut plain), 3 * IMAGE_SIZE / 512);

    backend.signal(libc::SIGTERM);
    assert!(backend.child.wait().unwrap().success());
}
