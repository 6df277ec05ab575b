//! Zone lifecycle without restarting the bridge: the simulated zone is shut down and started
//! again 100 times (RAM zeroed, IRQs dropped, a new guest that resets and re-initialises the
//! device), with I/O in every cycle, while the bridge's RSS and open fd count stay flat.

mod common;

use common::*;
use hvisor_vhost_tests::driver::{BlkOptions, BlkStatus};
use hvisor_vhost_tests::harness::SimBridge;

const BLK: u64 = 0xa003c00;
const IRQ: u32 = 78;
const CYCLES: u64 = 100;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse().ok())
        .expect("VmRSS")
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn hundred_zone_restarts_keep_the_bridge_flat() {
    let dir = dir_with_images("lifecycle", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let pid = sb.bridge.pid();
    let mut baseline = None;
    for cycle in 0..CYCLES {
        sb.sim.restart_zone(1).unwrap();
        {
            let g = Guest::new(&sb, 1, 0, IRQ);
            let mut blk = g.blk(BLK, 0x10_0000, &BlkOptions::default());
            let data = vec![cycle as u8; 4096];
            assert_eq!(
                blk.write(cycle * 8, &data).unwrap(),
                BlkStatus::Ok,
                "cycle {cycle}"
            );
            let mut back = vec![0u8; 4096];
            assert_eq!(blk.read(cycle * 8, &mut back).unwrap(), BlkStatus::Ok);
            assert_eq!(back, data, "cycle {cycle}");
            // The first cycle's data survives every restart: it lives in the image.
            assert_eq!(blk.read(0, &mut back).unwrap(), BlkStatus::Ok);
            assert_eq!(back, vec![0u8; 4096], "cycle {cycle}: block 0");
        }
        if cycle == 9 {
            baseline = Some((rss_kib(pid), open_fds(pid)));
        }
    }
    let (rss0, fds0) = baseline.unwrap();
    let (rss, fds) = (rss_kib(pid), open_fds(pid));
    eprintln!(
        "bridge after 10 cycles: {rss0} KiB, {fds0} fds; after {CYCLES}: {rss} KiB, {fds} fds"
    );
    assert_eq!(fds, fds0, "open fds grew across zone restarts");
    assert!(rss <= rss0 + 2048, "RSS grew from {rss0} KiB to {rss} KiB");
}
