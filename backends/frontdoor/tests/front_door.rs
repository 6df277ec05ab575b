//! The front door between real vhost-user peers: the `vhost` crate's `Frontend` (or raw bytes
//! for what it will not send) on one side, a `vhost-user-backend` daemon with a small mock
//! backend on the other.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vhost::vhost_user::message::{
    FrontendReq, VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserSharedMsg,
};
use vhost::vhost_user::{
    Backend, Frontend, FrontendReqHandler, HandlerResult, Listener, VhostUserFrontend,
    VhostUserFrontendReqHandler, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
use vhost_user_frontdoor::{ConfigNotifier, Delivery, Error, FrontDoor, MessageError, Peer};
use vm_memory::{
    ByteValued, FileOffset, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend,
    GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;
use vmm_sys_util::tempfile::TempFile;

const GUEST_SIZE: usize = 0x10_0000;
const QUEUE_SIZE: u16 = 64;
const CONFIG: [u8; 16] = *b"front-door-cfg!!";
/// How long a test waits for an event before declaring the peer stuck.
const TIMEOUT: Duration = Duration::from_secs(10);

const VERSION_1: u64 = 1 << 32;
const NEED_REPLY: u32 = 0x8;
const REPLY: u32 = 0x4;

/// What the mock backend offers.
fn mock_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::SHARED_OBJECT
}

/// One-queue device that reports what VUB hands it.
struct MockBackend {
    memory: Mutex<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    backend_channel: Mutex<Option<Backend>>,
    queue_events: Mutex<Sender<u16>>,
    /// Lets VUB stop the worker thread when the daemon is dropped.
    exit: (EventConsumer, EventNotifier),
}

impl MockBackend {
    fn new() -> (Arc<Self>, Receiver<u16>) {
        let (sender, events) = mpsc::channel();
        let backend = MockBackend {
            memory: Mutex::new(None),
            backend_channel: Mutex::new(None),
            queue_events: Mutex::new(sender),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK).unwrap(),
        };
        (Arc::new(backend), events)
    }

    /// Sizes of the guest memory regions the daemon mapped.
    fn region_sizes(&self) -> Vec<u64> {
        let memory = self.memory.lock().unwrap();
        let Some(memory) = memory.as_ref() else {
            return Vec::new();
        };
        memory.memory().iter().map(|region| region.len()).collect()
    }
}

impl VhostUserBackend for MockBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(QUEUE_SIZE)
    }

    fn features(&self) -> u64 {
        VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        mock_protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {}

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let start = (offset as usize).min(CONFIG.len());
        let end = (start + size as usize).min(CONFIG.len());
        CONFIG[start..end].to_vec()
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> std::io::Result<()> {
        *self.memory.lock().unwrap() = Some(mem);
        Ok(())
    }

    fn set_backend_req_fd(&self, backend: Backend) {
        *self.backend_channel.lock().unwrap() = Some(backend);
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((
            self.exit.0.try_clone().unwrap(),
            self.exit.1.try_clone().unwrap(),
        ))
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        _vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let _ = self.queue_events.lock().unwrap().send(device_event);
        Ok(())
    }
}

type DaemonResult = Result<(), vhost_user_backend::Error>;

/// A front door serving one session to a daemon over `backend`, in its own thread.
struct Served {
    path: PathBuf,
    notifier: Receiver<ConfigNotifier>,
    done: JoinHandle<(Result<(), Error>, DaemonResult)>,
}

impl Served {
    fn start(backend: Arc<MockBackend>, tag: &str) -> Self {
        let path = socket_path(tag);
        let door = FrontDoor::bind(&path).unwrap();
        let (notifier_sender, notifier) = mpsc::channel();
        let done = thread::spawn(move || {
            let mut daemon = VhostUserDaemon::new(
                "mock".into(),
                backend,
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .unwrap();
            let session = door.accept_into(&mut daemon).unwrap();
            notifier_sender.send(session.notifier()).unwrap();
            let session_result = session.wait();
            let daemon_result = daemon.wait();
            (session_result, daemon_result)
        });
        Served {
            path,
            notifier,
            done,
        }
    }

    fn notifier(&self) -> ConfigNotifier {
        self.notifier.recv_timeout(TIMEOUT).unwrap()
    }

    fn finish(self) -> (Result<(), Error>, DaemonResult) {
        self.done.join().unwrap()
    }
}

/// The front door's private directories (`.NAME.XXXXXX`) beside the socket `path`.
fn private_dirs(path: &Path) -> Vec<PathBuf> {
    let prefix = format!(".{}.", path.file_name().unwrap().to_str().unwrap());
    std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_str().unwrap().starts_with(&prefix))
        .map(|entry| entry.path())
        .collect()
}

fn socket_path(tag: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("frontdoor-{tag}-{}-{n}.sock", std::process::id()))
}

/// Guest RAM in a file, as a frontend must share it.
fn guest_memory() -> (GuestMemoryMmap, TempFile) {
    let backing = TempFile::new().unwrap();
    backing.as_file().set_len(GUEST_SIZE as u64).unwrap();
    let file = backing.as_file().try_clone().unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
        GuestAddress(0),
        GUEST_SIZE,
        Some(FileOffset::new(file, 0)),
    )])
    .unwrap();
    (mem, backing)
}

fn negotiate(path: &Path, extra: VhostUserProtocolFeatures) -> Frontend {
    let mut frontend = Frontend::connect(path, 1).unwrap();
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    assert_eq!(
        features,
        VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    );
    let offered = frontend.get_protocol_features().unwrap();
    assert!(offered.contains(mock_protocol_features() | VhostUserProtocolFeatures::REPLY_ACK));
    frontend
        .set_protocol_features(
            VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | extra,
        )
        .unwrap();
    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    frontend
}

#[test]
fn a_whole_frontend_session_passes_through() {
    let (backend, queue_events) = MockBackend::new();
    let served = Served::start(backend.clone(), "session");
    let mut frontend = negotiate(&served.path, VhostUserProtocolFeatures::empty());
    assert_eq!(frontend.get_queue_num().unwrap(), 1);
    // The daemon's private socket was removed once it had connected.
    assert_eq!(private_dirs(&served.path), Vec::<PathBuf>::new());
    let (_, config) = frontend
        .get_config(0, 16, VhostUserConfigFlags::WRITABLE, &[0; 16])
        .unwrap();
    assert_eq!(config, CONFIG);

    frontend
        .set_features(VERSION_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    let (mem, _backing) = guest_memory();
    let (kick, _call) = set_up_queue(&mut frontend, &mem);
    assert_eq!(backend.region_sizes(), vec![GUEST_SIZE as u64]);
    frontend.set_vring_enable(0, true).unwrap();

    // The kick eventfd crossed the front door: the daemon's worker wakes on it.
    kick.write(1).unwrap();
    assert_eq!(queue_events.recv_timeout(TIMEOUT).unwrap(), 0);
    assert_eq!(frontend.get_vring_base(0).unwrap(), 0);

    drop(frontend);
    let (session, daemon) = served.finish();
    session.unwrap();
    assert!(
        matches!(
            daemon,
            Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                ))
        ),
        "{daemon:?}"
    );
}

/// Shares `mem` and sets up queue 0 in it, without enabling it. Returns its kick and call
/// eventfds.
fn set_up_queue(frontend: &mut Frontend, mem: &GuestMemoryMmap) -> (EventFd, EventFd) {
    let region = mem.find_region(GuestAddress(0)).unwrap();
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo::from_guest_region(region).unwrap()])
        .unwrap();
    let host = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as u64;
    frontend.set_vring_num(0, QUEUE_SIZE).unwrap();
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: host(0),
                used_ring_addr: host(0x2000),
                avail_ring_addr: host(0x1000),
                log_addr: None,
            },
        )
        .unwrap();
    frontend.set_vring_base(0, 0).unwrap();
    let (kick, call) = (EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    frontend.set_vring_call(0, &call).unwrap();
    frontend.set_vring_kick(0, &kick).unwrap();
    (kick, call)
}

/// Writes one raw vhost-user message with `fds` attached to its first byte.
fn send_raw(stream: &UnixStream, request: u32, flags: u32, body: &[u8], fds: &[RawFd]) {
    let mut bytes = Vec::new();
    for field in [request, flags, body.len() as u32] {
        bytes.extend_from_slice(&field.to_ne_bytes());
    }
    bytes.extend_from_slice(body);
    assert_eq!(
        stream.send_with_fds(&[&bytes[..]], fds).unwrap(),
        bytes.len()
    );
}

/// Reads one reply; `None` if the peer closed the connection instead.
fn read_raw(mut stream: &UnixStream) -> Option<(u32, u32, Vec<u8>)> {
    let mut header = [0u8; 12];
    if stream.read_exact(&mut header).is_err() {
        return None;
    }
    let field = |i: usize| u32::from_ne_bytes(header[i * 4..i * 4 + 4].try_into().unwrap());
    let mut body = vec![0u8; field(2) as usize];
    stream.read_exact(&mut body).ok()?;
    Some((field(0), field(1), body))
}

/// Reads the u64 acknowledgement of `request`.
fn read_ack(stream: &UnixStream, request: FrontendReq) -> Option<u64> {
    let (code, flags, body) = read_raw(stream)?;
    assert_eq!(code, u32::from(request));
    assert_eq!(flags, 1 | REPLY);
    Some(u64::from_ne_bytes(body.try_into().unwrap()))
}

/// What user-mode Linux sends: room for two regions, `num_regions` 1, one descriptor.
/// Returns the SET_MEM_TABLE acknowledgement, or `None` if the backend hung up instead.
fn send_uml_style_mem_table(stream: &UnixStream) -> Option<u64> {
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    send_raw(stream, FrontendReq::GET_FEATURES.into(), 1, &[], &[]);
    let (_, _, features) = read_raw(stream).unwrap();
    let features = u64::from_ne_bytes(features.try_into().unwrap());
    assert_ne!(
        features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        0
    );
    let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits().to_ne_bytes();
    send_raw(
        stream,
        FrontendReq::SET_PROTOCOL_FEATURES.into(),
        1 | NEED_REPLY,
        &reply_ack,
        &[],
    );
    assert_eq!(
        read_ack(stream, FrontendReq::SET_PROTOCOL_FEATURES),
        Some(0)
    );

    let guest_ram = TempFile::new().unwrap();
    guest_ram.as_file().set_len(GUEST_SIZE as u64).unwrap();
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_ne_bytes()); // num_regions
    body.extend_from_slice(&0u32.to_ne_bytes()); // padding
    for value in [0u64, GUEST_SIZE as u64, 0x7f00_0000_0000, 0] {
        body.extend_from_slice(&value.to_ne_bytes()); // gpa, size, user address, mmap offset
    }
    body.extend_from_slice(&[0; 32]); // the unused second slot
    assert_eq!(body.len(), 72);
    send_raw(
        stream,
        FrontendReq::SET_MEM_TABLE.into(),
        1 | NEED_REPLY,
        &body,
        &[guest_ram.as_file().as_raw_fd()],
    );
    read_ack(stream, FrontendReq::SET_MEM_TABLE)
}

#[test]
fn padded_mem_table_is_accepted_through_the_front_door() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend.clone(), "padded");
    let stream = UnixStream::connect(&served.path).unwrap();
    assert_eq!(send_uml_style_mem_table(&stream), Some(0));
    assert_eq!(backend.region_sizes(), vec![GUEST_SIZE as u64]);
    drop(stream);
    let (session, _) = served.finish();
    session.unwrap();
}

#[test]
fn padded_mem_table_is_refused_without_the_front_door() {
    let (backend, _) = MockBackend::new();
    let path = socket_path("direct");
    let mut listener = Listener::new(&path, true).unwrap();
    let mut daemon = VhostUserDaemon::new(
        "mock".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap();
    let server = thread::spawn(move || {
        daemon.start(&mut listener).unwrap();
        daemon.wait()
    });
    let stream = UnixStream::connect(&path).unwrap();
    // The vhost crate nacks the message and ends the connection.
    assert_eq!(send_uml_style_mem_table(&stream), Some(1));
    assert!(read_raw(&stream).is_none());
    assert!(backend.region_sizes().is_empty());
    let end = server.join().unwrap();
    assert!(
        matches!(
            end,
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::InvalidMessage
            ))
        ),
        "{end:?}"
    );
}

/// QEMU's virtio-net order: SET_VRING_ENABLE after SET_PROTOCOL_FEATURES but before
/// SET_FEATURES, which the `vhost` crate's frontend will not send, so those go as raw bytes on
/// the same connection. The ring must work once the features are set, and the frontend must
/// get exactly the replies it asked for.
fn enable_before_set_features(reply_ack: bool, ack_protocol_features: bool) {
    let (backend, queue_events) = MockBackend::new();
    let served = Served::start(backend, "early-enable");
    let raw = UnixStream::connect(&served.path).unwrap();
    raw.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut frontend = Frontend::from_stream(raw.try_clone().unwrap(), 1);
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    frontend.get_protocol_features().unwrap();
    let mut protocol_features = VhostUserProtocolFeatures::MQ;
    if reply_ack {
        protocol_features |= VhostUserProtocolFeatures::REPLY_ACK;
    }
    frontend.set_protocol_features(protocol_features).unwrap();
    let enable_flags = if reply_ack {
        frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        1 | NEED_REPLY
    } else {
        1
    };

    // Disabled, then enabled: the last request for a queue wins.
    for num in [0u32, 1] {
        let body = [0u32.to_ne_bytes(), num.to_ne_bytes()].concat();
        send_raw(
            &raw,
            FrontendReq::SET_VRING_ENABLE.into(),
            enable_flags,
            &body,
            &[],
        );
        if reply_ack {
            assert_eq!(read_ack(&raw, FrontendReq::SET_VRING_ENABLE), Some(0));
        }
    }

    let mut features = VERSION_1;
    if ack_protocol_features {
        features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    }
    // With REPLY_ACK the frontend checks that the next reply acknowledges SET_FEATURES.
    frontend.set_features(features).unwrap();
    let (mem, _backing) = guest_memory();
    let (kick, _call) = set_up_queue(&mut frontend, &mem);

    // The daemon only wakes the device for a kick on an enabled ring.
    kick.write(1).unwrap();
    assert_eq!(queue_events.recv_timeout(TIMEOUT).unwrap(), 0);
    // The session is alive and in step: the next reply answers the next request...
    assert_eq!(frontend.get_features().unwrap(), offered);
    // ...and nothing else is waiting for the frontend.
    raw.set_nonblocking(true).unwrap();
    let error = (&raw).read(&mut [0; 1]).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock);

    drop((frontend, raw));
    served.finish().0.unwrap();
}

#[test]
fn early_vring_enable_is_replayed_after_set_features() {
    enable_before_set_features(true, true);
}

#[test]
fn early_vring_enable_is_replayed_without_reply_ack() {
    enable_before_set_features(false, true);
}

#[test]
fn early_vring_enable_is_dropped_when_rings_start_enabled() {
    enable_before_set_features(true, false);
}

/// The frontend's side of the backend channel.
#[derive(Default)]
struct FrontendSide {
    config_changes: AtomicUsize,
    /// Size of the file behind each shared-object lookup descriptor.
    looked_up: Mutex<Vec<u64>>,
    refuse_config_change: bool,
}

impl VhostUserFrontendReqHandler for FrontendSide {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.config_changes.fetch_add(1, Ordering::SeqCst);
        if self.refuse_config_change {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        Ok(0)
    }

    fn shared_object_lookup(
        &self,
        _uuid: &VhostUserSharedMsg,
        fd: &dyn std::os::fd::AsRawFd,
    ) -> HandlerResult<u64> {
        // SAFETY: the handler owns the received descriptor for the duration of this call;
        // the borrowed file is not closed here.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        let file = File::from(fd.try_clone_to_owned()?);
        self.looked_up.lock().unwrap().push(file.metadata()?.len());
        Ok(0)
    }
}

/// A frontend with a backend channel, as QEMU sets one up.
fn frontend_with_backend_channel(
    path: &Path,
    side: FrontendSide,
) -> (
    Frontend,
    FrontendReqHandler<FrontendSide>,
    Arc<FrontendSide>,
) {
    let mut frontend = negotiate(
        path,
        VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::SHARED_OBJECT,
    );
    let side = Arc::new(side);
    let mut handler = FrontendReqHandler::new(side.clone()).unwrap();
    handler.set_reply_ack_flag(true);
    frontend
        .set_backend_request_fd(&handler.get_tx_raw_fd())
        .unwrap();
    (frontend, handler, side)
}

/// Serves one backend-channel request, failing the test if none arrives in time.
fn handle_one_request(handler: &mut FrontendReqHandler<FrontendSide>) -> HandlerResult<u64> {
    let mut poll = libc::pollfd {
        fd: handler.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    let ready = unsafe { libc::poll(&mut poll, 1, TIMEOUT.as_millis() as i32) };
    assert_eq!(ready, 1, "no backend request within {TIMEOUT:?}");
    handler
        .handle_request()
        .map_err(|e| std::io::Error::other(e.to_string()))
}

#[test]
fn config_change_reaches_the_frontend() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend, "config");
    let mut frontend = negotiate(&served.path, VhostUserProtocolFeatures::empty());
    let notifier = served.notifier();
    // No BACKEND_REQ negotiated: nothing to send on.
    assert_eq!(notifier.config_changed().unwrap(), Delivery::NoChannel);
    frontend.get_queue_num().unwrap();
    drop(frontend);
    served.finish().0.unwrap();

    let (backend, _) = MockBackend::new();
    let served = Served::start(backend, "config");
    let (frontend, mut handler, side) =
        frontend_with_backend_channel(&served.path, FrontendSide::default());
    let notifier = served.notifier();
    let sending = notifier.clone();
    let sender = thread::spawn(move || sending.config_changed());
    assert_eq!(handle_one_request(&mut handler).unwrap(), 0);
    assert_eq!(sender.join().unwrap().unwrap(), Delivery::Acknowledged);
    assert_eq!(side.config_changes.load(Ordering::SeqCst), 1);

    // After the session the notifier has nowhere to send.
    drop(frontend);
    served.finish().0.unwrap();
    assert_eq!(notifier.config_changed().unwrap(), Delivery::NoChannel);
    assert_eq!(side.config_changes.load(Ordering::SeqCst), 1);
}

#[test]
fn a_refused_config_change_is_reported() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend, "refused");
    let side = FrontendSide {
        refuse_config_change: true,
        ..FrontendSide::default()
    };
    let (frontend, mut handler, side) = frontend_with_backend_channel(&served.path, side);
    let notifier = served.notifier();
    let second = notifier.clone();
    let sender = thread::spawn(move || notifier.config_changed());
    assert!(handle_one_request(&mut handler).is_err());
    assert!(matches!(
        sender.join().unwrap(),
        Err(Error::Refused(status)) if status == (-libc::EBUSY) as u64
    ));
    assert_eq!(side.config_changes.load(Ordering::SeqCst), 1);
    drop(frontend);
    served.finish().0.unwrap();
    assert_eq!(second.config_changed().unwrap(), Delivery::NoChannel);
}

#[test]
fn the_daemons_own_backend_requests_are_relayed() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend.clone(), "relay");
    let (frontend, mut handler, side) =
        frontend_with_backend_channel(&served.path, FrontendSide::default());
    let vub_channel = backend.backend_channel.lock().unwrap().take().unwrap();
    let shared = TempFile::new().unwrap();
    shared.as_file().set_len(12345).unwrap();
    let lookup = thread::spawn(move || {
        let mut uuid = VhostUserSharedMsg::default();
        uuid.as_mut_slice().copy_from_slice(&[0x42; 16]);
        vub_channel.shared_object_lookup(&uuid, &shared.as_file().as_fd())
    });
    assert_eq!(handle_one_request(&mut handler).unwrap(), 0);
    assert_eq!(lookup.join().unwrap().unwrap(), 0);
    assert_eq!(*side.looked_up.lock().unwrap(), vec![12345]);
    drop(frontend);
    served.finish().0.unwrap();
}

#[test]
fn a_malformed_message_ends_the_session() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend, "malformed");
    let mut stream = UnixStream::connect(&served.path).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let mut header = Vec::new();
    for field in [u32::from(FrontendReq::GET_CONFIG), 1, 0x1001] {
        header.extend_from_slice(&field.to_ne_bytes());
    }
    stream.write_all(&header).unwrap();
    // The front door hangs up on the frontend and on the daemon.
    assert!(read_raw(&stream).is_none());
    let (session, daemon) = served.finish();
    assert!(
        matches!(
            session,
            Err(Error::Receive {
                peer: Peer::Frontend,
                source: MessageError::TooLarge(0x1001)
            })
        ),
        "{session:?}"
    );
    assert!(
        matches!(
            daemon,
            Ok(())
                | Err(vhost_user_backend::Error::HandleRequest(
                    vhost::vhost_user::Error::Disconnected
                ))
        ),
        "{daemon:?}"
    );
}

#[test]
fn a_daemon_hang_up_closes_the_frontend() {
    let (backend, _) = MockBackend::new();
    let served = Served::start(backend, "daemon-gone");
    let stream = UnixStream::connect(&served.path).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    // A request code the daemon does not know: it ends its connection.
    send_raw(&stream, 0x7777, 1, &[], &[]);
    assert!(read_raw(&stream).is_none());
    let (session, daemon) = served.finish();
    session.unwrap();
    assert!(daemon.is_err(), "{daemon:?}");
}

#[test]
fn bind_guards_the_socket_path() {
    let path = socket_path("bind");
    let door = FrontDoor::bind(&path).unwrap();
    assert_eq!(door.path(), Some(path.as_path()));
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o600);
    // The staging directory beside it is gone.
    assert_eq!(private_dirs(&path), Vec::<PathBuf>::new());

    // A live socket is refused.
    assert!(matches!(FrontDoor::bind(&path), Err(Error::SocketInUse(_))));
    drop(door);
    assert!(!path.exists());

    // A stale socket is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let stale_inode = std::fs::symlink_metadata(&path).unwrap().ino();
    let door = FrontDoor::bind(&path).unwrap();
    assert_ne!(std::fs::symlink_metadata(&path).unwrap().ino(), stale_inode);
    drop(door);

    // The daemon is given its socket path as a string.
    let not_utf8 = std::env::temp_dir().join(std::ffi::OsStr::from_bytes(b"frontdoor-\xff.sock"));
    assert!(matches!(
        FrontDoor::bind(&not_utf8),
        Err(Error::InvalidPath(_))
    ));
    assert!(!not_utf8.exists());

    // A regular file is left alone.
    std::fs::write(&path, b"data").unwrap();
    assert!(matches!(FrontDoor::bind(&path), Err(Error::NotASocket(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    std::fs::remove_file(&path).unwrap();
}

/// `--socket-mode` and `--socket-owner`: the socket appears with them, never looser first.
#[test]
fn bind_with_gives_the_socket_its_mode_and_owner() {
    let path = socket_path("bind-access");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // As root, hand it to nobody:nogroup; otherwise the group change is to our own group,
    // which any user may make.
    let (uid, gid) = if root {
        (Some(65534), 65534)
    } else {
        // SAFETY: getegid has no preconditions.
        (None, unsafe { libc::getegid() })
    };
    let access = vhost_user_frontdoor::SocketAccess {
        mode: 0o660,
        owner: vhost_user_frontdoor::SocketOwner {
            uid,
            gid: Some(gid),
        },
    };
    let door = FrontDoor::bind_with(&path, &access).unwrap();
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(metadata.permissions().mode() & 0o777, 0o660);
    assert_eq!(metadata.gid(), gid);
    if let Some(uid) = uid {
        assert_eq!(metadata.uid(), uid);
    }
    drop(door);
}
