//! Third-party vhost-user backends behind the bridge, each driven by a guest driver through
//! the simulated hypervisor: rust-vmm's vhost-device-rng and vhost-device-vsock, and
//! virtiofsd. They are installed into build/thirdparty/bin by tests/thirdparty/install.sh.
//! Also: a third-party backend that dies fails its own device only.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::console::{ConsoleDriver, ConsoleOptions, ControlRx};
use hvisor_vhost_tests::driver::fs::{FsDriver, ROOT_ID};
use hvisor_vhost_tests::driver::mmio::{status, INTERRUPT_CONFIG};
use hvisor_vhost_tests::driver::rng::RngDriver;
use hvisor_vhost_tests::driver::vsock::VsockDriver;
use hvisor_vhost_tests::driver::{
    BlkOptions, BlkStatus, DriverError, GuestAllocator, GuestMemory, Interrupts, MmioBus,
};
use hvisor_vhost_tests::harness::{Process, SimBridge};

const BLK: u64 = 0xa003c00;
const BLK_IRQ: u32 = 78;
const RNG: u64 = 0xa003e00;
const RNG_IRQ: u32 = 79;
const VSOCK: u64 = 0xa003a00;
const VSOCK_IRQ: u32 = 77;
const FS: u64 = 0xa003800;
const FS_IRQ: u32 = 76;
/// How long a guest request may take.
const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// A program installed by `tests/thirdparty/install.sh`; `HVV_THIRDPARTY_BIN` overrides the
/// directory.
fn thirdparty_bin(name: &str) -> PathBuf {
    let path = std::env::var_os("HVV_THIRDPARTY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/thirdparty/bin"))
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run tests/thirdparty/install.sh",
        path.display()
    );
    path
}

/// Starts a backend and waits until `socket` exists (the only sign that another process
/// bound it), failing early if the backend exits.
fn start_backend(name: &str, cmd: &mut Command, socket: &Path) -> Process {
    let mut backend = Process::spawn(name, cmd);
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    while !socket.exists() {
        if let Some(status) = backend.wait_timeout(Duration::from_millis(5)) {
            panic!(
                "{name} exited before creating {} ({status})",
                socket.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{name} did not create {} within {SOCKET_TIMEOUT:?}",
            socket.display()
        );
    }
    backend
}

/// A device entry served by the external backend on `socket`.
fn external_entry(kind: &str, addr: u64, irq: u32, socket: &Path, extra: &str) -> String {
    format!(
        r#"{{"type":"{kind}","addr":"{addr:#x}","len":"0x200","irq":{irq},"socket":"{}","status":"enable"{extra}}}"#,
        socket.display()
    )
}

/// vhost-device-rng on `<dir>/rng.sock`; it serves `rng.sock0` (it appends the instance
/// number). Returns the process and the socket it serves.
fn start_rng(dir: &Path) -> (Process, PathBuf) {
    let socket = dir.join("rng.sock");
    let served = dir.join("rng.sock0");
    let mut cmd = Command::new(thirdparty_bin("vhost-device-rng"));
    cmd.arg("--socket-path").arg(&socket);
    (start_backend("vhost-device-rng", &mut cmd, &served), served)
}

#[test]
fn vhost_device_rng_returns_random_bytes() {
    let dir = dir_with_images("tp-rng", &[]);
    let (_backend, socket) = start_rng(dir.path());
    let cfg = config(&[zone(
        1,
        &[external_entry("rng", RNG, RNG_IRQ, &socket, "")],
        None,
    )]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = Guest::new(&sb, 1, 0, RNG_IRQ);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x100_0000);
    let mut rng = RngDriver::new(&g.vcpu, RNG, &g.ram, &g.irq, &mut alloc, 4096, TIMEOUT)
        .expect("virtio-rng init");
    let first = rng.read(64).unwrap();
    let second = rng.read(64).unwrap();
    for bytes in [&first, &second] {
        assert!(
            !bytes.is_empty() && bytes.iter().any(|&b| b != 0),
            "no entropy: {bytes:?}"
        );
    }
    assert_ne!(first, second, "two reads returned the same bytes");
    let large = rng.read(4096).unwrap();
    assert!(
        large.len() > 64,
        "a 4 KiB request got {} bytes",
        large.len()
    );
    // 4 KiB of random bytes take nearly all 256 values; a stuck source takes a few.
    let mut seen = [false; 256];
    for &b in &large {
        seen[usize::from(b)] = true;
    }
    assert!(seen.iter().filter(|&&s| s).count() > 100);
}

/// A host program listening on `path`: it takes one connection, reads `len` bytes, answers
/// them prefixed with `echo: ` and returns what it read.
fn echo_host(path: &Path, len: usize) -> std::thread::JoinHandle<Vec<u8>> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept the backend's connection");
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut message = vec![0u8; len];
        stream
            .read_exact(&mut message)
            .expect("read from the guest");
        let mut reply = b"echo: ".to_vec();
        reply.extend_from_slice(&message);
        stream.write_all(&reply).unwrap();
        message
    })
}

/// Sends `message` from the guest to host port `port` and checks the echo.
fn vsock_echo<B: MmioBus, M: GuestMemory, I: Interrupts>(
    vsock: &mut VsockDriver<'_, B, M, I>,
    port: u32,
    message: &[u8],
) {
    let mut conn = vsock.connect(50_000, port).expect("connect to host port");
    vsock.write(&mut conn, message).unwrap();
    let expected = [b"echo: ".as_slice(), message].concat();
    let mut reply = Vec::new();
    while reply.len() < expected.len() {
        reply.extend(vsock.read(&mut conn).expect("echo from the host"));
    }
    assert_eq!(reply, expected);
    vsock.close(conn).expect("orderly shutdown");
}

#[test]
fn vhost_device_vsock_connects_to_a_host_unix_listener() {
    const PORT: u32 = 1234;
    const GUEST_CID: u64 = 3;
    const MESSAGE: &[u8] = b"hello from the guest";
    let dir = dir_with_images("tp-vsock", &[]);
    let socket = dir.path().join("vsock.sock");
    let uds = dir.path().join("vm.vsock");
    // For a guest connection to host port P the backend connects to `<uds-path>_P`.
    let host = echo_host(&dir.path().join(format!("vm.vsock_{PORT}")), MESSAGE.len());
    let mut cmd = Command::new(thirdparty_bin("vhost-device-vsock"));
    cmd.arg("--guest-cid")
        .arg(GUEST_CID.to_string())
        .arg("--socket")
        .arg(&socket)
        .arg("--uds-path")
        .arg(&uds);
    let _backend = start_backend("vhost-device-vsock", &mut cmd, &socket);
    let cfg = config(&[zone(
        1,
        &[external_entry("vsock", VSOCK, VSOCK_IRQ, &socket, "")],
        None,
    )]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = Guest::new(&sb, 1, 0, VSOCK_IRQ);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x100_0000);
    let mut vsock =
        VsockDriver::new(&g.vcpu, VSOCK, &g.ram, &g.irq, &mut alloc, TIMEOUT).expect("init");
    assert_eq!(vsock.guest_cid(), GUEST_CID, "guest_cid from config space");

    vsock_echo(&mut vsock, PORT, MESSAGE);
    assert_eq!(host.join().unwrap(), MESSAGE, "bytes the host received");
}

#[test]
fn virtiofsd_serves_fuse_requests_both_ways() {
    let dir = dir_with_images("tp-fs", &[]);
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let host_text = b"written by the host, read by the guest\n";
    std::fs::write(share.join("from-host.txt"), host_text).unwrap();
    let socket = dir.path().join("fs.sock");
    let mut cmd = Command::new(thirdparty_bin("virtiofsd"));
    cmd.arg("--socket-path")
        .arg(&socket)
        .arg("--shared-dir")
        .arg(&share)
        .args(["--tag", "hvvfs", "--cache", "never"])
        // The namespace sandbox needs privileges a test runner may not have.
        .args(["--sandbox", "none"]);
    let _backend = start_backend("virtiofsd", &mut cmd, &socket);
    let cfg = config(&[zone(
        1,
        &[external_entry(
            "fs",
            FS,
            FS_IRQ,
            &socket,
            r#","num_queues":2"#,
        )],
        None,
    )]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = Guest::new(&sb, 1, 0, FS_IRQ);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x100_0000);
    let mut fs =
        FsDriver::new(&g.vcpu, FS, &g.ram, &g.irq, &mut alloc, 64 * 1024, TIMEOUT).expect("init");
    assert_eq!(fs.config().tag, "hvvfs", "tag from config space");
    assert_eq!(fs.config().num_request_queues, 1);
    let init = fs.init().expect("FUSE_INIT");
    assert_eq!(init.major, 7);
    assert!(init.max_write >= 4096, "max_write {}", init.max_write);

    // The host's file, read through LOOKUP, OPEN, READ and RELEASE.
    let entry = fs.lookup(ROOT_ID, "from-host.txt").expect("LOOKUP");
    assert_eq!(entry.size, host_text.len() as u64);
    assert_eq!(entry.mode & libc::S_IFMT, libc::S_IFREG, "a regular file");
    let fh = fs.open(entry.nodeid, libc::O_RDONLY as u32).expect("OPEN");
    let data = fs.read(entry.nodeid, fh, 0, 4096).expect("READ");
    assert_eq!(data, host_text);
    fs.release(entry.nodeid, fh, libc::O_RDONLY as u32)
        .expect("RELEASE");
    assert_eq!(
        fs.lookup(ROOT_ID, "missing.txt"),
        Err(DriverError::Fuse(libc::ENOENT))
    );

    // A new file, written through CREATE, WRITE and RELEASE, then read by the host.
    let guest_text = b"written by the guest, read by the host\n";
    let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
    let (created, fh) = fs
        .create(ROOT_ID, "from-guest.txt", flags, libc::S_IFREG | 0o644)
        .expect("CREATE");
    assert_eq!(
        fs.write(created.nodeid, fh, 0, guest_text).expect("WRITE"),
        guest_text.len() as u32
    );
    fs.release(created.nodeid, fh, flags).expect("RELEASE");
    assert_eq!(
        std::fs::read(share.join("from-guest.txt")).unwrap(),
        guest_text
    );

    // Drop the lookups on the high-priority queue; the nodes are then gone for the device.
    fs.forget(entry.nodeid, 1).expect("FORGET on hiprio");
    fs.forget(created.nodeid, 1).expect("FORGET on hiprio");
    let again = fs
        .lookup(ROOT_ID, "from-host.txt")
        .expect("LOOKUP after FORGET");
    assert_eq!(again.ino, entry.ino, "same file after FORGET");
}

/// The bridge's log, captured to a file.
fn log_file(dir: &Path) -> (PathBuf, File) {
    let path = dir.join("bridge.log");
    let file = File::create(&path).unwrap();
    (path, file)
}

#[test]
fn a_dead_thirdparty_backend_fails_only_its_device() {
    let dir = dir_with_images("tp-fail", &["disk.img"]);
    let (mut rng_backend, rng_socket) = start_rng(dir.path());
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(BLK, BLK_IRQ, "disk.img", ""),
            external_entry("rng", RNG, RNG_IRQ, &rng_socket, ""),
        ],
        None,
    )]);
    let (log_path, log) = log_file(dir.path());
    let mut sb = SimBridge::start_with(dir, &cfg, &["--reconnect-timeout-s", "2"], Some(log));
    let blk_guest = Guest::new(&sb, 1, 0, BLK_IRQ);
    let rng_guest = Guest::new(&sb, 1, 0, RNG_IRQ);
    let mut blk = blk_guest.blk(BLK, 0x10_0000, &BlkOptions::default());
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x300_0000, 0x10_0000);
    let mut rng = RngDriver::new(
        &rng_guest.vcpu,
        RNG,
        &rng_guest.ram,
        &rng_guest.irq,
        &mut alloc,
        256,
        TIMEOUT,
    )
    .unwrap();
    assert!(!rng.read(32).unwrap().is_empty());

    rng_backend.signal(libc::SIGKILL);
    assert!(
        rng_backend.wait_timeout(TIMEOUT).is_some(),
        "rng backend killed"
    );

    // The blk device keeps serving while the bridge tries to get the rng backend back.
    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    let mut verified_write = |sector: u64, fill: u8| {
        let data = vec![fill; 8192];
        assert_eq!(blk.write(sector, &data).unwrap(), BlkStatus::Ok);
        let mut back = vec![0u8; data.len()];
        assert_eq!(blk.read(sector, &mut back).unwrap(), BlkStatus::Ok);
        assert_eq!(back, data, "read back at sector {sector}");
        let mut on_disk = vec![0u8; data.len()];
        image.read_exact_at(&mut on_disk, sector * 512).unwrap();
        assert_eq!(on_disk, data, "image at sector {sector}");
    };
    verified_write(0, 0x11);

    // Once the reconnect timeout passes, the rng device signals DEVICE_NEEDS_RESET with a
    // config interrupt.
    let deadline = Instant::now() + Duration::from_secs(20);
    let dev = rng.device();
    let outcome = loop {
        match dev.wait_interrupt(deadline) {
            Ok(pending) => assert_eq!(pending & INTERRUPT_CONFIG, 0, "config change alone"),
            other => break other,
        }
    };
    assert_eq!(outcome, Err(DriverError::DeviceNeedsReset));
    assert_eq!(dev.config_interrupts(), 1);
    assert_ne!(
        dev.device().status() & status::DEVICE_NEEDS_RESET,
        0,
        "status {:#x}",
        dev.device().status()
    );

    // The other device and the bridge are unaffected.
    verified_write(64, 0x22);
    assert!(
        sb.bridge.wait_timeout(Duration::ZERO).is_none(),
        "bridge still running"
    );
    assert_ne!(
        blk.device().status() & status::DRIVER_OK,
        0,
        "blk status {:#x}",
        blk.device().status()
    );
    assert_eq!(blk.device().status() & status::DEVICE_NEEDS_RESET, 0);

    let exit = sb.bridge.terminate();
    assert!(exit.success(), "bridge exit {exit}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let needs_reset: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("the device needs a reset"))
        .collect();
    assert_eq!(needs_reset.len(), 1, "one failed device:\n{log}");
    assert!(
        needs_reset[0].contains(&format!("rng@{RNG:#x}")),
        "the log names the rng device: {}",
        needs_reset[0]
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("rng@{RNG:#x}")) && l.contains("backend hung up")),
        "the hang-up is logged:\n{log}"
    );
}

/// The documented example `configs/thirdparty-mixed.json`, as written: our blk backend and
/// qemu-storage-daemon, virtiofsd, vhost-device-vsock, -rng and -console on one bridge, all
/// serving at once.
#[test]
fn the_mixed_example_config_serves_every_backend_at_once() {
    const VSOCK_PORT: u32 = 5000;
    let dir = dir_with_images("tp-mixed", &["rootfs-zone1.ext4", "data.img"]);
    let path = |name: &str| dir.path().join(name);
    let share = path("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("motd"), b"hello from zone0\n").unwrap();
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=disk,filename={},cache.direct=off",
            path("data.img").display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on",
            path("qsd-data.sock").display()
        ));
    let mut virtiofsd = Command::new(thirdparty_bin("virtiofsd"));
    virtiofsd
        .arg("--socket-path")
        .arg(path("virtiofsd.sock"))
        .arg("--shared-dir")
        .arg(&share)
        .args(["--tag", "zone1fs", "--cache", "never", "--sandbox", "none"]);
    let mut vsock = Command::new(thirdparty_bin("vhost-device-vsock"));
    vsock
        .args(["--guest-cid", "3", "--socket"])
        .arg(path("vsock.sock"))
        .arg("--uds-path")
        .arg(path("vm.vsock"));
    let mut rng = Command::new(thirdparty_bin("vhost-device-rng"));
    rng.arg("--socket-path").arg(path("rng.sock"));
    // A free port: the listener is closed before the backend binds it.
    let console_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut console = Command::new(thirdparty_bin("vhost-device-console"));
    console
        .arg("--socket-path")
        .arg(path("console.sock"))
        .args([
            "--backend",
            "network",
            "--tcp-port",
            &console_port.to_string(),
        ]);
    let _backends = [
        start_backend("qemu-storage-daemon", &mut qsd, &path("qsd-data.sock")),
        start_backend("virtiofsd", &mut virtiofsd, &path("virtiofsd.sock")),
        start_backend("vhost-device-vsock", &mut vsock, &path("vsock.sock")),
        start_backend("vhost-device-rng", &mut rng, &path("rng.sock0")),
        start_backend("vhost-device-console", &mut console, &path("console.sock0")),
    ];
    let echo = echo_host(&path(&format!("vm.vsock_{VSOCK_PORT}")), 5);
    // The harness writes the config into `dir`, so its relative paths land there.
    let cfg = include_str!("../../configs/thirdparty-mixed.json");
    let sb = SimBridge::start(Arc::clone(&dir), cfg, &[]);
    assert_eq!(sb.config.devices().count(), 6);

    for (addr, irq, image, offset) in [
        (0xa003c00, 78, "rootfs-zone1.ext4", 0x10_0000),
        (0xa003400, 74, "data.img", 0x210_0000),
    ] {
        let g = Guest::new(&sb, 1, 0, irq);
        let mut blk = g.blk(addr, offset, &BlkOptions::default());
        let data = vec![irq as u8; 4096];
        assert_eq!(blk.write(8, &data).unwrap(), BlkStatus::Ok, "{image}");
        let mut on_disk = vec![0u8; 4096];
        File::open(path(image))
            .unwrap()
            .read_exact_at(&mut on_disk, 8 * 512)
            .unwrap();
        assert_eq!(on_disk, data, "{image}");
    }

    let g = Guest::new(&sb, 1, 0, 76);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x420_0000, 0x40_0000);
    let mut fs = FsDriver::new(
        &g.vcpu, 0xa003800, &g.ram, &g.irq, &mut alloc, 8192, TIMEOUT,
    )
    .expect("fs init");
    assert_eq!(fs.config().tag, "zone1fs");
    fs.init().expect("FUSE_INIT");
    let motd = fs.lookup(ROOT_ID, "motd").expect("LOOKUP");
    let fh = fs.open(motd.nodeid, libc::O_RDONLY as u32).expect("OPEN");
    assert_eq!(
        fs.read(motd.nodeid, fh, 0, 512).unwrap(),
        b"hello from zone0\n"
    );
    fs.release(motd.nodeid, fh, libc::O_RDONLY as u32).unwrap();

    let g = Guest::new(&sb, 1, 0, 77);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x460_0000, 0x40_0000);
    let mut vsock =
        VsockDriver::new(&g.vcpu, 0xa003a00, &g.ram, &g.irq, &mut alloc, TIMEOUT).unwrap();
    assert_eq!(vsock.guest_cid(), 3);
    vsock_echo(&mut vsock, VSOCK_PORT, b"ping!");
    assert_eq!(echo.join().unwrap(), b"ping!");

    let g = Guest::new(&sb, 1, 0, 79);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x4a0_0000, 0x40_0000);
    let mut rng =
        RngDriver::new(&g.vcpu, 0xa003e00, &g.ram, &g.irq, &mut alloc, 64, TIMEOUT).unwrap();
    assert!(rng.read(64).unwrap().iter().any(|&b| b != 0));

    let g = Guest::new(&sb, 1, 0, 75);
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x4e0_0000, 0x100_0000);
    // Receive and control buffers posted on demand, as in console_e2e's interop test:
    // vhost-device-console 0.1.0 loses buffers posted while it is busy.
    let options = ConsoleOptions {
        rx_slots: 1,
        rx_buffers: 0,
        repost_rx: false,
        control_rx: ControlRx::VHOST_DEVICE_CONSOLE,
        ..ConsoleOptions::default()
    };
    let mut console = ConsoleDriver::new(&g.vcpu, 0xa003600, &g.ram, &g.irq, &mut alloc, &options)
        .expect("console init");
    console.wait_port_open().unwrap();
    let mut client = std::net::TcpStream::connect(("127.0.0.1", console_port)).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let line = b"zone1 console up\n";
    console.write(line).unwrap();
    console.flush().unwrap();
    let mut got = vec![0u8; line.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, line);
}
