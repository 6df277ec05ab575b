//! The ring thread: it consumes the HSM request ring, answers register accesses from each
//! device's transport, turns call eventfds into guest interrupts and watches the backend
//! sockets. It never waits on a backend: every vhost-user round trip runs on the device's
//! control worker ([`crate::control`]), and a guest access that depends on one is answered
//! when the worker reports back, while every other device goes on being served.

use std::collections::{BTreeSet, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvisor_hsm::{DeviceReq, Hsm};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::control::{ControlDone, ControlOp, DeviceHandle, CONTROL_TIMEOUT_DEFAULT};
use crate::irq;
use crate::ratelimit::RateLimited;
use crate::reconnect::{Cancel, Reconnect, Reconnected};
use crate::supervisor::SpawnedBackend;
use crate::transport::MmioTransport;

mod backend_events;
mod status;

/// Epoll tokens: fixed ones first, then one per device fd.
const TOKEN_WAKEUP: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_HSM_CONTROL: u64 = 2;
const TOKEN_RECONNECT: u64 = 3;
const TOKEN_CONTROL: u64 = 4;
const TOKEN_STATUS: u64 = 5;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;
/// Within a device's token space: queue `q` call fd is `q`, the socket and the
/// backend-to-frontend channel are these.
const DEVICE_SOCKET_SLOT: u64 = 0xffff;
const DEVICE_BACKEND_REQ_SLOT: u64 = 0xfffe;

/// A backend socket is watched for hang-up only.
const SOCKET_EVENTS: EventSet = EventSet::READ_HANG_UP.union(EventSet::HANG_UP);
/// The backend-to-frontend channel fires once, then waits until the control worker has read
/// the message: level-triggered, it would fire on every loop until then.
const BACKEND_REQ_EVENTS: EventSet = EventSet::IN.union(EventSet::ONE_SHOT);

/// How many empty ring polls between looks at the other fds while spinning.
const POLLS_PER_EPOLL: u32 = 32;

/// Default [`LoopOptions::await_spin`], in microseconds.
pub const AWAIT_SPIN_DEFAULT_US: u64 = 2_000;

/// Default [`LoopOptions::spin_max`], in microseconds.
pub const SPIN_MAX_DEFAULT_US: u64 = 1_000;

/// Upper bounds, in microseconds, of the [`LoopStats::ack_gaps`] buckets; the last bucket
/// takes the rest.
pub const ACK_GAP_BOUNDS_US: [u64; 7] = [100, 250, 500, 1_000, 2_000, 4_000, 8_000];

/// Whether `fd` polls readable at once.
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    let mut pollfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call's duration; a zero timeout never blocks.
    let ret = unsafe { libc::poll(&mut pollfd, 1, 0) };
    ret > 0 && pollfd.revents & libc::POLLIN != 0
}

/// The spin window of [`LoopOptions::spin_max`], in the manner of KVM's halt polling.
#[derive(Debug, Clone, Copy)]
struct AdaptiveSpin {
    window: Duration,
    min: Duration,
    max: Duration,
}

impl AdaptiveSpin {
    /// A spin of `min` (zero: never spin, and never widen) that may widen up to `max`.
    fn new(min: Duration, max: Duration) -> Self {
        let max = if min.is_zero() { min } else { max.max(min) };
        Self {
            window: min,
            min,
            max,
        }
    }

    /// How long to poll after the last activity before sleeping.
    fn window(&self) -> Duration {
        self.window
    }

    /// A sleep of `slept` ended, with work (`woken`) or by a timeout.
    fn slept(&mut self, slept: Duration, woken: bool) {
        if slept > self.max {
            self.window = (self.window / 2).max(self.min);
        } else if woken {
            // `window` is at least `min`, which is not zero whenever `max` is not.
            self.window = (self.window * 2).min(self.max);
        }
    }
}

/// Event-loop tuning.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// Keep polling the ring this long after the last activity before sleeping.
    pub spin: Duration,
    /// Widen the spin up to this, adaptively: doubled (from [`LoopOptions::spin`]) after a
    /// sleep that work ended within this bound, which a wider spin would have caught
    /// without a wakeup; halved after a sleep longer than it. Zero, or a zero `spin`: the
    /// spin stays fixed.
    pub spin_max: Duration,
    /// Keep polling this long after an event whose answer is certain to follow: a
    /// QueueNotify the backend has not answered with a used-buffer signal yet, or an
    /// injection the guest has not ACKed yet (its InterruptStatus read and InterruptACK come
    /// next). Each of those that finds the bridge asleep pays a full wakeup, and for the
    /// guest's accesses a vCPU of the guest spins on the reply meanwhile.
    pub await_spin: Duration,
    /// Sleep at most this long: the guard against a wakeup the hypervisor never sends.
    pub guard_timeout: Duration,
    /// Ask the hypervisor which zones run at most this often, and only when idle: hvisor
    /// does not tell the daemon that a zone shut down. `None`: never ask.
    pub zone_poll: Option<Duration>,
    /// Inject an asserted line again when its backend signals once more (at most once per
    /// batch of events), and when the guest has not ACKed it this long after the last
    /// injection: hvisor drops an injection that finds the IRQ active in the guest (see
    /// [`crate::irq`]). `None`: inject once per assertion (enough for a simulator that
    /// delivers every injection).
    pub reinject: Option<Duration>,
    /// Bound of one control operation (a vhost-user round trip or a few): past it the
    /// backend is treated as hung, its device alone gets DEVICE_NEEDS_RESET, and the
    /// reconnect path takes over.
    pub control_timeout: Duration,
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(50),
            spin_max: Duration::from_micros(SPIN_MAX_DEFAULT_US),
            await_spin: Duration::from_micros(AWAIT_SPIN_DEFAULT_US),
            guard_timeout: Duration::from_millis(100),
            zone_poll: Some(Duration::from_secs(1)),
            reinject: Some(Duration::from_millis(10)),
            control_timeout: CONTROL_TIMEOUT_DEFAULT,
        }
    }
}

/// One emulated virtio-mmio device.
#[derive(Debug)]
pub struct BridgeDevice {
    /// The zone that owns it.
    pub zone: u32,
    /// Guest-physical base of its registers.
    pub base: u64,
    /// Size of its register window.
    pub len: u64,
    /// The interrupt id injected into the guest.
    pub irq: u32,
    /// The register state machine over the device's control handle.
    pub transport: MmioTransport<DeviceHandle>,
    /// An interrupt is owed but the zone was at hvisor's pending limit.
    deferred: bool,
    /// The backend signalled while the line was asserted: inject it again once this batch
    /// of events is handled.
    reinject_owed: bool,
    /// When the line was last injected (the re-injection timer counts from here).
    last_injection: Instant,
    /// An injection found the result ring full: tried again every [`irq::INJECTION_RETRY`].
    injection_failed: bool,
    /// When the guest last wrote QueueNotify, until the backend signals a used buffer: its
    /// answer is on the way.
    kicked_at: Option<Instant>,
    /// This device's share of [`LoopStats::notify_to_call`], for the status socket.
    notify_to_call: RoundTrips,
    /// How to bring the backend back; `None` fails the device on hang-up instead.
    reconnect: Option<Reconnect>,
    /// The backend process, when the bridge started it.
    process: Option<SpawnedBackend>,
    reconnecting: bool,
    /// A round trip outlived the control timeout: the backend is stopped hard when it is
    /// replaced (it may never run again to handle a polite SIGTERM).
    hung: bool,
    /// The guest access whose reply waits for the control worker.
    waiting: Option<DeviceReq>,
    /// Later accesses to this device, answered in order once `waiting` is.
    held: VecDeque<DeviceReq>,
}

impl BridgeDevice {
    /// A device at `[base, base+len)` of `zone`.
    pub fn new(
        zone: u32,
        base: u64,
        len: u64,
        irq: u32,
        transport: MmioTransport<DeviceHandle>,
    ) -> Self {
        Self {
            zone,
            base,
            len,
            irq,
            transport,
            deferred: false,
            reinject_owed: false,
            injection_failed: false,
            last_injection: Instant::now(),
            kicked_at: None,
            notify_to_call: RoundTrips::default(),
            reconnect: None,
            process: None,
            reconnecting: false,
            hung: false,
            waiting: None,
            held: VecDeque::new(),
        }
    }

    /// Keeps the backend process (stopped with the device) and the plan to restore it.
    pub fn with_backend(
        mut self,
        process: Option<SpawnedBackend>,
        reconnect: Option<Reconnect>,
    ) -> Self {
        self.process = process;
        self.reconnect = reconnect;
        self
    }

    fn contains(&self, zone: u32, address: u64) -> bool {
        self.zone == zone && address >= self.base && address - self.base < self.len
    }
}

/// Errors that stop the event loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// epoll failed.
    #[error("epoll failed")]
    Epoll(#[source] std::io::Error),
    /// A control worker thread could not be started.
    #[error("cannot start the control worker of {device}")]
    Worker {
        /// The device's label.
        device: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Counters, for logs, the status socket and benchmarks.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LoopStats {
    /// Requests taken from the ring.
    pub requests: u64,
    /// Interrupts pushed to the hypervisor.
    pub interrupts: u64,
    /// Asserted lines injected again (see [`LoopOptions::reinject`]).
    pub reinjections: u64,
    /// Times the loop went to sleep.
    pub sleeps: u64,
    /// Sleeps that ended by the guard timeout with requests pending (lost wakeups).
    pub guard_wakeups: u64,
    /// Backends brought back after a hang-up.
    pub reconnects: u64,
    /// Zones seen running and then gone, whose devices were reset.
    pub zone_resets: u64,
    /// Control operations cut off at the control timeout (hung backends).
    pub control_timeouts: u64,
    /// Time from an injection to the guest's InterruptACK, bucketed by
    /// [`ACK_GAP_BOUNDS_US`]: part of what [`LoopOptions::await_spin`] has to cover.
    pub ack_gaps: [u64; ACK_GAP_BOUNDS_US.len() + 1],
    /// From a QueueNotify to the backend's call that answers it, over every device: the
    /// backends' share of a request's round trip (their wakeup and service), beside the
    /// guest's share that [`LoopStats::ack_gaps`] shows.
    pub notify_to_call: RoundTrips,
}

/// Round trips counted and their durations summed, for a mean over any interval.
#[derive(Debug, Default, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundTrips {
    pub count: u64,
    pub total_us: u64,
}

impl RoundTrips {
    fn add(&mut self, took: Duration) {
        self.count += 1;
        self.total_us = self
            .total_us
            .saturating_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX));
    }
}

/// The bridge: devices plus the HSM, driven by [`Bridge::run`].
#[derive(Debug)]
pub struct Bridge {
    hsm: Arc<dyn Hsm>,
    devices: Vec<BridgeDevice>,
    epoll: Epoll,
    options: LoopOptions,
    stats: LoopStats,
    stop_fd: Option<RawFd>,
    hsm_gone: bool,
    reload_requested: bool,
    unknown_access: RateLimited,
    bad_request: RateLimited,
    /// Injections that found the result ring full.
    ring_full: RateLimited,
    reconnect_event: EventFd,
    reconnect_tx: Sender<Reconnected>,
    reconnect_rx: Receiver<Reconnected>,
    reconnect_threads: Vec<JoinHandle<()>>,
    cancel: Arc<Cancel>,
    /// Written by control workers after each report.
    control_event: EventFd,
    control_rx: Receiver<ControlDone>,
    /// A stop signal arrived: backends that go away now are not restarted.
    stopping: bool,
    /// When to ask the hypervisor about running zones next.
    next_zone_poll: Instant,
    /// Zones with devices that the hypervisor has reported running.
    seen_live: BTreeSet<u32>,
    /// Where the status snapshot is published (see [`crate::status`]).
    status: Option<Arc<crate::status::StatusBoard>>,
    status_published: Instant,
}

impl Drop for Bridge {
    fn drop(&mut self) {
        // Reconnect threads give up at once, and are waited for: a backend one of them just
        // restarted must be stopped with the others, not outlive the bridge.
        self.cancel.cancel();
        for thread in self.reconnect_threads.drain(..) {
            let _ = thread.join();
        }
        // Results nobody will use: dropping them stops their backend processes.
        while self.reconnect_rx.try_recv().is_ok() {}
    }
}

impl Bridge {
    /// Builds the loop. `stop` (an eventfd or signalfd), when readable, ends [`Bridge::run`];
    /// `hsm_control`, when it hangs up, means the hypervisor stand-in is gone.
    pub fn new(
        hsm: Arc<dyn Hsm>,
        mut devices: Vec<BridgeDevice>,
        options: LoopOptions,
        stop: Option<BorrowedFd<'_>>,
        hsm_control: Option<BorrowedFd<'_>>,
    ) -> Result<Self, LoopError> {
        let epoll = Epoll::new().map_err(LoopError::Epoll)?;
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(LoopError::Epoll)
        };
        add(hsm.wakeup_fd().as_raw_fd(), EventSet::IN, TOKEN_WAKEUP)?;
        if let Some(stop) = stop {
            add(stop.as_raw_fd(), EventSet::IN, TOKEN_STOP)?;
        }
        if let Some(control) = hsm_control {
            add(
                control.as_raw_fd(),
                EventSet::READ_HANG_UP | EventSet::HANG_UP,
                TOKEN_HSM_CONTROL,
            )?;
        }
        let reconnect_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(LoopError::Epoll)?;
        add(reconnect_event.as_raw_fd(), EventSet::IN, TOKEN_RECONNECT)?;
        let (reconnect_tx, reconnect_rx) = channel();
        let control_event = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(LoopError::Epoll)?;
        add(control_event.as_raw_fd(), EventSet::IN, TOKEN_CONTROL)?;
        let (control_tx, control_rx) = channel();
        for (i, dev) in devices.iter_mut().enumerate() {
            let handle = dev.transport.backend_mut();
            handle
                .start_worker(i, control_tx.clone(), &control_event)
                .map_err(|source| LoopError::Worker {
                    device: handle.label().to_string(),
                    source,
                })?;
            let base = TOKEN_DEVICE_BASE * (i as u64 + 1);
            for (q, fd) in handle.call_fds().enumerate() {
                add(fd.as_raw_fd(), EventSet::IN, base + q as u64)?;
            }
            if let Some(fd) = handle.socket_fd() {
                add(fd.as_raw_fd(), SOCKET_EVENTS, base + DEVICE_SOCKET_SLOT)?;
            }
            if let Some(fd) = handle.backend_req_fd() {
                add(
                    fd.as_raw_fd(),
                    BACKEND_REQ_EVENTS,
                    base + DEVICE_BACKEND_REQ_SLOT,
                )?;
            }
        }
        let addrs: Vec<u64> = devices.iter().map(|d| d.base).collect();
        hsm.bridge().publish_mmio_addrs(&addrs);
        Ok(Self {
            hsm,
            devices,
            epoll,
            options,
            stats: LoopStats::default(),
            stop_fd: stop.map(|s| s.as_raw_fd()),
            hsm_gone: false,
            reload_requested: false,
            unknown_access: RateLimited::new(),
            bad_request: RateLimited::new(),
            ring_full: RateLimited::new(),
            reconnect_event,
            reconnect_tx,
            reconnect_rx,
            reconnect_threads: Vec::new(),
            cancel: Arc::new(Cancel::default()),
            control_event,
            control_rx,
            stopping: false,
            next_zone_poll: Instant::now(),
            seen_live: BTreeSet::new(),
            status: None,
            status_published: Instant::now(),
        })
    }

    /// The devices, e.g. for tests that inspect transport state.
    pub fn devices(&self) -> &[BridgeDevice] {
        &self.devices
    }

    /// True when the last [`Bridge::run`] returned because of SIGHUP (the stop fd is a
    /// signalfd): the caller re-reads its config and calls `run` again.
    pub fn reload_requested(&self) -> bool {
        self.reload_requested
    }

    /// Runs until the stop fd fires or the hypervisor stand-in hangs up.
    pub fn run(&mut self) -> Result<LoopStats, LoopError> {
        let bridge_page = Arc::clone(&self.hsm);
        let ring = bridge_page.bridge();
        // Drain before the first sleep: requests may predate the bridge (hvisor-tool does not).
        ring.disarm_wakeup();
        let mut events = vec![EpollEvent::default(); 64];
        let mut last_activity = Instant::now();
        let mut polls: u32 = 0;
        let mut spin = AdaptiveSpin::new(self.options.spin, self.options.spin_max);
        loop {
            let mut busy = false;
            while let Some(req) = ring.pop_request() {
                self.handle_request(&req);
                busy = true;
            }
            polls = polls.wrapping_add(1);
            if busy || polls.is_multiple_of(POLLS_PER_EPOLL) {
                let n = self.epoll_wait(&mut events, 0)?;
                busy |= n > 0;
                if self.dispatch(&events[..n]) {
                    break;
                }
            }
            let now = Instant::now();
            self.reinject_overdue(now);
            self.retry_failed_injections(now);
            self.cut_off_overdue(now);
            if busy {
                last_activity = now;
                continue;
            }
            let idle = now.duration_since(last_activity);
            if idle < self.options.spin {
                std::hint::spin_loop();
                continue;
            }
            if idle < spin.window() || (idle < self.options.await_spin && self.awaiting(now)) {
                // Beyond the fixed spin, poll without holding the CPU from whatever is runnable
                // on it: the answer may need this very CPU (a backend pinned beside the bridge,
                // the guest's side of root Linux).
                std::thread::yield_now();
                continue;
            }
            // Idle (and at least once per guard timeout while idle): off the hot path.
            self.poll_zones(now);
            self.refresh_status(now, false);
            // need_wakeup=1, SeqCst fence, re-check: a request pushed before the flag was
            // visible is caught here instead of being slept on.
            if !ring.arm_wakeup() {
                continue;
            }
            self.stats.sleeps += 1;
            // Wake for the next re-injection and control deadline too; rounded up so that it
            // is due on waking.
            let sleep = [
                self.next_reinjection(now),
                self.next_injection_retry(now),
                self.next_control_deadline(now),
            ]
            .into_iter()
            .flatten()
            .fold(self.options.guard_timeout, Duration::min);
            let timeout = sleep.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as i32;
            let n = self.epoll_wait(&mut events, timeout)?;
            ring.disarm_wakeup();
            spin.slept(now.elapsed(), n > 0 || ring.has_requests());
            // A wakeup that arrived just after the timeout was sent, not lost.
            if n == 0 && ring.has_requests() && !readable_now(self.hsm.wakeup_fd()) {
                self.stats.guard_wakeups += 1;
                log::warn!("requests pending after a {timeout} ms sleep without a wakeup");
            }
            if self.dispatch(&events[..n]) {
                break;
            }
            last_activity = Instant::now();
        }
        Ok(self.stats)
    }

    fn epoll_wait(&self, events: &mut [EpollEvent], timeout_ms: i32) -> Result<usize, LoopError> {
        loop {
            match self.epoll.wait(timeout_ms, events) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LoopError::Epoll(e)),
            }
        }
    }

    /// Handles ready fds; true when the loop must stop.
    fn dispatch(&mut self, events: &[EpollEvent]) -> bool {
        // The stop fd first: a backend hang-up seen in the same batch as a stop signal (both
        // can come from one signal to the process group) must not start a restart.
        let mut stop = false;
        if events.iter().any(|e| e.data() == TOKEN_STOP) {
            let signal = self.stop_fd.and_then(read_stop_signal);
            if signal == Some(libc::SIGUSR1 as u32) {
                self.log_status();
            } else {
                self.reload_requested = signal == Some(libc::SIGHUP as u32);
                if !self.reload_requested {
                    self.stopping = true;
                    self.cancel.cancel();
                    return true;
                }
                stop = true;
            }
        }
        for event in events {
            match event.data() {
                TOKEN_WAKEUP => self.hsm.ack_wakeup(),
                TOKEN_STOP => {}
                TOKEN_STATUS => self.refresh_status(Instant::now(), true),
                TOKEN_RECONNECT => {
                    let _ = self.reconnect_event.read();
                    while let Ok(done) = self.reconnect_rx.try_recv() {
                        self.finish_reconnect(done);
                    }
                }
                TOKEN_CONTROL => {
                    let _ = self.control_event.read();
                    while let Ok(done) = self.control_rx.try_recv() {
                        self.finish_control(done);
                    }
                }
                TOKEN_HSM_CONTROL => {
                    if !self.hsm_gone {
                        log::warn!("the hypervisor side closed its control connection; stopping");
                    }
                    self.hsm_gone = true;
                    stop = true;
                }
                token => self.device_event(token),
            }
        }
        self.reinject_owed();
        stop
    }

    fn device_event(&mut self, token: u64) {
        let index = (token / TOKEN_DEVICE_BASE) as usize;
        let slot = token % TOKEN_DEVICE_BASE;
        let Some(dev) = index.checked_sub(1).and_then(|i| self.devices.get_mut(i)) else {
            return;
        };
        if slot == DEVICE_SOCKET_SLOT {
            if !dev.transport.backend().is_disconnected() {
                self.backend_gone(index - 1);
            }
            return;
        }
        if slot == DEVICE_BACKEND_REQ_SLOT {
            // Re-armed when the worker has read the message (see `finish_control`).
            dev.transport.backend_mut().queue(ControlOp::BackendRequest);
            return;
        }
        if dev.transport.backend().take_call(slot as usize) {
            if let Some(kicked_at) = dev.kicked_at.take() {
                let took = kicked_at.elapsed();
                dev.notify_to_call.add(took);
                self.stats.notify_to_call.add(took);
            }
            if dev.transport.signal_used_buffer() {
                self.raise(index - 1);
            } else {
                self.owe_reinjection(index - 1);
            }
        }
    }

    /// The backend of device `index` signalled while its line may be asserted: when
    /// re-injection is on, the line is injected again after this batch of events, in case
    /// hvisor dropped the injection that asserted it.
    fn owe_reinjection(&mut self, index: usize) {
        let dev = &mut self.devices[index];
        if self.options.reinject.is_some() && dev.transport.line_asserted() {
            dev.reinject_owed = true;
        }
    }

    /// Injects again the asserted lines whose backends signalled in the last batch.
    fn reinject_owed(&mut self) {
        // Read the clock only when a line is owed: this runs after every batch of events.
        let mut now = None;
        for index in 0..self.devices.len() {
            let dev = &mut self.devices[index];
            if std::mem::take(&mut dev.reinject_owed)
                && dev.transport.line_asserted()
                && dev.transport.interrupt_status() != 0
            {
                let now = *now.get_or_insert_with(Instant::now);
                self.reinject(index, now);
            }
        }
    }

    /// Injects again the asserted lines the guest has left unACKed for the re-injection
    /// period since their last injection.
    fn reinject_overdue(&mut self, now: Instant) {
        let Some(period) = self.options.reinject else {
            return;
        };
        for index in 0..self.devices.len() {
            let dev = &self.devices[index];
            if irq::reinjection_due(
                dev.transport.line_asserted(),
                dev.transport.interrupt_status(),
                now.saturating_duration_since(dev.last_injection),
                period,
            ) {
                self.reinject(index, now);
            }
        }
    }

    /// How long until the re-injection timer of some asserted line runs out, if one runs.
    fn next_reinjection(&self, now: Instant) -> Option<Duration> {
        let period = self.options.reinject?;
        self.devices
            .iter()
            .filter(|d| d.transport.line_asserted() && d.transport.interrupt_status() != 0)
            .map(|d| (d.last_injection + period).saturating_duration_since(now))
            .min()
    }

    /// Injects device `index`'s asserted line again. It already counts against the zone's
    /// pending limit, and hvisor keeps one pending entry per IRQ, so the limit holds.
    fn reinject(&mut self, index: usize, now: Instant) {
        let dev = &mut self.devices[index];
        // A failed push is retried by the timer, which restarts here either way.
        dev.last_injection = now;
        if irq::inject(self.hsm.as_ref(), dev.zone, dev.irq) {
            self.stats.reinjections += 1;
        }
    }

    /// Asks the hypervisor which zones run, when it is time to; resets the devices of a zone
    /// that was seen running and is gone (`hvisor zone shutdown`), so that no backend
    /// touches its RAM any more, exactly as if its guest had written Status=0. The zone's
    /// next guest resets and initialises its devices as usual.
    fn poll_zones(&mut self, now: Instant) {
        let Some(period) = self.options.zone_poll else {
            return;
        };
        if now < self.next_zone_poll {
            return;
        }
        self.next_zone_poll = now + period;
        let Some(live) = self.hsm.live_zones() else {
            return;
        };
        let served: BTreeSet<u32> = self.devices.iter().map(|d| d.zone).collect();
        for zone in served {
            if live.contains(&zone) {
                if self.seen_live.insert(zone) {
                    log::info!("zone {zone} is running");
                }
            } else if self.seen_live.remove(&zone) {
                log::warn!("zone {zone} is no longer running; resetting its devices");
                self.reset_zone(zone);
            }
        }
    }

    /// Resets every device of `zone` through the same path as a guest writing Status=0.
    fn reset_zone(&mut self, zone: u32) {
        let status = u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS);
        for dev in self.devices.iter_mut().filter(|d| d.zone == zone) {
            dev.transport.write(status, 4, 0);
            dev.deferred = false;
        }
        self.stats.zone_resets += 1;
    }

    /// Whether an answer younger than the await spin is owed: the backend's to a kick, or
    /// the guest's ACK of an injection.
    fn awaiting(&self, now: Instant) -> bool {
        let recent = |t: Instant| now.saturating_duration_since(t) < self.options.await_spin;
        self.devices.iter().any(|d| {
            d.kicked_at.is_some_and(recent)
                || (d.transport.line_asserted() && recent(d.last_injection))
        })
    }

    /// Injects device `index`'s line (the transport said it was not asserted).
    fn raise(&mut self, index: usize) {
        let zone = self.devices[index].zone;
        let asserted = self
            .devices
            .iter()
            .filter(|d| d.zone == zone && d.transport.line_asserted())
            .count();
        let dev = &mut self.devices[index];
        if asserted >= self.hsm.bridge().abi().max_pending_irqs() {
            dev.deferred = true;
        } else if irq::inject(self.hsm.as_ref(), zone, dev.irq) {
            dev.transport.mark_line_asserted();
            dev.deferred = false;
            dev.injection_failed = false;
            dev.last_injection = Instant::now();
            self.stats.interrupts += 1;
        } else {
            if self.ring_full.hit() {
                log::warn!(
                    "zone {zone}: the result ring is full; irq {} is injected again every {:?}",
                    dev.irq,
                    irq::INJECTION_RETRY
                );
            }
            dev.injection_failed = true;
            dev.last_injection = Instant::now();
        }
    }

    /// Tries again the injections that found the result ring full, once their retry period
    /// has passed: without this, the line would wait for the device's next event.
    fn retry_failed_injections(&mut self, now: Instant) {
        for index in 0..self.devices.len() {
            let dev = &mut self.devices[index];
            if !dev.injection_failed
                || now.saturating_duration_since(dev.last_injection) < irq::INJECTION_RETRY
            {
                continue;
            }
            if dev.transport.line_asserted() || dev.transport.interrupt_status() == 0 {
                // Injected meanwhile, or acknowledged: nothing owed any more.
                dev.injection_failed = false;
            } else {
                self.raise(index);
            }
        }
    }

    /// How long until a failed injection is tried again, if one is owed.
    fn next_injection_retry(&self, now: Instant) -> Option<Duration> {
        self.devices
            .iter()
            .filter(|d| d.injection_failed)
            .map(|d| (d.last_injection + irq::INJECTION_RETRY).saturating_duration_since(now))
            .min()
    }

    fn handle_request(&mut self, req: &DeviceReq) {
        self.stats.requests += 1;
        let sync = req.need_interrupt == 0;
        if !matches!(req.size, 1 | 2 | 4 | 8) {
            if self.bad_request.hit() {
                log::warn!(
                    "request with access size {} at {:#x} ignored",
                    req.size,
                    req.address
                );
            }
            self.reply(req, 0);
            return;
        }
        let Some(index) = self
            .devices
            .iter()
            .position(|d| d.contains(req.src_zone, req.address))
        else {
            if self.unknown_access.hit() {
                log::warn!(
                    "zone {}: access to {:#x} matches no device ({})",
                    req.src_zone,
                    req.address,
                    if sync { "answered 0" } else { "dropped" }
                );
            }
            self.reply(req, 0);
            return;
        };
        let dev = &mut self.devices[index];
        if dev.waiting.is_some() {
            hold(&mut dev.held, req);
            return;
        }
        self.serve(index, req);
    }

    /// Answers one access of device `index` (its size already checked), or leaves its reply
    /// waiting for the control worker when the access queued a round trip.
    fn serve(&mut self, index: usize, req: &DeviceReq) {
        let size = req.size as u8;
        let dev = &mut self.devices[index];
        let offset = req.address - dev.base;
        let zone = dev.zone;
        if req.is_write != 0 {
            if offset == u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY) {
                dev.kicked_at = Some(Instant::now());
            }
            let was_asserted = dev.transport.line_asserted();
            let effect = dev.transport.write(offset, size, req.value);
            let now_asserted = dev.transport.line_asserted();
            if dev.transport.backend().holds_the_guest() {
                dev.waiting = Some(*req);
            } else {
                self.reply(req, 0);
            }
            if was_asserted && !now_asserted {
                let gap = self.devices[index].last_injection.elapsed();
                self.stats.ack_gaps[ack_gap_bucket(gap)] += 1;
                self.retry_deferred(zone);
            }
            if effect.inject_interrupt {
                self.raise(index);
            }
            let status = u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_STATUS);
            if offset == status && req.value == 0 {
                self.restore_again(index);
            }
        } else {
            let value = dev.transport.read(offset, size);
            self.reply(req, value);
        }
    }

    /// Replies to a synchronous request; asynchronous ones (QueueNotify) get none.
    /// `value` is already masked to the access size: the transport masks every read, and
    /// the other replies are 0.
    fn reply(&mut self, req: &DeviceReq, value: u64) {
        if req.need_interrupt != 0 {
            return;
        }
        if let Err(e) = self.hsm.bridge().reply(req.src_cpu, value) {
            if self.bad_request.hit() {
                log::warn!(
                    "cannot reply to zone {} cpu {}: {e}",
                    req.src_zone,
                    req.src_cpu
                );
            }
        }
    }

    fn retry_deferred(&mut self, zone: u32) {
        for i in 0..self.devices.len() {
            let dev = &self.devices[i];
            if dev.zone == zone && dev.deferred && !dev.transport.line_asserted() {
                if dev.transport.interrupt_status() != 0 {
                    self.raise(i);
                } else {
                    self.devices[i].deferred = false;
                }
            }
        }
    }
}

/// Queues an access behind the one that waits for the control worker. A notify repeated
/// meanwhile adds nothing (the first one kicks the queue), so a guest cannot grow the queue
/// without bound; sync accesses are bounded by the vCPUs, each of which waits for its reply.
fn hold(held: &mut VecDeque<DeviceReq>, req: &DeviceReq) {
    if req.need_interrupt == 0 || !held.contains(req) {
        held.push_back(*req);
    }
}

/// The [`LoopStats::ack_gaps`] bucket of an injection-to-ACK gap.
fn ack_gap_bucket(gap: Duration) -> usize {
    let gap = gap.as_micros();
    ACK_GAP_BOUNDS_US
        .iter()
        .position(|&bound| gap < u128::from(bound))
        .unwrap_or(ACK_GAP_BOUNDS_US.len())
}

/// Clears the stop fd; for a signalfd, returns the signal number it carried.
fn read_stop_signal(fd: RawFd) -> Option<u32> {
    // Room for one `struct signalfd_siginfo` (128 bytes) or an eventfd counter (8 bytes).
    let mut buf = [0u8; 128];
    // SAFETY: reading into a local buffer of the given length; the fd is readable (epoll
    // said so), and a failed read returns -1, handled below.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    // signalfd_siginfo starts with ssi_signo (u32).
    (n == 128).then(|| u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spin_widens_while_work_comes_soon_after_a_sleep_and_narrows_after_long_idle() {
        let us = Duration::from_micros;
        let mut spin = AdaptiveSpin::new(us(50), us(1000));
        assert_eq!(spin.window(), us(50));
        // Woken by work 300 µs into a sleep: a wider spin would have caught it.
        for expected in [100, 200, 400, 800, 1000, 1000] {
            spin.slept(us(300), true);
            assert_eq!(spin.window(), us(expected));
        }
        // A guard timeout with nothing to do, within the bound, changes nothing.
        spin.slept(us(900), false);
        assert_eq!(spin.window(), us(1000));
        // Long idle periods narrow it back to the fixed spin, never below.
        for expected in [500, 250, 125, 62, 50, 50] {
            spin.slept(Duration::from_millis(100), true);
            assert_eq!(spin.window().as_micros(), expected);
        }
        // Without a bound the spin stays fixed; no spin stays no spin.
        let mut fixed = AdaptiveSpin::new(us(50), Duration::ZERO);
        fixed.slept(us(10), true);
        assert_eq!(fixed.window(), us(50));
        let mut none = AdaptiveSpin::new(Duration::ZERO, us(1000));
        none.slept(us(10), true);
        assert_eq!(none.window(), Duration::ZERO);
    }

    fn access(is_write: u8, address: u64, value: u64, asynchronous: bool) -> DeviceReq {
        DeviceReq {
            src_cpu: 1,
            address,
            size: 4,
            value,
            src_zone: 1,
            is_write,
            need_interrupt: u8::from(asynchronous),
            ..DeviceReq::default()
        }
    }

    #[test]
    fn held_accesses_keep_their_order_and_repeated_notifies_collapse() {
        let mut held = VecDeque::new();
        let notify = access(1, 0xa000_0050, 0, true);
        let status = access(0, 0xa000_0070, 0, false);
        hold(&mut held, &notify);
        hold(&mut held, &status);
        for _ in 0..1000 {
            hold(&mut held, &notify);
        }
        // A notify of another queue is news.
        let other_queue = access(1, 0xa000_0050, 1, true);
        hold(&mut held, &other_queue);
        // Sync accesses are never dropped, even identical ones (two reads in a row).
        hold(&mut held, &status);
        assert_eq!(
            held.into_iter().collect::<Vec<_>>(),
            vec![notify, status, other_queue, status]
        );
    }

    #[test]
    fn ack_gaps_fall_in_the_bucket_of_their_bound() {
        let us = Duration::from_micros;
        assert_eq!(ack_gap_bucket(us(0)), 0);
        assert_eq!(ack_gap_bucket(us(99)), 0);
        assert_eq!(ack_gap_bucket(us(100)), 1);
        assert_eq!(ack_gap_bucket(us(7_999)), ACK_GAP_BOUNDS_US.len() - 1);
        assert_eq!(ack_gap_bucket(us(8_000)), ACK_GAP_BOUNDS_US.len());
        assert_eq!(
            ack_gap_bucket(Duration::from_secs(3600)),
            ACK_GAP_BOUNDS_US.len()
        );
    }

    #[test]
    fn a_stop_eventfd_carries_no_signal() {
        let stop = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).unwrap();
        stop.write(1).unwrap();
        assert_eq!(read_stop_signal(stop.as_raw_fd()), None);
        // Cleared: nothing left to read.
        assert!(stop.read().is_err());
    }
}
