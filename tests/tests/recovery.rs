//! Backend crash recovery: `vhost-user-blk` is killed with SIGKILL 20 times at random points
//! of a sustained, verified write and read workload. The bridge respawns it, replays the
//! vrings from the guest's used index and re-kicks; the guest sees every request complete
//! and every block matches the model afterwards.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus};
use hvisor_vhost_tests::harness::{children_running, Rng, SimBridge};

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
/// The workload covers 8 MiB of the disk, in 4 KiB blocks.
const BLOCKS: u64 = 2048;
const KILLS: usize = 20;

#[test]
fn backend_killed_twenty_times_loses_no_io() {
    let dir = dir_with_images("recovery", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let done = AtomicBool::new(false);
    let ops = AtomicU64::new(0);
    let seed = 0x00c0_ffee;

    let model = std::thread::scope(|s| {
        let guest = s.spawn(|| {
            let opts = BlkOptions {
                timeout: Duration::from_secs(60),
                ..BlkOptions::default()
            };
            let mut blk = g.blk(BLK, 0x10_0000, &opts);
            let mut rng = Rng::new(seed);
            let mut model: Vec<Option<u64>> = vec![None; BLOCKS as usize];
            let mut block = vec![0u8; 4096];
            while !done.load(Ordering::Acquire) {
                let n = rng.below(BLOCKS);
                if rng.below(3) == 0 {
                    assert_eq!(
                        blk.read(n * 8, &mut block).unwrap(),
                        BlkStatus::Ok,
                        "read of block {n}"
                    );
                    let mut expected = vec![0u8; 4096];
                    if let Some(tag) = model[n as usize] {
                        Rng::new(tag).fill(&mut expected);
                    }
                    assert!(
                        block == expected,
                        "seed {seed:#x}: block {n} differs from the model"
                    );
                } else {
                    let tag = rng.next_u64();
                    Rng::new(tag).fill(&mut block);
                    assert_eq!(
                        blk.write(n * 8, &block).unwrap(),
                        BlkStatus::Ok,
                        "write of block {n}"
                    );
                    model[n as usize] = Some(tag);
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            // Every block through the device, then the image file itself.
            for n in 0..BLOCKS {
                let mut expected = vec![0u8; 4096];
                if let Some(tag) = model[n as usize] {
                    Rng::new(tag).fill(&mut expected);
                }
                assert_eq!(blk.read(n * 8, &mut block).unwrap(), BlkStatus::Ok);
                assert!(
                    block == expected,
                    "seed {seed:#x}: final check of block {n}"
                );
            }
            assert_eq!(blk.flush().unwrap(), BlkStatus::Ok);
            model
        });

        let mut rng = Rng::new(seed ^ 0x55);
        let mut killed = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while killed.len() < KILLS {
            assert!(
                Instant::now() < deadline,
                "only {} kills in 120 s",
                killed.len()
            );
            assert!(!guest.is_finished(), "the guest stopped early");
            // Random points of the workload: let it run a random number of operations.
            let target = ops.load(Ordering::Relaxed) + 5 + rng.below(60);
            while ops.load(Ordering::Relaxed) < target {
                assert!(!guest.is_finished(), "the guest stopped early");
                std::thread::yield_now();
            }
            let Some(pid) = children_running(sb.bridge.pid(), "vhost-user-blk")
                .into_iter()
                .find(|p| !killed.contains(p))
            else {
                std::thread::yield_now();
                continue;
            };
            // SAFETY: kill(2) on a process this test's bridge started; no memory is touched.
            assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
            killed.push(pid);
        }
        // Let the workload run on the last restarted backend too.
        let target = ops.load(Ordering::Relaxed) + 100;
        while ops.load(Ordering::Relaxed) < target && !guest.is_finished() {
            std::thread::yield_now();
        }
        done.store(true, Ordering::Release);
        let model = guest.join().expect("guest workload");
        eprintln!(
            "{} kills during {} operations",
            killed.len(),
            ops.load(Ordering::Relaxed)
        );
        model
    });

    let image = File::open(sb.dir.path().join("disk.img")).unwrap();
    let mut on_disk = vec![0u8; 4096];
    for (n, tag) in model.iter().enumerate() {
        let mut expected = vec![0u8; 4096];
        if let Some(tag) = tag {
            Rng::new(*tag).fill(&mut expected);
        }
        image.read_exact_at(&mut on_disk, n as u64 * 4096).unwrap();
        assert!(
            on_disk == expected,
            "image block {n} differs from the model"
        );
    }
}
