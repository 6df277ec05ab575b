//! The `hvisor-vhost-bridge` command line: `--check`, one-line config errors, a missing
//! `/dev/hvisor`, and the example configs under `configs/`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hvisor_bridge::config::Config;
use serde_json::Value;

const BRIDGE: &str = env!("CARGO_BIN_EXE_hvisor-vhost-bridge");

/// A private scratch directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "hvv-cli-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        TempDir(path)
    }

    fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.0.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent dir");
        }
        std::fs::write(&path, contents).expect("write file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BRIDGE)
        .args(args)
        // The default filter; a caller's RUST_LOG must not change what the tests see.
        .env("RUST_LOG", "info")
        .output()
        .expect("run hvisor-vhost-bridge")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A zone-1 config with the given device entries (JSON objects, comma-joined).
fn one_zone(devices: &str) -> String {
    format!(
        r#"{{"zones":[{{"id":1,
            "memory_region":[{{"zone0_ipa":"0x50000000","zonex_ipa":"0x50000000","size":"0x10000000"}}],
            "devices":[{devices}]}}]}}"#
    )
}

const DISK0: &str = r#"{"type":"blk","addr":"0xa003c00","len":"0x200","irq":78,"img":"disk.img","status":"enable"}"#;

#[test]
fn check_accepts_a_valid_config() {
    let dir = TempDir::new("valid");
    dir.write("disk.img", "");
    let config = dir.write("virtio_cfg.json", &one_zone(DISK0));
    let out = run(&["--check", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.ends_with("1 zones, 1 devices: OK\n"),
        "stdout: {stdout}"
    );
}

#[test]
fn check_rejects_bad_configs_with_one_error_line() {
    let cases: &[(&str, String, &str)] = &[
        (
            "unknown type",
            one_zone(&DISK0.replace(r#""blk""#, r#""floppy""#)),
            "zone 1: device #0: field `type`: ",
        ),
        (
            "missing image",
            one_zone(&DISK0.replace("disk.img", "missing.img")),
            "zone 1: device #0 (blk): field `img`: ",
        ),
        (
            "duplicate irq",
            one_zone(&format!(
                "{DISK0},{}",
                DISK0.replace("0xa003c00", "0xa003e00")
            )),
            "zone 1: device #1 (blk): field `irq`: ",
        ),
        (
            "overlapping device windows",
            one_zone(&format!(
                "{DISK0},{}",
                DISK0.replace("0xa003c00", "0xa003d00").replace("78", "79")
            )),
            "zone 1: device #1 (blk): field `addr`: ",
        ),
        (
            "RAM region of size zero",
            one_zone(DISK0).replace(r#""size":"0x10000000""#, r#""size":"0""#),
            "zone 1: field `memory_region[0].size`: ",
        ),
    ];
    for (what, config_text, expected) in cases {
        let dir = TempDir::new("invalid");
        dir.write("disk.img", "");
        let config = dir.write("virtio_cfg.json", config_text);
        let out = run(&["--check", "-c", config.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            out.stdout.is_empty(),
            "{what}: stdout {}",
            text(&out.stdout)
        );
        let stderr = text(&out.stderr);
        let lines: Vec<_> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: {stderr}");
        assert!(
            lines[0].contains("ERROR") && lines[0].contains(expected),
            "{what}: {stderr}"
        );
    }
}

#[test]
fn unreadable_config_is_one_line() {
    let dir = TempDir::new("nofile");
    let missing = dir.0.join("absent.json");
    let out = run(&["--check", "-c", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("field `<file>`: cannot read"), "{stderr}");
}

#[test]
fn missing_hvisor_device_is_a_clear_error() {
    let dir = TempDir::new("nodev");
    dir.write("disk.img", "");
    let config = dir.write("virtio_cfg.json", &one_zone(DISK0));
    let out = run(&[
        "-c",
        config.to_str().unwrap(),
        "--hsm-dev",
        "/nonexistent/hvisor",
        "--runtime-dir",
        dir.0.join("run").to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error = stderr
        .lines()
        .find(|l| l.contains("ERROR"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        error.contains("cannot open /nonexistent/hvisor") && error.contains("No such file"),
        "{error}"
    );
}

/// A stand-in for hvisor's side: a provider socket that hands over a bridge page, the two
/// eventfds and no RAM, and reports on `handed` once a bridge has taken them.
fn fake_provider(
    dir: &TempDir,
) -> (
    PathBuf,
    std::sync::mpsc::Receiver<()>,
    std::thread::JoinHandle<()>,
) {
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixListener;
    use vmm_sys_util::eventfd::EventFd;

    let socket = dir.0.join("hsm.sock");
    let listener = UnixListener::bind(&socket).expect("bind provider socket");
    let page = dir.write("bridge-page", &"\0".repeat(4096));
    let (handed, rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let page = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(page)
            .expect("open bridge page");
        let wakeup = EventFd::new(0).expect("eventfd");
        let finish = EventFd::new(0).expect("eventfd");
        let (stream, _) = listener.accept().expect("accept");
        // SAFETY: both eventfds outlive the borrows, which end with this scope.
        let (wakeup_fd, finish_fd) = unsafe {
            use std::os::fd::{AsRawFd, BorrowedFd};
            (
                BorrowedFd::borrow_raw(wakeup.as_raw_fd()),
                BorrowedFd::borrow_raw(finish.as_raw_fd()),
            )
        };
        let handover = hvisor_hsm::provider::Handover {
            bridge: (page.as_fd(), 0),
            wakeup: wakeup_fd,
            finish: finish_fd,
            regions: Vec::new(),
        };
        hvisor_hsm::provider::send_handover(&stream, &handover).expect("handover");
        let _ = handed.send(());
        // Hold the connection until the bridge leaves.
        let _ = std::io::Read::read(&mut &stream, &mut [0u8; 1]);
    });
    (socket, rx, thread)
}

#[test]
fn hsm_is_initialised_before_a_rejected_config_is_read() {
    // On a board, INIT_VIRTIO must happen even when the config is then refused: a zone whose
    // first virtio access finds no bridge page panics hvisor.
    let dir = TempDir::new("order");
    let config = dir.write("virtio_cfg.json", &one_zone(DISK0)); // disk.img is missing
    let (socket, handed, provider) = fake_provider(&dir);
    let out = run(&[
        "-c",
        config.to_str().unwrap(),
        "--hsm-socket",
        socket.to_str().unwrap(),
        "--runtime-dir",
        dir.0.join("run").to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // The bridge waits for the handover once connected, so a bridge that exited having
    // connected has taken it. The provider says so after sending it, which can be after the
    // bridge has exited: wait for its word (a provider never connected to never sends it).
    assert!(
        handed.recv_timeout(Duration::from_secs(30)).is_ok(),
        "the bridge exited without initialising the HSM: {stderr}"
    );
    provider.join().unwrap();
    let opened = stderr.find("HSM: provider at").expect("HSM log line");
    let rejected = stderr.find("field `img`").expect("config error");
    assert!(opened < rejected, "{stderr}");
}

#[test]
fn check_never_opens_the_hsm() {
    let dir = TempDir::new("checkdev");
    dir.write("disk.img", "");
    let config = dir.write("virtio_cfg.json", &one_zone(DISK0));
    let out = run(&[
        "--check",
        "-c",
        config.to_str().unwrap(),
        "--hsm-dev",
        "/nonexistent/hvisor",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// The `img` values of a config, wherever they are.
fn image_paths(config: &Value) -> Vec<String> {
    let mut images = Vec::new();
    for zone in config["zones"].as_array().into_iter().flatten() {
        for dev in zone["devices"].as_array().into_iter().flatten() {
            if let Some(img) = dev["img"].as_str() {
                images.push(img.to_owned());
            }
        }
    }
    images
}

#[test]
fn every_example_config_parses() {
    let configs_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut names: Vec<_> = std::fs::read_dir(&configs_dir)
        .expect("configs/ exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    for expected in ["board-nxp-style", "demo", "external-qsd", "two-zones"] {
        assert!(
            names.iter().any(|p| p.file_stem().unwrap() == expected),
            "configs/{expected}.json is missing"
        );
    }
    for path in names {
        let contents = std::fs::read_to_string(&path).expect("read config");
        let json: Value =
            serde_json::from_str(&contents).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A private copy with the images it names, so that `img` checks really run.
        let dir = TempDir::new("example");
        let copy = dir.write(path.file_name().unwrap().to_str().unwrap(), &contents);
        for image in image_paths(&json) {
            assert!(
                Path::new(&image).is_relative(),
                "{}: examples use relative image paths",
                path.display()
            );
            dir.write(&image, "");
        }
        let config = Config::from_file(&copy).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            config.devices().count() > 0,
            "{}: no enabled device",
            path.display()
        );
        let out = run(&["--check", "-c", copy.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            text(&out.stderr)
        );
    }
}
