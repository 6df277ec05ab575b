//! The demo: a simulated hvisor zone whose virtio-blk disk is served by the real
//! `hvisor-vhost-bridge` and `vhost-user-blk` processes. The guest driver in this process
//! probes the device the way Linux does, writes a random pattern, flushes, reads it back,
//! and checks the image file itself.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hvisor_vhost_tests::driver::blk::{feature, SECTOR_SIZE};
use hvisor_vhost_tests::driver::mmio::reg;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator, MmioBus};
use hvisor_vhost_tests::harness::{make_image, Rng, SimBridge, TempDir};

const RAM_BASE: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x800_0000;
const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

/// Demo knobs.
#[derive(Debug, Parser)]
#[command(about = "hvisor-vhost demo: a simulated zone with a vhost-user-blk disk")]
struct Args {
    /// Disk size in MiB.
    #[arg(long, default_value_t = 128)]
    disk_mib: u64,
    /// MiB of random data to write and verify.
    #[arg(long, default_value_t = 32)]
    write_mib: u64,
    /// Scratch directory (default: /dev/shm if present, else the system temp dir).
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let scratch = args.dir.clone().or_else(|| {
        let shm = PathBuf::from("/dev/shm");
        shm.is_dir().then_some(shm)
    });
    if let Some(dir) = scratch {
        // No other thread exists yet, so changing the environment is race-free.
        std::env::set_var("TMPDIR", dir);
    }
    match run(&args) {
        Ok(()) => {
            println!("\nDEMO PASSED");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("\nDEMO FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let dir = Arc::new(TempDir::new("demo"));
    let image = dir.path().join("disk.img");
    make_image(&image, args.disk_mib << 20);
    let cfg = format!(
        r#"{{"zones":[{{"id":1,
  "memory_region":[{{"zone0_ipa":"{RAM_BASE:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],
  "devices":[{{"type":"blk","addr":"{BLK:#x}","len":"0x200","irq":{IRQ},"img":"disk.img","status":"enable",
               "backend":{{"serial":"hvisor-vhost-demo"}}}}]}}]}}"#
    );
    println!("== hvisor-vhost demo ==");
    println!(
        "zone 1: {} MiB RAM at {RAM_BASE:#x}; virtio-blk at {BLK:#x}, irq {IRQ}",
        RAM_SIZE >> 20
    );
    println!("image:  {} ({} MiB, fresh)", image.display(), args.disk_mib);
    println!("config (hvisor-tool virtio_cfg.json format):\n{cfg}\n");
    println!("starting the simulated hypervisor and hvisor-vhost-bridge (which starts vhost-user-blk)...");
    let mut sb = SimBridge::start(Arc::clone(&dir), &cfg, &[]);

    let vcpu = sb.vcpu(1, 0);
    let ram = sb.ram(1);
    let irq = sb.irq(1, IRQ);
    let started = Instant::now();
    let magic = vcpu.read(BLK + reg::MAGIC_VALUE, 4) as u32;
    println!(
        "\n[guest] probe {BLK:#x}: magic {:?} version {} device id {} vendor {:#x} (first access answered after {:?})",
        String::from_utf8_lossy(&magic.to_le_bytes()),
        vcpu.read(BLK + reg::VERSION, 4),
        vcpu.read(BLK + reg::DEVICE_ID, 4),
        vcpu.read(BLK + reg::VENDOR_ID, 4),
        started.elapsed()
    );
    let options = BlkOptions {
        max_transfer: 1 << 20,
        auto_kick: false,
        ..BlkOptions::default()
    };
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, RAM_SIZE - 0x10_0000);
    let mut blk = BlkDriver::new(&vcpu, BLK, &ram, &irq, &mut alloc, &options)
        .map_err(|e| format!("init: {e}"))?;
    let f = blk.features();
    let named: Vec<&str> = [
        (feature::FLUSH, "FLUSH"),
        (feature::SEG_MAX, "SEG_MAX"),
        (feature::SIZE_MAX, "SIZE_MAX"),
        (feature::BLK_SIZE, "BLK_SIZE"),
        (1 << 28, "INDIRECT_DESC"),
        (1 << 29, "EVENT_IDX"),
        (1 << 32, "VERSION_1"),
    ]
    .iter()
    .filter(|(bit, _)| f & bit != 0)
    .map(|(_, n)| *n)
    .collect();
    println!("[guest] negotiated features {f:#x}: {}", named.join(" "));
    println!(
        "[guest] capacity {} sectors ({} MiB), serial {:?}",
        blk.capacity(),
        (blk.capacity() * 512) >> 20,
        blk.get_id().map_err(|e| format!("GET_ID: {e}"))?
    );

    // Random-sized writes at random offsets, 4 in flight, then FLUSH.
    let mut rng = Rng::new(0xdeb0);
    let sectors = blk.capacity();
    let mut writes = Vec::new();
    let mut total = 0u64;
    while total < args.write_mib << 20 {
        let len = (1 + rng.below(256)) * SECTOR_SIZE as u64;
        let sector = rng.below(sectors - len / 512) & !7;
        writes.push((sector, len as usize, rng.next_u64()));
        total += len;
    }
    let t = Instant::now();
    let mut in_flight = 0;
    for (sector, len, seed) in &writes {
        let mut data = vec![0u8; *len];
        Rng::new(*seed).fill(&mut data);
        blk.submit_write(*sector, &data)
            .map_err(|e| format!("submit: {e}"))?;
        in_flight += 1;
        if in_flight == 4 {
            blk.kick();
            for c in blk
                .complete(Duration::from_secs(10))
                .map_err(|e| format!("write: {e}"))?
            {
                if c.status != BlkStatus::Ok {
                    return Err(format!("write failed: {:?}", c.status));
                }
                in_flight -= 1;
            }
        }
    }
    blk.kick();
    while in_flight > 0 {
        in_flight -= blk
            .complete(Duration::from_secs(10))
            .map_err(|e| format!("write: {e}"))?
            .len();
    }
    if blk.flush().map_err(|e| format!("flush: {e}"))? != BlkStatus::Ok {
        return Err("FLUSH failed".into());
    }
    let write_time = t.elapsed();
    println!(
        "[guest] wrote {} requests, {:.1} MiB, then FLUSH: {:.0} MB/s",
        writes.len(),
        total as f64 / f64::from(1 << 20),
        total as f64 / 1e6 / write_time.as_secs_f64()
    );

    // Later writes may overlap earlier ones: the expected image is the writes in order.
    let mut expected = vec![0u8; (args.disk_mib << 20) as usize];
    for (sector, len, seed) in &writes {
        let start = (*sector as usize) * SECTOR_SIZE;
        Rng::new(*seed).fill(&mut expected[start..start + len]);
    }
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    for (i, chunk) in expected.chunks(1 << 20).enumerate() {
        let status = blk
            .read((i as u64) << 11, &mut buf[..chunk.len()])
            .map_err(|e| format!("read: {e}"))?;
        if status != BlkStatus::Ok || buf[..chunk.len()] != *chunk {
            return Err(format!(
                "read-back of MiB {i} differs from what was written"
            ));
        }
    }
    let read_time = t.elapsed();
    println!(
        "[guest] read back all {} MiB and compared: identical ({:.0} MB/s)",
        args.disk_mib,
        (args.disk_mib << 20) as f64 / 1e6 / read_time.as_secs_f64()
    );
    let file = File::open(&image).map_err(|e| format!("open image: {e}"))?;
    let mut on_disk = vec![0u8; expected.len()];
    file.read_exact_at(&mut on_disk, 0)
        .map_err(|e| format!("read image: {e}"))?;
    if on_disk != expected {
        return Err("the image file differs from what the guest wrote".into());
    }
    println!("[host]  image file matches the guest's writes byte for byte");
    let stats = sb.sim.stats();
    println!(
        "[hvisor] {} trapped accesses ({} async QueueNotify), {} wakeups, {} interrupts injected, max {} IRQs pending per zone",
        stats.requests, stats.async_requests, stats.wakeups, stats.irqs_delivered, stats.max_pending_irqs
    );
    let status = sb.bridge.terminate();
    println!("[host]  bridge stopped with SIGTERM: {status}");
    if !status.success() {
        return Err("bridge did not exit cleanly".into());
    }
    Ok(())
}
