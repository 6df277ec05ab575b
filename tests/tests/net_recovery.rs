//! Recovery of an external `vhost-user-net`: the backend is killed with SIGKILL while the
//! guest has receive buffers posted, and started again on the same vhost-user socket (its
//! TAP goes with it and comes back). The bridge reconnects and replays both queues from the
//! guest's used indexes: frames then cross in both directions, the host's into the
//! buffers posted before the crash, and no interrupt is lost (the bridge's drop check).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hvisor_vhost_tests::driver::net::{frames, NetDriver, NetOptions};
use hvisor_vhost_tests::driver::GuestAllocator;
use hvisor_vhost_tests::harness::{Irq, SimBridge, Vcpu};
use hvisor_vhost_tests::netns::{format_mac, NetBackend, NetNs, PacketSocket, SingleAccessRam};

const NET: u64 = 0xa003600;
const IRQ: u32 = 75;
const TAP: &str = "vtap0";
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x56, 0x00, 0x00, 0x01];
const WAIT: Duration = Duration::from_secs(10);

fn net_entry(socket: &Path) -> String {
    format!(
        r#"{{"type":"net","addr":"{NET:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"}}"#,
        socket.display()
    )
}

/// The backend in `ns`, its TAP configured, and a packet socket on it.
fn start_backend(ns: &NetNs, socket: &Path) -> (NetBackend, PacketSocket) {
    // A killed backend leaves its socket behind.
    let _ = std::fs::remove_file(socket);
    let mac = format_mac(&GUEST_MAC);
    let backend = NetBackend::spawn(ns, socket, TAP, &["--mac", mac.as_str()]);
    ns.configure_host_side(TAP);
    let packets = PacketSocket::open(ns, TAP).expect("packet socket on the TAP");
    (backend, packets)
}

/// A frame of `len` bytes of EtherType 0x88b5 whose payload starts with `tag`.
fn test_frame(dst: [u8; 6], src: [u8; 6], tag: u32) -> Vec<u8> {
    let payload: Vec<u8> = tag
        .to_be_bytes()
        .into_iter()
        .chain((0..200u32).map(|i| (i ^ tag) as u8))
        .collect();
    frames::ethernet(dst, src, frames::ETHERTYPE_EXPERIMENTAL, &payload)
}

fn is_test_frame(frame: &[u8]) -> bool {
    frames::ethertype(frame) == Some(frames::ETHERTYPE_EXPERIMENTAL)
}

/// One frame each way, compared byte for byte.
fn exchange(
    net: &mut NetDriver<'_, Vcpu, SingleAccessRam, Irq>,
    ns: &NetNs,
    packets: &PacketSocket,
    tag: u32,
) {
    let tap_mac = ns.mac(TAP);
    let out = test_frame(tap_mac, GUEST_MAC, tag);
    net.send(&out, WAIT).unwrap();
    let seen = packets
        .recv_matching(WAIT, is_test_frame)
        .unwrap()
        .expect("frame on the TAP");
    assert_eq!(seen, out, "guest to host, frame {tag}");
    net.flush_tx(WAIT).unwrap();
    let inbound = test_frame(GUEST_MAC, tap_mac, tag + 1);
    packets.send(&inbound).unwrap();
    let got = net.recv_matching(WAIT, is_test_frame).unwrap();
    assert_eq!(got.frame, inbound, "host to guest, frame {}", tag + 1);
}

#[test]
fn external_net_backend_killed_and_restarted_serves_both_directions() {
    let ns = NetNs::new("net-recovery");
    let dir = dir_with_images("net-recovery", &[]);
    let socket = dir.path().join("net.sock");
    // Declared before the bridge, so that the backend stops after it.
    let (mut backend, mut packets) = start_backend(&ns, &socket);
    let cfg = config(&[zone(1, &[net_entry(&socket)], None)]);
    let sb = SimBridge::start(Arc::clone(&dir), &cfg, &[]);
    let (vcpu, ram, irq) = (sb.vcpu(1, 0), SingleAccessRam(sb.ram(1).0), sb.irq(1, IRQ));
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x200_0000);
    let mut net = NetDriver::new(&vcpu, NET, &ram, &irq, &mut alloc, &NetOptions::default())
        .unwrap_or_else(|e| panic!("net init: {e}"));
    exchange(&mut net, &ns, &packets, 1);
    assert!(
        net.rx_posted() > 0,
        "receive buffers are in flight across the crash"
    );

    let killed = backend.pid();
    // SAFETY: kill(2) on the backend this test started; no memory is touched.
    let rc = unsafe { libc::kill(killed as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0);
    drop(packets);
    // Reaps it; its TAP is gone with it.
    drop(backend);
    (backend, packets) = start_backend(&ns, &socket);
    assert_ne!(backend.pid(), killed);

    exchange(&mut net, &ns, &packets, 100);
    exchange(&mut net, &ns, &packets, 200);
    assert_eq!(net.lost_interrupts(), 0);
}
