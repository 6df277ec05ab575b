//! What the bridge passes to a backend and learns from it: the backend fields of a spawned
//! blk device reach its command line, a queue size the backend cannot take is refused at
//! start-up with a clear error, and a config change the backend pushes (BACKEND_REQ) reaches
//! the guest as a config interrupt with the new contents.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::SimHypervisor;
use hvisor_vhost_tests::driver::mmio::INTERRUPT_CONFIG;
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus, Interrupts};
use hvisor_vhost_tests::harness::{bin_path, sim_zones, Process, SimBridge};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

fn external_blk(dir: &std::path::Path, socket: &std::path::Path, queue_size: u16) -> Process {
    let backend = Process::spawn(
        "vhost-user-blk",
        Command::new(bin_path("vhost-user-blk"))
            .arg("--socket-path")
            .arg(socket)
            .arg("--image")
            .arg(dir.join("disk.img"))
            .arg("--queue-size")
            .arg(queue_size.to_string()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "backend socket never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
    backend
}

#[test]
fn a_queue_size_the_backend_refuses_fails_at_start_up() {
    let dir = dir_with_images("qsize", &["disk.img"]);
    let socket = dir.path().join("blk.sock");
    let _backend = external_blk(dir.path(), &socket, 128);
    let entry = format!(
        r#"{{"type":"blk","addr":"{BLK:#x}","len":"0x200","irq":{IRQ},"socket":"{}","queue_size":256}}"#,
        socket.display()
    );
    let cfg_path = dir.path().join("virtio_cfg.json");
    std::fs::write(&cfg_path, config(&[zone(1, &[entry], None)])).unwrap();
    let config = hvisor_bridge::config::Config::from_file(&cfg_path).unwrap();
    let sim = SimHypervisor::new(sim_zones(&config)).unwrap();
    let hsm_socket = dir.path().join("hsm.sock");
    let _server = sim.serve(&hsm_socket).unwrap();
    let output = Command::new(bin_path("hvisor-vhost-bridge"))
        .arg("--config")
        .arg(&cfg_path)
        .arg("--hsm-socket")
        .arg(&hsm_socket)
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "the bridge must refuse to start: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "one error line: {stderr}");
    assert!(
        errors[0].contains("refuses queue size 256 for queue 0")
            && errors[0].contains("queue_size"),
        "{}",
        errors[0]
    );
}

#[test]
fn a_resize_pushed_by_the_backend_reaches_the_guest() {
    let dir = dir_with_images("resize", &["disk.img"]);
    let log_path = dir.path().join("bridge.log");
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start_with(
        Arc::clone(&dir),
        &cfg,
        &[],
        Some(File::create(&log_path).unwrap()),
    );
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let before = blk.capacity();
    let generation = blk.device().config_generation();

    // Grow the image and tell our backend, as an operator would.
    let image = File::options()
        .write(true)
        .open(dir.path().join("disk.img"))
        .unwrap();
    image.set_len(DISK_SIZE * 2).unwrap();
    // The bridge forks its backends from a dedicated thread: read every thread's children.
    let children: String = std::fs::read_dir(format!("/proc/{}/task", sb.bridge.pid()))
        .unwrap()
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .collect::<Vec<_>>()
        .join(" ");
    let backend: i32 = children
        .split_whitespace()
        .next()
        .expect("backend pid")
        .parse()
        .unwrap();
    // SAFETY: kill(2) on the backend the bridge started for this test; no memory is touched.
    assert_eq!(unsafe { libc::kill(backend, libc::SIGHUP) }, 0);

    // The guest takes the config interrupt, as Linux's virtio_mmio does.
    assert!(
        g.irq.wait(Duration::from_secs(10)),
        "no interrupt after the resize"
    );
    let status = blk.device().interrupt_status();
    assert_ne!(
        status & INTERRUPT_CONFIG,
        0,
        "InterruptStatus {status:#x} lacks the config bit"
    );
    blk.device().ack_interrupt(status);
    assert!(
        blk.device().config_generation() != generation,
        "ConfigGeneration must change"
    );
    let after = blk.reread_config().unwrap().capacity;
    assert_eq!(after, 2 * before, "new capacity in config space");
    // The new space is usable.
    let data = vec![0x3cu8; 4096];
    assert_eq!(blk.write(after - 8, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; 4096];
    assert_eq!(blk.read(after - 8, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("backend reported a config change"), "{log}");
}

#[test]
fn the_io_engine_field_reaches_the_spawned_backend() {
    let dir = dir_with_images("engine", &["disk.img"]);
    let log_path = dir.path().join("bridge.log");
    let entry = blk_entry(
        BLK,
        IRQ,
        "disk.img",
        r#","backend":{"io_engine":"io_uring"}"#,
    );
    let sb = SimBridge::start_with(
        Arc::clone(&dir),
        &config(&[zone(1, &[entry], None)]),
        &[],
        Some(File::create(&log_path).unwrap()),
    );
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(blk.write(64, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; data.len()];
    assert_eq!(blk.read(64, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
    let mut on_disk = vec![0u8; data.len()];
    File::open(dir.path().join("disk.img"))
        .unwrap()
        .read_exact_at(&mut on_disk, 64 * 512)
        .unwrap();
    assert_eq!(on_disk, data, "the write is in the image");
    // The backend names its engine when it starts serving.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("Serving") && l.contains("io_uring I/O")),
        "{log}"
    );
}
