//! The vhost-user frontend of one device: it negotiates with the backend when the device is
//! created, caches the config space, and on the guest's DRIVER_OK hands the backend the zone's
//! memory table and the vrings. It implements [`VirtioBackend`] so the transport drives it.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, HandlerResult, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::backend_maps::{self, Checked, StrayMapping};
use crate::config_space::{self, GetConfigError, QueueCountMismatch};
use crate::ratelimit::RateLimited;
use crate::transport::{BackendError, QueueConfig, VirtioBackend};

/// Protocol features the bridge can use.
fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// The memory regions SET_MEM_TABLE carries to any backend (the spec's
/// VHOST_MEMORY_BASELINE_NREGIONS; libvhost-user takes no more fds in one message). More
/// need CONFIGURE_MEM_SLOTS and ADD_MEM_REG, up to the backend's GET_MAX_MEM_SLOTS.
const BASELINE_MEM_REGIONS: usize = 8;

/// The backend-to-frontend channel's handler: it only records that the config changed; the
/// event loop then re-reads the config and raises the guest's config interrupt.
#[derive(Debug, Default)]
struct ConfigChanged(AtomicBool);

impl VhostUserFrontendReqHandler for ConfigChanged {
    fn handle_config_change(&self) -> HandlerResult<u64> {
        self.0.store(true, Ordering::Release);
        Ok(0)
    }
}

/// Errors of the vhost-user frontend.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The backend socket did not appear or refused the connection.
    #[error("Cannot connect to {}", .socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The socket did not appear in time.
    #[error("Backend socket {} did not appear within {timeout:?}", .socket.display())]
    SocketTimeout {
        /// The socket path.
        socket: PathBuf,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vhost-user request failed.
    #[error("vhost-user {request} failed")]
    Request {
        /// The request, e.g. `SET_MEM_TABLE`.
        request: &'static str,
        /// Why.
        #[source]
        source: vhost::Error,
    },
    /// The backend serves fewer queues than the device needs.
    #[error("Backend offers {offered} queues, the device needs {wanted}")]
    QueueCount {
        /// From GET_QUEUE_NUM.
        offered: u64,
        /// From the config.
        wanted: u16,
    },
    /// A vring address the guest gave is not inside zone RAM or misaligned.
    #[error("Queue {queue}: {what} at {addr:#x} is outside zone RAM or misaligned")]
    BadRing {
        /// The queue index.
        queue: u16,
        /// Which part of the ring.
        what: &'static str,
        /// The guest-physical address.
        addr: u64,
    },
    /// An eventfd could not be created.
    #[error("Cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A zone RAM region could not be described to the backend.
    #[error("Zone RAM region has no file backing")]
    MemoryRegion(#[source] vhost::Error),
    /// The backend has gone.
    #[error("Backend disconnected")]
    Disconnected,
    /// The backend did not answer in time; its connection was shut down.
    #[error("Backend did not answer within {0:?} (see --backend-timeout-ms)")]
    Unresponsive(Duration),
    /// The backend refused the configured queue size.
    #[error(
        "Backend refuses queue size {size} for queue {queue}; lower `queue_size` in the config"
    )]
    QueueSizeRefused {
        /// The queue index.
        queue: usize,
        /// The configured size.
        size: u16,
    },
    /// The backend, which takes no REPLY_ACK, closed the connection after SET_VRING_NUM:
    /// how rust-vmm's vhost-user-backend refuses a queue larger than its maximum.
    #[error(
        "Backend hung up after SET_VRING_NUM {size} (it offers no REPLY_ACK, so this is how \
         it refuses a queue size); if it was not stopped, lower `queue_size` in the config"
    )]
    HungUpAtQueueSize {
        /// The configured size.
        size: u16,
        /// The request that found the connection gone.
        #[source]
        source: vhost::Error,
    },
    /// The backend maps guest memory outside zone RAM, which on hvisor is root Linux's.
    #[error("Refusing the backend: it maps memory outside zone RAM")]
    StrayMapping(#[source] StrayMapping),
    /// GET_CONFIG gave no config space.
    #[error("GET_CONFIG of {device} gave no config space")]
    GetConfig {
        /// The device's label.
        device: String,
        /// Why.
        #[source]
        source: GetConfigError,
    },
    /// The backend's config space states fewer queues than the window has.
    #[error("The queue count of {device}'s backend does not fit its window")]
    QueueCountField {
        /// The device's label.
        device: String,
        /// The numbers.
        #[source]
        source: QueueCountMismatch,
    },
    /// Zone RAM has more regions than the backend takes.
    #[error(
        "Zone RAM has {regions} memory regions, but the backend takes at most {limit} \
         ({why}); use fewer `memory_region` entries for this zone"
    )]
    TooManyRegions {
        /// Regions of zone RAM.
        regions: usize,
        /// The backend's limit.
        limit: u64,
        /// Where the limit comes from.
        why: &'static str,
    },
    /// A restarted backend no longer offers features the guest acked.
    #[error("Restarted backend offers features {after:#x}, the guest acked some of {before:#x}")]
    FeaturesLost {
        /// Features of the old backend.
        before: u64,
        /// Features of the new one.
        after: u64,
    },
}

impl FrontendError {
    /// True when the connection to the backend broke (it died, or a hung round trip was cut
    /// off), not that the backend refused something: a restore that fails this way is worth
    /// another backend.
    pub fn connection_lost(&self) -> bool {
        use vhost::vhost_user::Error as Protocol;
        match self {
            Self::Disconnected => true,
            Self::Request {
                source: vhost::Error::VhostUserProtocol(e),
                ..
            }
            | Self::HungUpAtQueueSize {
                source: vhost::Error::VhostUserProtocol(e),
                ..
            } => matches!(
                e,
                Protocol::PartialMessage
                    | Protocol::Disconnected
                    | Protocol::SocketBroken(_)
                    | Protocol::SocketError(_)
            ),
            _ => false,
        }
    }
}

fn request(request: &'static str) -> impl FnOnce(vhost::Error) -> FrontendError {
    move |source| FrontendError::Request { request, source }
}

/// Static facts about the device that the config gives.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// For logs.
    pub label: String,
    /// The virtio device id.
    pub device_id: u32,
    /// Number of virtqueues.
    pub num_queues: u16,
    /// QueueNumMax for every queue.
    pub queue_size: u16,
    /// Bytes of config space to fetch and expose.
    pub config_len: usize,
}

/// Waits up to `timeout` for `socket` to exist, then connects.
pub fn connect(
    socket: &Path,
    num_queues: u16,
    timeout: Duration,
) -> Result<Frontend, FrontendError> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        if socket.exists() {
            match Frontend::connect(socket, u64::from(num_queues)) {
                Ok(f) => return Ok(f),
                Err(source) if Instant::now() >= deadline => {
                    return Err(FrontendError::Connect {
                        socket: socket.to_path_buf(),
                        source,
                    })
                }
                Err(_) => {}
            }
        } else if Instant::now() >= deadline {
            return Err(FrontendError::SocketTimeout {
                socket: socket.to_path_buf(),
                timeout,
            });
        }
        // Polling the path is the only way to learn that another process created a socket.
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// The frontend's side of a backend restore. While one is under way the device is served
/// from cached state, and a guest that resets and re-activates it is told DRIVER_OK worked:
/// the activation waits for the restored backend, as QEMU's vhost-user-blk defers its start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Restore {
    /// The backend hung up and the event loop is bringing it back.
    under_way: bool,
    /// The guest activated the device while no backend ran. Its driver set the queues up
    /// afresh, so they start at 0: the used ring's memory may still hold an earlier
    /// driver's index.
    fresh_activation: bool,
    /// Config bytes the guest wrote while no backend ran, `[start, end)`, for the restored
    /// backend.
    unsent_config: Option<(usize, usize)>,
}

impl Restore {
    /// DRIVER_OK with no backend: true when the activation can wait for the restore (it is
    /// then marked fresh), false when there is nothing to wait for and it fails.
    fn defer_activation(&mut self) -> bool {
        self.fresh_activation |= self.under_way;
        self.under_way
    }

    /// Whether the restored backend resumes each queue at the guest's used index (it had
    /// been started before the crash) or starts it at 0 (a deferred, fresh activation).
    fn resumes_at_used_index(&self) -> bool {
        !self.fresh_activation
    }

    /// The queues run on a backend now; a later crash resumes them at the used index.
    fn queues_started(&mut self) {
        self.fresh_activation = false;
    }

    /// The guest reset the device: no activation is pending any more.
    fn device_reset(&mut self) {
        self.fresh_activation = false;
    }

    /// Records a config write of `[start, end)` for the restored backend.
    fn config_written(&mut self, start: usize, end: usize) {
        self.unsent_config = Some(match self.unsent_config {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }
}

/// One device's vhost-user frontend.
pub struct VhostUserDevice {
    spec: DeviceSpec,
    frontend: Frontend,
    memory: GuestMemoryMmap,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    backend_req: Option<FrontendReqHandler<ConfigChanged>>,
    config_changed: Arc<ConfigChanged>,
    started: Vec<bool>,
    activated: bool,
    features_sent: bool,
    disconnected: bool,
    acked_features: u64,
    active_queues: Vec<QueueConfig>,
    /// A warning that the mapping check could not be made was logged (once is enough).
    maps_warned: bool,
    restore: Restore,
    /// Guest writes to config bytes that are not writable, for a rate-limited warning.
    read_only_writes: RateLimited,
    /// Zone RAM went to this connection by ADD_MEM_REG (more regions than SET_MEM_TABLE's).
    mem_regions_added: bool,
}

impl std::fmt::Debug for VhostUserDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostUserDevice")
            .field("spec", &self.spec)
            .field("backend_features", &self.backend_features)
            .field("protocol", &self.protocol)
            .field("started", &self.started)
            .field("activated", &self.activated)
            .field("disconnected", &self.disconnected)
            .field("restore", &self.restore)
            .finish_non_exhaustive()
    }
}

/// What start-up negotiation learned from a backend.
struct Negotiated {
    frontend: Frontend,
    backend_features: u64,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    backend_req: Option<FrontendReqHandler<ConfigChanged>>,
}

/// The backend's config space, `spec.config_len` bytes of it, with its queue count made
/// the window's.
fn read_config_space(
    frontend: &Frontend,
    spec: &DeviceSpec,
    backend_features: u64,
) -> Result<Vec<u8>, FrontendError> {
    // SAFETY: the raw fd belongs to `frontend`, which outlives the borrow.
    let socket = unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) };
    let mut config = config_space::get_config(socket, spec.config_len).map_err(|source| {
        FrontendError::GetConfig {
            device: spec.label.clone(),
            source,
        }
    })?;
    config_space::reconcile_queue_count(
        spec.device_id,
        config_space::guest_features(spec.device_id, spec.num_queues, backend_features),
        spec.num_queues,
        &mut config,
    )
    .map_err(|source| FrontendError::QueueCountField {
        device: spec.label.clone(),
        source,
    })?;
    Ok(config)
}

/// SET_OWNER, features, protocol features, queue count, config space and the
/// backend-to-frontend channel: everything that needs no guest state.
fn negotiate(
    spec: &DeviceSpec,
    mut frontend: Frontend,
    config_changed: &Arc<ConfigChanged>,
    regions: usize,
) -> Result<Negotiated, FrontendError> {
    frontend.set_owner().map_err(request("SET_OWNER"))?;
    let backend_features = frontend.get_features().map_err(request("GET_FEATURES"))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(request("GET_PROTOCOL_FEATURES"))?;
        protocol = offered & wanted_protocol_features();
        frontend
            .set_protocol_features(protocol)
            .map_err(request("SET_PROTOCOL_FEATURES"))?;
        if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
    }
    let (limit, why) = if protocol.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS) {
        let slots = frontend
            .get_max_mem_slots()
            .map_err(request("GET_MAX_MEM_SLOTS"))?;
        (slots, "its GET_MAX_MEM_SLOTS")
    } else {
        (
            BASELINE_MEM_REGIONS as u64,
            "SET_MEM_TABLE's limit for a backend without CONFIGURE_MEM_SLOTS",
        )
    };
    if regions as u64 > limit {
        return Err(FrontendError::TooManyRegions {
            regions,
            limit,
            why,
        });
    }
    if protocol.contains(VhostUserProtocolFeatures::MQ) {
        let offered = frontend.get_queue_num().map_err(request("GET_QUEUE_NUM"))?;
        if offered < u64::from(spec.num_queues) {
            return Err(FrontendError::QueueCount {
                offered,
                wanted: spec.num_queues,
            });
        }
    }
    // vhost-user has no message that reports a backend's largest queue; a backend that
    // cannot take QueueNumMax refuses SET_VRING_NUM. Ask now, so a misconfigured size fails
    // at start-up with a clear error instead of at the guest's DRIVER_OK.
    // A backend that died meanwhile is a lost connection, not a refusal: the restore path
    // starts another backend for the first and gives up only on the second.
    for queue in 0..usize::from(spec.num_queues) {
        if let Err(e) = frontend.set_vring_num(queue, spec.queue_size) {
            let error = request("SET_VRING_NUM")(e);
            if error.connection_lost() {
                return Err(error);
            }
            return Err(FrontendError::QueueSizeRefused {
                queue,
                size: spec.queue_size,
            });
        }
    }
    // Without REPLY_ACK a refusal has no answer: rust-vmm's vhost-user-backend drops the
    // connection instead (vhost-device-scsi 0.1.0 takes at most 128). A request that does
    // have one finds that out here, where the error can name the size, rather than at
    // whatever comes next.
    if !protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) && spec.num_queues > 0 {
        frontend
            .get_features()
            .map_err(|source| FrontendError::HungUpAtQueueSize {
                size: spec.queue_size,
                source,
            })?;
    }
    let mut config = vec![0u8; spec.config_len];
    if protocol.contains(VhostUserProtocolFeatures::CONFIG) && spec.config_len > 0 {
        config = read_config_space(&frontend, spec, backend_features)?;
    }
    let mut backend_req = None;
    if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
        let mut handler = FrontendReqHandler::new(Arc::clone(config_changed))
            .map_err(|e| request("SET_BACKEND_REQ_FD")(vhost::Error::VhostUserProtocol(e)))?;
        handler.set_reply_ack_flag(protocol.contains(VhostUserProtocolFeatures::REPLY_ACK));
        frontend
            .set_backend_request_fd(&handler.get_tx_raw_fd())
            .map_err(request("SET_BACKEND_REQ_FD"))?;
        backend_req = Some(handler);
    }
    log::info!(
        "{}: backend features {:#x}, protocol features {:#x}, {} queues of {}",
        spec.label,
        backend_features,
        protocol.bits(),
        spec.num_queues,
        spec.queue_size
    );
    Ok(Negotiated {
        frontend,
        backend_features,
        protocol,
        config,
        backend_req,
    })
}

impl VhostUserDevice {
    /// Negotiates with a connected backend: SET_OWNER, features, protocol features, queue count
    /// and config space, which is cached for the guest's reads.
    pub fn new(
        spec: DeviceSpec,
        frontend: Frontend,
        memory: GuestMemoryMmap,
    ) -> Result<Self, FrontendError> {
        if let Err(error) = backend_maps::register_zone_memory(&memory) {
            log::warn!(
                "{}: cannot examine zone RAM's fds, so how backends map it is not checked: {error}",
                spec.label
            );
        }
        let config_changed = Arc::new(ConfigChanged::default());
        let n = negotiate(&spec, frontend, &config_changed, memory.num_regions())?;
        let queues = usize::from(spec.num_queues);
        let new_fd = || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(FrontendError::EventFd);
        let kicks = (0..queues)
            .map(|_| new_fd())
            .collect::<Result<Vec<_>, _>>()?;
        let calls = (0..queues)
            .map(|_| new_fd())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            spec,
            frontend: n.frontend,
            memory,
            backend_features: n.backend_features,
            protocol: n.protocol,
            config: n.config,
            kicks,
            calls,
            backend_req: n.backend_req,
            config_changed,
            started: vec![false; queues],
            activated: false,
            features_sent: false,
            disconnected: false,
            acked_features: 0,
            active_queues: Vec::new(),
            maps_warned: false,
            restore: Restore::default(),
            read_only_writes: RateLimited::new(),
            mem_regions_added: false,
        })
    }

    /// Takes a new connection to a restarted backend and replays the state the old one had:
    /// protocol features and config on connect, then, if the guest had activated the device,
    /// features, memory table and every started vring with its base at the guest's used
    /// index, and one kick per queue. Requests after that index are executed again, which is
    /// what a backend that completes each queue in order needs. An activation deferred during
    /// the restore starts its queues at 0 instead. Config bytes the guest wrote meanwhile are
    /// sent to the new backend first.
    pub fn reattach(&mut self, frontend: Frontend) -> Result<(), FrontendError> {
        let n = negotiate(
            &self.spec,
            frontend,
            &self.config_changed,
            self.memory.num_regions(),
        )?;
        self.mem_regions_added = false;
        let old_features = self.backend_features;
        self.frontend = n.frontend;
        self.backend_features = n.backend_features;
        self.protocol = n.protocol;
        self.backend_req = n.backend_req;
        let mut config = n.config;
        if let Some((start, end)) = self.restore.unsent_config.take() {
            // Only writable bytes were recorded, but the range may span others between them.
            for (s, e) in config_space::split_write(self.spec.device_id, start, end).0 {
                if let Some(written) = self.config.get(s..e).map(<[u8]>::to_vec) {
                    self.set_config(s, &written)?;
                    if let Some(fresh) = config.get_mut(s..e) {
                        fresh.copy_from_slice(&written);
                    }
                }
            }
        }
        if config != self.config {
            log::warn!(
                "{}: the restarted backend reports a different config",
                self.spec.label
            );
            self.config = config;
        }
        self.disconnected = false;
        if !self.activated {
            return Ok(());
        }
        let acked = self.acked_features;
        if acked & !n.backend_features & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            return Err(FrontendError::FeaturesLost {
                before: old_features,
                after: n.backend_features,
            });
        }
        let queues = std::mem::take(&mut self.active_queues);
        let resume = self.restore.resumes_at_used_index();
        let result = self.start_all(acked, &queues, resume);
        self.active_queues = queues;
        result?;
        if !resume {
            log::info!(
                "{}: deferred activation completed with features {:#x}",
                self.spec.label,
                acked
            );
        }
        self.restore.queues_started();
        Ok(())
    }

    /// The guest's used index of `queue`: where a restarted backend resumes.
    fn used_index(&self, queue: &QueueConfig) -> Result<u16, FrontendError> {
        self.memory
            .read_obj::<u16>(GuestAddress(queue.device + 2))
            .map_err(|_| FrontendError::BadRing {
                queue: queue.index,
                what: "used ring",
                addr: queue.device,
            })
    }

    /// The label used in logs.
    pub fn label(&self) -> &str {
        &self.spec.label
    }

    /// The kick eventfd of each queue, which the backend polls for the guest's notifies.
    pub fn kick_events(&self) -> impl Iterator<Item = &EventFd> {
        self.kicks.iter()
    }

    /// The call eventfd of each queue, which the backend writes for a used buffer.
    pub fn call_events(&self) -> impl Iterator<Item = &EventFd> {
        self.calls.iter()
    }

    /// The backend socket, to poll for hang-up.
    pub fn socket_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the raw fd belongs to `self.frontend`, which outlives the returned borrow.
        unsafe { BorrowedFd::borrow_raw(self.frontend.as_raw_fd()) }
    }

    /// The backend-to-frontend channel, to poll for config-change messages.
    pub fn backend_req_fd(&self) -> Option<BorrowedFd<'_>> {
        // SAFETY: the raw fd belongs to the handler in `self`, which outlives the borrow.
        self.backend_req
            .as_ref()
            .map(|h| unsafe { BorrowedFd::borrow_raw(h.as_raw_fd()) })
    }

    /// Serves one message of the backend-to-frontend channel. Returns true when the backend
    /// reported a config change, after the cached config has been re-read.
    pub fn handle_backend_request(&mut self) -> Result<bool, FrontendError> {
        let Some(handler) = self.backend_req.as_mut() else {
            return Ok(false);
        };
        if let Err(source) = handler.handle_request() {
            // The channel is gone or broken; stop listening on it.
            self.backend_req = None;
            return Err(FrontendError::Request {
                request: "backend request channel",
                source: vhost::Error::VhostUserProtocol(source),
            });
        }
        if !self.config_changed.0.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        self.refresh_config()?;
        Ok(true)
    }

    /// SET_CONFIG of writable bytes, with flags 0: the spec's "front-end" type. Flags 1
    /// (vhost's `WRITABLE`) means live migration in the spec, which backends may refuse.
    fn set_config(&mut self, offset: usize, data: &[u8]) -> Result<(), FrontendError> {
        self.frontend
            .set_config(offset as u32, VhostUserConfigFlags::empty(), data)
            .map_err(request("SET_CONFIG"))
    }

    fn refresh_config(&mut self) -> Result<(), FrontendError> {
        if self.config.is_empty() || !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(());
        }
        self.config = read_config_space(&self.frontend, &self.spec, self.backend_features)?;
        Ok(())
    }

    /// The backend hung up: a later activation fails unless a restore is under way (see
    /// [`Self::begin_restore`]).
    pub fn mark_disconnected(&mut self) {
        // `activated` and the saved queues stay: they are what a reconnect replays.
        self.disconnected = true;
        self.backend_req = None;
    }

    /// True once the backend hung up.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    /// The event loop is bringing the backend back: until [`Self::end_restore`], a DRIVER_OK
    /// waits for [`Self::reattach`] instead of failing, and config writes are kept for it.
    pub fn begin_restore(&mut self) {
        self.restore.under_way = true;
    }

    /// The restore is over, whether or not a backend came back.
    pub fn end_restore(&mut self) {
        self.restore.under_way = false;
    }

    fn memory_table(&self) -> Result<Vec<VhostUserMemoryRegionInfo>, FrontendError> {
        self.memory
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(FrontendError::MemoryRegion)
            })
            .collect()
    }

    /// The bridge's host address of `[gpa, gpa+len)`, which must lie in one region and be
    /// `align`-aligned: the backend maps the same regions and translates back.
    fn host_address(
        &self,
        queue: u16,
        what: &'static str,
        gpa: u64,
        len: u64,
        align: u64,
    ) -> Result<u64, FrontendError> {
        let bad = || FrontendError::BadRing {
            queue,
            what,
            addr: gpa,
        };
        if !gpa.is_multiple_of(align) {
            return Err(bad());
        }
        let region = self.memory.find_region(GuestAddress(gpa)).ok_or_else(bad)?;
        let offset = gpa - region.start_addr().0;
        if offset.checked_add(len).is_none_or(|end| end > region.len()) {
            return Err(bad());
        }
        let host = self
            .memory
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| bad())?;
        Ok(host as u64)
    }

    fn start_queue(&mut self, q: &QueueConfig, base: u16) -> Result<(), FrontendError> {
        let size = u64::from(q.size);
        let index = usize::from(q.index);
        let data = VringConfigData {
            queue_max_size: self.spec.queue_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: self.host_address(
                q.index,
                "descriptor table",
                q.desc,
                16 * size,
                16,
            )?,
            avail_ring_addr: self.host_address(
                q.index,
                "available ring",
                q.driver,
                6 + 2 * size,
                2,
            )?,
            used_ring_addr: self.host_address(q.index, "used ring", q.device, 6 + 8 * size, 4)?,
            log_addr: None,
        };
        let f = &mut self.frontend;
        f.set_vring_num(index, q.size)
            .map_err(request("SET_VRING_NUM"))?;
        f.set_vring_addr(index, &data)
            .map_err(request("SET_VRING_ADDR"))?;
        f.set_vring_base(index, base)
            .map_err(request("SET_VRING_BASE"))?;
        f.set_vring_call(index, &self.calls[index])
            .map_err(request("SET_VRING_CALL"))?;
        f.set_vring_kick(index, &self.kicks[index])
            .map_err(request("SET_VRING_KICK"))?;
        self.started[index] = true;
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            f.set_vring_enable(index, true)
                .map_err(request("SET_VRING_ENABLE"))?;
        }
        Ok(())
    }

    fn protocol_features_acked(&self) -> bool {
        self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    fn try_activate(&mut self, acked: u64, queues: &[QueueConfig]) -> Result<(), FrontendError> {
        if self.disconnected {
            if !self.restore.defer_activation() {
                return Err(FrontendError::Disconnected);
            }
            // What `reattach` replays; the transport sees a device that runs, and the kicks
            // wait in the eventfds the bridge owns.
            self.acked_features = acked;
            self.active_queues = queues.iter().filter(|q| q.ready).copied().collect();
            self.activated = true;
            return Ok(());
        }
        self.start_all(acked, queues, false)?;
        self.acked_features = acked;
        self.active_queues = queues.iter().filter(|q| q.ready).copied().collect();
        Ok(())
    }

    /// SET_FEATURES, SET_MEM_TABLE and every ready queue; `resume` takes each vring's base
    /// from the guest's used index (a restarted backend) instead of 0 (a fresh activation).
    fn start_all(
        &mut self,
        acked: u64,
        queues: &[QueueConfig],
        resume: bool,
    ) -> Result<(), FrontendError> {
        let mut features = acked & self.backend_features;
        if self.protocol_features_acked() {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(request("SET_FEATURES"))?;
        self.features_sent = true;
        let table = self.memory_table()?;
        if table.len() <= BASELINE_MEM_REGIONS {
            self.frontend
                .set_mem_table(&table)
                .map_err(request("SET_MEM_TABLE"))?;
        } else if !self.mem_regions_added {
            // Negotiation checked CONFIGURE_MEM_SLOTS and the slot count. Zone RAM never
            // changes, so a connection gets its regions once.
            for region in &table {
                self.frontend
                    .add_mem_region(region)
                    .map_err(request("ADD_MEM_REG"))?;
            }
            self.mem_regions_added = true;
        }
        self.started.iter_mut().for_each(|s| *s = false);
        self.check_backend_mappings()?;
        for q in queues.iter().filter(|q| q.ready) {
            let base = if resume { self.used_index(q)? } else { 0 };
            self.start_queue(q, base)?;
        }
        self.activated = true;
        // Without REPLY_ACK nothing says the backend has applied SET_VRING_ENABLE yet, and
        // backends on vhost-user-backend before 0.24 drop a kick that finds the vring
        // disabled. A request with a reply orders the kicks after every message above.
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend
                .get_features()
                .map_err(request("GET_FEATURES"))?;
        }
        // Notifies may have arrived between DRIVER_OK (or the crash) and now; kick every
        // started queue once.
        for (kick, _) in self.kicks.iter().zip(&self.started).filter(|(_, s)| **s) {
            let _ = kick.write(1);
        }
        Ok(())
    }

    /// Refuses a backend that mapped more than zone RAM (see [`backend_maps`]), before any
    /// vring lets it touch guest memory. The backend must have applied SET_MEM_TABLE: with
    /// REPLY_ACK its reply says so, otherwise the reply to a later request does.
    fn check_backend_mappings(&mut self) -> Result<(), FrontendError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            self.frontend
                .get_features()
                .map_err(request("GET_FEATURES"))?;
        }
        let problem = match backend_maps::check_backend(self.socket_fd()) {
            Err(stray) => return Err(FrontendError::StrayMapping(stray)),
            Ok(Checked::Clean { pid, mappings: 0 }) => format!(
                "backend process {pid} shows no mapping of guest memory, so how it maps \
                 memory cannot be checked"
            ),
            Ok(Checked::Clean { pid, mappings }) => {
                log::info!(
                    "{}: backend process {pid} maps guest memory only inside zone RAM \
                     ({mappings} mappings)",
                    self.spec.label
                );
                return Ok(());
            }
            Ok(Checked::Skipped(error)) => {
                format!("cannot check how the backend maps guest memory: {error}")
            }
        };
        if !std::mem::replace(&mut self.maps_warned, true) {
            log::warn!("{}: {problem}", self.spec.label);
        }
        Ok(())
    }

    fn try_reset(&mut self) -> Result<(), FrontendError> {
        self.active_queues.clear();
        self.restore.device_reset();
        if self.disconnected {
            // Nothing to tell a backend that is gone; the next one starts from scratch.
            self.started.iter_mut().for_each(|s| *s = false);
            self.features_sent = false;
            self.activated = false;
            return Ok(());
        }
        for index in 0..self.started.len() {
            if !self.started[index] {
                continue;
            }
            self.started[index] = false;
            if self.protocol_features_acked() {
                self.frontend
                    .set_vring_enable(index, false)
                    .map_err(request("SET_VRING_ENABLE"))?;
            }
            self.frontend
                .get_vring_base(index)
                .map_err(request("GET_VRING_BASE"))?;
        }
        if self.features_sent
            && self
                .protocol
                .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(request("RESET_DEVICE"))?;
        }
        self.features_sent = false;
        self.activated = false;
        Ok(())
    }
}

impl VirtioBackend for VhostUserDevice {
    fn device_id(&self) -> u32 {
        self.spec.device_id
    }

    fn device_features(&self) -> u64 {
        config_space::guest_features(
            self.spec.device_id,
            self.spec.num_queues,
            self.backend_features,
        )
    }

    fn num_queues(&self) -> u16 {
        self.spec.num_queues
    }

    fn queue_max_size(&self, _queue: u16) -> u16 {
        self.spec.queue_size
    }

    fn config_len(&self) -> usize {
        self.config.len()
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        data.fill(0);
        if let Some(src) = self.config.get(offset..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        let end = offset
            .checked_add(data.len())
            .filter(|&e| e <= self.config.len());
        let Some(end) = end else {
            return Err(BackendError::new("config write beyond the config space"));
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(BackendError::new("backend has no CONFIG protocol feature"));
        }
        let (writable, ignored) = config_space::split_write(self.spec.device_id, offset, end);
        if ignored && self.read_only_writes.hit() {
            log::warn!(
                "{}: guest wrote config bytes {offset:#x}..{end:#x}, of which only {writable:x?} \
                 are writable; the rest is ignored ({} such writes)",
                self.spec.label,
                self.read_only_writes.count()
            );
        }
        if writable.is_empty() {
            return Ok(());
        }
        if self.disconnected && !self.restore.under_way {
            return Err(BackendError::from_error(FrontendError::Disconnected));
        }
        for (start, end) in writable {
            let bytes = &data[start - offset..end - offset];
            if self.disconnected {
                // Nothing to send to: the restored backend gets the bytes.
                self.restore.config_written(start, end);
            } else {
                self.set_config(start, bytes)
                    .map_err(BackendError::from_error)?;
            }
            self.config[start..end].copy_from_slice(bytes);
        }
        if !self.disconnected && config_space::write_changes_config(self.spec.device_id) {
            // What the driver reads next depends on what it wrote: ask the backend.
            self.refresh_config().map_err(BackendError::from_error)?;
        }
        Ok(())
    }

    fn activate(
        &mut self,
        acked_features: u64,
        queues: &[QueueConfig],
    ) -> Result<(), BackendError> {
        let started = Instant::now();
        self.try_activate(acked_features, queues)
            .map_err(BackendError::from_error)?;
        if self.disconnected {
            log::info!(
                "{}: DRIVER_OK while the backend is being restored; activation with features \
                 {:#x} deferred until it is back",
                self.spec.label,
                acked_features
            );
            return Ok(());
        }
        log::info!(
            "{}: activated with features {:#x} in {:?}",
            self.spec.label,
            acked_features,
            started.elapsed()
        );
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.try_reset().map_err(BackendError::from_error)?;
        log::info!("{}: reset", self.spec.label);
        Ok(())
    }

    fn notify(&mut self, queue: u16) {
        if let Some(kick) = self.kicks.get(usize::from(queue)) {
            // An eventfd write fails only when the counter would overflow; the backend has
            // then plenty of pending kicks already.
            let _ = kick.write(1);
        }
    }
}

#[cfg(test)]
#[path = "frontend_tests.rs"]
mod scripted;

#[cfg(test)]
mod tests {
    use super::Restore;

    #[test]
    fn an_activation_deferred_during_a_restore_starts_its_queues_at_0() {
        let mut restore = Restore {
            under_way: true,
            ..Restore::default()
        };
        assert!(restore.defer_activation());
        restore.under_way = false;
        assert!(!restore.resumes_at_used_index());
        // Once running on a backend, a later crash resumes where the guest left the queues.
        restore.queues_started();
        assert!(restore.resumes_at_used_index());
    }

    #[test]
    fn a_reset_while_an_activation_is_deferred_cancels_it() {
        let mut restore = Restore {
            under_way: true,
            ..Restore::default()
        };
        assert!(restore.defer_activation());
        restore.device_reset();
        assert!(restore.resumes_at_used_index());
    }

    #[test]
    fn an_activation_with_no_restore_under_way_is_not_deferred() {
        let mut restore = Restore::default();
        assert!(!restore.defer_activation());
        assert!(restore.resumes_at_used_index());
    }

    #[test]
    fn config_writes_during_a_restore_are_kept_as_one_range() {
        let mut restore = Restore::default();
        restore.config_written(0x20, 0x21);
        restore.config_written(0x10, 0x14);
        assert_eq!(restore.unsent_config, Some((0x10, 0x21)));
    }

    #[test]
    fn only_a_broken_connection_is_worth_another_backend() {
        use super::FrontendError;
        use vhost::vhost_user::Error as Protocol;
        let request = |e| FrontendError::Request {
            request: "GET_FEATURES",
            source: vhost::Error::VhostUserProtocol(e),
        };
        assert!(FrontendError::Disconnected.connection_lost());
        assert!(request(Protocol::PartialMessage).connection_lost());
        assert!(request(Protocol::SocketBroken(
            std::io::ErrorKind::ConnectionReset.into()
        ))
        .connection_lost());
        assert!(!request(Protocol::InvalidMessage).connection_lost());
        assert!(!FrontendError::QueueCount {
            offered: 1,
            wanted: 2
        }
        .connection_lost());
        assert!(!FrontendError::FeaturesLost {
            before: 1,
            after: 0
        }
        .connection_lost());
    }
}
