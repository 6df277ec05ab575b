//! Hostile backends, end to end through the real bridge process: a scripted vhost-user
//! backend in the test answers the bridge with error replies and wrong sizes, or behaves as
//! qemu-storage-daemon does with config writes, and the bridge must end in a defined state
//! (a start-up error naming the device, or a backend that is still served) instead of
//! hanging or losing the session.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use hvisor_vhost_tests::driver::mmio::VirtioMmioDevice;
use hvisor_vhost_tests::harness::SimBridge;

const BLK: u64 = 0xa000000;
const IRQ: u32 = 48;
/// Bound on the bridge's exit after a refused start-up; it normally takes milliseconds.
/// Reaching it means the bridge hangs, which is the bug these tests guard against.
const EXIT_WAIT: Duration = Duration::from_secs(30);

// vhost-user requests the script answers with a body; every other one is acked if asked.
const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const SET_BACKEND_REQ_FD: u32 = 21;
/// On the backend-to-frontend channel.
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// BACKEND_REQ, offered by the script only when it hands the channel to the test.
const PROTOCOL_BACKEND_REQ: u64 = 1 << 5;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// MQ, REPLY_ACK and CONFIG.
const PROTOCOL: u64 = 1 | 1 << 3 | 1 << 9;

/// How the script answers GET_FEATURES.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FeaturesReply {
    Normal,
    /// A 16-byte body where the spec has 8.
    TooLong,
    /// The reply carries GET_PROTOCOL_FEATURES' request code.
    WrongRequest,
}

/// How the script answers GET_CONFIG.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConfigReply {
    /// The 60 bytes asked for: capacity 0x1000 sectors, writeback 0.
    Normal,
    /// The spec's error reply: size 0, no payload.
    Refused,
    /// Half the bytes asked for, framed as such.
    Short,
    /// Normal at start-up; the first refresh (after a config-change message) gets the error
    /// reply; later ones report capacity 0x2000.
    RefusedOnFirstRefresh,
}

/// A one-connection scripted blk backend listening on `socket`. Each SET_CONFIG it gets is
/// sent to the returned channel as (offset, flags, bytes); one with nonzero flags ends the
/// session, as qemu-storage-daemon does.
type ConfigWrites = mpsc::Receiver<(u32, u32, Vec<u8>)>;

fn scripted_backend(
    socket: &Path,
    get_features: FeaturesReply,
    get_config: ConfigReply,
) -> ConfigWrites {
    scripted_backend_with_channel(socket, get_features, get_config, None)
}

/// [`scripted_backend`] that also offers BACKEND_REQ and sends the backend-to-frontend
/// channel the bridge gives it to `channel`.
fn scripted_backend_with_channel(
    socket: &Path,
    get_features: FeaturesReply,
    get_config: ConfigReply,
    channel: Option<mpsc::Sender<OwnedFd>>,
) -> ConfigWrites {
    let listener = UnixListener::bind(socket).unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream, get_features, get_config, &tx, channel.as_ref());
    });
    rx
}

/// Reads a message header (12 bytes) and the fd sent with it, if any.
fn recv_header(stream: &UnixStream, header: &mut [u8; 12]) -> Option<Option<OwnedFd>> {
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: header.len(),
    };
    // Room for one control message carrying a few fds.
    let mut control = [0u64; 8];
    // SAFETY: a zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg into the buffers described by `msg`, all alive for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_WAITALL) };
    if n != header.len() as isize {
        return None;
    }
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR reads within its control buffer.
    let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    // SAFETY: a non-null cmsg points into `control`; its data holds fds for SCM_RIGHTS.
    let fd = (!cmsg.is_null() && unsafe { (*cmsg).cmsg_type } == libc::SCM_RIGHTS).then(|| {
        // SAFETY: as above; the first fd is ours now (the others, if any, are leaked to the
        // test process, which ends soon).
        unsafe { OwnedFd::from_raw_fd(std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast())) }
    });
    Some(fd)
}

fn reply(stream: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = Vec::new();
    for word in [code, 1 | FLAG_REPLY, body.len() as u32] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    msg.extend_from_slice(body);
    // The bridge may have gone (a refused start-up): nothing more to do.
    let _ = stream.write_all(&msg);
}

fn serve(
    mut stream: UnixStream,
    get_features: FeaturesReply,
    get_config: ConfigReply,
    tx: &mpsc::Sender<(u32, u32, Vec<u8>)>,
    channel: Option<&mpsc::Sender<OwnedFd>>,
) {
    let mut config_reads = 0;
    loop {
        let mut header = [0u8; 12];
        let Some(fd) = recv_header(&stream, &mut header) else {
            return;
        };
        let word = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let (code, flags, size) = (
            word(&header, 0),
            word(&header, 4),
            word(&header, 8) as usize,
        );
        let mut body = vec![0u8; size];
        if stream.read_exact(&mut body).is_err() {
            return;
        }
        let u64_reply = |stream: &mut UnixStream, v: u64| reply(stream, code, &v.to_le_bytes());
        match code {
            GET_FEATURES => {
                let features = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
                match get_features {
                    FeaturesReply::Normal => u64_reply(&mut stream, features),
                    FeaturesReply::TooLong => {
                        let body = [features.to_le_bytes(), features.to_le_bytes()].concat();
                        reply(&mut stream, code, &body);
                    }
                    FeaturesReply::WrongRequest => {
                        reply(&mut stream, GET_PROTOCOL_FEATURES, &features.to_le_bytes())
                    }
                }
            }
            GET_PROTOCOL_FEATURES => {
                let offered = if channel.is_some() {
                    PROTOCOL | PROTOCOL_BACKEND_REQ
                } else {
                    PROTOCOL
                };
                u64_reply(&mut stream, offered)
            }
            SET_BACKEND_REQ_FD => {
                if let (Some(channel), Some(fd)) = (channel, fd) {
                    let _ = channel.send(fd);
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    u64_reply(&mut stream, 0);
                }
            }
            GET_QUEUE_NUM => u64_reply(&mut stream, 1),
            GET_CONFIG => {
                let asked = word(&body, 4) as usize;
                let mut config = vec![0u8; asked];
                config[..8].copy_from_slice(&0x1000u64.to_le_bytes());
                let mut out = body[..12].to_vec();
                config_reads += 1;
                let get_config = match (get_config, config_reads) {
                    (ConfigReply::RefusedOnFirstRefresh, 1) => ConfigReply::Normal,
                    (ConfigReply::RefusedOnFirstRefresh, 2) => ConfigReply::Refused,
                    (ConfigReply::RefusedOnFirstRefresh, _) => {
                        config[..8].copy_from_slice(&0x2000u64.to_le_bytes());
                        ConfigReply::Normal
                    }
                    (reply, _) => reply,
                };
                match get_config {
                    ConfigReply::Normal => out.extend_from_slice(&config),
                    ConfigReply::Refused => out[4..8].copy_from_slice(&0u32.to_le_bytes()),
                    ConfigReply::Short => {
                        out[4..8].copy_from_slice(&((asked / 2) as u32).to_le_bytes());
                        out.extend_from_slice(&config[..asked / 2]);
                    }
                    ConfigReply::RefusedOnFirstRefresh => unreachable!("mapped above"),
                }
                reply(&mut stream, code, &out);
            }
            SET_CONFIG => {
                let flags_field = word(&body, 8);
                let _ = tx.send((word(&body, 0), flags_field, body[12..].to_vec()));
                if flags_field != 0 {
                    return;
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    u64_reply(&mut stream, 0);
                }
            }
            _ => {
                if flags & FLAG_NEED_REPLY != 0 {
                    u64_reply(&mut stream, 0);
                }
            }
        }
    }
}

fn external_blk(socket: &Path) -> String {
    config(&[zone(
        1,
        &[format!(
            r#"{{"type":"blk","addr":"{BLK:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"}}"#,
            socket.display()
        )],
        None,
    )])
}

/// Starts the bridge on a backend that answers GET_FEATURES and GET_CONFIG as told, expects
/// it to exit with an error, and returns its log.
fn refused_start_up(tag: &str, get_features: FeaturesReply, get_config: ConfigReply) -> String {
    let dir = dir_with_images(tag, &[]);
    let socket = dir.path().join("blk.sock");
    let _sets = scripted_backend(&socket, get_features, get_config);
    let log_path = dir.path().join("bridge.log");
    let log = File::create(&log_path).unwrap();
    let mut sb = SimBridge::start_with(dir.clone(), &external_blk(&socket), &[], Some(log));
    let status = sb
        .bridge
        .wait_timeout(EXIT_WAIT)
        .expect("the bridge hangs on the backend's reply");
    assert!(!status.success(), "bridge exit status {status}");
    std::fs::read_to_string(&log_path).unwrap()
}

#[test]
fn a_get_config_error_reply_fails_start_up_naming_the_device() {
    let log = refused_start_up("hb-refused", FeaturesReply::Normal, ConfigReply::Refused);
    assert!(
        log.contains(&format!("blk@{BLK:#x}")) && log.contains("refused GET_CONFIG"),
        "{log}"
    );
}

#[test]
fn a_short_get_config_reply_fails_start_up_naming_the_device() {
    let log = refused_start_up("hb-short", FeaturesReply::Normal, ConfigReply::Short);
    assert!(
        log.contains(&format!("blk@{BLK:#x}")) && log.contains("malformed GET_CONFIG reply"),
        "{log}"
    );
}

#[test]
fn a_cache_type_write_reaches_a_backend_that_refuses_migration_writes() {
    let dir = dir_with_images("hb-writeback", &[]);
    let socket = dir.path().join("blk.sock");
    let sets = scripted_backend(&socket, FeaturesReply::Normal, ConfigReply::Normal);
    let sb = SimBridge::start(dir.clone(), &external_blk(&socket), &[]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let dev = VirtioMmioDevice::new(&g.vcpu, BLK);
    assert_eq!(
        dev.read_config_u64(0).unwrap(),
        0x1000,
        "capacity from the backend"
    );
    // A read-only field: ignored, not passed on.
    dev.write_config(0, &[0xff]);
    // Linux's cache_type attribute writes writeback alone; a config write is synchronous,
    // and with REPLY_ACK the bridge waits for the backend's ack before it answers the vCPU.
    dev.write_config(32, &[1]);
    assert_eq!(
        sets.try_recv().ok(),
        Some((32, 0, vec![1])),
        "writeback, with flags 0"
    );
    assert!(sets.try_recv().is_err(), "nothing else was written");
    assert_eq!(dev.read_config_u8(32), 1);
    assert_eq!(
        dev.read_config_u64(0).unwrap(),
        0x1000,
        "capacity unchanged"
    );
    // The backend kept the session: a second write reaches it too.
    dev.write_config(32, &[0]);
    assert_eq!(sets.try_recv().ok(), Some((32, 0, vec![0])));
}

#[test]
fn a_features_reply_longer_than_the_spec_fails_start_up_naming_the_device() {
    let log = refused_start_up("hb-long", FeaturesReply::TooLong, ConfigReply::Normal);
    // vhost reads the 8 bytes it expects; the rest fails the next exchange.
    assert!(
        log.contains(&format!("blk@{BLK:#x}")) && log.contains("invalid message"),
        "{log}"
    );
}

#[test]
fn a_reply_to_another_request_fails_start_up_naming_the_device() {
    let log = refused_start_up("hb-wrong", FeaturesReply::WrongRequest, ConfigReply::Normal);
    assert!(
        log.contains(&format!("blk@{BLK:#x}")) && log.contains("GET_FEATURES"),
        "{log}"
    );
}

/// A backend that accepts the connection and reads, but never answers: the bridge gives up
/// after `--backend-timeout-ms` with an error naming the device, instead of hanging before
/// it serves anything.
#[test]
fn a_backend_that_never_answers_fails_start_up_within_the_bound() {
    let dir = dir_with_images("hb-silent", &[]);
    let socket = dir.path().join("blk.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // Swallow everything until the bridge hangs up.
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
    });
    let log_path = dir.path().join("bridge.log");
    let log = File::create(&log_path).unwrap();
    let mut sb = SimBridge::start_with(
        dir.clone(),
        &external_blk(&socket),
        &["--backend-timeout-ms", "500"],
        Some(log),
    );
    let status = sb
        .bridge
        .wait_timeout(EXIT_WAIT)
        .expect("the bridge hangs on a backend that never answers");
    assert!(!status.success(), "bridge exit status {status}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains(&format!("blk@{BLK:#x}")) && log.contains("did not answer within 500ms"),
        "{log}"
    );
}

/// A config refresh the backend refuses (GET_CONFIG's error reply, after its config-change
/// message) is logged, and the backend-to-frontend channel stays watched: the next change
/// message is read, and its refresh reaches the guest (ConfigGeneration, new capacity).
#[test]
fn a_refused_config_refresh_keeps_the_backend_channel_watched() {
    let dir = dir_with_images("hb-refresh", &[]);
    let socket = dir.path().join("blk.sock");
    let (channel_tx, channel_rx) = mpsc::channel();
    let _sets = scripted_backend_with_channel(
        &socket,
        FeaturesReply::Normal,
        ConfigReply::RefusedOnFirstRefresh,
        Some(channel_tx),
    );
    let sb = SimBridge::start(dir.clone(), &external_blk(&socket), &[]);
    let g = Guest::new(&sb, 1, 0, IRQ);
    let dev = VirtioMmioDevice::new(&g.vcpu, BLK);
    assert_eq!(dev.read_config_u64(0).unwrap(), 0x1000);
    let generation = dev.config_generation();
    let mut channel = UnixStream::from(
        channel_rx
            .recv_timeout(EXIT_WAIT)
            .expect("the bridge gave no backend channel"),
    );
    let change = |channel: &mut UnixStream| {
        let mut msg = Vec::new();
        for word in [BACKEND_CONFIG_CHANGE_MSG, 1, 0] {
            msg.extend_from_slice(&word.to_le_bytes());
        }
        channel.write_all(&msg).unwrap();
    };
    let deadline = std::time::Instant::now() + EXIT_WAIT;
    // The first refresh is refused: nothing changes for the guest.
    change(&mut channel);
    // The second is served; its generation and capacity reach the guest.
    change(&mut channel);
    while dev.read_config_u64(0).unwrap() != 0x2000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the second config change never reached the guest"
        );
        std::thread::yield_now();
    }
    assert_ne!(dev.config_generation(), generation);
}
