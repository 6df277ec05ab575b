//! The core-slice benchmark. In one run it prints, each next to its baseline:
//! (a) the synchronous register-read round trip through ring + bridge, against a bare ring
//!     echo (same two threads, the responder only echoes);
//! (b) blk 4 KiB random-read IOPS at QD1 and QD32 and 1 MiB sequential-read MB/s through the
//!     whole path (simulated hypervisor → bridge → vhost-user-blk) on a tmpfs image, against
//!     `pread` of the same file from one thread;
//! (c) the RSS of the bridge and of the backend.
//!
//! Run: `cargo build --release --workspace --bins && target/release/hvisor-vhost-bench`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hvisor_hsm::{SimHypervisor, SimRegion, SimZoneSpec};
use hvisor_vhost_tests::driver::blk::SECTOR_SIZE;
use hvisor_vhost_tests::driver::{BlkDriver, BlkOptions, BlkStatus, GuestAllocator};
use hvisor_vhost_tests::harness::{Rng, SimBridge, TempDir};

const RAM_BASE: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x800_0000;
const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;

/// Benchmark knobs.
#[derive(Debug, Parser)]
#[command(about = "hvisor-vhost core benchmark: ring round trip, blk IOPS/throughput, RSS")]
struct Args {
    /// Register reads per latency sample set.
    #[arg(long, default_value_t = 200_000)]
    reads: usize,
    /// Seconds per I/O measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Image size in MiB (on tmpfs).
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Directory for the image and sockets (tmpfs keeps the disk out of the measurement).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Bridge busy-poll window, microseconds.
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
}

fn main() {
    let args = Args::parse();
    // The harness puts its scratch directory under TMPDIR.
    // No other thread exists yet, so changing the environment is race-free.
    std::env::set_var("TMPDIR", &args.dir);
    println!("hvisor-vhost benchmark (all figures from this run)\n");

    let (base_med, base_p99) = ring_echo_baseline(args.reads);
    let dir = Arc::new(TempDir::new("bench"));
    let image = dir.path().join("disk.img");
    fill_image(&image, args.image_mib << 20);
    let cfg = format!(
        r#"{{"zones":[{{"id":1,"memory_region":[{{"zone0_ipa":"{RAM_BASE:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],
        "devices":[{{"type":"blk","addr":"{BLK:#x}","len":"0x200","irq":{IRQ},"img":"disk.img","status":"enable"}}]}}]}}"#
    );
    let spin = args.spin_us.to_string();
    let sb = SimBridge::start(Arc::clone(&dir), &cfg, &["--spin-us", &spin]);
    let (full_med, full_p99) = bridge_round_trip(&sb, args.reads);

    println!(
        "(a) synchronous register read round trip (MagicValue), {} reads",
        args.reads
    );
    println!(
        "    bare ring echo        median {:>7.2} us   p99 {:>7.2} us",
        base_med, base_p99
    );
    println!(
        "    ring + bridge         median {:>7.2} us   p99 {:>7.2} us",
        full_med, full_p99
    );
    println!(
        "    ratio (bridge/echo)   median {:>7.2}x     p99 {:>7.2}x\n",
        full_med / base_med,
        full_p99 / base_p99
    );

    let secs = Duration::from_secs_f64(args.seconds);
    let sectors = (args.image_mib << 20) / SECTOR_SIZE as u64;
    let vcpu = sb.vcpu(1, 0);
    let ram = sb.ram(1);
    let irq = sb.irq(1, IRQ);
    let options = BlkOptions {
        max_transfer: 1 << 20,
        auto_kick: false,
        ..BlkOptions::default()
    };
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, RAM_SIZE - 0x10_0000);
    let mut blk = BlkDriver::new(&vcpu, BLK, &ram, &irq, &mut alloc, &options).expect("blk driver");

    let qd1 = blk_random_reads(&mut blk, sectors, 1, secs);
    let qd32 = blk_random_reads(&mut blk, sectors, 32, secs);
    let seq = blk_sequential_reads(&mut blk, sectors, secs);
    let file = File::open(&image).expect("image");
    let pread_iops = pread_random(&file, sectors, secs);
    let pread_seq = pread_sequential(&file, sectors, secs);
    println!(
        "(b) vhost-user-blk through the bridge, tmpfs image of {} MiB",
        args.image_mib
    );
    println!(
        "    4 KiB random read QD1   {:>10.0} IOPS   pread {:>10.0} IOPS   ratio {:.3}",
        qd1,
        pread_iops,
        qd1 / pread_iops
    );
    println!(
        "    4 KiB random read QD32  {:>10.0} IOPS   pread {:>10.0} IOPS   ratio {:.3}",
        qd32,
        pread_iops,
        qd32 / pread_iops
    );
    println!(
        "    1 MiB sequential read   {:>10.1} MB/s   pread {:>10.1} MB/s   ratio {:.3}\n",
        seq,
        pread_seq,
        seq / pread_seq
    );

    let bridge_pid = sb.bridge.pid();
    let backend_pid = child_pids(bridge_pid).into_iter().next();
    println!("(c) resident memory (VmRSS / VmHWM)");
    print_rss("bridge", bridge_pid);
    match backend_pid {
        Some(pid) => print_rss("vhost-user-blk", pid),
        None => println!("    vhost-user-blk        (pid not found)"),
    }
}

/// The same two threads as the real path, but the responder only echoes.
fn ring_echo_baseline(reads: usize) -> (f64, f64) {
    let spec = SimZoneSpec {
        id: 1,
        regions: vec![SimRegion {
            zone0_ipa: RAM_BASE,
            zonex_ipa: RAM_BASE,
            size: 0x10_0000,
        }],
        windows: vec![(BLK, 0x200)],
    };
    let sim = SimHypervisor::new(vec![spec]).expect("sim");
    let hsm = sim.hsm();
    let stop = Arc::new(AtomicBool::new(false));
    let responder = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let page = hsm.bridge();
            while !stop.load(Ordering::Relaxed) {
                match page.pop_request() {
                    Some(req) if req.need_interrupt == 0 => {
                        let _ = page.reply(req.src_cpu, 0x7472_6976);
                    }
                    Some(_) => {}
                    None => std::hint::spin_loop(),
                }
            }
        })
    };
    let vcpu = sim.vcpu(1, 0);
    let result = time_reads(reads, || vcpu.read(BLK, 4));
    stop.store(true, Ordering::Relaxed);
    responder.join().expect("responder");
    result
}

fn bridge_round_trip(sb: &SimBridge, reads: usize) -> (f64, f64) {
    let vcpu = sb.sim.vcpu(1, 0);
    // Warm up: the first access waits for the bridge to start and negotiate.
    let magic = vcpu
        .read_within(BLK, 4, Duration::from_secs(30))
        .expect("bridge answers");
    assert_eq!(magic, 0x7472_6976, "bridge serves the device");
    time_reads(reads, || vcpu.read(BLK, 4))
}

/// Median and p99 of one read, in microseconds.
fn time_reads(reads: usize, mut read: impl FnMut() -> u64) -> (f64, f64) {
    for _ in 0..reads / 10 {
        read();
    }
    let mut samples = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        let v = read();
        samples.push(t.elapsed());
        assert_eq!(v, 0x7472_6976);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

type Blk<'a> = BlkDriver<
    'a,
    hvisor_vhost_tests::harness::Vcpu,
    hvisor_vhost_tests::harness::Ram,
    hvisor_vhost_tests::harness::Irq,
>;

fn blk_random_reads(blk: &mut Blk<'_>, sectors: u64, depth: usize, duration: Duration) -> f64 {
    let mut rng = Rng::new(42);
    let blocks = sectors / 8;
    let mut in_flight = 0;
    let mut done: u64 = 0;
    let start = Instant::now();
    loop {
        while in_flight < depth {
            blk.submit_read(rng.below(blocks) * 8, 4096)
                .expect("submit");
            in_flight += 1;
        }
        blk.kick();
        for c in blk.complete(Duration::from_secs(10)).expect("complete") {
            assert_eq!(c.status, BlkStatus::Ok);
            in_flight -= 1;
            done += 1;
        }
        if start.elapsed() >= duration {
            break;
        }
    }
    while in_flight > 0 {
        in_flight -= blk.complete(Duration::from_secs(10)).expect("drain").len();
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn blk_sequential_reads(blk: &mut Blk<'_>, sectors: u64, duration: Duration) -> f64 {
    let chunk = 1u64 << 20;
    let per = chunk / SECTOR_SIZE as u64;
    let mut sector = 0;
    let mut in_flight = 0;
    let mut bytes = 0u64;
    let start = Instant::now();
    loop {
        while in_flight < 4 {
            if sector + per > sectors {
                sector = 0;
            }
            blk.submit_read(sector, chunk as usize).expect("submit");
            sector += per;
            in_flight += 1;
        }
        blk.kick();
        for c in blk.complete(Duration::from_secs(10)).expect("complete") {
            assert_eq!(c.status, BlkStatus::Ok);
            in_flight -= 1;
            bytes += chunk;
        }
        if start.elapsed() >= duration {
            break;
        }
    }
    while in_flight > 0 {
        in_flight -= blk.complete(Duration::from_secs(10)).expect("drain").len();
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn pread_random(file: &File, sectors: u64, duration: Duration) -> f64 {
    let mut rng = Rng::new(42);
    let mut buf = vec![0u8; 4096];
    let blocks = sectors / 8;
    let mut done = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..256 {
            file.read_exact_at(&mut buf, rng.below(blocks) * 4096)
                .expect("pread");
            done += 1;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn pread_sequential(file: &File, sectors: u64, duration: Duration) -> f64 {
    let chunk = 1u64 << 20;
    let size = sectors * SECTOR_SIZE as u64;
    let mut buf = vec![0u8; chunk as usize];
    let mut offset = 0;
    let mut bytes = 0u64;
    let start = Instant::now();
    while start.elapsed() < duration {
        if offset + chunk > size {
            offset = 0;
        }
        file.read_exact_at(&mut buf, offset).expect("pread");
        offset += chunk;
        bytes += chunk;
    }
    bytes as f64 / 1e6 / start.elapsed().as_secs_f64()
}

fn fill_image(path: &Path, size: u64) {
    let file = File::create(path).expect("image");
    let mut rng = Rng::new(1);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < size {
        rng.fill(&mut buf);
        file.write_all_at(&buf, offset).expect("fill image");
        offset += buf.len() as u64;
    }
}

fn child_pids(pid: u32) -> Vec<u32> {
    let path = format!("/proc/{pid}/task/{pid}/children");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn print_rss(name: &str, pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN)
    };
    println!(
        "    {:<20} {:>6.1} MiB / {:>6.1} MiB",
        name,
        field("VmRSS:"),
        field("VmHWM:")
    );
}
