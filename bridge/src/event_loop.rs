//! The bridge's one event loop: it consumes the HSM request ring, answers register accesses
//! from each device's transport, turns call eventfds into guest interrupts and watches the
//! backend sockets.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hvisor_hsm::{DeviceReq, Hsm};
use vhost::vhost_user::Frontend;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::{BackendSpec, DeviceConfig};
use crate::frontend::{self, FrontendError, VhostUserDevice};
use crate::irq;
use crate::ratelimit::RateLimited;
use crate::supervisor::{SpawnedBackend, Supervisor};
use crate::transport::MmioTransport;

/// Epoll tokens: fixed ones first, then one per device fd.
const TOKEN_WAKEUP: u64 = 0;
const TOKEN_STOP: u64 = 1;
const TOKEN_HSM_CONTROL: u64 = 2;
const TOKEN_RECONNECT: u64 = 3;
const TOKEN_DEVICE_BASE: u64 = 1 << 32;
/// Within a device's token space: queue `q` call fd is `q`, the socket and the
/// backend-to-frontend channel are these.
const DEVICE_SOCKET_SLOT: u64 = 0xffff;
const DEVICE_BACKEND_REQ_SLOT: u64 = 0xfffe;

/// How many empty ring polls between looks at the other fds while spinning.
const POLLS_PER_EPOLL: u32 = 32;

/// Default [`LoopOptions::await_spin`], in microseconds.
pub const AWAIT_SPIN_DEFAULT_US: u64 = 0;

/// Upper bounds, in microseconds, of the [`LoopStats::ack_gaps`] buckets; the last bucket
/// takes the rest.
pub const ACK_GAP_BOUNDS_US: [u64; 7] = [100, 250, 500, 1_000, 2_000, 4_000, 8_000];

/// Event-loop tuning.
#[derive(Debug, Clone, Copy)]
pub struct LoopOptions {
    /// Keep polling the ring this long after the last activity before sleeping.
    pub spin: Duration,
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
}

impl Default for LoopOptions {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(50),
            await_spin: Duration::from_micros(AWAIT_SPIN_DEFAULT_US),
            guard_timeout: Duration::from_millis(100),
            zone_poll: Some(Duration::from_secs(1)),
            reinject: Some(Duration::from_millis(10)),
        }
    }
}

/// How to get a device's backend back after it dies: respawn ours, or wait for an external
/// one to listen again.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Starts our backends.
    pub supervisor: Supervisor,
    /// The device's zone.
    pub zone: u32,
    /// The device entry (backend kind, socket, geometry).
    pub device: DeviceConfig,
    /// Give up after this long.
    pub timeout: Duration,
}

/// Tells reconnect threads that the bridge is stopping, and wakes them from their back-off.
#[derive(Debug, Default)]
struct Cancel {
    stopping: Mutex<bool>,
    changed: Condvar,
}

impl Cancel {
    fn cancel(&self) {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        *self.stopping.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sleeps up to `delay`; true when the bridge is stopping.
    fn sleep(&self, delay: Duration) -> bool {
        let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        let (stopping, _) = self
            .changed
            .wait_timeout_while(stopping, delay, |stopping| !*stopping)
            .unwrap_or_else(|p| p.into_inner());
        *stopping
    }
}

/// A reconnect thread's outcome.
struct Reconnected {
    index: usize,
    result: Result<(Frontend, Option<SpawnedBackend>), String>,
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
    /// The register state machine over the vhost-user frontend.
    pub transport: MmioTransport<VhostUserDevice>,
    /// An interrupt is owed but the zone was at hvisor's pending limit.
    deferred: bool,
    /// The backend signalled while the line was asserted: inject it again once this batch
    /// of events is handled.
    reinject_owed: bool,
    /// When the line was last injected (the re-injection timer counts from here).
    last_injection: Instant,
    /// When the guest last wrote QueueNotify, until the backend signals a used buffer: its
    /// answer is on the way.
    kicked_at: Option<Instant>,
    /// How to bring the backend back; `None` fails the device on hang-up instead.
    reconnect: Option<Reconnect>,
    /// The backend process, when the bridge started it.
    process: Option<SpawnedBackend>,
    reconnecting: bool,
}

impl BridgeDevice {
    /// A device at `[base, base+len)` of `zone`.
    pub fn new(
        zone: u32,
        base: u64,
        len: u64,
        irq: u32,
        transport: MmioTransport<VhostUserDevice>,
    ) -> Self {
        Self {
            zone,
            base,
            len,
            irq,
            transport,
            deferred: false,
            reinject_owed: false,
            last_injection: Instant::now(),
            kicked_at: None,
            reconnect: None,
            process: None,
            reconnecting: false,
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
}

/// Counters, for logs and benchmarks.
#[derive(Debug, Default, Clone, Copy)]
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
    /// Time from an injection to the guest's InterruptACK, bucketed by
    /// [`ACK_GAP_BOUNDS_US`]: part of what [`LoopOptions::await_spin`] has to cover.
    pub ack_gaps: [u64; ACK_GAP_BOUNDS_US.len() + 1],
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
    reconnect_event: EventFd,
    reconnect_tx: Sender<Reconnected>,
    reconnect_rx: Receiver<Reconnected>,
    reconnect_threads: Vec<JoinHandle<()>>,
    cancel: Arc<Cancel>,
    /// A stop signal arrived: backends that go away now are not restarted.
    stopping: bool,
    /// When to ask the hypervisor about running zones next.
    next_zone_poll: Instant,
    /// Zones with devices that the hypervisor has reported running.
    seen_live: BTreeSet<u32>,
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
        devices: Vec<BridgeDevice>,
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
        for (i, dev) in devices.iter().enumerate() {
            let base = TOKEN_DEVICE_BASE * (i as u64 + 1);
            let frontend = dev.transport.backend();
            for (q, fd) in frontend.call_fds().enumerate() {
                add(fd.as_raw_fd(), EventSet::IN, base + q as u64)?;
            }
            add(
                frontend.socket_fd().as_raw_fd(),
                EventSet::READ_HANG_UP | EventSet::HANG_UP,
                base + DEVICE_SOCKET_SLOT,
            )?;
            if let Some(fd) = frontend.backend_req_fd() {
                add(fd.as_raw_fd(), EventSet::IN, base + DEVICE_BACKEND_REQ_SLOT)?;
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
            reconnect_event,
            reconnect_tx,
            reconnect_rx,
            reconnect_threads: Vec::new(),
            cancel: Arc::new(Cancel::default()),
            stopping: false,
            next_zone_poll: Instant::now(),
            seen_live: BTreeSet::new(),
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
            if busy {
                last_activity = now;
                continue;
            }
            let idle = now.duration_since(last_activity);
            if idle < self.options.spin || (idle < self.options.await_spin && self.awaiting(now)) {
                std::hint::spin_loop();
                continue;
            }
            // Idle (and at least once per guard timeout while idle): off the hot path.
            self.poll_zones(now);
            // need_wakeup=1, SeqCst fence, re-check: a request pushed before the flag was
            // visible is caught here instead of being slept on.
            if !ring.arm_wakeup() {
                continue;
            }
            self.stats.sleeps += 1;
            // Wake for the next re-injection too; rounded up so that it is due on waking.
            let sleep = self
                .next_reinjection(now)
                .map_or(self.options.guard_timeout, |due| {
                    due.min(self.options.guard_timeout)
                });
            let timeout = sleep.as_micros().div_ceil(1000).clamp(1, i32::MAX as u128) as i32;
            let n = self.epoll_wait(&mut events, timeout)?;
            ring.disarm_wakeup();
            if n == 0 && ring.has_requests() {
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
            self.reload_requested = signal == Some(libc::SIGHUP as u32);
            if !self.reload_requested {
                self.stopping = true;
                self.cancel.cancel();
                return true;
            }
            stop = true;
        }
        for event in events {
            match event.data() {
                TOKEN_WAKEUP => self.hsm.ack_wakeup(),
                TOKEN_STOP => {}
                TOKEN_RECONNECT => {
                    let _ = self.reconnect_event.read();
                    while let Ok(done) = self.reconnect_rx.try_recv() {
                        self.finish_reconnect(done);
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
            let fd = dev
                .transport
                .backend()
                .backend_req_fd()
                .map(|f| f.as_raw_fd());
            match dev.transport.backend_mut().handle_backend_request() {
                Ok(true) => {
                    log::info!(
                        "{}: backend reported a config change",
                        dev.transport.backend().label()
                    );
                    if dev.transport.signal_config_change() {
                        self.raise(index - 1);
                    } else {
                        self.owe_reinjection(index - 1);
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    log::warn!("{}: {e}", dev.transport.backend().label());
                    if let Some(fd) = fd {
                        let _ = self
                            .epoll
                            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
                    }
                }
            }
            return;
        }
        if dev.transport.backend().take_call(slot as usize) {
            dev.kicked_at = None;
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

    /// A backend hung up: stop watching its fds, then restore it in the background, or fail
    /// the device when there is no way to.
    fn backend_gone(&mut self, index: usize) {
        let dev = &mut self.devices[index];
        let frontend = dev.transport.backend();
        for fd in [Some(frontend.socket_fd()), frontend.backend_req_fd()]
            .into_iter()
            .flatten()
        {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                fd.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        dev.transport.backend_mut().mark_disconnected();
        let label = dev.transport.backend().label().to_string();
        if self.stopping {
            log::info!("{label}: backend hung up while the bridge is stopping");
            return;
        }
        let Some(plan) = dev.reconnect.clone() else {
            log::error!("{label}: backend hung up; the device needs a reset");
            if dev.transport.fail() {
                self.raise(index);
            }
            return;
        };
        dev.transport.backend_mut().begin_restore();
        if dev.reconnecting {
            return;
        }
        dev.reconnecting = true;
        let dead = dev.process.take();
        match &dead {
            Some(p) => log::error!("{label}: backend (pid {}) hung up; restarting it", p.pid()),
            None => log::error!("{label}: backend hung up; waiting for it to come back"),
        }
        let tx = self.reconnect_tx.clone();
        // The event fd is shared: the thread writes it once its result is queued.
        let wake = self.reconnect_event.try_clone();
        let cancel = Arc::clone(&self.cancel);
        let spawned = std::thread::Builder::new()
            .name(format!("reconnect-{index}"))
            .spawn(move || {
                // Reap the dead process first: its socket path is about to be reused.
                drop(dead);
                let result = reconnect(&plan, &label, &cancel);
                let _ = tx.send(Reconnected { index, result });
                if let Ok(wake) = wake {
                    let _ = wake.write(1);
                }
            });
        match spawned {
            Ok(thread) => self.reconnect_threads.push(thread),
            Err(e) => {
                log::error!("cannot start a reconnect thread: {e}");
                self.devices[index].reconnecting = false;
                self.devices[index].transport.backend_mut().end_restore();
                if self.devices[index].transport.fail() {
                    self.raise(index);
                }
            }
        }
    }

    fn finish_reconnect(&mut self, done: Reconnected) {
        self.reconnect_threads.retain(|t| !t.is_finished());
        let index = done.index;
        let Some(dev) = self.devices.get_mut(index) else {
            return;
        };
        dev.reconnecting = false;
        // A restore that fails from here on fails the device, even an activation that was
        // waiting for it; one that is retried begins again in `backend_gone`.
        dev.transport.backend_mut().end_restore();
        let label = dev.transport.backend().label().to_string();
        // An error, and whether it came from a new backend that died during its restore.
        let outcome = match done.result {
            Err(e) => Err((e, false)),
            Ok((frontend, process)) => {
                dev.process = process;
                dev.transport
                    .backend_mut()
                    .reattach(frontend)
                    .map_err(|e| (error_chain(&e), connection_lost(&e)))
            }
        };
        match outcome {
            Ok(()) => {
                self.stats.reconnects += 1;
                let base = TOKEN_DEVICE_BASE * (index as u64 + 1);
                let frontend = self.devices[index].transport.backend();
                let socket = frontend.socket_fd().as_raw_fd();
                let backend_req = frontend.backend_req_fd().map(|f| f.as_raw_fd());
                let _ = self.epoll.ctl(
                    ControlOperation::Add,
                    socket,
                    EpollEvent::new(
                        EventSet::READ_HANG_UP | EventSet::HANG_UP,
                        base + DEVICE_SOCKET_SLOT,
                    ),
                );
                if let Some(fd) = backend_req {
                    let _ = self.epoll.ctl(
                        ControlOperation::Add,
                        fd,
                        EpollEvent::new(EventSet::IN, base + DEVICE_BACKEND_REQ_SLOT),
                    );
                }
                log::info!(
                    "{label}: backend restored; its queues resume where the guest left them"
                );
                // The old backend may have published used entries and died before its call
                // (inside its interrupt-coalescing window, say); the new one starts from the
                // guest's used index and has nothing to announce. An interrupt now tells the
                // driver about them; a spurious one costs the driver one empty look.
                if self.devices[index].transport.signal_used_buffer() {
                    self.raise(index);
                }
            }
            // A backend that dies while it is being restored crashed like the first one: the
            // device can still be restored, by the next backend.
            Err((e, true)) if self.devices[index].reconnect.is_some() => {
                log::error!("{label}: the backend died while being restored ({e})");
                self.backend_gone(index);
            }
            Err((e, _)) => {
                log::error!("{label}: cannot restore the backend: {e}; the device needs a reset");
                if self.devices[index].transport.fail() {
                    self.raise(index);
                }
            }
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
            dev.last_injection = Instant::now();
            self.stats.interrupts += 1;
        }
    }

    fn handle_request(&mut self, req: &DeviceReq) {
        self.stats.requests += 1;
        let sync = req.need_interrupt == 0;
        let size = match req.size {
            1 | 2 | 4 | 8 => req.size as u8,
            _ => {
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
        };
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
        let offset = req.address - dev.base;
        let zone = dev.zone;
        if req.is_write != 0 {
            if offset == u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY)
                && self.options.await_spin > Duration::ZERO
            {
                dev.kicked_at = Some(Instant::now());
            }
            let was_asserted = dev.transport.line_asserted();
            let effect = dev.transport.write(offset, size, req.value);
            let now_asserted = dev.transport.line_asserted();
            self.reply(req, 0);
            if was_asserted && !now_asserted {
                let gap = self.devices[index].last_injection.elapsed().as_micros();
                let bucket = ACK_GAP_BOUNDS_US
                    .iter()
                    .position(|&bound| gap < u128::from(bound))
                    .unwrap_or(ACK_GAP_BOUNDS_US.len());
                self.stats.ack_gaps[bucket] += 1;
                self.retry_deferred(zone);
            }
            if effect.inject_interrupt {
                self.raise(index);
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

/// Brings a backend back: respawns ours, or waits for an external one, retrying with backoff
/// until `plan.timeout` or until the bridge stops.
fn reconnect(
    plan: &Reconnect,
    label: &str,
    cancel: &Cancel,
) -> Result<(Frontend, Option<SpawnedBackend>), String> {
    let deadline = Instant::now() + plan.timeout;
    let mut delay = Duration::from_millis(50);
    let mut attempt = 0u32;
    loop {
        if cancel.is_cancelled() {
            return Err("the bridge is stopping".into());
        }
        attempt += 1;
        let outcome = match &plan.device.backend {
            BackendSpec::External { socket } => {
                frontend::connect(socket, plan.device.num_queues, Duration::ZERO)
                    .map_err(|e| error_chain(&e))
                    .and_then(|f| {
                        let checked = plan.supervisor.check_peer(&f, socket, None);
                        checked.map(|()| (f, None)).map_err(|e| error_chain(&e))
                    })
            }
            _ => plan
                .supervisor
                .spawn(plan.zone, &plan.device)
                .map_err(|e| error_chain(&e))
                .and_then(|spawned| {
                    let spawned = spawned.ok_or_else(|| "nothing to spawn".to_string())?;
                    frontend::connect(
                        spawned.socket(),
                        plan.device.num_queues,
                        Duration::from_secs(5),
                    )
                    .map_err(|e| error_chain(&e))
                    .and_then(|f| {
                        let checked =
                            plan.supervisor
                                .check_peer(&f, spawned.socket(), Some(&spawned));
                        checked
                            .map(|()| (f, Some(spawned)))
                            .map_err(|e| error_chain(&e))
                    })
                }),
        };
        match outcome {
            // Dropping the result stops a backend started just now.
            Ok(_) if cancel.is_cancelled() => return Err("the bridge is stopping".into()),
            Ok(done) => {
                if attempt > 1 {
                    log::info!("{label}: backend back after {attempt} attempts");
                }
                return Ok(done);
            }
            Err(e) => {
                if Instant::now() + delay > deadline {
                    return Err(format!("gave up after {attempt} attempts: {e}"));
                }
                if attempt == 1 || attempt.is_power_of_two() {
                    log::warn!(
                        "{label}: reconnect attempt {attempt} failed: {e}; retrying in {delay:?}"
                    );
                }
            }
        }
        if cancel.sleep(delay) {
            return Err("the bridge is stopping".into());
        }
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// True when `e` says the connection to the backend broke (it died), not that the backend
/// refused something: a restore that fails this way is worth another backend.
fn connection_lost(e: &FrontendError) -> bool {
    use vhost::vhost_user::Error as Protocol;
    match e {
        FrontendError::Disconnected => true,
        FrontendError::Request {
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
    use vhost::vhost_user::Error as Protocol;

    #[test]
    fn only_a_broken_connection_is_worth_another_backend() {
        let request = |e| FrontendError::Request {
            request: "GET_FEATURES",
            source: vhost::Error::VhostUserProtocol(e),
        };
        assert!(connection_lost(&FrontendError::Disconnected));
        assert!(connection_lost(&request(Protocol::PartialMessage)));
        assert!(connection_lost(&request(Protocol::SocketBroken(
            std::io::ErrorKind::ConnectionReset.into()
        ))));
        assert!(!connection_lost(&request(Protocol::InvalidMessage)));
        assert!(!connection_lost(&FrontendError::QueueCount {
            offered: 1,
            wanted: 2
        }));
        assert!(!connection_lost(&FrontendError::FeaturesLost {
            before: 1,
            after: 0
        }));
    }
}
