//! The control plane: every vhost-user round trip of a device runs on that device's own
//! worker thread, never on the ring thread.
//!
//! A backend can stop answering at any time (a bug, `SIGSTOP`, a full disk it waits on), and
//! hvisor's vCPUs spin while the ring thread owes them a reply. So the ring thread only ever
//! does bounded work: it answers register accesses from state it owns and hands each round
//! trip (activation, reset, config writes, config refresh, reattach) to the device's worker as
//! a [`ControlOp`]. The guest access that asked for it is answered when the worker reports
//! back; meanwhile the ring thread serves every other device. A round trip that outlives its
//! bound is cut off by shutting the socket down under the worker (see
//! [`DeviceHandle::cut_off_overdue`]); the event loop then treats the backend as hung up.
//!
//! [`DeviceHandle`] is what the transport drives on the ring thread: it answers from a
//! [`DeviceView`] the worker refreshes after each operation, writes kicks and reads calls on
//! eventfds it shares with the worker, and queues everything else.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::Frontend;
use vmm_sys_util::eventfd::EventFd;

use crate::frontend::{FrontendError, VhostUserDevice};
use crate::transport::{BackendError, QueueConfig, VirtioBackend};

/// Default bound of one control operation; see [`DeviceHandle::cut_off_overdue`].
pub const CONTROL_TIMEOUT_DEFAULT: Duration = Duration::from_secs(3);

/// Work for a device's control worker, carried out in the order it was queued.
pub enum ControlOp {
    /// The guest wrote DRIVER_OK.
    Activate {
        /// Features the guest acked.
        features: u64,
        /// Every queue's layout.
        queues: Vec<QueueConfig>,
    },
    /// The guest wrote Status=0 (or its zone went away).
    Reset,
    /// The guest wrote config space.
    WriteConfig {
        /// Offset in config space.
        offset: usize,
        /// The bytes.
        data: Vec<u8>,
    },
    /// The backend-to-frontend channel is readable.
    BackendRequest,
    /// The backend hung up.
    MarkDisconnected,
    /// The event loop is bringing the backend back.
    BeginRestore,
    /// The restore is over, whether or not a backend came back.
    EndRestore,
    /// A connection to the restored backend.
    Reattach(Frontend),
}

impl std::fmt::Debug for ControlOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kind().name())
    }
}

impl ControlOp {
    fn kind(&self) -> OpKind {
        match self {
            Self::Activate { .. } => OpKind::Activate,
            Self::Reset => OpKind::Reset,
            Self::WriteConfig { .. } => OpKind::WriteConfig,
            Self::BackendRequest => OpKind::BackendRequest,
            Self::MarkDisconnected | Self::BeginRestore | Self::EndRestore => OpKind::Bookkeeping,
            Self::Reattach(_) => OpKind::Reattach,
        }
    }
}

/// Which operation a [`ControlDone`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// [`ControlOp::Activate`].
    Activate,
    /// [`ControlOp::Reset`].
    Reset,
    /// [`ControlOp::WriteConfig`].
    WriteConfig,
    /// [`ControlOp::BackendRequest`].
    BackendRequest,
    /// Restore bookkeeping: no round trip.
    Bookkeeping,
    /// [`ControlOp::Reattach`].
    Reattach,
}

impl OpKind {
    /// Whether the guest access that queued it waits for it: the guest must not see a reset
    /// complete while the backend may still touch its rings, nor read config (or Status)
    /// that the operation is about to change.
    fn holds_the_guest(self) -> bool {
        matches!(self, Self::Activate | Self::Reset | Self::WriteConfig)
    }

    /// For logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Activate => "activation",
            Self::Reset => "reset",
            Self::WriteConfig => "config write",
            Self::BackendRequest => "config refresh",
            Self::Bookkeeping => "restore bookkeeping",
            Self::Reattach => "reattach",
        }
    }
}

/// How an operation ended.
#[derive(Debug)]
pub enum Outcome {
    /// Done; for [`OpKind::BackendRequest`], whether the backend reported a config change.
    Done {
        /// The backend reported a config change (config already re-read).
        config_changed: bool,
    },
    /// Failed. `connection_lost`: the connection broke (the backend died or was cut off),
    /// rather than the backend refusing something.
    Failed {
        /// The error and its sources on one line.
        error: String,
        /// See above.
        connection_lost: bool,
    },
}

/// A worker's report of one finished operation.
#[derive(Debug)]
pub struct ControlDone {
    /// The device's index in the event loop.
    pub index: usize,
    /// What finished.
    pub kind: OpKind,
    /// How.
    pub outcome: Outcome,
    /// The backend-to-frontend channel after the operation, when it changed: a new one after
    /// a reattach, or none after it broke. `None`: unchanged.
    pub backend_req: Option<Option<OwnedFd>>,
    /// The device has a live connection after the operation: for a reattach that failed
    /// after negotiating (the backend lost features, say), the new connection stays, and is
    /// watched, so that the guest's reset can use it.
    pub connected: bool,
}

/// What the ring thread reads of a device between operations.
#[derive(Debug, Clone, Default)]
struct DeviceView {
    device_features: u64,
    config: Vec<u8>,
}

impl DeviceView {
    fn of(device: &VhostUserDevice) -> Self {
        let mut config = vec![0u8; device.config_len()];
        device.read_config(0, &mut config);
        Self {
            device_features: device.device_features(),
            config,
        }
    }
}

/// A device's queued, not yet reported operations, oldest first (the worker carries them out
/// in order), with when each was queued.
#[derive(Debug, Default)]
struct InFlight {
    ops: VecDeque<(OpKind, Instant)>,
    /// The connection was shut down to cut off a hung round trip: the operations behind it
    /// fail at once, and the next deadline is the next connection's.
    cut_off: bool,
}

impl InFlight {
    fn queued(&mut self, kind: OpKind, at: Instant) {
        self.ops.push_back((kind, at));
    }

    fn completed(&mut self) {
        self.ops.pop_front();
    }

    fn new_connection(&mut self) {
        self.cut_off = false;
    }

    fn any(&self) -> bool {
        !self.ops.is_empty()
    }

    fn holds_the_guest(&self) -> bool {
        self.ops.iter().any(|(kind, _)| kind.holds_the_guest())
    }

    /// The oldest operation's deadline: the ones behind it wait for it, so theirs start
    /// counting when it is done.
    fn deadline(&self, bound: Duration) -> Option<Instant> {
        if self.cut_off {
            return None;
        }
        self.ops.front().map(|(_, queued)| *queued + bound)
    }

    /// The oldest operation when it outlived `bound`, once per connection.
    fn overdue(&mut self, now: Instant, bound: Duration) -> Option<OpKind> {
        if now < self.deadline(bound)? {
            return None;
        }
        self.cut_off = true;
        self.ops.front().map(|(kind, _)| *kind)
    }
}

/// The ring thread's side of one device: see the module documentation.
pub struct DeviceHandle {
    label: String,
    device_id: u32,
    num_queues: u16,
    queue_size: u16,
    view: Arc<Mutex<DeviceView>>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// The current connection (a duplicate of the worker's): watched for hang-up, and shut
    /// down to cut off a round trip that outlives its bound.
    socket: Option<OwnedFd>,
    /// The backend-to-frontend channel (a duplicate), watched for config-change messages.
    backend_req: Option<OwnedFd>,
    disconnected: bool,
    in_flight: InFlight,
    /// The device before [`Self::start_worker`] moves it to its thread.
    device: Option<VhostUserDevice>,
    ops: Option<Sender<ControlOp>>,
    worker: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for DeviceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceHandle")
            .field("label", &self.label)
            .field("disconnected", &self.disconnected)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl DeviceHandle {
    /// Wraps a negotiated device; its worker starts with [`Self::start_worker`].
    pub fn new(device: VhostUserDevice) -> Result<Self, FrontendError> {
        let dup = |fd: BorrowedFd<'_>| fd.try_clone_to_owned().map_err(FrontendError::EventFd);
        let dup_events = |events: &mut dyn Iterator<Item = &EventFd>| {
            events
                .map(|e| dup_event(e).map_err(FrontendError::EventFd))
                .collect::<Result<Vec<_>, _>>()
        };
        let kicks = dup_events(&mut device.kick_events())?;
        let calls = dup_events(&mut device.call_events())?;
        let socket = Some(dup(device.socket_fd())?);
        let backend_req = device.backend_req_fd().map(dup).transpose()?;
        Ok(Self {
            label: device.label().to_string(),
            device_id: device.device_id(),
            num_queues: device.num_queues(),
            queue_size: device.queue_max_size(0),
            view: Arc::new(Mutex::new(DeviceView::of(&device))),
            kicks,
            calls,
            socket,
            backend_req,
            disconnected: false,
            in_flight: InFlight::default(),
            device: Some(device),
            ops: None,
            worker: None,
        })
    }

    /// Moves the device to its worker thread, which reports each finished operation on
    /// `done` and then writes `wake`.
    pub fn start_worker(
        &mut self,
        index: usize,
        done: Sender<ControlDone>,
        wake: &EventFd,
    ) -> std::io::Result<()> {
        let Some(device) = self.device.take() else {
            return Ok(());
        };
        let (tx, rx) = channel();
        let wake = dup_event(wake)?;
        let view = Arc::clone(&self.view);
        let worker = std::thread::Builder::new()
            .name(format!("control-{index}"))
            .spawn(move || serve(index, device, &rx, &done, &wake, &view))?;
        self.ops = Some(tx);
        self.worker = Some(worker);
        Ok(())
    }

    /// The label used in logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The call eventfd of each queue, to poll for used-buffer notifications.
    pub fn call_fds(&self) -> impl Iterator<Item = BorrowedFd<'_>> {
        // SAFETY: each raw fd belongs to an EventFd in `self.calls`, which outlives the borrow.
        self.calls
            .iter()
            .map(|c| unsafe { BorrowedFd::borrow_raw(c.as_raw_fd()) })
    }

    /// Reads (and clears) queue `queue`'s call eventfd; true if it had fired.
    pub fn take_call(&self, queue: usize) -> bool {
        self.calls.get(queue).is_some_and(|c| c.read().is_ok())
    }

    /// The backend socket, to poll for hang-up; none once it hung up.
    pub fn socket_fd(&self) -> Option<BorrowedFd<'_>> {
        self.socket.as_ref().map(|s| s.as_fd())
    }

    /// The backend-to-frontend channel, to poll for config-change messages.
    pub fn backend_req_fd(&self) -> Option<BorrowedFd<'_>> {
        self.backend_req.as_ref().map(|s| s.as_fd())
    }

    /// True once the backend hung up, until a reattach succeeds.
    pub fn is_disconnected(&self) -> bool {
        self.disconnected
    }

    /// Queues `op` for the worker.
    pub fn queue(&mut self, op: ControlOp) {
        let kind = op.kind();
        match &op {
            ControlOp::MarkDisconnected => {
                self.disconnected = true;
                self.socket = None;
                self.backend_req = None;
            }
            // The new connection is the one to cut off if its replay hangs; it is watched for
            // hang-up once the replay succeeds.
            ControlOp::Reattach(frontend) => {
                // SAFETY: the fd belongs to `frontend`, alive for this borrow; the duplicate is
                // our own.
                let fd = unsafe { BorrowedFd::borrow_raw(frontend.as_raw_fd()) };
                self.socket = fd.try_clone_to_owned().ok();
                self.in_flight.new_connection();
            }
            _ => {}
        }
        let sent = self.ops.as_ref().is_some_and(|ops| ops.send(op).is_ok());
        if sent {
            self.in_flight.queued(kind, Instant::now());
        } else {
            log::error!(
                "{}: the control worker is gone; {} dropped",
                self.label,
                kind.name()
            );
        }
    }

    /// A report arrived: the oldest operation is done. Applies what the ring thread keeps of
    /// it (the channel fds, the connection state).
    pub fn complete(&mut self, done: &mut ControlDone) {
        self.in_flight.completed();
        if let Some(backend_req) = done.backend_req.take() {
            self.backend_req = backend_req;
        }
        if done.kind == OpKind::Reattach {
            self.disconnected = !done.connected;
            if self.disconnected {
                self.socket = None;
            }
        }
    }

    /// Whether an operation the guest waits for is queued or running.
    pub fn holds_the_guest(&self) -> bool {
        self.in_flight.holds_the_guest()
    }

    /// When the oldest operation outlives `bound`, if one runs and has not been cut off.
    pub fn deadline(&self, bound: Duration) -> Option<Instant> {
        self.in_flight.deadline(bound)
    }

    /// Cuts off a round trip that has run longer than `bound`: shutting the socket down
    /// makes the worker's blocked send or receive fail at once (vhost's frontend retries a
    /// timed-out socket call forever, so a socket timeout cannot do this), and the loop sees
    /// the hang-up on the same socket. Returns the operation cut off, once per connection.
    pub fn cut_off_overdue(&mut self, now: Instant, bound: Duration) -> Option<OpKind> {
        let socket = self.socket.as_ref()?;
        let kind = self.in_flight.overdue(now, bound)?;
        // SAFETY: shutdown(2) on a socket fd we own; it touches no memory.
        unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        Some(kind)
    }

    fn view(&self) -> MutexGuard<'_, DeviceView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for DeviceHandle {
    fn drop(&mut self) {
        // The worker ends once its queue is closed and drained; one stuck in a round trip is
        // cut off first, so that stopping the bridge never waits on a hung backend.
        self.ops = None;
        if self.in_flight.any() {
            if let Some(socket) = &self.socket {
                // SAFETY: shutdown(2) on a socket fd we own; it touches no memory.
                unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl VirtioBackend for DeviceHandle {
    fn device_id(&self) -> u32 {
        self.device_id
    }

    fn device_features(&self) -> u64 {
        self.view().device_features
    }

    fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn queue_max_size(&self, _queue: u16) -> u16 {
        self.queue_size
    }

    fn config_len(&self) -> usize {
        self.view().config.len()
    }

    fn read_config(&self, offset: usize, data: &mut [u8]) {
        data.fill(0);
        if let Some(src) = self.view().config.get(offset..) {
            let n = src.len().min(data.len());
            data[..n].copy_from_slice(&src[..n]);
        }
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) -> Result<(), BackendError> {
        self.queue(ControlOp::WriteConfig {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn activate(&mut self, features: u64, queues: &[QueueConfig]) -> Result<(), BackendError> {
        self.queue(ControlOp::Activate {
            features,
            queues: queues.to_vec(),
        });
        Ok(())
    }

    fn reset(&mut self) -> Result<(), BackendError> {
        self.queue(ControlOp::Reset);
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

/// The worker: carries out each operation, refreshes the view, reports.
fn serve(
    index: usize,
    mut device: VhostUserDevice,
    ops: &Receiver<ControlOp>,
    done: &Sender<ControlDone>,
    wake: &EventFd,
    view: &Mutex<DeviceView>,
) {
    while let Ok(op) = ops.recv() {
        let kind = op.kind();
        let had_channel = device.backend_req_fd().is_some();
        let mut outcome = carry_out(&mut device, op);
        let after = DeviceView::of(&device);
        // A restored backend that reports other config than its predecessor is a config
        // change the guest must be told of, as if the backend had sent one.
        if let (OpKind::Reattach, Outcome::Done { config_changed }) = (kind, &mut outcome) {
            *config_changed = view.lock().unwrap_or_else(|p| p.into_inner()).config != after.config;
        }
        *view.lock().unwrap_or_else(|p| p.into_inner()) = after;
        let connected = !device.is_disconnected();
        let channel = device.backend_req_fd();
        let backend_req = if kind == OpKind::Reattach && connected {
            Some(channel.and_then(|fd| fd.try_clone_to_owned().ok()))
        } else if had_channel && channel.is_none() {
            Some(None)
        } else {
            None
        };
        let report = ControlDone {
            index,
            kind,
            outcome,
            backend_req,
            connected,
        };
        if done.send(report).is_err() {
            return;
        }
        let _ = wake.write(1);
    }
}

fn carry_out(device: &mut VhostUserDevice, op: ControlOp) -> Outcome {
    let done = |config_changed| Outcome::Done { config_changed };
    let backend_error = |e: BackendError| Outcome::Failed {
        connection_lost: match &e {
            BackendError::Failed(source) => source
                .downcast_ref::<FrontendError>()
                .is_some_and(FrontendError::connection_lost),
            BackendError::Refused(_) => false,
        },
        error: error_chain(&e),
    };
    match op {
        ControlOp::Activate { features, queues } => device
            .activate(features, &queues)
            .map_or_else(backend_error, |()| done(false)),
        ControlOp::Reset => device.reset().map_or_else(backend_error, |()| done(false)),
        ControlOp::WriteConfig { offset, data } => device
            .write_config(offset, &data)
            .map_or_else(backend_error, |()| done(false)),
        ControlOp::BackendRequest => device
            .handle_backend_request()
            .map_or_else(|e| frontend_error(&e), done),
        ControlOp::MarkDisconnected => {
            device.mark_disconnected();
            done(false)
        }
        ControlOp::BeginRestore => {
            device.begin_restore();
            done(false)
        }
        ControlOp::EndRestore => {
            device.end_restore();
            done(false)
        }
        ControlOp::Reattach(frontend) => device
            .reattach(frontend)
            .map_or_else(|e| frontend_error(&e), |()| done(false)),
    }
}

fn frontend_error(e: &FrontendError) -> Outcome {
    Outcome::Failed {
        connection_lost: e.connection_lost(),
        error: error_chain(e),
    }
}

/// Bounds a round trip made outside a control worker (a device's negotiation at start-up):
/// unless disarmed within the bound, it shuts the socket down under the caller, whose blocked
/// call then fails at once, as [`DeviceHandle::cut_off_overdue`] does for the workers.
#[derive(Debug)]
pub struct Watchdog {
    disarm: Option<Sender<()>>,
    thread: Option<JoinHandle<bool>>,
}

impl Watchdog {
    /// Watches `socket` for `bound`.
    pub fn arm(socket: BorrowedFd<'_>, bound: Duration) -> std::io::Result<Self> {
        let socket = socket.try_clone_to_owned()?;
        let (disarm, armed) = channel::<()>();
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let fired = matches!(
                    armed.recv_timeout(bound),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                );
                if fired {
                    // SAFETY: shutdown(2) on a socket fd we own; it touches no memory.
                    unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
                }
                fired
            })?;
        Ok(Self {
            disarm: Some(disarm),
            thread: Some(thread),
        })
    }

    /// Stops watching; true when the bound had passed and the socket was shut down.
    pub fn disarm(mut self) -> bool {
        self.stop()
    }

    fn stop(&mut self) -> bool {
        // Closing the channel wakes the thread at once.
        self.disarm = None;
        self.thread
            .take()
            .is_some_and(|thread| thread.join().unwrap_or(false))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A duplicate of `event` that is close-on-exec, unlike `EventFd::try_clone`'s: a backend
/// spawned later must not inherit it.
pub fn dup_event(event: &EventFd) -> std::io::Result<EventFd> {
    // SAFETY: the raw fd belongs to `event`, alive for this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(event.as_raw_fd()) }.try_clone_to_owned()?;
    // SAFETY: `fd` is a fresh, owned eventfd descriptor (a duplicate of one), handed over.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOUND: Duration = Duration::from_secs(3);

    #[test]
    fn guest_visible_operations_hold_the_guest_until_reported() {
        let mut ops = InFlight::default();
        let t0 = Instant::now();
        ops.queued(OpKind::BackendRequest, t0);
        ops.queued(OpKind::Bookkeeping, t0);
        assert!(
            !ops.holds_the_guest(),
            "no guest access waits for a refresh"
        );
        ops.queued(OpKind::Reset, t0);
        assert!(ops.holds_the_guest());
        ops.completed();
        ops.completed();
        assert!(ops.holds_the_guest(), "the reset is still running");
        ops.completed();
        assert!(!ops.holds_the_guest());
        assert!(!ops.any());
        for kind in [OpKind::Activate, OpKind::WriteConfig] {
            ops.queued(kind, t0);
            assert!(ops.holds_the_guest(), "{kind:?}");
            ops.completed();
        }
    }

    #[test]
    fn the_deadline_is_the_oldest_operations() {
        let mut ops = InFlight::default();
        let t0 = Instant::now();
        assert_eq!(ops.deadline(BOUND), None);
        ops.queued(OpKind::Activate, t0);
        ops.queued(OpKind::WriteConfig, t0 + Duration::from_secs(1));
        assert_eq!(ops.deadline(BOUND), Some(t0 + BOUND));
        ops.completed();
        assert_eq!(
            ops.deadline(BOUND),
            Some(t0 + Duration::from_secs(1) + BOUND)
        );
    }

    #[test]
    fn an_overdue_operation_is_cut_off_once_per_connection() {
        let mut ops = InFlight::default();
        let t0 = Instant::now();
        ops.queued(OpKind::Reset, t0);
        assert_eq!(
            ops.overdue(t0 + BOUND - Duration::from_millis(1), BOUND),
            None
        );
        assert_eq!(ops.overdue(t0 + BOUND, BOUND), Some(OpKind::Reset));
        // The connection is shut down: nothing more to cut off, and no deadline to wake for.
        assert_eq!(ops.overdue(t0 + 2 * BOUND, BOUND), None);
        assert_eq!(ops.deadline(BOUND), None);
        // A reattach brings a new connection, whose replay is bounded again.
        ops.completed();
        ops.new_connection();
        ops.queued(OpKind::Reattach, t0 + 2 * BOUND);
        assert_eq!(ops.overdue(t0 + 3 * BOUND, BOUND), Some(OpKind::Reattach));
    }

    #[test]
    fn a_watchdog_cuts_off_a_round_trip_that_outlives_its_bound() {
        use std::io::Read;
        let (mut ours, _backend) = std::os::unix::net::UnixStream::pair().unwrap();
        let watchdog = Watchdog::arm(ours.as_fd(), Duration::from_millis(50)).unwrap();
        // A backend that never answers: the read returns (end of file) once the watchdog
        // fires, instead of blocking for ever.
        assert_eq!(ours.read(&mut [0u8; 1]).unwrap(), 0);
        assert!(watchdog.disarm());

        let (ours, _backend) = std::os::unix::net::UnixStream::pair().unwrap();
        let watchdog = Watchdog::arm(ours.as_fd(), Duration::from_secs(3600)).unwrap();
        assert!(!watchdog.disarm(), "disarmed in time: nothing shut down");
    }
}
