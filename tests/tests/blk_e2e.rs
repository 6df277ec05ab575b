//! End to end through real processes: the simulated hypervisor and a guest driver in this
//! process, `hvisor-vhost-bridge` and the blk backend as separate processes.
//!
//! The backend is our `vhost-user-blk`, or qemu-storage-daemon with `HVV_BLK_BACKEND=qsd`;
//! the `blk_e2e_qsd` target compiles this same file pinned to qemu-storage-daemon.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hvisor_bridge::config::BackendSpec;
use hvisor_vhost_tests::blk_backend::BlkBackend;
use hvisor_vhost_tests::driver::blk::{feature, SECTOR_SIZE};
use hvisor_vhost_tests::driver::mmio::{reg, status, MAGIC_VALUE, VIRTIO_F_VERSION_1};
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus, MmioBus, VirtioMmioDevice};
use hvisor_vhost_tests::harness::{Rng, SimBridge, TempDir};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

/// The backend of this compilation of the suite: the `blk_e2e_qsd` target pins
/// qemu-storage-daemon, this file's own target follows `HVV_BLK_BACKEND`.
fn blk_backend() -> BlkBackend {
    match env!("CARGO_CRATE_NAME") {
        "blk_e2e_qsd" => BlkBackend::Qsd,
        "blk_e2e" => BlkBackend::from_env(),
        other => panic!("the blk suite does not know which backend target {other} wants"),
    }
}

fn start(dir: Arc<TempDir>, cfg: &str) -> SimBridge {
    SimBridge::start_blk(dir, cfg, &[], blk_backend())
}

fn one_blk(tag: &str, extra: &str) -> SimBridge {
    let dir = dir_with_images(tag, &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", extra)], None)]);
    start(dir, &cfg)
}

#[test]
fn probe_values_and_feature_negotiation() {
    let sb = one_blk("probe", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let dev = VirtioMmioDevice::new(&g.vcpu, BLK);
    assert_eq!(g.vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
    let info = dev.probe().unwrap();
    assert_eq!(info.version, 2);
    assert_eq!(info.device_id, 2);
    assert_eq!(info.vendor_id, 0x4856_4953, "vendor \"HVIS\"");

    let offered = dev.device_features();
    for (bit, name) in [
        (VIRTIO_F_VERSION_1, "VERSION_1"),
        (feature::FLUSH, "FLUSH"),
        (feature::SEG_MAX, "SEG_MAX"),
        (feature::SIZE_MAX, "SIZE_MAX"),
        (feature::BLK_SIZE, "BLK_SIZE"),
        (1 << 28, "INDIRECT_DESC"),
        (1 << 29, "EVENT_IDX"),
    ] {
        assert_ne!(offered & bit, 0, "{name} not offered: {offered:#x}");
    }
    assert_eq!(
        offered & (1 << 30),
        0,
        "vhost-user PROTOCOL_FEATURES must stay hidden"
    );
    assert_eq!(
        offered & (1 << 33),
        0,
        "ACCESS_PLATFORM must never be offered"
    );
    assert_eq!(offered & feature::RO, 0, "RO offered for a writable image");

    // The driver acks a subset; FEATURES_OK sticks and the device works with it.
    let negotiated = dev.init(VIRTIO_F_VERSION_1 | feature::FLUSH).unwrap();
    assert_eq!(negotiated, VIRTIO_F_VERSION_1 | feature::FLUSH);
    assert_ne!(dev.status() & status::FEATURES_OK, 0);
    dev.reset().unwrap();
    assert_eq!(dev.status(), 0);

    let opts = BlkOptions {
        features: VIRTIO_F_VERSION_1 | feature::FLUSH,
        ..BlkOptions::default()
    };
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    assert_eq!(blk.features(), VIRTIO_F_VERSION_1 | feature::FLUSH);
    let data = vec![0xa5u8; 8192];
    assert_eq!(blk.write(0, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; 8192];
    assert_eq!(blk.read(0, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
}

#[test]
fn config_space_reads_at_every_width() {
    let sb = one_blk("config", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let dev = blk.device();
    let sectors = DISK_SIZE / SECTOR_SIZE as u64;
    assert_eq!(dev.read_config_u64(0).unwrap(), sectors);
    assert_eq!(
        u64::from(dev.read_config_u32(0)) | u64::from(dev.read_config_u32(4)) << 32,
        sectors
    );
    let lo = sectors.to_le_bytes();
    for (i, byte) in lo.iter().enumerate() {
        assert_eq!(dev.read_config_u8(i as u64), *byte, "capacity byte {i}");
    }
    assert_eq!(dev.read_config_u16(0), sectors as u16);
    // blk_size at offset 20.
    assert_eq!(dev.read_config_u32(20), 512);
    // Raw reads are masked to the access width even where the field is wider.
    let raw1 = g.vcpu.read(BLK + reg::CONFIG, 1);
    assert_eq!(raw1, u64::from(lo[0]));
    let raw2 = g.vcpu.read(BLK + reg::CONFIG + 1, 2);
    assert_eq!(raw2, u64::from(u16::from_le_bytes([lo[1], lo[2]])));
    // Beyond the config space: zeros, not a crash.
    assert_eq!(g.vcpu.read(BLK + 0x1f8, 8), 0);
    assert_eq!(blk.capacity(), sectors);
}

/// Linux's `cache_type` attribute writes `writeback` (offset 32) alone. The write must reach
/// the backend as a front-end write (flags 0): qemu-storage-daemon ends the session on
/// flags 1, the spec's live-migration write, which loses the write and then the device.
#[test]
fn a_cache_type_write_keeps_the_backend_and_its_io() {
    let dir = dir_with_images("cache-type", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let (cfg, daemons) = blk_backend().prepare(&cfg, dir.path());
    let log_path = dir.path().join("bridge.log");
    let log = File::create(&log_path).unwrap();
    let mut sb = SimBridge::start_with(dir, &cfg, &[], Some(log));
    sb.extra = daemons;
    let g = Guest::new(&sb, 1, 0, IRQ);
    let opts = BlkOptions {
        features: VIRTIO_F_VERSION_1 | feature::FLUSH | feature::CONFIG_WCE,
        ..BlkOptions::default()
    };
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    assert_ne!(
        blk.features() & feature::CONFIG_WCE,
        0,
        "CONFIG_WCE offered"
    );
    for writeback in [0u8, 1] {
        blk.device().write_config(32, &[writeback]);
        assert_eq!(blk.device().read_config_u8(32), writeback);
        let data = vec![writeback ^ 0x5a; 4096];
        assert_eq!(blk.write(8, &data).unwrap(), BlkStatus::Ok);
        let mut back = vec![0u8; 4096];
        assert_eq!(blk.read(8, &mut back).unwrap(), BlkStatus::Ok);
        assert_eq!(back, data);
        assert_eq!(blk.device().status() & status::DEVICE_NEEDS_RESET, 0);
    }
    // I/O would also go on through a restored session; the write would not.
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        !log.contains("hung up"),
        "the backend dropped the session:\n{log}"
    );
}

#[test]
fn random_writes_verified_in_image_and_read_back() {
    let sb = one_blk("random", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let opts = BlkOptions {
        max_transfer: 256 * 1024,
        ..BlkOptions::default()
    };
    let mut blk = g.blk(BLK, 0x10_0000, &opts);
    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    let seed = 0x5eed_0001;
    let mut rng = Rng::new(seed);
    let total_target: usize = 64 << 20;
    let mut written = 0usize;
    let mut count = 0;
    let sectors = DISK_SIZE / SECTOR_SIZE as u64;
    while written < total_target {
        let len_sectors = 1 + rng.below(512) as usize; // up to 256 KiB
        let sector = rng.below(sectors - len_sectors as u64);
        let mut data = vec![0u8; len_sectors * SECTOR_SIZE];
        rng.fill(&mut data);
        assert_eq!(
            blk.write(sector, &data).unwrap(),
            BlkStatus::Ok,
            "seed {seed:#x} write {count}"
        );
        let mut on_disk = vec![0u8; data.len()];
        image
            .read_exact_at(&mut on_disk, sector * SECTOR_SIZE as u64)
            .unwrap();
        assert!(
            on_disk == data,
            "seed {seed:#x}: write {count} at sector {sector} not in the image"
        );
        let mut back = vec![0u8; data.len()];
        assert_eq!(blk.read(sector, &mut back).unwrap(), BlkStatus::Ok);
        assert!(
            back == data,
            "seed {seed:#x}: read-back {count} at sector {sector} differs"
        );
        written += data.len();
        count += 1;
    }
    eprintln!("{count} writes, {written} bytes verified");
}

#[test]
fn queued_requests_complete_out_of_a_deep_queue() {
    let sb = one_blk("qd32", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(
        BLK,
        0x10_0000,
        &BlkOptions {
            auto_kick: false,
            ..BlkOptions::default()
        },
    );
    let mut rng = Rng::new(7);
    let mut expected = Vec::new();
    for i in 0..32u64 {
        let mut data = vec![0u8; 4096];
        rng.fill(&mut data);
        blk.submit_write(i * 8, &data).unwrap();
        expected.push(data);
    }
    blk.kick();
    let mut done = 0;
    while done < 32 {
        for c in blk.complete(Duration::from_secs(10)).unwrap() {
            assert_eq!(c.status, BlkStatus::Ok);
            done += 1;
        }
    }
    for (i, data) in expected.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        blk.read(i as u64 * 8, &mut back).unwrap();
        assert!(&back == data, "request {i}");
    }
}

#[test]
fn flush_makes_writes_durable() {
    let sb = one_blk("flush", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    assert_ne!(blk.features() & feature::FLUSH, 0);
    let data = vec![0x42u8; 65536];
    assert_eq!(blk.write(1000, &data).unwrap(), BlkStatus::Ok);
    assert_eq!(blk.flush().unwrap(), BlkStatus::Ok);
    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    let mut on_disk = vec![0u8; data.len()];
    image.read_exact_at(&mut on_disk, 1000 * 512).unwrap();
    assert_eq!(on_disk, data);
}

#[test]
fn read_only_image_fails_writes_with_ioerr() {
    let sb = one_blk("ro", r#","read_only":true"#);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    assert_ne!(blk.features() & feature::RO, 0, "RO feature offered");
    assert_eq!(blk.write(0, &[1u8; 512]).unwrap(), BlkStatus::IoErr);
    let mut back = [0xffu8; 512];
    assert_eq!(blk.read(0, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(
        back, [0u8; 512],
        "the refused write must not reach the image"
    );
}

#[test]
fn out_of_range_sectors_give_ioerr() {
    let sb = one_blk("range", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let sectors = blk.capacity();
    let mut buf = [0u8; 1024];
    assert_eq!(
        blk.read(sectors - 1, &mut buf).unwrap(),
        BlkStatus::IoErr,
        "straddles the end"
    );
    assert_eq!(
        blk.read(sectors, &mut buf[..512]).unwrap(),
        BlkStatus::IoErr
    );
    assert_eq!(
        blk.write(u64::MAX / 512, &buf[..512]).unwrap(),
        BlkStatus::IoErr
    );
    assert_eq!(
        blk.read(sectors - 1, &mut buf[..512]).unwrap(),
        BlkStatus::Ok,
        "last sector is fine"
    );
}

#[test]
fn get_id_returns_the_serial() {
    let sb = one_blk("serial", r#","backend":{"serial":"zone1-disk0"}"#);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    // qemu-storage-daemon takes no serial and answers with a fixed id of its own.
    assert_eq!(
        blk.get_id().unwrap(),
        blk_backend().get_id_for("zone1-disk0")
    );
}

#[test]
fn reset_and_reinitialize() {
    let sb = one_blk("reset", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    for round in 0..5u8 {
        let mut blk = g.blk(
            BLK,
            0x10_0000 + u64::from(round) * 0x20_0000,
            &BlkOptions::default(),
        );
        let data = vec![round; 4096];
        assert_eq!(
            blk.write(u64::from(round) * 8, &data).unwrap(),
            BlkStatus::Ok
        );
        let mut back = vec![0u8; 4096];
        blk.read(u64::from(round) * 8, &mut back).unwrap();
        assert_eq!(back, data, "round {round}");
        blk.device().reset().unwrap();
        assert_eq!(blk.device().status(), 0);
    }
    // Data written before each reset is still there.
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    for round in 0..5u8 {
        let mut back = vec![0u8; 4096];
        blk.read(u64::from(round) * 8, &mut back).unwrap();
        assert_eq!(back, vec![round; 4096]);
    }
}

#[test]
fn two_vcpus_access_registers_concurrently() {
    let sb = one_blk("vcpus", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    let sb = &sb;
    std::thread::scope(|s| {
        // vCPU 1 hammers read-only registers while vCPU 0 does I/O.
        let reader = s.spawn(move || {
            let vcpu = sb.vcpu(1, 1);
            for _ in 0..20_000 {
                assert_eq!(vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32, MAGIC_VALUE);
                assert_eq!(vcpu.read(BLK + reg::DEVICE_ID, 4), 2);
                assert_eq!(vcpu.read(BLK + reg::CONFIG, 8), DISK_SIZE / 512);
            }
        });
        let mut rng = Rng::new(99);
        for i in 0..200u64 {
            let mut data = vec![0u8; 4096];
            rng.fill(&mut data);
            assert_eq!(blk.write(i * 8, &data).unwrap(), BlkStatus::Ok);
            let mut back = vec![0u8; 4096];
            blk.read(i * 8, &mut back).unwrap();
            assert_eq!(back, data);
        }
        reader.join().unwrap();
    });
}

#[test]
fn two_zones_each_with_a_device() {
    let dir = dir_with_images("zones", &["a.img", "b.img"]);
    let cfg = config(&[
        zone(1, &[blk_entry(BLK, IRQ, "a.img", "")], None),
        zone(2, &[blk_entry(BLK, IRQ, "b.img", "")], None),
    ]);
    let sb = start(dir, &cfg);
    let g1 = Guest::new(&sb, 1, 0, IRQ);
    let g2 = Guest::new(&sb, 2, 1, IRQ);
    let mut b1 = g1.blk(BLK, 0x10_0000, &BlkOptions::default());
    let mut b2 = g2.blk(BLK, 0x10_0000, &BlkOptions::default());
    assert_eq!(b1.write(0, &[1u8; 4096]).unwrap(), BlkStatus::Ok);
    assert_eq!(b2.write(0, &[2u8; 4096]).unwrap(), BlkStatus::Ok);
    let mut back = [0u8; 4096];
    b1.read(0, &mut back).unwrap();
    assert_eq!(back, [1u8; 4096], "zone 1 sees its own disk");
    b2.read(0, &mut back).unwrap();
    assert_eq!(back, [2u8; 4096], "zone 2 sees its own disk");
    let mut on_disk = [0u8; 4096];
    File::open(sb.dir.path().join("b.img"))
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk, [2u8; 4096]);
}

/// One shared trap window for two devices, as in hvisor's qemu-aarch64 examples: only the
/// device at the window base gets asynchronous notifies, the other's are synchronous.
#[test]
fn shared_window_with_synchronous_notifies() {
    let dir = dir_with_images("window", &["a.img", "b.img"]);
    let base = 0xa000000;
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(base, 48, "a.img", ""),
            blk_entry(base + 0x200, 49, "b.img", ""),
        ],
        Some(r#"[{"base":"0xa000000","size":"0x4000"}]"#),
    )]);
    let sb = start(dir, &cfg);
    let g0 = Guest::new(&sb, 1, 0, 48);
    let g1 = Guest::new(&sb, 1, 0, 49);
    let mut b0 = g0.blk(base, 0x10_0000, &BlkOptions::default());
    let mut b1 = g1.blk(base + 0x200, 0x30_0000, &BlkOptions::default());
    // Device 1 sits at window offset 0x200: its QueueNotify is at window offset 0x250, so
    // hvisor sends it synchronously.
    let before = sb.sim.stats();
    for i in 0..50u64 {
        assert_eq!(b1.write(i, &[!(i as u8); 512]).unwrap(), BlkStatus::Ok);
    }
    let mid = sb.sim.stats();
    assert_eq!(
        mid.async_requests, before.async_requests,
        "device 1 notifies must be synchronous"
    );
    for i in 0..50u64 {
        assert_eq!(b0.write(i, &[i as u8; 512]).unwrap(), BlkStatus::Ok);
    }
    let after = sb.sim.stats();
    assert!(
        after.async_requests > mid.async_requests,
        "device 0 notifies are asynchronous"
    );
    let mut back = [0u8; 512];
    for i in 0..50u64 {
        b0.read(i, &mut back).unwrap();
        assert_eq!(back, [i as u8; 512]);
        b1.read(i, &mut back).unwrap();
        assert_eq!(back, [!(i as u8); 512]);
    }
}

/// The default: one window per device, so every device's notify is asynchronous.
#[test]
fn per_device_windows_make_every_notify_asynchronous() {
    let dir = dir_with_images("perdev", &["a.img", "b.img"]);
    let cfg = config(&[zone(
        1,
        &[
            blk_entry(0xa000000, 48, "a.img", ""),
            blk_entry(0xa000200, 49, "b.img", ""),
        ],
        None,
    )]);
    let sb = start(dir, &cfg);
    let g1 = Guest::new(&sb, 1, 0, 49);
    let mut b1 = g1.blk(0xa000200, 0x30_0000, &BlkOptions::default());
    let before = sb.sim.stats();
    for i in 0..20u64 {
        assert_eq!(b1.write(i, &[7u8; 512]).unwrap(), BlkStatus::Ok);
    }
    let after = sb.sim.stats();
    assert!(
        after.async_requests - before.async_requests >= 1,
        "device 1 notifies are async"
    );
}

/// A config written exactly like hvisor-tool's board examples: hex strings everywhere, a MAC
/// given as strings, a disabled device.
#[test]
fn hvisor_tool_board_config_is_accepted() {
    let dir = dir_with_images("board", &["rootfs1.ext4"]);
    let cfg = r#"{
    "zones": [
        {
            "id": 1,
            "memory_region": [
                {
                    "zone0_ipa": "0x50000000",
                    "zonex_ipa": "0x50000000",
                    "size": "0x4000000"
                }
            ],
            "devices": [
                {
                    "type": "blk",
                    "addr": "0xa003c00",
                    "len": "0x200",
                    "irq": 78,
                    "img": "rootfs1.ext4",
                    "status": "enable"
                },
                {
                    "type": "net",
                    "addr": "0xa003600",
                    "len": "0x200",
                    "irq": 75,
                    "tap": "tap0",
                    "mac": ["0x00", "0x16", "0x3e", "0x10", "0x10", "0x10"],
                    "status": "disable"
                },
                {
                    "type": "console",
                    "addr": "0xa003800",
                    "len": "0x200",
                    "irq": 76,
                    "status": "disable"
                }
            ]
        }
    ]
}"#;
    let sb = start(Arc::clone(&dir), cfg);
    let g = Guest::new(&sb, 1, 0, 78);
    let mut blk = g.blk(0xa003c00, 0x10_0000, &BlkOptions::default());
    assert_eq!(blk.write(0, &[9u8; 512]).unwrap(), BlkStatus::Ok);
    // The disabled devices are not there: their windows read as "no device".
    assert_eq!(g.vcpu.read(0xa003600 + reg::MAGIC_VALUE, 4), 0);
    assert_eq!(
        sb.sim.stats().unhandled_accesses,
        1,
        "disabled device window traps nowhere"
    );
}

#[test]
fn sigterm_stops_the_bridge_and_its_backend_cleanly() {
    let mut sb = one_blk("sigterm", "");
    let g = Guest::new(&sb, 1, 0, IRQ);
    let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
    assert_eq!(blk.write(0, &[3u8; 512]).unwrap(), BlkStatus::Ok);
    let run_dir = sb.dir.path().join("run");
    if blk_backend().spawned_by_bridge() {
        assert!(
            std::fs::read_dir(&run_dir).unwrap().count() >= 1,
            "backend socket exists"
        );
    }
    let status = sb.bridge.terminate();
    assert!(status.success(), "bridge exit status {status}");
    assert_eq!(
        std::fs::read_dir(&run_dir).map(|d| d.count()).unwrap_or(0),
        0,
        "the spawned backend removed its socket"
    );
    if !blk_backend().spawned_by_bridge() {
        // An external backend is not the bridge's to stop: it stays up for the next frontend.
        let socket = match &sb.config.zones[0].devices[0].backend {
            BackendSpec::External { socket } => socket.clone(),
            other => panic!("expected an external backend, got {other:?}"),
        };
        UnixStream::connect(&socket).unwrap_or_else(|e| {
            panic!(
                "the external backend stopped with the bridge ({}: {e})",
                socket.display()
            )
        });
    }
}
