//! The frontend against a scripted backend on a socket pair: every request it sends is
//! recorded, and the backend's replies (config space, error replies, slot limits) are set
//! per test.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
use vhost::vhost_user::Frontend;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::{DeviceSpec, FrontendError, VhostUserDevice};
use crate::config_space::GetConfigError;
use crate::transport::{QueueConfig, VirtioBackend};

// Requests the scripted backend answers with a body; every other one gets an ack when it
// asks for one.
const GET_FEATURES: u32 = 1;
const GET_PROTOCOL_FEATURES: u32 = 15;
const GET_VRING_BASE: u32 = 11;
const GET_QUEUE_NUM: u32 = 17;
const GET_CONFIG: u32 = 24;
const SET_CONFIG: u32 = 25;
const GET_MAX_MEM_SLOTS: u32 = 36;
const ADD_MEM_REG: u32 = 37;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// How the scripted backend answers GET_CONFIG.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ConfigReply {
    /// The config space it holds.
    Normal,
    /// The spec's error reply: size 0, no payload.
    Refused,
    /// Fewer bytes than asked, correctly framed.
    Short,
}

#[derive(Clone)]
struct Script {
    features: u64,
    protocol: P,
    queue_num: u64,
    config: Vec<u8>,
    /// One answer per GET_CONFIG in order; the last one repeats.
    config_replies: Vec<ConfigReply>,
    /// Config spaces for successive GET_CONFIGs, when they change; the last one repeats.
    configs: Vec<Vec<u8>>,
    max_mem_slots: u64,
    /// As qemu-storage-daemon does: a SET_CONFIG with nonzero flags ends the session.
    drop_on_migration_flags: bool,
    /// How SET_VRING_NUM is answered.
    vring_num: VringNumReply,
}

/// How the scripted backend answers SET_VRING_NUM.
#[derive(Clone, Copy, PartialEq, Eq)]
enum VringNumReply {
    Accept,
    /// A nonzero REPLY_ACK: the backend cannot take that size.
    Refuse,
    /// The backend dies on it: the socket closes.
    HangUp,
}

impl Script {
    fn new(config_len: usize) -> Self {
        Self {
            features: VERSION_1 | PROTOCOL_FEATURES,
            protocol: P::MQ | P::REPLY_ACK | P::CONFIG,
            queue_num: 8,
            config: vec![0xaa; config_len],
            config_replies: vec![ConfigReply::Normal],
            configs: Vec::new(),
            max_mem_slots: 0,
            drop_on_migration_flags: true,
            vring_num: VringNumReply::Accept,
        }
    }
}

/// One request the frontend sent.
#[derive(Debug, Clone)]
struct Msg {
    code: u32,
    body: Vec<u8>,
}

impl Msg {
    fn u32_at(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.body[at..at + 4].try_into().unwrap())
    }
}

struct Fake {
    thread: JoinHandle<Vec<Msg>>,
}

impl Fake {
    /// A scripted backend and the frontend's end of its socket.
    fn start(script: Script) -> (Self, Frontend) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || serve(theirs, script));
        (Self { thread }, Frontend::from_stream(ours, 8))
    }

    /// Every request the backend received, once `device` has gone.
    fn finish(self, device: VhostUserDevice) -> Vec<Msg> {
        drop(device);
        self.thread.join().unwrap()
    }
}

fn reply(stream: &mut UnixStream, code: u32, body: &[u8]) {
    let mut msg = Vec::new();
    for word in [code, 1 | FLAG_REPLY, body.len() as u32] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    msg.extend_from_slice(body);
    stream.write_all(&msg).unwrap();
}

fn serve(mut stream: UnixStream, script: Script) -> Vec<Msg> {
    let mut log = Vec::new();
    let mut get_configs = 0usize;
    loop {
        let mut header = [0u8; 12];
        // The frontend closing its end ends the script; fds sent with a request are dropped.
        if stream.read_exact(&mut header).is_err() {
            return log;
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let (code, flags, size) = (word(0), word(4), word(8) as usize);
        let mut body = vec![0u8; size];
        stream.read_exact(&mut body).unwrap();
        let msg = Msg { code, body };
        log.push(msg.clone());
        let u64_reply = |stream: &mut UnixStream, v: u64| reply(stream, code, &v.to_le_bytes());
        match code {
            GET_FEATURES => u64_reply(&mut stream, script.features),
            GET_PROTOCOL_FEATURES => u64_reply(&mut stream, script.protocol.bits()),
            GET_QUEUE_NUM => u64_reply(&mut stream, script.queue_num),
            GET_MAX_MEM_SLOTS => u64_reply(&mut stream, script.max_mem_slots),
            GET_VRING_BASE => reply(
                &mut stream,
                code,
                &[msg.body[..4].to_vec(), vec![0; 4]].concat(),
            ),
            GET_CONFIG => {
                let answer =
                    script.config_replies[get_configs.min(script.config_replies.len() - 1)];
                let config = match script.configs.len() {
                    0 => &script.config,
                    n => &script.configs[get_configs.min(n - 1)],
                };
                get_configs += 1;
                let asked = msg.u32_at(4) as usize;
                let mut body = msg.body[..12].to_vec();
                match answer {
                    ConfigReply::Normal => body.extend_from_slice(&config[..asked]),
                    ConfigReply::Refused => body[4..8].copy_from_slice(&0u32.to_le_bytes()),
                    ConfigReply::Short => {
                        body[4..8].copy_from_slice(&((asked / 2) as u32).to_le_bytes());
                        body.extend_from_slice(&config[..asked / 2]);
                    }
                }
                reply(&mut stream, code, &body);
            }
            SET_CONFIG if script.drop_on_migration_flags && msg.u32_at(8) != 0 => return log,
            SET_VRING_NUM if script.vring_num == VringNumReply::HangUp => return log,
            SET_VRING_NUM if script.vring_num == VringNumReply::Refuse => u64_reply(&mut stream, 1),
            _ => {
                if flags & FLAG_NEED_REPLY != 0 {
                    u64_reply(&mut stream, 0);
                }
            }
        }
    }
}

fn spec(device_id: u32, num_queues: u16, config_len: usize) -> DeviceSpec {
    DeviceSpec {
        label: format!("test{device_id}"),
        device_id,
        num_queues,
        queue_size: 64,
        config_len,
    }
}

/// `regions` file-backed RAM regions of one page each, a page apart.
fn memory(regions: usize) -> GuestMemoryMmap {
    let ranges = (0..regions)
        .map(|i| {
            let file = TempFile::new().unwrap().into_file();
            file.set_len(0x1000).unwrap();
            (
                GuestAddress(0x1000_0000 + 0x2000 * i as u64),
                0x1000,
                Some(FileOffset::new(file, 0)),
            )
        })
        .collect::<Vec<_>>();
    GuestMemoryMmap::from_ranges_with_files(ranges).unwrap()
}

fn device(script: Script, spec: DeviceSpec) -> (Fake, VhostUserDevice) {
    let (fake, frontend) = Fake::start(script);
    let device = VhostUserDevice::new(spec, frontend, memory(1)).unwrap();
    (fake, device)
}

fn set_configs(log: &[Msg]) -> Vec<(u32, u32, Vec<u8>)> {
    log.iter()
        .filter(|m| m.code == SET_CONFIG)
        .map(|m| (m.u32_at(0), m.u32_at(8), m.body[12..].to_vec()))
        .collect()
}

const BLK: u32 = 2;
const SCSI: u32 = 8;
const INPUT: u32 = 18;

#[test]
fn blk_writeback_goes_to_the_backend_with_flags_0_and_nothing_else_does() {
    let (fake, mut dev) = device(Script::new(60), spec(BLK, 1, 60));
    // capacity, then writeback, then writeback with its neighbours.
    dev.write_config(0, &[1, 2, 3, 4]).unwrap();
    dev.write_config(32, &[1]).unwrap();
    dev.write_config(32, &[0, 0x55, 0x66, 0x77]).unwrap();
    let mut read = [0u8; 4];
    dev.read_config(0, &mut read);
    assert_eq!(
        read, [0xaa; 4],
        "a read-only field keeps the backend's value"
    );
    dev.read_config(32, &mut read);
    assert_eq!(
        read,
        [0, 0xaa, 0xaa, 0xaa],
        "writeback written, its neighbours not"
    );
    let log = fake.finish(dev);
    // Flags 1 is live migration in the spec; such a backend would have hung up at the first.
    assert_eq!(
        set_configs(&log),
        vec![(32, 0, vec![1]), (32, 0, vec![0])],
        "only writeback is written, with flags 0"
    );
}

#[test]
fn scsi_config_writes_reach_no_backend() {
    let (fake, mut dev) = device(Script::new(36), spec(SCSI, 3, 36));
    // Linux's virtio-scsi writes sense_size and cdb_size at every probe.
    dev.write_config(28, &[96, 0, 0, 0]).unwrap();
    dev.write_config(32, &[32, 0, 0, 0]).unwrap();
    assert!(set_configs(&fake.finish(dev)).is_empty());
}

#[test]
fn input_select_and_subsel_go_to_the_backend() {
    let (fake, mut dev) = device(Script::new(136), spec(INPUT, 2, 136));
    dev.write_config(0, &[1, 0]).unwrap();
    dev.write_config(2, &[9]).unwrap(); // size: read-only
    assert_eq!(set_configs(&fake.finish(dev)), vec![(0, 0, vec![1, 0])]);
}

#[test]
fn config_written_during_a_restore_reaches_the_new_backend_with_flags_0() {
    let (fake, mut dev) = device(Script::new(60), spec(BLK, 1, 60));
    dev.mark_disconnected();
    dev.begin_restore();
    dev.write_config(0, &[1]).unwrap();
    dev.write_config(32, &[1]).unwrap();
    assert_eq!(dev.restore.unsent_config, Some((32, 33)));
    let (fake2, frontend) = Fake::start(Script::new(60));
    dev.reattach(frontend).unwrap();
    let mut read = [0u8; 1];
    dev.read_config(32, &mut read);
    assert_eq!(read, [1]);
    fake.thread.join().unwrap();
    assert_eq!(set_configs(&fake2.finish(dev)), vec![(32, 0, vec![1])]);
}

fn get_configs(log: &[Msg]) -> usize {
    log.iter().filter(|m| m.code == GET_CONFIG).count()
}

/// The error chain of `error`, as the logs show it.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}

#[test]
fn input_config_is_read_from_the_backend_after_each_select() {
    let mut script = Script::new(136);
    let mut selected = vec![0u8; 136];
    selected[..3].copy_from_slice(&[1, 0, 5]);
    selected[8..13].copy_from_slice(b"mouse");
    script.configs = vec![vec![0; 136], selected];
    let (fake, mut dev) = device(script, spec(INPUT, 2, 136));
    // VIRTIO_INPUT_CFG_ID_NAME: the driver selects, then reads size and the string.
    dev.write_config(0, &[1, 0]).unwrap();
    let mut size = [0u8; 1];
    dev.read_config(2, &mut size);
    assert_eq!(size, [5], "size of the selected item, from the backend");
    let mut name = [0u8; 5];
    dev.read_config(8, &mut name);
    assert_eq!(&name, b"mouse");
    assert_eq!(
        get_configs(&fake.finish(dev)),
        2,
        "at start-up and after the write"
    );
}

#[test]
fn blk_config_is_not_read_again_after_a_writeback_write() {
    let (fake, mut dev) = device(Script::new(60), spec(BLK, 1, 60));
    dev.write_config(32, &[1]).unwrap();
    assert_eq!(get_configs(&fake.finish(dev)), 1);
}

#[test]
fn an_error_reply_to_get_config_at_start_up_fails_naming_the_device() {
    let mut script = Script::new(60);
    script.config_replies = vec![ConfigReply::Refused];
    let (fake, frontend) = Fake::start(script);
    // vhost's own GET_CONFIG would wait here for 60 bytes that never come.
    let error = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(1)).unwrap_err();
    let text = chain(&error);
    assert!(
        matches!(
            &error,
            FrontendError::GetConfig {
                source: GetConfigError::Refused,
                ..
            }
        ),
        "{text}"
    );
    assert!(text.contains("test2") && text.contains("size 0"), "{text}");
    fake.thread.join().unwrap();
}

#[test]
fn an_error_reply_to_get_config_at_runtime_fails_the_write_naming_the_device() {
    let mut script = Script::new(136);
    script.config_replies = vec![
        ConfigReply::Normal,
        ConfigReply::Refused,
        ConfigReply::Normal,
    ];
    let (fake, mut dev) = device(script, spec(INPUT, 2, 136));
    let error = dev.write_config(0, &[1, 0]).unwrap_err();
    let text = chain(&error);
    assert!(text.contains("test18") && text.contains("size 0"), "{text}");
    // The connection is still in step: the next exchange works.
    dev.write_config(0, &[2, 0]).unwrap();
    assert_eq!(get_configs(&fake.finish(dev)), 3);
}

#[test]
fn a_short_get_config_reply_is_refused() {
    let mut script = Script::new(60);
    script.config_replies = vec![ConfigReply::Short];
    let (fake, frontend) = Fake::start(script);
    let error = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(1)).unwrap_err();
    assert!(
        matches!(
            &error,
            FrontendError::GetConfig {
                source: GetConfigError::Malformed(_),
                ..
            }
        ),
        "{}",
        chain(&error)
    );
    fake.thread.join().unwrap();
}

const VIRTIO_BLK_F_MQ: u64 = 1 << 12;
const CONSOLE: u32 = 3;

#[test]
fn the_guest_reads_the_windows_queue_count_not_the_backends() {
    let mut script = Script::new(60);
    script.features |= VIRTIO_BLK_F_MQ;
    script.config[34..36].copy_from_slice(&8u16.to_le_bytes());
    let (fake, dev) = device(script, spec(BLK, 2, 60));
    let mut num_queues = [0u8; 2];
    dev.read_config(34, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), 2);
    fake.finish(dev);
}

#[test]
fn a_backend_with_fewer_queues_in_its_config_is_refused_at_start_up() {
    let mut script = Script::new(60);
    script.features |= VIRTIO_BLK_F_MQ;
    script.config[34..36].copy_from_slice(&1u16.to_le_bytes());
    let (fake, frontend) = Fake::start(script);
    let error = VhostUserDevice::new(spec(BLK, 4, 60), frontend, memory(1)).unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("test2")
            && text.contains("num_queues = 1")
            && text.contains("num_queues = 4"),
        "{text}"
    );
    fake.thread.join().unwrap();
}

#[test]
fn a_console_window_without_control_queues_hides_multiport() {
    let mut script = Script::new(12);
    script.features |= 1 << 1;
    let (fake, dev) = device(script.clone(), spec(CONSOLE, 2, 12));
    assert_eq!(dev.device_features() & 1 << 1, 0);
    fake.finish(dev);
    let (fake, dev) = device(script, spec(CONSOLE, 4, 12));
    assert_ne!(dev.device_features() & 1 << 1, 0);
    let mut ports = [0u8; 4];
    dev.read_config(4, &mut ports);
    assert_eq!(
        u32::from_le_bytes(ports),
        1,
        "port 0 and the control pair: one port"
    );
    fake.finish(dev);
}

fn activate_without_queues(dev: &mut VhostUserDevice) {
    let queues: Vec<QueueConfig> = Vec::new();
    dev.activate(VERSION_1, &queues).unwrap();
}

fn count(log: &[Msg], code: u32) -> usize {
    log.iter().filter(|m| m.code == code).count()
}

#[test]
fn more_regions_than_set_mem_table_carries_are_refused_without_mem_slots() {
    let (fake, frontend) = Fake::start(Script::new(60));
    let error = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(9)).unwrap_err();
    let text = chain(&error);
    assert!(
        matches!(
            error,
            FrontendError::TooManyRegions {
                regions: 9,
                limit: 8,
                ..
            }
        ),
        "{text}"
    );
    assert!(
        text.contains("9 memory regions") && text.contains("at most 8"),
        "{text}"
    );
    fake.thread.join().unwrap();
}

#[test]
fn more_regions_than_the_backends_slots_are_refused() {
    let mut script = Script::new(60);
    script.protocol |= P::CONFIGURE_MEM_SLOTS;
    script.max_mem_slots = 4;
    let (fake, frontend) = Fake::start(script);
    let error = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(5)).unwrap_err();
    let text = chain(&error);
    assert!(
        text.contains("5 memory regions")
            && text.contains("at most 4")
            && text.contains("GET_MAX_MEM_SLOTS"),
        "{text}"
    );
    fake.thread.join().unwrap();
}

#[test]
fn regions_beyond_set_mem_table_go_by_add_mem_reg_once_per_connection() {
    let mut script = Script::new(60);
    script.protocol |= P::CONFIGURE_MEM_SLOTS;
    script.max_mem_slots = 32;
    let (fake, frontend) = Fake::start(script);
    let mut dev = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(9)).unwrap();
    activate_without_queues(&mut dev);
    dev.reset().unwrap();
    activate_without_queues(&mut dev);
    let log = fake.finish(dev);
    assert_eq!(count(&log, ADD_MEM_REG), 9);
    assert_eq!(count(&log, SET_MEM_TABLE), 0);
}

#[test]
fn a_few_regions_go_by_set_mem_table() {
    let mut script = Script::new(60);
    script.protocol |= P::CONFIGURE_MEM_SLOTS;
    script.max_mem_slots = 32;
    let (fake, frontend) = Fake::start(script);
    let mut dev = VhostUserDevice::new(spec(BLK, 1, 60), frontend, memory(2)).unwrap();
    activate_without_queues(&mut dev);
    let log = fake.finish(dev);
    assert_eq!(
        (count(&log, SET_MEM_TABLE), count(&log, ADD_MEM_REG)),
        (1, 0)
    );
}

#[test]
fn a_restarted_backend_without_a_feature_the_guest_acked_is_refused() {
    const EVENT_IDX: u64 = 1 << 29;
    let mut script = Script::new(60);
    script.features |= EVENT_IDX;
    let (fake, mut dev) = device(script, spec(BLK, 1, 60));
    dev.activate(VERSION_1 | EVENT_IDX, &[]).unwrap();
    dev.mark_disconnected();
    let (fake2, frontend) = Fake::start(Script::new(60));
    let error = dev.reattach(frontend).unwrap_err();
    assert!(
        matches!(error, FrontendError::FeaturesLost { .. }),
        "{}",
        chain(&error)
    );
    fake.thread.join().unwrap();
    fake2.finish(dev);
}

#[test]
fn a_backend_that_refuses_the_queue_size_is_told_apart_from_one_that_died() {
    let mut refusing = Script::new(60);
    refusing.vring_num = VringNumReply::Refuse;
    let error = refused(refusing, spec(BLK, 1, 60));
    assert!(
        matches!(error, FrontendError::QueueSizeRefused { queue: 0, .. }),
        "{}",
        chain(&error)
    );
    assert!(!error.connection_lost());

    // Killed while the bridge negotiates (a restore): worth another backend, not a reset.
    let mut dying = Script::new(60);
    dying.vring_num = VringNumReply::HangUp;
    let error = refused(dying, spec(BLK, 1, 60));
    assert!(error.connection_lost(), "{}", chain(&error));
}

/// Negotiates with a scripted backend that must refuse the device; its error, once the
/// backend's thread has ended.
fn refused(script: Script, spec: DeviceSpec) -> FrontendError {
    let (fake, frontend) = Fake::start(script);
    let error = VhostUserDevice::new(spec, frontend, memory(1)).unwrap_err();
    fake.thread.join().unwrap();
    error
}

#[test]
fn a_backend_without_reply_ack_that_hangs_up_at_the_queue_size_is_named_for_it() {
    // As vhost-device-scsi 0.1.0 (queues of at most 128, no REPLY_ACK) does with 256: the
    // refusal is a closed socket, which would otherwise surface at the next request
    // (GET_CONFIG here) and blame that.
    let mut script = Script::new(36);
    script.protocol = P::MQ | P::CONFIG;
    script.vring_num = VringNumReply::HangUp;
    let error = refused(script, spec(SCSI, 1, 36));
    assert!(
        matches!(error, FrontendError::HungUpAtQueueSize { size: 64, .. }),
        "{}",
        chain(&error)
    );
    // Still a lost connection: a restore starts another backend for it.
    assert!(error.connection_lost(), "{}", chain(&error));
}
