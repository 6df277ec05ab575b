//! Network end to end through real processes: the simulated hypervisor and a virtio-net guest
//! driver in this process, `hvisor-vhost-bridge` and `vhost-user-net` as separate processes,
//! and the host kernel's network stack on the other side of the TAP as a real peer.
//!
//! Each test makes its own network namespace; the backend runs inside it and creates the TAP
//! there, and only that TAP gets an address (10.77.0.1/24). Deleting the namespace on drop
//! removes everything the test made.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use hvisor_vhost_tests::driver::net::{
    ctrl, feature, frames, NetDriver, NetError, NetOptions, CTRL_ERR, HEADER_LEN,
};
use hvisor_vhost_tests::driver::GuestAllocator;
use hvisor_vhost_tests::harness::{Irq, SimBridge, TempDir, Vcpu};
use hvisor_vhost_tests::netns::{
    NetBackend, NetNs, PacketSocket, SingleAccessRam, GUEST_IP, HOST_IP,
};

const NET: u64 = 0xa003600;
const IRQ: u32 = 75;
const TAP: &str = "vtap0";
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x56, 0x00, 0x00, 0x01];
const WAIT: Duration = Duration::from_secs(10);

/// The host side of a test: namespace, backend and a packet socket on the TAP. Fields drop
/// in order: socket, backend (which removes its TAP), namespace.
struct Host {
    packets: PacketSocket,
    backend: NetBackend,
    ns: NetNs,
    dir: Arc<TempDir>,
}

impl Host {
    fn new(tag: &str, backend_args: &[&str]) -> Host {
        Host::with_namespace(tag, NetNs::new(tag), backend_args)
    }

    /// A host whose backend starts in `ns`, where the TAP may already exist.
    fn with_namespace(tag: &str, ns: NetNs, backend_args: &[&str]) -> Host {
        let dir = dir_with_images(tag, &[]);
        let socket = dir.path().join("net.sock");
        let mac = hvisor_vhost_tests::netns::format_mac(&GUEST_MAC);
        let mut args = vec!["--mac", mac.as_str()];
        args.extend_from_slice(backend_args);
        let backend = NetBackend::spawn(&ns, &socket, TAP, &args);
        ns.configure_host_side(TAP);
        let packets = PacketSocket::open(&ns, TAP).expect("packet socket on the TAP");
        Host {
            packets,
            backend,
            ns,
            dir,
        }
    }

    fn tap_mac(&self) -> [u8; 6] {
        self.ns.mac(TAP)
    }

    /// A bridge whose zone 1 has one net device on this host's backend.
    fn bridge(&self, device_extra: &str) -> SimBridge {
        let cfg = config(&[zone(
            1,
            &[net_entry(&self.backend.socket, device_extra)],
            None,
        )]);
        SimBridge::start(Arc::clone(&self.dir), &cfg, &[])
    }
}

fn net_entry(socket: &Path, extra: &str) -> String {
    format!(
        r#"{{"type":"net","addr":"{NET:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"{extra}}}"#,
        socket.display()
    )
}

/// The accessors of the guest: vCPU 0 of zone 1, its RAM and the device's interrupt line.
struct NetGuest {
    vcpu: Vcpu,
    ram: SingleAccessRam,
    irq: Irq,
}

impl NetGuest {
    fn new(sb: &SimBridge) -> NetGuest {
        NetGuest {
            vcpu: sb.vcpu(1, 0),
            ram: SingleAccessRam(sb.ram(1).0),
            irq: sb.irq(1, IRQ),
        }
    }
}

fn driver<'a>(g: &'a NetGuest, options: &NetOptions) -> NetDriver<'a, Vcpu, SingleAccessRam, Irq> {
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x200_0000);
    NetDriver::new(&g.vcpu, NET, &g.ram, &g.irq, &mut alloc, options)
        .unwrap_or_else(|e| panic!("net init: {e}"))
}

/// A frame of `len` bytes of EtherType 0x88b5 whose payload starts with `tag`.
fn test_frame(dst: [u8; 6], src: [u8; 6], tag: u32, len: usize) -> Vec<u8> {
    let payload: Vec<u8> = tag
        .to_be_bytes()
        .into_iter()
        .chain((0..len - frames::ETH_HEADER_LEN - 4).map(|i| (i as u32 ^ tag) as u8))
        .collect();
    frames::ethernet(dst, src, frames::ETHERTYPE_EXPERIMENTAL, &payload)
}

fn is_test_frame(frame: &[u8]) -> bool {
    frames::ethertype(frame) == Some(frames::ETHERTYPE_EXPERIMENTAL)
}

fn tag_of(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[14..18].try_into().unwrap())
}

#[test]
fn frames_cross_the_tap_in_both_directions() {
    let host = Host::new("frames", &[]);
    let sb = host.bridge("");
    let g = NetGuest::new(&sb);
    let mut net = driver(&g, &NetOptions::default());
    let config = *net.config();
    assert_eq!(config.mac, Some(GUEST_MAC));
    assert_eq!(config.link_up, Some(true));
    assert_eq!(config.mtu, Some(1500));
    assert_eq!(
        net.features() & (1 << 30),
        0,
        "vhost-user PROTOCOL_FEATURES stays hidden"
    );
    let tap_mac = host.tap_mac();

    // Guest to host: the very bytes arrive on the TAP.
    for (tag, len) in [(1u32, 60usize), (2, 1514), (3, 64)] {
        let frame = test_frame(tap_mac, GUEST_MAC, tag, len);
        net.send(&frame, WAIT).unwrap();
        let seen = host
            .packets
            .recv_matching(WAIT, is_test_frame)
            .unwrap()
            .expect("frame on the TAP");
        assert_eq!(seen, frame, "frame {tag}");
    }
    net.flush_tx(WAIT).unwrap();

    // Host to guest.
    for (tag, len) in [(10u32, 60usize), (11, 1514), (12, 333)] {
        let frame = test_frame(GUEST_MAC, tap_mac, tag, len);
        host.packets.send(&frame).unwrap();
        let got = net.recv_matching(WAIT, is_test_frame).unwrap();
        assert_eq!(got.frame, frame, "frame {tag}");
        assert_eq!(got.header[..10], [0; 10], "no offloads were negotiated");
    }
}

#[test]
fn the_host_kernel_answers_arp_and_icmp_echo() {
    let host = Host::new("ping", &[]);
    let sb = host.bridge("");
    let g = NetGuest::new(&sb);
    let mut net = driver(&g, &NetOptions::default());
    let tap_mac = host.tap_mac();

    net.send(&frames::arp_request(GUEST_MAC, GUEST_IP, HOST_IP), WAIT)
        .unwrap();
    let reply = net
        .recv_matching(WAIT, |frame| frames::parse_arp_reply(frame).is_some())
        .expect("ARP reply");
    let (sender_mac, sender_ip, target_ip) = frames::parse_arp_reply(&reply.frame).unwrap();
    assert_eq!(sender_mac, tap_mac);
    assert_eq!(sender_ip, HOST_IP);
    assert_eq!(target_ip, GUEST_IP);
    assert_eq!(frames::destination(&reply.frame), Some(GUEST_MAC));

    for seq in 1..=5u16 {
        let data: Vec<u8> = (0..56).map(|i| i as u8 ^ seq as u8).collect();
        let request =
            frames::icmp_echo_request(sender_mac, GUEST_MAC, GUEST_IP, HOST_IP, 0x4856, seq, &data);
        net.send(&request, WAIT).unwrap();
        let reply = net
            .recv_matching(WAIT, |frame| {
                frames::parse_icmp_echo_reply(frame).is_some_and(|(_, _, s, _)| s == seq)
            })
            .unwrap_or_else(|e| panic!("echo reply {seq}: {e}"));
        let (from, id, _, echoed) = frames::parse_icmp_echo_reply(&reply.frame).unwrap();
        assert_eq!(from, HOST_IP);
        assert_eq!(id, 0x4856);
        assert_eq!(echoed, data);
        assert_eq!(frames::source(&reply.frame), Some(tap_mac));
    }
}

#[test]
fn frames_spread_over_merged_buffers_or_fill_one_big_buffer() {
    let host = Host::new("mrg", &[]);
    let tap_mac = host.tap_mac();
    let sb = host.bridge("");
    let g = NetGuest::new(&sb);
    {
        // 512-byte buffers: a full-size frame takes three of them.
        let options = NetOptions {
            rx_buffer_len: 512,
            ..NetOptions::default()
        };
        let mut net = driver(&g, &options);
        assert_ne!(net.features() & feature::MRG_RXBUF, 0);
        for tag in 0..20u32 {
            let frame = test_frame(GUEST_MAC, tap_mac, tag, 1514);
            host.packets.send(&frame).unwrap();
            let got = net.recv_matching(WAIT, is_test_frame).unwrap();
            assert_eq!(got.frame, frame);
            assert_eq!(got.buffers, 3, "12 + 1514 bytes in 512-byte buffers");
        }
        net.device().reset().unwrap();
    }
    // Without MRG_RXBUF every frame takes one buffer that must hold it all.
    let options = NetOptions {
        features: NetOptions::default().features & !feature::MRG_RXBUF,
        rx_buffer_len: (HEADER_LEN + 1514) as u32,
        ..NetOptions::default()
    };
    let mut net = driver(&g, &options);
    assert_eq!(net.features() & feature::MRG_RXBUF, 0);
    for tag in 0..20u32 {
        let frame = test_frame(GUEST_MAC, tap_mac, tag, 1514);
        host.packets.send(&frame).unwrap();
        let got = net.recv_matching(WAIT, is_test_frame).unwrap();
        assert_eq!(got.frame, frame);
        assert_eq!(got.buffers, 1);
        assert_eq!(u16::from_le_bytes([got.header[10], got.header[11]]), 1);
    }
}

#[test]
fn bursts_arrive_complete_and_in_order() {
    let host = Host::new("burst", &[]);
    let tap_mac = host.tap_mac();
    let sb = host.bridge("");
    let g = NetGuest::new(&sb);
    let options = NetOptions {
        auto_kick: false,
        ..NetOptions::default()
    };
    let mut net = driver(&g, &options);
    let rounds = 10u32;
    let burst = 50u32;

    // Guest to host: bursts queued, one kick each.
    for round in 0..rounds {
        for i in 0..burst {
            let tag = round * burst + i;
            net.send(
                &test_frame(tap_mac, GUEST_MAC, tag, 64 + (tag as usize % 1400)),
                WAIT,
            )
            .unwrap();
        }
        net.kick_tx();
        for i in 0..burst {
            let tag = round * burst + i;
            let frame = host
                .packets
                .recv_matching(WAIT, is_test_frame)
                .unwrap()
                .unwrap_or_else(|| panic!("frame {tag} never reached the TAP"));
            assert_eq!(tag_of(&frame), tag);
            assert_eq!(
                frame,
                test_frame(tap_mac, GUEST_MAC, tag, 64 + (tag as usize % 1400))
            );
        }
    }
    net.flush_tx(WAIT).unwrap();

    // Host to guest: bursts smaller than the TAP's queue, each received whole.
    for round in 0..rounds {
        for i in 0..burst {
            let tag = round * burst + i;
            host.packets
                .send(&test_frame(
                    GUEST_MAC,
                    tap_mac,
                    tag,
                    64 + (tag as usize % 1400),
                ))
                .unwrap();
        }
        for i in 0..burst {
            let tag = round * burst + i;
            let got = net.recv_matching(WAIT, is_test_frame).unwrap();
            assert_eq!(tag_of(&got.frame), tag);
            assert_eq!(got.frame.len(), 64 + (tag as usize % 1400));
        }
    }
}

#[test]
fn control_queue_is_answered_by_the_backend() {
    let host = Host::new("ctrl", &[]);
    let tap_mac = host.tap_mac();
    // Two queues of data plus the control queue.
    let sb = host.bridge(r#","num_queues":3"#);
    let g = NetGuest::new(&sb);
    let options = NetOptions {
        features: NetOptions::default().features | feature::CTRL_VQ | feature::MQ,
        ..NetOptions::default()
    };
    let mut net = driver(&g, &options);
    assert_ne!(net.features() & feature::CTRL_VQ, 0);
    assert_eq!(net.config().max_queue_pairs, 1);
    net.set_queue_pairs(1, WAIT).unwrap();
    assert_eq!(
        net.set_queue_pairs(2, WAIT),
        Err(NetError::ControlRefused(CTRL_ERR))
    );
    assert_eq!(
        net.control(ctrl::CLASS_RX, 0, &[1], WAIT).unwrap(),
        CTRL_ERR,
        "promiscuous mode is not offered"
    );
    assert_eq!(
        net.control(ctrl::CLASS_MAC, 1, &[2, 0, 0, 0, 0, 9], WAIT)
            .unwrap(),
        CTRL_ERR
    );
    // Traffic still flows.
    let frame = test_frame(GUEST_MAC, tap_mac, 7, 100);
    host.packets.send(&frame).unwrap();
    assert_eq!(net.recv_matching(WAIT, is_test_frame).unwrap().frame, frame);
}

#[test]
fn backend_serves_the_next_bridge_and_stops_cleanly() {
    let mut host = Host::new("reserve", &[]);
    let tap_mac = host.tap_mac();
    let socket: PathBuf = host.backend.socket.clone();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    for round in 0..3u32 {
        let mut sb = host.bridge("");
        let g = NetGuest::new(&sb);
        let mut net = driver(&g, &NetOptions::default());
        let frame = test_frame(tap_mac, GUEST_MAC, round, 80);
        net.send(&frame, WAIT).unwrap();
        let seen = host.packets.recv_matching(WAIT, is_test_frame).unwrap();
        assert_eq!(seen, Some(frame), "round {round}");
        let back = test_frame(GUEST_MAC, tap_mac, round, 90);
        host.packets.send(&back).unwrap();
        assert_eq!(net.recv_matching(WAIT, is_test_frame).unwrap().frame, back);
        drop(net);
        assert!(sb.bridge.terminate().success());
    }

    let status = host.backend.terminate();
    assert!(status.success(), "backend exit {status}");
    assert!(!socket.exists(), "socket removed");
    let links = host.ns.ip(&["-o", "link", "show"]);
    assert!(
        !links.contains(TAP),
        "the TAP left with its backend: {links}"
    );
}

/// CPU time (user + system, in clock ticks) the process has used, all threads included.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may contain spaces; the fields after it are space-separated.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn idle_backend_does_not_spin() {
    let host = Host::new("idle", &[]);
    let tap_mac = host.tap_mac();
    let sb = host.bridge("");
    let g = NetGuest::new(&sb);
    let mut net = driver(&g, &NetOptions::default());
    // Exercise both directions, then leave the device idle with buffers posted.
    net.send(&test_frame(tap_mac, GUEST_MAC, 1, 100), WAIT)
        .unwrap();
    assert!(host
        .packets
        .recv_matching(WAIT, is_test_frame)
        .unwrap()
        .is_some());
    let frame = test_frame(GUEST_MAC, tap_mac, 2, 100);
    host.packets.send(&frame).unwrap();
    assert_eq!(net.recv_matching(WAIT, is_test_frame).unwrap().frame, frame);
    net.flush_tx(WAIT).unwrap();

    // A measurement window, not a synchronisation: an idle backend blocked in epoll uses no
    // CPU, one polling the TAP or the rings would use the whole second.
    let before = cpu_ticks(host.backend.pid());
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks(host.backend.pid()) - before;
    assert!(used <= 2, "idle backend used {used} ticks in 1 s");

    // Still awake for new frames after the idle second.
    let frame = test_frame(GUEST_MAC, tap_mac, 3, 100);
    host.packets.send(&frame).unwrap();
    assert_eq!(net.recv_matching(WAIT, is_test_frame).unwrap().frame, frame);
}

#[test]
fn attaches_to_an_existing_tap_and_leaves_it_in_place() {
    let ns = NetNs::new("existing");
    ns.ip(&["tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr"]);
    let mut host = Host::with_namespace("existing", ns, &[]);
    let tap_mac = host.tap_mac();
    {
        let sb = host.bridge("");
        let g = NetGuest::new(&sb);
        let mut net = driver(&g, &NetOptions::default());
        let frame = test_frame(tap_mac, GUEST_MAC, 5, 200);
        net.send(&frame, WAIT).unwrap();
        let seen = host.packets.recv_matching(WAIT, is_test_frame).unwrap();
        assert_eq!(seen, Some(frame));
        let back = test_frame(GUEST_MAC, tap_mac, 6, 200);
        host.packets.send(&back).unwrap();
        assert_eq!(net.recv_matching(WAIT, is_test_frame).unwrap().frame, back);
    }
    assert!(host.backend.terminate().success());
    // The TAP was not the backend's to remove; it keeps its address.
    let addresses = host.ns.ip(&["-o", "addr", "show", "dev", TAP]);
    assert!(addresses.contains("10.77.0.1/24"), "{addresses}");
}

/// An IPv4/UDP frame from `port`: flows that differ in the port hash to different TAP queues.
fn udp_frame(dst: [u8; 6], src: [u8; 6], port: u16) -> Vec<u8> {
    let payload = port.to_be_bytes();
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&HOST_IP);
    ip.extend_from_slice(&GUEST_IP);
    let sum = frames::checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&port.to_be_bytes());
    ip.extend_from_slice(&9u16.to_be_bytes());
    ip.extend_from_slice(&udp_len.to_be_bytes());
    ip.extend_from_slice(&[0, 0]); // no UDP checksum
    ip.extend_from_slice(&payload);
    frames::ethernet(dst, src, frames::ETHERTYPE_IPV4, &ip)
}

fn is_udp_test_frame(frame: &[u8]) -> bool {
    frames::ethertype(frame) == Some(frames::ETHERTYPE_IPV4) && frame.get(23) == Some(&17)
}

/// Sends one frame for each of `flows` UDP flows and counts the ones the guest receives on
/// queue pair 0 (the only pair this driver uses).
fn flows_received(
    host: &Host,
    net: &mut NetDriver<'_, Vcpu, SingleAccessRam, Irq>,
    flows: u16,
) -> u16 {
    let tap_mac = host.tap_mac();
    for port in 0..flows {
        host.packets
            .send(&udp_frame(GUEST_MAC, tap_mac, 40_000 + port))
            .unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    // The frames already queued arrive well within a second; the rest never will.
    while let Ok(received) = net.recv_matching(Duration::from_secs(1), is_udp_test_frame) {
        seen.insert(u16::from_be_bytes([received.frame[34], received.frame[35]]));
    }
    seen.len() as u16
}

#[test]
fn control_queue_attaches_and_detaches_tap_queues() {
    let host = Host::new("mq", &["--queue-pairs", "2"]);
    // Two pairs and the control queue; the driver sets up pair 0 and the control queue only.
    let sb = host.bridge(r#","num_queues":5"#);
    let g = NetGuest::new(&sb);
    let options = NetOptions {
        features: NetOptions::default().features | feature::CTRL_VQ | feature::MQ,
        ..NetOptions::default()
    };
    let mut net = driver(&g, &options);
    assert_eq!(net.config().max_queue_pairs, 2);
    // Until the driver asks for more, one pair: the second TAP queue is detached, so every
    // flow comes to pair 0.
    assert_eq!(flows_received(&host, &mut net, 64), 64);
    net.set_queue_pairs(2, WAIT).unwrap();
    // Both TAP queues attached: the flows the TAP steers to queue 1 wait there for a pair
    // this driver never set up.
    let with_two = flows_received(&host, &mut net, 64);
    assert!(
        0 < with_two && with_two < 64,
        "{with_two} of 64 flows on pair 0"
    );
    net.set_queue_pairs(1, WAIT).unwrap();
    assert_eq!(flows_received(&host, &mut net, 64), 64);
}
