//! Packets per second through the whole network path: the simulated hypervisor and the
//! virtio-net guest driver in this process, `hvisor-vhost-bridge`, `vhost-user-net` on a TAP in
//! a private network namespace, and a packet socket on that TAP as the host-side peer.
//!
//! Guest to host: the driver queues small frames in batches (one kick per batch) while the
//! host side counts what reaches the TAP. Host to guest: the host side writes frames to the
//! TAP as fast as it can while the driver counts what it receives (the TAP's own queue drops
//! the excess, so "offered" is above "delivered").
//!
//! Needs root (network namespaces, TAP). Run:
//! `cargo build --release --workspace --bins && target/release/hvisor-vhost-net-bench`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hvisor_vhost_tests::driver::net::NetError;
use hvisor_vhost_tests::driver::net::{frames, NetDriver, NetOptions};
use hvisor_vhost_tests::driver::DriverError;
use hvisor_vhost_tests::driver::GuestAllocator;
use hvisor_vhost_tests::harness::{SimBridge, TempDir};
use hvisor_vhost_tests::netns::{format_mac, NetBackend, NetNs, PacketSocket, SingleAccessRam};

const RAM_BASE: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x800_0000;
const NET: u64 = 0xa003600;
const IRQ: u32 = 75;
const TAP: &str = "bench0";
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x56, 0x00, 0x00, 0x02];
/// Marks the end of a run.
const LAST_TAG: u32 = u32::MAX;
const QUIET: Duration = Duration::from_secs(2);

#[derive(Debug, Parser)]
#[command(about = "hvisor-vhost network benchmark: packets per second both ways")]
struct Args {
    /// Seconds per direction.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Ethernet frame length (without the virtio-net header), at least 18.
    #[arg(long, default_value_t = 64)]
    frame_len: usize,
    /// Frames queued per transmit kick.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Bridge busy-poll window, microseconds.
    #[arg(long, default_value_t = 200)]
    spin_us: u64,
    /// Directory for sockets and the config.
    #[arg(long, default_value = "/dev/shm")]
    dir: std::path::PathBuf,
}

fn frame(dst: [u8; 6], src: [u8; 6], tag: u32, len: usize) -> Vec<u8> {
    let mut payload = tag.to_be_bytes().to_vec();
    payload.resize(len - frames::ETH_HEADER_LEN, 0x5a);
    frames::ethernet(dst, src, frames::ETHERTYPE_EXPERIMENTAL, &payload)
}

fn tag(frame: &[u8]) -> Option<u32> {
    if frames::ethertype(frame) != Some(frames::ETHERTYPE_EXPERIMENTAL) {
        return None;
    }
    Some(u32::from_be_bytes(frame.get(14..18)?.try_into().ok()?))
}

/// Frames counted between the first and the last one.
struct Count {
    frames: u64,
    span: Duration,
}

impl Count {
    fn pps(&self) -> f64 {
        self.frames as f64 / self.span.as_secs_f64().max(1e-9)
    }
}

fn main() {
    let args = Args::parse();
    assert!(args.frame_len >= 18, "--frame-len must be at least 18");
    // The harness puts its scratch directory under TMPDIR. No other thread exists yet, so
    // changing the environment is race-free.
    std::env::set_var("TMPDIR", &args.dir);
    let seconds = Duration::from_secs_f64(args.seconds);

    let dir = Arc::new(TempDir::new("netbench"));
    let ns = NetNs::new("netbench");
    let socket = dir.path().join("net.sock");
    let mac = format_mac(&GUEST_MAC);
    let backend = NetBackend::spawn(&ns, &socket, TAP, &["--mac", &mac]);
    ns.configure_host_side(TAP);
    let tap_mac = ns.mac(TAP);
    let packets = PacketSocket::open(&ns, TAP).expect("packet socket");
    packets
        .set_receive_buffer(64 << 20)
        .expect("packet socket buffer");
    let cfg = format!(
        r#"{{"zones":[{{"id":1,"memory_region":[{{"zone0_ipa":"{RAM_BASE:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],
        "devices":[{{"type":"net","addr":"{NET:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"}}]}}]}}"#,
        socket.display()
    );
    let spin = args.spin_us.to_string();
    let sb = SimBridge::start(Arc::clone(&dir), &cfg, &["--spin-us", &spin]);
    let (vcpu, ram, irq) = (sb.vcpu(1, 0), SingleAccessRam(sb.ram(1).0), sb.irq(1, IRQ));
    let options = NetOptions {
        auto_kick: false,
        tx_slots: 256,
        ..NetOptions::default()
    };
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x400_0000);
    let mut net = NetDriver::new(&vcpu, NET, &ram, &irq, &mut alloc, &options).expect("net init");

    println!(
        "hvisor-vhost network benchmark: {}-byte frames, {} s per direction, batches of {}\n",
        args.frame_len, args.seconds, args.batch
    );

    // Guest to host.
    let (sent, send_span, received) = std::thread::scope(|scope| {
        let counter = scope.spawn(|| count_on_tap(&packets));
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < seconds {
            for _ in 0..args.batch {
                // sent < 2^32 in any realistic run; the tag only has to differ from LAST_TAG.
                let frame = frame(
                    tap_mac,
                    GUEST_MAC,
                    (sent % u64::from(LAST_TAG)) as u32,
                    args.frame_len,
                );
                net.send(&frame, QUIET).expect("send");
                sent += 1;
            }
            net.kick_tx();
        }
        net.flush_tx(QUIET).expect("flush");
        let span = start.elapsed();
        net.send(&frame(tap_mac, GUEST_MAC, LAST_TAG, args.frame_len), QUIET)
            .expect("send the end marker");
        net.kick_tx();
        (sent, span, counter.join().expect("counter"))
    });
    println!("guest -> host (driver queues, packet socket on the TAP counts)");
    println!(
        "    sent      {:>10} frames  {:>12.0} pps",
        sent,
        sent as f64 / send_span.as_secs_f64()
    );
    println!(
        "    received  {:>10} frames  {:>12.0} pps",
        received.frames,
        received.pps()
    );

    // Host to guest.
    let stop = AtomicBool::new(false);
    let (offered, offer_span, delivered) = std::thread::scope(|scope| {
        let sender = scope.spawn(|| {
            let start = Instant::now();
            let mut offered = 0u64;
            let data = frame(GUEST_MAC, tap_mac, 0, args.frame_len);
            while start.elapsed() < seconds && !stop.load(Ordering::Relaxed) {
                // A full TAP queue drops the frame; send still succeeds.
                packets.send(&data).expect("send on the TAP");
                offered += 1;
            }
            let span = start.elapsed();
            (offered, span)
        });
        let delivered = count_in_guest(&mut net, seconds + QUIET);
        stop.store(true, Ordering::Relaxed);
        let (offered, span) = sender.join().expect("sender");
        (offered, span, delivered)
    });
    println!("host -> guest (packet socket on the TAP sends, driver counts)");
    println!(
        "    offered   {:>10} frames  {:>12.0} pps",
        offered,
        offered as f64 / offer_span.as_secs_f64()
    );
    println!(
        "    delivered {:>10} frames  {:>12.0} pps",
        delivered.frames,
        delivered.pps()
    );

    drop(net);
    drop(sb);
    drop(backend);
    drop(ns);
}

/// Counts test frames arriving on the TAP until the end marker, or until it goes quiet.
fn count_on_tap(packets: &PacketSocket) -> Count {
    let mut frames = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    while let Some(frame) = packets.recv(QUIET).expect("receive on the TAP") {
        match tag(&frame) {
            Some(LAST_TAG) => break,
            Some(_) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                frames += 1;
            }
            None => {}
        }
    }
    Count {
        frames,
        span: first.map_or(Duration::ZERO, |first| last - first),
    }
}

/// Counts test frames the driver receives within `limit`, stopping once they stop coming.
fn count_in_guest<B, M, I>(net: &mut NetDriver<'_, B, M, I>, limit: Duration) -> Count
where
    B: hvisor_vhost_tests::driver::MmioBus,
    M: hvisor_vhost_tests::driver::GuestMemory,
    I: hvisor_vhost_tests::driver::Interrupts,
{
    let start = Instant::now();
    let mut frames = 0u64;
    let mut first = None;
    let mut last = start;
    while start.elapsed() < limit {
        match net.recv(QUIET) {
            Ok(received) if tag(&received.frame).is_some() => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                frames += 1;
            }
            Ok(_) => {}
            Err(NetError::Driver(DriverError::Timeout)) if frames > 0 => break,
            Err(e) => panic!("receive failed after {frames} frames: {e}"),
        }
    }
    Count {
        frames,
        span: first.map_or(Duration::ZERO, |first| last - first),
    }
}
