//! hvisor's role played in software: guest RAM and the bridge page in memfds, vCPUs that
//! trap into the request ring exactly as hvisor's `mmio_virtio_handler` does, and a thread
//! that drains the result ring into per-zone pending IRQs. [`SimOptions`] choose how closely
//! it follows the real hvisor and hvisor.ko; the defaults follow them.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::abi::{DeviceReq, MMAP_SIZE, QUEUE_NOTIFY_OFFSET};
use crate::mmap::{memfd, SharedMapping};
use crate::provider::RegionHandover;
use crate::provider::{Handover, HandoverMode};
use crate::ring::spin_until;
use crate::sim_options::{NotifyAccess, SimOptions, SimOrdering, SimRamLayout, SimWakeup};
use crate::wakeup::{gettid, send_sighvi, SignalWakeup, WakeupKind};
use crate::{BridgePage, Hsm, HsmError, RamFd};

pub use crate::sim_server::ProviderServer;

/// hvisor's `MAX_BACKOFF`: the longest spin between retries on a full request ring.
const MAX_BACKOFF_SPINS: u32 = 1024;

/// One guest RAM region of a simulated zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimRegion {
    /// Address root Linux would use (the `ram_region` key).
    pub zone0_ipa: u64,
    /// Guest-physical address.
    pub zonex_ipa: u64,
    /// Size in bytes.
    pub size: u64,
}

/// A simulated zone: its RAM and its trapping virtio MMIO windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimZoneSpec {
    /// Zone id.
    pub id: u32,
    /// Guest RAM regions.
    pub regions: Vec<SimRegion>,
    /// Virtio MMIO windows `(base, size)`, as in the zone config's `"virtio"` regions.
    pub windows: Vec<(u64, u64)>,
}

/// Counters of the simulated hypervisor.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Requests pushed into the ring.
    pub requests: u64,
    /// Of those, asynchronous (QueueNotify at window offset 0x50).
    pub async_requests: u64,
    /// Times a vCPU found the ring full and backed off.
    pub ring_full_backoffs: u64,
    /// Wakeups sent: eventfd writes, or signals in [`SimWakeup::Signal`] mode.
    pub wakeups: u64,
    /// Signal-mode wakeups that had no thread to go to (no bridge registered yet), or whose
    /// `tgkill` failed (the thread is gone): the bridge's guard timeout must recover them.
    pub wakeups_undelivered: u64,
    /// Requests that found `need_wakeup` set and sent no wakeup
    /// ([`SimOptions::lose_wakeup_every`]): each leaves the bridge asleep on a pending
    /// request unless something else wakes it.
    pub wakeups_lost: u64,
    /// Results taken from the result ring for known zones.
    pub irqs_delivered: u64,
    /// Results naming an unknown zone (skipped, as hvisor does).
    pub unknown_zone_results: u64,
    /// Results dropped because the guest was still handling their IRQ
    /// ([`SimOptions::drop_while_active`]).
    pub irqs_dropped_active: u64,
    /// Most distinct IRQs ever pending at once in one zone.
    pub max_pending_irqs: usize,
    /// Times more than `MAX_DEVS - 1` ([`crate::HvisorAbi::max_pending_irqs`]) were pending
    /// in one zone (hvisor would panic).
    pub pending_limit_violations: u64,
    /// Accesses outside every virtio window (not sent; reads return 0).
    pub unhandled_accesses: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    async_requests: AtomicU64,
    ring_full_backoffs: AtomicU64,
    wakeups: AtomicU64,
    wakeups_undelivered: AtomicU64,
    /// Requests that found `need_wakeup` set: picks every Nth for `lose_wakeup_every`.
    armed_pushes: AtomicU64,
    wakeups_lost: AtomicU64,
    unhandled_accesses: AtomicU64,
}

#[derive(Debug, Default)]
struct IrqState {
    /// Distinct pending IRQs per zone, cleared as `wait_irq` consumes them.
    pending: HashMap<u32, BTreeSet<u32>>,
    /// IRQs per zone that `wait_irq` handed to the guest and that it has not finished
    /// handling (it waits on the line again): only kept with `drop_while_active`.
    active: HashMap<u32, BTreeSet<u32>>,
    delivered: u64,
    dropped_active: u64,
    unknown_zone: u64,
    max_pending: usize,
    violations: u64,
}

#[derive(Debug)]
struct RamRegion {
    spec: SimRegion,
    fd: Arc<OwnedFd>,
    /// Where the region starts in `fd`.
    file_offset: u64,
    map: SharedMapping,
}

#[derive(Debug)]
struct Zone {
    id: u32,
    regions: Vec<RamRegion>,
    windows: Vec<(u64, u64)>,
    /// Listed by `live_zones`: false between `shutdown_zone` and `restart_zone`.
    running: AtomicBool,
}

/// State shared with the simulator's threads.
#[derive(Debug)]
pub(crate) struct Shared {
    options: SimOptions,
    bridge_fd: Arc<OwnedFd>,
    page: BridgePage,
    /// hvisor's `req_lock`: serialises request producers.
    producer: Mutex<()>,
    /// One synchronous access at a time per physical CPU.
    cpu_locks: Vec<Mutex<()>>,
    wakeup: EventFd,
    /// Signal mode: the thread to wake, `pid << 32 | tid`, or 0 before a bridge registered.
    signal_target: AtomicU64,
    finish: EventFd,
    zones: Vec<Zone>,
    irqs: Mutex<IrqState>,
    irq_arrived: Condvar,
    counters: Counters,
    /// A test holds the result ring: FINISH_REQ drains nothing until it lets go.
    results_held: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Who emulates a trapped access. A thread may sleep on the simulator's locks and log; a
/// signal handler that emulates a faulting load or store (the trap harness) must not: it could
/// interrupt a logger holding its lock, and a futex sleep there is not async-signal-safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Thread,
    SignalHandler,
}

/// Spins before each `sched_yield` while a signal handler waits for a simulator lock.
const SPINS_PER_YIELD: u32 = 1024;

/// Takes `mutex` the way `caller` may: blocking for a thread, spinning on `try_lock` (what
/// hvisor's spin locks do) for a signal handler. Neither allocates.
fn acquire<T>(mutex: &Mutex<T>, caller: Caller) -> MutexGuard<'_, T> {
    if caller == Caller::Thread {
        return lock(mutex);
    }
    let mut spins: u32 = 0;
    loop {
        match mutex.try_lock() {
            Ok(guard) => return guard,
            Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(SPINS_PER_YIELD) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

pub(crate) fn borrow_eventfd(evt: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is owned by `evt`, which outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) }
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

fn validate(zones: &[SimZoneSpec], ram: SimRamLayout) -> Result<(), HsmError> {
    let bad = |msg: String| Err(HsmError::SimConfig(msg));
    let mut all_zone0 = Vec::new();
    if ram == SimRamLayout::Physical {
        // The bridge page is the first physical page of the simulated machine.
        all_zone0.push((0, MMAP_SIZE as u64));
    }
    for (i, zone) in zones.iter().enumerate() {
        if zones[..i].iter().any(|z| z.id == zone.id) {
            return bad(format!("zone {} listed twice", zone.id));
        }
        let mut zonex = Vec::new();
        for r in &zone.regions {
            let fits = r.size > 0
                && r.zone0_ipa.checked_add(r.size).is_some()
                && r.zonex_ipa.checked_add(r.size).is_some()
                && usize::try_from(r.size).is_ok()
                && i64::try_from(r.size).is_ok();
            if !fits {
                return bad(format!("zone {}: bad region {r:?}", zone.id));
            }
            let page = MMAP_SIZE as u64 - 1;
            if ram == SimRamLayout::Physical && (r.zone0_ipa | r.size) & page != 0 {
                return bad(format!(
                    "zone {}: region {r:?} is not page-aligned (it is mapped at its physical \
                     address)",
                    zone.id
                ));
            }
            if zonex
                .iter()
                .any(|&x| ranges_overlap(x, (r.zonex_ipa, r.size)))
            {
                return bad(format!(
                    "zone {}: overlapping guest RAM at {:#x}",
                    zone.id, r.zonex_ipa
                ));
            }
            if all_zone0
                .iter()
                .any(|&x| ranges_overlap(x, (r.zone0_ipa, r.size)))
            {
                return bad(format!(
                    "overlapping zone0_ipa ranges at {:#x}",
                    r.zone0_ipa
                ));
            }
            zonex.push((r.zonex_ipa, r.size));
            all_zone0.push((r.zone0_ipa, r.size));
        }
        for (j, &window) in zone.windows.iter().enumerate() {
            if window.1 == 0 || window.0.checked_add(window.1).is_none() {
                return bad(format!("zone {}: bad window {window:#x?}", zone.id));
            }
            if zone.windows[..j].iter().any(|&w| ranges_overlap(w, window)) {
                return bad(format!(
                    "zone {}: overlapping windows at {:#x}",
                    zone.id, window.0
                ));
            }
        }
    }
    Ok(())
}

impl Shared {
    fn zone(&self, id: u32) -> Option<&Zone> {
        self.zones.iter().find(|z| z.id == id)
    }

    /// hvisor's `push_req`: retry a full ring with exponential backoff outside the lock.
    fn push(&self, req: &DeviceReq, caller: Caller) {
        let mut backoff = 1;
        let armed = loop {
            let armed = {
                let _producer = acquire(&self.producer, caller);
                // hvisor reads `need_wakeup` after releasing its spin lock, a plain release
                // store that does not order the `req_rear` store before the load. Our
                // unlock is an atomic swap, a full barrier on x86 that would hide the race:
                // so the flag is read before the unlock.
                self.page
                    .push_request(req)
                    .then(|| match self.options.ordering {
                        SimOrdering::Hvisor => self.page.need_wakeup(),
                        SimOrdering::Fenced => self.page.need_wakeup_fenced(),
                    })
            };
            if let Some(armed) = armed {
                break armed;
            }
            self.counters
                .ring_full_backoffs
                .fetch_add(1, Ordering::Relaxed);
            for _ in 0..backoff {
                std::hint::spin_loop();
            }
            if backoff == MAX_BACKOFF_SPINS {
                // Unlike hvisor's, our consumer may be waiting for this very CPU.
                std::thread::yield_now();
            }
            backoff = (backoff * 2).min(MAX_BACKOFF_SPINS);
        };
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        if armed && self.loses_this_wakeup() {
            self.counters.wakeups_lost.fetch_add(1, Ordering::Relaxed);
        } else if armed {
            self.wake(caller);
        }
    }

    /// True for every `lose_wakeup_every`th request that found `need_wakeup` set.
    fn loses_this_wakeup(&self) -> bool {
        let every = u64::from(self.options.lose_wakeup_every);
        every != 0
            && (self.counters.armed_pushes.fetch_add(1, Ordering::Relaxed) + 1)
                .is_multiple_of(every)
    }

    /// The wakeup IRQ and what hvisor.ko makes of it. hvisor sends it once per push that
    /// found `need_wakeup` set, and never re-checks.
    fn wake(&self, caller: Caller) {
        self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
        let result = match self.options.wakeup {
            SimWakeup::Eventfd => self.wakeup.write(1),
            SimWakeup::Signal => match self.signal_target.load(Ordering::Acquire) {
                // The old module with no task recorded yet sends nothing.
                0 => Err(io::ErrorKind::NotFound.into()),
                target => send_sighvi((target >> 32) as i32, target as u32 as i32),
            },
        };
        if let Err(e) = result {
            self.counters
                .wakeups_undelivered
                .fetch_add(1, Ordering::Relaxed);
            // A signal handler may not log; the bridge's guard timeout covers a lost wakeup.
            if caller == Caller::Thread {
                log::warn!("sim: wakeup not delivered: {e}");
            }
        }
    }

    /// Signal mode: from now on, wakeups go to thread `tid` of process `pid` (hvisor.ko's
    /// `task = get_current()` at INIT_VIRTIO; the last caller wins).
    pub(crate) fn set_signal_target(&self, pid: i32, tid: i32) {
        let target = (u64::from(pid as u32) << 32) | u64::from(tid as u32);
        self.signal_target.store(target, Ordering::Release);
    }

    /// hvisor's `hv_virtio_inject_irq`: take every result and mark its IRQ pending.
    fn drain_results(&self) {
        if self.results_held.load(Ordering::Acquire) {
            return;
        }
        let mut irqs = lock(&self.irqs);
        while let Some(res) = self.page.pop_result() {
            if self.zone(res.target_zone).is_none() {
                log::warn!("sim: result for unknown zone {}", res.target_zone);
                irqs.unknown_zone += 1;
                continue;
            }
            irqs.delivered += 1;
            if irqs
                .active
                .get(&res.target_zone)
                .is_some_and(|a| a.contains(&res.irq_id))
            {
                irqs.dropped_active += 1;
                continue;
            }
            let pending = irqs.pending.entry(res.target_zone).or_default();
            pending.insert(res.irq_id);
            let count = pending.len();
            irqs.max_pending = irqs.max_pending.max(count);
            let limit = self.options.abi.max_pending_irqs();
            if count > limit {
                log::error!(
                    "sim: zone {} has {count} distinct pending IRQs (hvisor allows {limit})",
                    res.target_zone
                );
                irqs.violations += 1;
            }
        }
        drop(irqs);
        self.irq_arrived.notify_all();
    }

    pub(crate) fn handover_mode(&self) -> HandoverMode {
        HandoverMode {
            abi: self.options.abi,
            wakeup: match self.options.wakeup {
                SimWakeup::Eventfd => WakeupKind::Eventfd,
                SimWakeup::Signal => WakeupKind::Signal,
            },
        }
    }

    pub(crate) fn handover(&self) -> Handover<'_> {
        Handover {
            bridge: (self.bridge_fd.as_fd(), 0),
            wakeup: borrow_eventfd(&self.wakeup),
            finish: borrow_eventfd(&self.finish),
            regions: self
                .zones
                .iter()
                .flat_map(|z| &z.regions)
                .map(|r| RegionHandover {
                    zone0_ipa: r.spec.zone0_ipa,
                    size: r.spec.size,
                    fd: r.fd.as_fd(),
                    offset: r.file_offset,
                })
                .collect(),
        }
    }

    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError> {
        let end = zone0_ipa.checked_add(size);
        self.zones
            .iter()
            .flat_map(|z| &z.regions)
            .find(|r| {
                r.spec.zone0_ipa <= zone0_ipa
                    && end.is_some_and(|end| end <= r.spec.zone0_ipa + r.spec.size)
            })
            .map(|r| RamFd {
                fd: r.fd.clone(),
                offset: r.file_offset + (zone0_ipa - r.spec.zone0_ipa),
            })
            .ok_or(HsmError::NoRamRegion { zone0_ipa, size })
    }
}

pub(crate) const EVENT_EXIT: u64 = 0;
const EVENT_FINISH: u64 = 1;

pub(crate) fn watch(
    epoll: &Epoll,
    fd: BorrowedFd<'_>,
    events: EventSet,
    token: u64,
) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd.as_raw_fd(),
        EpollEvent::new(events, token),
    )
}

pub(crate) fn wait_events(epoll: &Epoll, events: &mut [EpollEvent]) -> io::Result<usize> {
    loop {
        match epoll.wait(-1, events) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// The drain thread: FINISH_REQ (the finish eventfd) drains the result ring.
fn drain_loop(shared: Arc<Shared>, epoll: Epoll) {
    let mut events = [EpollEvent::default(); 2];
    loop {
        let ready = match wait_events(&epoll, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::error!("sim: drain thread epoll failed: {e}");
                return;
            }
        };
        for event in &events[..ready] {
            match event.data() {
                EVENT_EXIT => return,
                EVENT_FINISH => {
                    // Clear first: a FINISH_REQ after this read is seen by the next wait.
                    let _ = shared.finish.read();
                    shared.drain_results();
                }
                _ => {}
            }
        }
    }
}

/// The simulated hypervisor. Share it through `Arc`; dropping the last reference stops its
/// drain thread.
#[derive(Debug)]
pub struct SimHypervisor {
    pub(crate) shared: Arc<Shared>,
    exit: EventFd,
    drain: Option<JoinHandle<()>>,
}

impl SimHypervisor {
    /// Creates the zones' RAM and the bridge page and starts the result drain thread, with
    /// the options of [`SimOptions::from_env`] (hvisor's behaviour unless the environment
    /// says otherwise).
    pub fn new(zones: Vec<SimZoneSpec>) -> Result<Arc<Self>, HsmError> {
        SimHypervisor::with_options(zones, SimOptions::from_env()?)
    }

    /// [`SimHypervisor::new`] with explicit options.
    pub fn with_options(
        zones: Vec<SimZoneSpec>,
        options: SimOptions,
    ) -> Result<Arc<Self>, HsmError> {
        validate(&zones, options.ram)?;
        let setup = |what| move |e| HsmError::io(what, e);
        // Physical: one file is the machine's memory, as /dev/hvisor is. Its size is where
        // the highest region ends; it stays sparse.
        let physical_size = zones
            .iter()
            .flat_map(|z| &z.regions)
            .map(|r| r.zone0_ipa + r.size)
            .fold(MMAP_SIZE as u64, u64::max);
        let bridge_fd = Arc::new(
            match options.ram {
                SimRamLayout::Physical => memfd("hvisor-sim-physical", physical_size),
                SimRamLayout::MemfdPerRegion => memfd("hvisor-sim-bridge", MMAP_SIZE as u64),
            }
            .map_err(setup("creating the bridge memfd"))?,
        );
        let page = BridgePage::map_abi(bridge_fd.as_fd(), 0, options.abi)?;
        let mut sim_zones = Vec::with_capacity(zones.len());
        for spec in zones {
            let mut regions = Vec::with_capacity(spec.regions.len());
            for (i, r) in spec.regions.iter().enumerate() {
                let (fd, file_offset) = match options.ram {
                    SimRamLayout::Physical => (bridge_fd.clone(), r.zone0_ipa),
                    SimRamLayout::MemfdPerRegion => {
                        let fd = memfd(&format!("hvisor-sim-zone{}-ram{i}", spec.id), r.size)
                            .map_err(setup("creating a guest RAM memfd"))?;
                        (Arc::new(fd), 0)
                    }
                };
                // Size checked to fit usize by `validate`.
                let map = SharedMapping::new(fd.as_fd(), file_offset, r.size as usize)
                    .map_err(setup("mapping guest RAM"))?;
                regions.push(RamRegion {
                    spec: *r,
                    fd,
                    file_offset,
                    map,
                });
            }
            sim_zones.push(Zone {
                id: spec.id,
                regions,
                windows: spec.windows,
                running: AtomicBool::new(true),
            });
        }
        let eventfd =
            || EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC).map_err(setup("eventfd creation"));
        let shared = Arc::new(Shared {
            options,
            bridge_fd,
            page,
            producer: Mutex::new(()),
            cpu_locks: (0..options.abi.max_cpus).map(|_| Mutex::new(())).collect(),
            wakeup: eventfd()?,
            signal_target: AtomicU64::new(0),
            finish: eventfd()?,
            zones: sim_zones,
            irqs: Mutex::new(IrqState::default()),
            irq_arrived: Condvar::new(),
            counters: Counters::default(),
            results_held: std::sync::atomic::AtomicBool::new(false),
        });

        let exit = eventfd()?;
        let epoll = Epoll::new().map_err(setup("epoll creation"))?;
        watch(&epoll, borrow_eventfd(&exit), EventSet::IN, EVENT_EXIT)
            .and_then(|()| {
                watch(
                    &epoll,
                    borrow_eventfd(&shared.finish),
                    EventSet::IN,
                    EVENT_FINISH,
                )
            })
            .map_err(setup("epoll setup"))?;
        let thread_shared = shared.clone();
        let drain = std::thread::Builder::new()
            .name("sim-drain".into())
            .spawn(move || drain_loop(thread_shared, epoll))
            .map_err(setup("spawning the drain thread"))?;
        Ok(Arc::new(SimHypervisor {
            shared,
            exit,
            drain: Some(drain),
        }))
    }

    /// The options this simulator runs with.
    pub fn options(&self) -> SimOptions {
        self.shared.options
    }

    /// Signal mode: the `(pid, tid)` wakeups go to, once a bridge registered.
    pub fn signal_target(&self) -> Option<(i32, i32)> {
        match self.shared.signal_target.load(Ordering::Acquire) {
            0 => None,
            target => Some(((target >> 32) as i32, target as u32 as i32)),
        }
    }

    /// An in-process [`Hsm`] for a bridge. In [`SimWakeup::Signal`] mode, the calling thread
    /// blocks signal 10, becomes the wakeup's target, and must be the one that polls
    /// [`Hsm::wakeup_fd`].
    pub fn hsm(self: &Arc<Self>) -> Arc<dyn Hsm> {
        self.try_hsm().expect("signal wakeup set-up")
    }

    /// [`SimHypervisor::hsm`], with the signal set-up's failure returned.
    pub fn try_hsm(self: &Arc<Self>) -> Result<Arc<dyn Hsm>, HsmError> {
        let signal = match self.shared.options.wakeup {
            SimWakeup::Eventfd => None,
            SimWakeup::Signal => {
                let signal = SignalWakeup::new()
                    .map_err(|e| HsmError::io("setting up the signal wakeup", e))?;
                // SAFETY: getpid has no arguments and cannot fail.
                self.shared
                    .set_signal_target(unsafe { libc::getpid() }, gettid());
                Some(signal)
            }
        };
        Ok(Arc::new(SimHsm {
            sim: self.clone(),
            signal,
        }))
    }

    /// A vCPU of `zone` on physical CPU `cpu`.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS` (hvisor's `cfg_*` arrays have no such slot).
    pub fn vcpu(self: &Arc<Self>, zone: u32, cpu: u64) -> SimVcpu {
        let max_cpus = self.shared.options.abi.max_cpus;
        assert!(cpu < max_cpus as u64, "cpu {cpu} out of range");
        SimVcpu {
            sim: self.clone(),
            zone,
            cpu,
        }
    }

    /// Shuts `zone` down and starts it again, as `hvisor zone shutdown` then `zone start`
    /// with the same config would: its RAM reads as zeros again (the pages go back to the
    /// kernel) and its pending IRQs are dropped. The zone's physical memory stays where it
    /// was, so a daemon's existing mappings stay valid, exactly as with `/dev/hvisor`.
    pub fn restart_zone(&self, zone: u32) -> Result<(), HsmError> {
        let z = self.shared.zone(zone).ok_or(HsmError::UnknownZone(zone))?;
        for region in &z.regions {
            let too_large = |_| HsmError::SimConfig("region too large".into());
            let len = libc::off_t::try_from(region.spec.size).map_err(too_large)?;
            let start = libc::off_t::try_from(region.file_offset).map_err(too_large)?;
            // SAFETY: fallocate on a memfd this simulator owns; it only releases pages.
            let rc = unsafe {
                libc::fallocate(
                    region.fd.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    start,
                    len,
                )
            };
            if rc != 0 {
                return Err(HsmError::Io {
                    what: "zeroing zone RAM",
                    source: io::Error::last_os_error(),
                });
            }
        }
        let mut irqs = lock(&self.shared.irqs);
        irqs.pending.remove(&zone);
        irqs.active.remove(&zone);
        z.running.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Shuts `zone` down, as `hvisor zone shutdown` does: it leaves the zone list that
    /// `Hsm::live_zones` reports and its pending IRQs are dropped, and nothing tells the
    /// bridge. [`SimHypervisor::restart_zone`] starts it again.
    pub fn shutdown_zone(&self, zone: u32) -> Result<(), HsmError> {
        let z = self.shared.zone(zone).ok_or(HsmError::UnknownZone(zone))?;
        z.running.store(false, Ordering::SeqCst);
        let mut irqs = lock(&self.shared.irqs);
        irqs.pending.remove(&zone);
        irqs.active.remove(&zone);
        Ok(())
    }

    /// Guest RAM of `zone`, addressed by guest-physical address.
    pub fn ram(self: &Arc<Self>, zone: u32) -> SimRam {
        SimRam {
            sim: self.clone(),
            zone,
        }
    }

    /// Waits up to `timeout` for `irq` to be pending in `zone`, and consumes it. With
    /// [`SimOptions::drop_while_active`], the guest is handling `irq` from the moment this
    /// returns true until it waits on the line again (its EOI).
    pub fn wait_irq(&self, zone: u32, irq: u32, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut irqs = lock(&self.shared.irqs);
        if let Some(active) = irqs.active.get_mut(&zone) {
            active.remove(&irq);
        }
        loop {
            if irqs.pending.get_mut(&zone).is_some_and(|p| p.remove(&irq)) {
                if self.shared.options.drop_while_active {
                    irqs.active.entry(zone).or_default().insert(irq);
                }
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            irqs = self
                .shared
                .irq_arrived
                .wait_timeout(irqs, deadline - now)
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .0;
        }
    }

    /// Holds the result ring (`true`): FINISH_REQ drains nothing, so the bridge's injections
    /// fill it, as a hypervisor that has stopped draining would. Letting go drains at once.
    pub fn hold_results(&self, hold: bool) {
        self.shared.results_held.store(hold, Ordering::Release);
        if !hold {
            self.shared.drain_results();
        }
    }

    /// Injection results waiting in the result ring.
    pub fn results_queued(&self) -> usize {
        self.shared.page.results_queued()
    }

    /// Whether the bridge has asked for a wakeup (`need_wakeup` set, read with a fence): it
    /// is asleep, or about to sleep once its re-check finds the request ring empty.
    pub fn wakeup_armed(&self) -> bool {
        self.shared.page.need_wakeup_fenced()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SimStats {
        let counters = &self.shared.counters;
        let irqs = lock(&self.shared.irqs);
        SimStats {
            requests: counters.requests.load(Ordering::Relaxed),
            async_requests: counters.async_requests.load(Ordering::Relaxed),
            ring_full_backoffs: counters.ring_full_backoffs.load(Ordering::Relaxed),
            wakeups: counters.wakeups.load(Ordering::Relaxed),
            wakeups_undelivered: counters.wakeups_undelivered.load(Ordering::Relaxed),
            wakeups_lost: counters.wakeups_lost.load(Ordering::Relaxed),
            irqs_delivered: irqs.delivered,
            unknown_zone_results: irqs.unknown_zone,
            irqs_dropped_active: irqs.dropped_active,
            max_pending_irqs: irqs.max_pending,
            pending_limit_violations: irqs.violations,
            unhandled_accesses: counters.unhandled_accesses.load(Ordering::Relaxed),
        }
    }
}

impl Drop for SimHypervisor {
    fn drop(&mut self) {
        if let Some(drain) = self.drain.take() {
            if self.exit.write(1).is_ok() {
                let _ = drain.join();
            }
        }
    }
}

/// The in-process [`Hsm`] of a [`SimHypervisor`].
#[derive(Debug)]
struct SimHsm {
    sim: Arc<SimHypervisor>,
    /// Signal mode: signal 10 blocked in the thread that made this, read here.
    signal: Option<SignalWakeup>,
}

impl Hsm for SimHsm {
    fn bridge(&self) -> &BridgePage {
        &self.sim.shared.page
    }

    fn wakeup_fd(&self) -> BorrowedFd<'_> {
        match &self.signal {
            Some(signal) => signal.fd(),
            None => borrow_eventfd(&self.sim.shared.wakeup),
        }
    }

    fn ack_wakeup(&self) {
        match &self.signal {
            Some(signal) => signal.drain(),
            // Non-blocking: EAGAIN just means the counter was already clear.
            None => {
                let _ = self.sim.shared.wakeup.read();
            }
        }
    }

    fn finish_req(&self) -> Result<(), HsmError> {
        self.sim
            .shared
            .finish
            .write(1)
            .map_err(|e| HsmError::io("signalling FINISH_REQ", e))
    }

    fn ram_region(&self, zone0_ipa: u64, size: u64) -> Result<RamFd, HsmError> {
        self.sim.shared.ram_region(zone0_ipa, size)
    }

    fn live_zones(&self) -> Option<Vec<u32>> {
        let zones = &self.sim.shared.zones;
        let running = zones.iter().filter(|z| z.running.load(Ordering::SeqCst));
        Some(running.map(|z| z.id).collect())
    }
}

/// A guest vCPU pinned to one physical CPU: its MMIO accesses trap like hvisor's.
#[derive(Debug, Clone)]
pub struct SimVcpu {
    sim: Arc<SimHypervisor>,
    zone: u32,
    cpu: u64,
}

impl SimVcpu {
    /// A trapped read of `size` bytes. Returns the bridge's reply unmasked, as hvisor does on
    /// aarch64; 0 outside every virtio window, and 0 at once at window offset 0x50 (hvisor
    /// sends that read asynchronously, unless [`NotifyAccess::WritesOnly`]).
    pub fn read(&self, addr: u64, size: u8) -> u64 {
        self.access(addr, size, None, None, Caller::Thread)
            .expect("no deadline, so no timeout")
    }

    /// A trapped write. Returns at once for QueueNotify at window offset 0x50, otherwise
    /// after the bridge replied.
    pub fn write(&self, addr: u64, size: u8, value: u64) {
        self.access(addr, size, Some(value), None, Caller::Thread)
            .expect("no deadline, so no timeout");
    }

    /// [`SimVcpu::read`] that gives up after `timeout` (hvisor would spin forever).
    ///
    /// After a timeout the late reply may still arrive and complete the next access early.
    pub fn read_within(&self, addr: u64, size: u8, timeout: Duration) -> Result<u64, HsmError> {
        self.access(
            addr,
            size,
            None,
            Some(Instant::now() + timeout),
            Caller::Thread,
        )
    }

    /// [`SimVcpu::write`] that gives up after `timeout`.
    pub fn write_within(
        &self,
        addr: u64,
        size: u8,
        value: u64,
        timeout: Duration,
    ) -> Result<(), HsmError> {
        self.access(
            addr,
            size,
            Some(value),
            Some(Instant::now() + timeout),
            Caller::Thread,
        )
        .map(drop)
    }

    /// One trapped access (`write` is `Some(value)` for a store), for a `SIGSEGV` handler that
    /// emulates a faulting load or store. Same semantics as [`SimVcpu::read_within`] and
    /// [`SimVcpu::write_within`] (an access at window offset 0x50 is asynchronous), but it
    /// neither allocates, logs nor sleeps on a lock: it spins on the simulator's locks and on
    /// the reply slot, and makes no system calls but `sched_yield`, `clock_gettime` and the
    /// wakeup (the eventfd's `write`, or `tgkill` in signal mode).
    ///
    /// The handler must not have interrupted this simulator's own code on the same thread (a
    /// fault raised by guest code never does), or the spin on its locks would never end.
    pub fn access_raw(
        &self,
        addr: u64,
        size: u8,
        write: Option<u64>,
        deadline: Option<Instant>,
    ) -> Result<u64, HsmError> {
        self.access(addr, size, write, deadline, Caller::SignalHandler)
    }

    /// The vCPU's physical CPU id.
    pub fn cpu(&self) -> u64 {
        self.cpu
    }

    /// hvisor's `mmio_virtio_handler`.
    fn access(
        &self,
        addr: u64,
        size: u8,
        write: Option<u64>,
        deadline: Option<Instant>,
        caller: Caller,
    ) -> Result<u64, HsmError> {
        let shared = &self.sim.shared;
        let window_base = shared.zone(self.zone).and_then(|zone| {
            zone.windows
                .iter()
                .find(|&&(base, len)| addr >= base && addr - base < len)
                .map(|&(base, _)| base)
        });
        let Some(base) = window_base else {
            shared
                .counters
                .unhandled_accesses
                .fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        };
        // Relative to the window, not the device: in a shared window only the first device's
        // notify is asynchronous. hvisor does not look at the direction: a read there is
        // asynchronous too, and returns 0 without a reply.
        let async_access = write.is_some() || shared.options.notify == NotifyAccess::Any;
        let need_interrupt = async_access && addr - base == QUEUE_NOTIFY_OFFSET;
        let _cpu = acquire(&shared.cpu_locks[self.cpu as usize], caller);
        let old_flag = shared.page.cfg_flag(self.cpu);
        shared.push(
            &DeviceReq {
                src_cpu: self.cpu,
                address: addr,
                size: size.into(),
                value: write.unwrap_or(0),
                src_zone: self.zone,
                is_write: write.is_some().into(),
                need_interrupt: need_interrupt.into(),
                padding: 0,
            },
            caller,
        );
        if need_interrupt {
            shared
                .counters
                .async_requests
                .fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        if !spin_until(|| shared.page.cfg_flag(self.cpu) != old_flag, deadline) {
            return Err(HsmError::SyncTimeout(self.cpu));
        }
        Ok(if write.is_some() {
            0
        } else {
            shared.page.cfg_value(self.cpu)
        })
    }
}

/// Guest RAM of one zone, addressed by guest-physical address (`zonex_ipa`).
#[derive(Debug, Clone)]
pub struct SimRam {
    sim: Arc<SimHypervisor>,
    zone: u32,
}

impl SimRam {
    /// The host address of `gpa..gpa+len`, which must lie inside one region.
    fn locate(&self, gpa: u64, len: usize) -> Result<*mut u8, HsmError> {
        let zone = self
            .sim
            .shared
            .zone(self.zone)
            .ok_or(HsmError::UnknownZone(self.zone))?;
        let outside = || HsmError::GuestAddress {
            zone: self.zone,
            gpa,
            len: len as u64,
        };
        let end = gpa.checked_add(len as u64).ok_or_else(outside)?;
        let region = zone
            .regions
            .iter()
            .find(|r| r.spec.zonex_ipa <= gpa && end <= r.spec.zonex_ipa + r.spec.size)
            .ok_or_else(outside)?;
        let offset = (gpa - region.spec.zonex_ipa) as usize;
        // SAFETY: offset + len <= region size == mapping length (checked above).
        Ok(unsafe { region.map.as_ptr().add(offset) })
    }

    /// The host address of guest RAM `gpa..gpa+len`, which must lie inside one region: for a
    /// guest driver that works on its RAM in place (DMA buffers of the trap harness). The
    /// memory is shared with the bridge and its backends; the pointer stays valid while this
    /// `SimRam` or its simulator lives.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> Result<NonNull<u8>, HsmError> {
        let ptr = self.locate(gpa, len)?;
        // A mapping is never at address 0; the error is unreachable but costs nothing.
        NonNull::new(ptr).ok_or(HsmError::GuestAddress {
            zone: self.zone,
            gpa,
            len: len as u64,
        })
    }

    /// Copies guest memory at `gpa` into `buf`.
    /// A naturally aligned 2-, 4- or 8-byte access is one atomic load, so a ring index that
    /// a backend updates concurrently is never torn (as on real hardware).
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), HsmError> {
        let src = self.locate(gpa, buf.len())?;
        if let Some(bytes) = atomic_load(src, buf.len()) {
            buf.copy_from_slice(&bytes[..buf.len()]);
            return Ok(());
        }
        // SAFETY: `src..src+len` is inside a live mapping owned by the simulator (kept alive
        // by `self.sim`); `buf` is a distinct Rust buffer. Guest RAM is plain bytes.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`; aligned 2-, 4- and 8-byte writes are single
    /// atomic stores, like `read`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), HsmError> {
        let dst = self.locate(gpa, data.len())?;
        if atomic_store(dst, data) {
            return Ok(());
        }
        // SAFETY: as in `read`; the mapping is writable and shared.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }
}

/// One atomic load of `len` (2, 4 or 8) bytes at an aligned `ptr` into guest RAM, as bytes in
/// memory order; `None` for other sizes or alignments.
fn atomic_load(ptr: *const u8, len: usize) -> Option<[u8; 8]> {
    if !matches!(len, 2 | 4 | 8) || !(ptr as usize).is_multiple_of(len) {
        return None;
    }
    let mut out = [0u8; 8];
    // SAFETY: `ptr` points into a live, shared guest-RAM mapping, is aligned for the type
    // read (checked above), and atomics tolerate the backend writing concurrently.
    unsafe {
        match len {
            2 => out[..2].copy_from_slice(
                &(*ptr.cast::<AtomicU16>())
                    .load(Ordering::Acquire)
                    .to_ne_bytes(),
            ),
            4 => out[..4].copy_from_slice(
                &(*ptr.cast::<AtomicU32>())
                    .load(Ordering::Acquire)
                    .to_ne_bytes(),
            ),
            _ => out.copy_from_slice(
                &(*ptr.cast::<AtomicU64>())
                    .load(Ordering::Acquire)
                    .to_ne_bytes(),
            ),
        }
    }
    Some(out)
}

/// One atomic store of `data` (2, 4 or 8 bytes) at an aligned `ptr`; false when `data` has
/// another size or `ptr` is not aligned for it.
fn atomic_store(ptr: *mut u8, data: &[u8]) -> bool {
    if !matches!(data.len(), 2 | 4 | 8) || !(ptr as usize).is_multiple_of(data.len()) {
        return false;
    }
    let mut bytes = [0u8; 8];
    bytes[..data.len()].copy_from_slice(data);
    // SAFETY: as in `atomic_load`; the mapping is writable.
    unsafe {
        match data.len() {
            2 => (*ptr.cast::<AtomicU16>())
                .store(u16::from_ne_bytes([bytes[0], bytes[1]]), Ordering::Release),
            4 => (*ptr.cast::<AtomicU32>()).store(
                u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
                Ordering::Release,
            ),
            _ => (*ptr.cast::<AtomicU64>()).store(u64::from_ne_bytes(bytes), Ordering::Release),
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::AtomicBool;
    use std::sync::mpsc;

    use vmm_sys_util::tempdir::TempDir;

    use super::*;
    use crate::abi::MAX_PENDING_IRQS;
    use crate::mmap::SharedMapping;
    use crate::ProviderHsm;

    const WINDOW: u64 = 0xa00_0000;
    const RAM_ZONE0: u64 = 0x5000_0000;
    const RAM_GPA: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 0x10_0000;
    const LONG: Duration = Duration::from_secs(30);

    fn zone(windows: Vec<(u64, u64)>) -> SimZoneSpec {
        SimZoneSpec {
            id: 1,
            regions: vec![
                SimRegion {
                    zone0_ipa: RAM_ZONE0,
                    zonex_ipa: RAM_GPA,
                    size: RAM_SIZE,
                },
                SimRegion {
                    zone0_ipa: RAM_ZONE0 + 0x100_0000,
                    zonex_ipa: RAM_GPA + RAM_SIZE,
                    size: RAM_SIZE,
                },
            ],
            windows,
        }
    }

    /// One 0x4000 window shared by all devices, as in the qemu-aarch64 examples.
    fn shared_window_sim() -> Arc<SimHypervisor> {
        SimHypervisor::new(vec![zone(vec![(WINDOW, 0x4000)])]).unwrap()
    }

    /// One 0x200 window per device, as in the nxp/rk3588 examples.
    fn per_device_window_sim() -> Arc<SimHypervisor> {
        SimHypervisor::new(vec![zone(vec![(WINDOW, 0x200), (WINDOW + 0x200, 0x200)])]).unwrap()
    }

    /// Plays the daemon: pops requests, replies to the synchronous ones with
    /// `address ^ 0xffff`, and reports every request on a channel.
    struct Responder {
        stop: Arc<AtomicBool>,
        seen: mpsc::Receiver<DeviceReq>,
        thread: Option<JoinHandle<()>>,
    }

    impl Responder {
        fn start(hsm: Arc<dyn Hsm>) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, seen) = mpsc::channel();
            let thread_stop = stop.clone();
            let thread = std::thread::spawn(move || {
                while !thread_stop.load(Ordering::Relaxed) {
                    let Some(req) = hsm.bridge().pop_request() else {
                        std::thread::yield_now();
                        continue;
                    };
                    if req.need_interrupt == 0 {
                        hsm.bridge()
                            .reply(req.src_cpu, req.address ^ 0xffff)
                            .unwrap();
                    }
                    let _ = tx.send(req);
                }
            });
            Responder {
                stop,
                seen,
                thread: Some(thread),
            }
        }

        fn next(&self) -> DeviceReq {
            self.seen.recv_timeout(LONG).expect("a request")
        }
    }

    impl Drop for Responder {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(thread) = self.thread.take() {
                thread.join().unwrap();
            }
        }
    }

    fn poll_readable(fd: BorrowedFd<'_>) -> bool {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        unsafe { libc::poll(&mut poll, 1, 0) == 1 }
    }

    #[test]
    fn sync_read_returns_the_reply() {
        let sim = shared_window_sim();
        let responder = Responder::start(sim.hsm());
        let vcpu = sim.vcpu(1, 3);
        assert_eq!(vcpu.read(WINDOW + 0x8, 4), (WINDOW + 0x8) ^ 0xffff);
        let req = responder.next();
        assert_eq!(
            req,
            DeviceReq {
                src_cpu: 3,
                address: WINDOW + 0x8,
                size: 4,
                value: 0,
                src_zone: 1,
                is_write: 0,
                need_interrupt: 0,
                padding: 0,
            }
        );
        // A synchronous write also waits for the reply.
        vcpu.write(WINDOW + 0x70, 4, 0xf);
        let req = responder.next();
        assert_eq!((req.is_write, req.need_interrupt, req.value), (1, 0, 0xf));
        assert_eq!(sim.hsm().bridge().cfg_flag(3), 2);
        let stats = sim.stats();
        assert_eq!((stats.requests, stats.async_requests), (2, 0));
    }

    #[test]
    fn queue_notify_is_async_and_unreplied() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 0);
        // No daemon is running: only an asynchronous access can return.
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 1);
        let req = hsm.bridge().pop_request().unwrap();
        assert_eq!(
            (req.address, req.is_write, req.need_interrupt),
            (WINDOW + 0x50, 1, 1)
        );
        assert_eq!(hsm.bridge().cfg_flag(0), 0, "nobody replied");
        assert_eq!(sim.stats().async_requests, 1);

        // With a daemon running, the notify still gets no reply.
        let responder = Responder::start(hsm.clone());
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert_eq!(responder.next().need_interrupt, 1);
        assert_eq!(hsm.bridge().cfg_flag(0), 0);
        // hvisor sends a read of that offset asynchronously too: 0 at once, no reply.
        assert_eq!(vcpu.read(WINDOW + QUEUE_NOTIFY_OFFSET, 4), 0);
        let req = responder.next();
        assert_eq!((req.is_write, req.need_interrupt), (0, 1));
        assert_eq!(hsm.bridge().cfg_flag(0), 0);
        assert_eq!(sim.stats().async_requests, 3);
    }

    #[test]
    fn notify_reads_are_sync_in_writes_only_mode() {
        let options = SimOptions {
            notify: NotifyAccess::WritesOnly,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(vec![zone(vec![(WINDOW, 0x4000)])], options).unwrap();
        let responder = Responder::start(sim.hsm());
        let vcpu = sim.vcpu(1, 0);
        let got = vcpu.read(WINDOW + QUEUE_NOTIFY_OFFSET, 4);
        assert_eq!(got, (WINDOW + QUEUE_NOTIFY_OFFSET) ^ 0xffff);
        assert_eq!(responder.next().need_interrupt, 0);
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert_eq!(responder.next().need_interrupt, 1);
    }

    #[test]
    fn raw_access_is_trapped_like_the_others() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 2);
        vcpu.access_raw(WINDOW + QUEUE_NOTIFY_OFFSET, 4, Some(3), None)
            .unwrap();
        let req = hsm.bridge().pop_request().unwrap();
        assert_eq!((req.value, req.need_interrupt), (3, 1), "async notify");

        let deadline = || Some(Instant::now() + Duration::from_millis(20));
        assert!(matches!(
            vcpu.access_raw(WINDOW + 0x70, 4, None, deadline()),
            Err(HsmError::SyncTimeout(2))
        ));
        hsm.bridge().pop_request().unwrap();

        let responder = Responder::start(hsm.clone());
        let got = vcpu.access_raw(WINDOW + 0x8, 2, None, None).unwrap();
        assert_eq!(got, (WINDOW + 0x8) ^ 0xffff);
        let req = responder.next();
        assert_eq!((req.size, req.is_write, req.need_interrupt), (2, 0, 0));
        // The timed-out read was taken off the ring unanswered: one reply in all.
        assert_eq!(hsm.bridge().cfg_flag(2), 1);
    }

    #[test]
    fn host_ptr_is_the_guest_ram() {
        let sim = shared_window_sim();
        let ram = sim.ram(1);
        let ptr = ram.host_ptr(RAM_GPA + RAM_SIZE + 8, 4).unwrap();
        // SAFETY: 4 bytes inside the second region's live mapping; no one else touches them.
        unsafe {
            ptr.as_ptr()
                .copy_from_nonoverlapping([5, 6, 7, 8].as_ptr(), 4)
        };
        let mut got = [0u8; 4];
        ram.read(RAM_GPA + RAM_SIZE + 8, &mut got).unwrap();
        assert_eq!(got, [5, 6, 7, 8]);
        assert!(
            ram.host_ptr(RAM_GPA + RAM_SIZE - 2, 4).is_err(),
            "spans regions"
        );
    }

    #[test]
    fn notify_of_second_device_in_a_shared_window_is_sync() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 1);
        assert!(matches!(
            vcpu.write_within(WINDOW + 0x250, 4, 0, Duration::from_millis(20)),
            Err(HsmError::SyncTimeout(1))
        ));
        assert_eq!(hsm.bridge().pop_request().unwrap().need_interrupt, 0);

        let responder = Responder::start(hsm.clone());
        let flag = hsm.bridge().cfg_flag(1);
        vcpu.write(WINDOW + 0x250, 4, 0);
        let req = responder.next();
        assert_eq!((req.address, req.need_interrupt), (WINDOW + 0x250, 0));
        assert_eq!(hsm.bridge().cfg_flag(1), flag + 1);
    }

    #[test]
    fn notify_of_second_device_in_its_own_window_is_async() {
        let sim = per_device_window_sim();
        let hsm = sim.hsm();
        sim.vcpu(1, 1).write(WINDOW + 0x250, 4, 0);
        assert_eq!(hsm.bridge().pop_request().unwrap().need_interrupt, 1);
    }

    #[test]
    fn access_outside_windows_is_not_sent() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 0);
        assert_eq!(vcpu.read(WINDOW + 0x4000, 4), 0);
        vcpu.write(WINDOW - 4, 4, 1);
        assert_eq!(sim.vcpu(7, 0).read(WINDOW, 4), 0, "unknown zone");
        assert!(!hsm.bridge().has_requests());
        assert_eq!(sim.stats().unhandled_accesses, 3);
        assert_eq!(sim.stats().requests, 0);
    }

    #[test]
    fn wakeup_is_written_only_when_requested() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 0);
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert!(!poll_readable(hsm.wakeup_fd()));
        assert_eq!(sim.stats().wakeups, 0);

        hsm.bridge().pop_request().unwrap();
        assert!(hsm.bridge().arm_wakeup());
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert!(poll_readable(hsm.wakeup_fd()));
        assert_eq!(sim.stats().wakeups, 1);
        hsm.ack_wakeup();
        assert!(!poll_readable(hsm.wakeup_fd()));
        hsm.bridge().disarm_wakeup();
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert!(!poll_readable(hsm.wakeup_fd()));
    }

    #[test]
    fn every_nth_requested_wakeup_is_lost_when_asked() {
        let options = SimOptions {
            lose_wakeup_every: 2,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(vec![zone(vec![(WINDOW, 0x4000)])], options).unwrap();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 0);
        // Not armed: nothing sent, nothing lost, and the count of armed pushes stays.
        vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        hsm.bridge().pop_request().unwrap();
        let mut woken = Vec::new();
        for _ in 0..4 {
            assert!(hsm.bridge().arm_wakeup());
            assert!(sim.wakeup_armed());
            vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
            woken.push(poll_readable(hsm.wakeup_fd()));
            hsm.ack_wakeup();
            hsm.bridge().disarm_wakeup();
            hsm.bridge().pop_request().unwrap();
        }
        assert_eq!(woken, [true, false, true, false]);
        let stats = sim.stats();
        assert_eq!((stats.wakeups, stats.wakeups_lost), (2, 2));
    }

    fn signal_sim() -> Arc<SimHypervisor> {
        let options = SimOptions {
            wakeup: SimWakeup::Signal,
            ..SimOptions::default()
        };
        SimHypervisor::with_options(vec![zone(vec![(WINDOW, 0x4000)])], options).unwrap()
    }

    /// Runs `f` on a fresh thread, so that the signal mask it changes dies with it.
    fn on_own_thread(f: impl FnOnce() + Send + 'static) {
        std::thread::spawn(f).join().unwrap();
    }

    #[test]
    fn signal_mode_wakes_the_registered_thread() {
        on_own_thread(|| {
            let sim = signal_sim();
            let hsm = sim.hsm();
            // SAFETY: getpid has no arguments and cannot fail.
            let me = (unsafe { libc::getpid() }, gettid());
            assert_eq!(sim.signal_target(), Some(me));
            assert!(hsm.bridge().arm_wakeup());
            // The vCPU runs on another thread; the signal still goes to this one.
            let vcpu = sim.vcpu(1, 0);
            std::thread::spawn(move || vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0))
                .join()
                .unwrap();
            assert!(poll_readable(hsm.wakeup_fd()));
            hsm.ack_wakeup();
            assert!(!poll_readable(hsm.wakeup_fd()));
            let stats = sim.stats();
            assert_eq!((stats.wakeups, stats.wakeups_undelivered), (1, 0));
        });
    }

    #[test]
    fn signal_to_a_gone_thread_is_counted_undelivered() {
        let sim = signal_sim();
        let registering = sim.clone();
        let hsm = std::thread::spawn(move || registering.hsm())
            .join()
            .unwrap();
        assert!(hsm.bridge().arm_wakeup());
        sim.vcpu(1, 0).write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        let stats = sim.stats();
        assert_eq!((stats.wakeups, stats.wakeups_undelivered), (1, 1));
    }

    #[test]
    fn provider_in_signal_mode_learns_the_bridge_thread() {
        on_own_thread(|| {
            let sim = signal_sim();
            let dir = TempDir::new().unwrap();
            let socket = dir.as_path().join("hsm.sock");
            let _server = sim.serve(&socket).unwrap();
            let hsm = ProviderHsm::connect(&socket).unwrap();
            assert_eq!(hsm.wakeup_kind(), WakeupKind::Signal);
            // SAFETY: getpid has no arguments and cannot fail.
            let me = (unsafe { libc::getpid() }, gettid());
            let deadline = Some(Instant::now() + LONG);
            assert!(spin_until(|| sim.signal_target() == Some(me), deadline));
            assert!(hsm.bridge().arm_wakeup());
            sim.vcpu(1, 0).write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
            assert!(poll_readable(hsm.wakeup_fd()));
            hsm.ack_wakeup();
            assert!(!poll_readable(hsm.wakeup_fd()));
        });
    }

    #[test]
    fn provider_hands_over_the_abi_variant() {
        let abi = crate::HvisorAbi::new(32, 4, 4);
        let options = SimOptions {
            abi,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(vec![zone(vec![(WINDOW, 0x4000)])], options).unwrap();
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("hsm.sock");
        let _server = sim.serve(&socket).unwrap();
        let hsm: Arc<dyn Hsm> = Arc::new(ProviderHsm::connect(&socket).unwrap());
        assert_eq!(hsm.bridge().abi(), abi);
        let responder = Responder::start(hsm.clone());
        assert_eq!(sim.vcpu(1, 3).read(WINDOW + 8, 4), (WINDOW + 8) ^ 0xffff);
        assert_eq!(responder.next().src_cpu, 3);
        // Three distinct pending IRQs are hvisor's limit with MAX_DEVS = 4.
        for irq in [1, 2, 3, 4] {
            hsm.bridge().push_result(1, irq).unwrap();
        }
        hsm.finish_req().unwrap();
        assert!(sim.wait_irq(1, 4, LONG));
        assert_eq!(sim.stats().pending_limit_violations, 1);
    }

    #[test]
    fn full_ring_backs_off_until_the_daemon_resumes() {
        let sim = per_device_window_sim();
        let hsm = sim.hsm();
        let vcpu = sim.vcpu(1, 2);
        let guest = std::thread::spawn(move || {
            for n in 0..40 {
                vcpu.write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, n);
            }
        });
        // The daemon is "paused" until the vCPU is stuck on a full ring.
        let deadline = Some(Instant::now() + LONG);
        assert!(spin_until(
            || {
                let stats = sim.stats();
                stats.requests == 31 && stats.ring_full_backoffs > 0
            },
            deadline
        ));
        let mut values = Vec::new();
        assert!(spin_until(
            || {
                if let Some(req) = hsm.bridge().pop_request() {
                    values.push(req.value);
                }
                values.len() == 40
            },
            deadline
        ));
        guest.join().unwrap();
        assert_eq!(values, (0..40).collect::<Vec<_>>());
        assert_eq!(sim.stats().requests, 40);
    }

    #[test]
    fn results_become_pending_irqs() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        hsm.bridge().push_result(1, 78).unwrap();
        hsm.finish_req().unwrap();
        assert!(sim.wait_irq(1, 78, LONG));
        assert!(!sim.wait_irq(1, 78, Duration::from_millis(10)), "consumed");
        assert!(!sim.wait_irq(2, 78, Duration::from_millis(10)));
        assert_eq!(sim.stats().irqs_delivered, 1);
    }

    #[test]
    fn an_injection_while_the_guest_handles_the_irq_can_be_dropped() {
        let options = SimOptions {
            drop_while_active: true,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(vec![zone(vec![(WINDOW, 0x4000)])], options).unwrap();
        let hsm = sim.hsm();
        // The marker goes in the same drain batch, after 78: once it is pending, 78 was
        // handled. Each round takes a fresh marker, because a consumed marker stays active
        // and the drain may run before the guest waits on it again.
        let inject = |marker: u32| {
            hsm.bridge().push_result(1, 78).unwrap();
            hsm.bridge().push_result(1, marker).unwrap();
            hsm.finish_req().unwrap();
            assert!(sim.wait_irq(1, marker, LONG), "marker {marker} delivered");
        };
        inject(70);
        assert!(sim.wait_irq(1, 78, LONG));
        // The guest is inside its handler: hvisor finds the IRQ active and drops this one.
        inject(71);
        assert_eq!(sim.stats().irqs_dropped_active, 1);
        // Waiting again ends the handler; the dropped injection never arrives.
        assert!(!sim.wait_irq(1, 78, Duration::from_millis(10)));
        inject(72);
        assert!(
            sim.wait_irq(1, 78, LONG),
            "delivered once the guest is done"
        );
        assert_eq!(sim.stats().irqs_dropped_active, 1);
    }

    #[test]
    fn pending_irqs_are_distinct_and_limited() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        for irq in [78, 78, 76] {
            hsm.bridge().push_result(1, irq).unwrap();
        }
        hsm.bridge().push_result(9, 5).unwrap();
        hsm.finish_req().unwrap();
        // One finish after all pushes: the drain takes them as one batch.
        assert!(sim.wait_irq(1, 76, LONG));
        let stats = sim.stats();
        assert_eq!(stats.irqs_delivered, 3);
        assert_eq!(stats.unknown_zone_results, 1);
        assert_eq!(stats.max_pending_irqs, 2, "78 twice is one pending IRQ");
        assert_eq!(stats.pending_limit_violations, 0);
        assert!(sim.wait_irq(1, 78, LONG));
        assert!(!sim.wait_irq(1, 78, Duration::from_millis(10)));

        for irq in 100..100 + MAX_PENDING_IRQS as u32 + 1 {
            hsm.bridge().push_result(1, irq).unwrap();
        }
        hsm.finish_req().unwrap();
        assert!(sim.wait_irq(1, 100, LONG));
        let stats = sim.stats();
        assert_eq!(stats.max_pending_irqs, MAX_PENDING_IRQS + 1);
        assert_eq!(stats.pending_limit_violations, 1);
    }

    #[test]
    fn ram_is_bounds_checked_per_region() {
        let sim = shared_window_sim();
        let ram = sim.ram(1);
        ram.write(RAM_GPA + 0x10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        ram.read(RAM_GPA + 0x10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // The last bytes of a region and the first of the next one are both fine...
        ram.write(RAM_GPA + RAM_SIZE - 2, b"ab").unwrap();
        ram.write(RAM_GPA + RAM_SIZE, b"cd").unwrap();
        // ...but one access may not span them, even though both are RAM.
        let err = ram.write(RAM_GPA + RAM_SIZE - 1, b"xy").unwrap_err();
        assert!(
            matches!(err, HsmError::GuestAddress { zone: 1, gpa, len: 2 } if gpa == RAM_GPA + RAM_SIZE - 1)
        );
        assert!(ram.read(RAM_GPA - 1, &mut buf).is_err());
        assert!(ram.read(RAM_GPA + 2 * RAM_SIZE, &mut buf[..1]).is_err());
        assert!(ram.read(u64::MAX - 1, &mut buf).is_err());
        assert!(matches!(
            sim.ram(5).read(RAM_GPA, &mut buf),
            Err(HsmError::UnknownZone(5))
        ));
    }

    /// Reads 4 bytes at `offset` of a fresh mapping of `fd`.
    fn read_fd(fd: BorrowedFd<'_>, offset: u64) -> [u8; 4] {
        let page = offset & !0xfff;
        let map = SharedMapping::new(fd, page, 0x1000).unwrap();
        let mut got = [0u8; 4];
        // SAFETY: 4 bytes inside the 4 KiB mapping; nothing else writes them now.
        unsafe {
            std::ptr::copy_nonoverlapping(
                map.as_ptr().add((offset - page) as usize),
                got.as_mut_ptr(),
                4,
            )
        };
        got
    }

    #[test]
    fn ram_is_one_physical_file_by_default() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        sim.ram(1).write(RAM_GPA + 0x10, &[9, 8, 7, 6]).unwrap();
        let region = hsm.ram_region(RAM_ZONE0, RAM_SIZE).unwrap();
        // As from /dev/hvisor: the offset is the physical address...
        assert_eq!(region.offset, RAM_ZONE0);
        assert_eq!(read_fd(region.fd.as_fd(), RAM_ZONE0 + 0x10), [9, 8, 7, 6]);
        // ...and offset 0 of the same file is the bridge page, followed by memory that is
        // not the zone's (root Linux's, here a hole).
        hsm.bridge().reply(0, 0x0403_0201).unwrap();
        let cfg_values = offset_of!(crate::VirtioBridge, cfg_values) as u64;
        assert_eq!(read_fd(region.fd.as_fd(), cfg_values), [1, 2, 3, 4]);
        assert_eq!(read_fd(region.fd.as_fd(), 0x10_0010), [0; 4]);
        let second = hsm.ram_region(RAM_ZONE0 + 0x100_0000, 0x1000).unwrap();
        assert_eq!(second.offset, RAM_ZONE0 + 0x100_0000);

        // The old layout: a memfd per region, mapped from 0.
        let options = SimOptions {
            ram: SimRamLayout::MemfdPerRegion,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(vec![zone(vec![])], options).unwrap();
        sim.ram(1).write(RAM_GPA + 0x10, &[9, 8, 7, 6]).unwrap();
        let region = sim.hsm().ram_region(RAM_ZONE0, RAM_SIZE).unwrap();
        assert_eq!(region.offset, 0);
        assert_eq!(read_fd(region.fd.as_fd(), 0x10), [9, 8, 7, 6]);

        // Mapped at its physical address, a region must be page-aligned and clear of the
        // bridge page.
        for (zone0_ipa, size) in [(0x1800, 0x1000), (0x2000, 0x1800), (0, 0x1000)] {
            let spec = SimZoneSpec {
                id: 1,
                regions: vec![SimRegion {
                    zone0_ipa,
                    zonex_ipa: 0,
                    size,
                }],
                windows: vec![],
            };
            assert!(matches!(
                SimHypervisor::with_options(vec![spec.clone()], SimOptions::default()),
                Err(HsmError::SimConfig(_))
            ));
            let per_region = SimOptions {
                ram: SimRamLayout::MemfdPerRegion,
                ..SimOptions::default()
            };
            assert!(SimHypervisor::with_options(vec![spec], per_region).is_ok());
        }
    }

    #[test]
    fn ram_region_maps_the_guest_ram() {
        let sim = shared_window_sim();
        let hsm = sim.hsm();
        sim.ram(1)
            .write(RAM_GPA + RAM_SIZE + 0x2010, &[1, 2, 3, 4])
            .unwrap();
        let region = hsm
            .ram_region(RAM_ZONE0 + 0x100_0000 + 0x2000, 0x1000)
            .unwrap();
        assert_eq!(region.offset, RAM_ZONE0 + 0x100_0000 + 0x2000);
        let map = SharedMapping::new(region.fd.as_fd(), region.offset, 0x1000).unwrap();
        let mut got = [0u8; 4];
        // SAFETY: 0x10..0x14 lies inside the 4 KiB mapping; nothing else writes it now.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr().add(0x10), got.as_mut_ptr(), 4) };
        assert_eq!(got, [1, 2, 3, 4]);
        assert!(matches!(
            hsm.ram_region(RAM_ZONE0 + RAM_SIZE - 0x1000, 0x2000),
            Err(HsmError::NoRamRegion { .. })
        ));
    }

    #[test]
    fn provider_socket_serves_a_remote_bridge() {
        let sim = shared_window_sim();
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("hsm.sock");
        let server = sim.serve(&socket).unwrap();
        let hsm: Arc<dyn Hsm> = Arc::new(ProviderHsm::connect(&socket).unwrap());
        let remote = ProviderHsm::connect(&socket).unwrap();

        let responder = Responder::start(hsm.clone());
        assert_eq!(sim.vcpu(1, 4).read(WINDOW + 4, 4), (WINDOW + 4) ^ 0xffff);
        assert_eq!(responder.next().src_cpu, 4);
        drop(responder);

        assert!(hsm.bridge().arm_wakeup());
        sim.vcpu(1, 0).write(WINDOW + QUEUE_NOTIFY_OFFSET, 4, 0);
        assert!(poll_readable(hsm.wakeup_fd()));

        hsm.bridge().push_result(1, 79).unwrap();
        hsm.finish_req().unwrap();
        assert!(sim.wait_irq(1, 79, LONG));

        sim.ram(1).write(RAM_GPA, b"ram").unwrap();
        let region = hsm.ram_region(RAM_ZONE0, RAM_SIZE).unwrap();
        let map = SharedMapping::new(region.fd.as_fd(), region.offset, 4096).unwrap();
        let mut got = [0u8; 3];
        // SAFETY: the first 3 bytes of a live 4 KiB mapping.
        unsafe { std::ptr::copy_nonoverlapping(map.as_ptr(), got.as_mut_ptr(), 3) };
        assert_eq!(&got, b"ram");

        assert!(!poll_readable(remote.control_fd()));
        drop(server);
        assert!(
            poll_readable(remote.control_fd()),
            "EOF once the provider stops"
        );
        assert!(!socket.exists(), "socket removed");
    }

    #[test]
    fn stale_socket_file_is_replaced() {
        let sim = shared_window_sim();
        let dir = TempDir::new().unwrap();
        let socket = dir.as_path().join("hsm.sock");
        drop(UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        let _server = sim.serve(&socket).unwrap();
        assert!(ProviderHsm::connect(&socket).is_ok());
    }

    #[test]
    fn bad_specs_are_rejected() {
        let region = |zone0_ipa, zonex_ipa, size| SimRegion {
            zone0_ipa,
            zonex_ipa,
            size,
        };
        let spec = |id, regions, windows| SimZoneSpec {
            id,
            regions,
            windows,
        };
        let cases = [
            vec![spec(1, vec![], vec![]), spec(1, vec![], vec![])],
            vec![spec(1, vec![region(0x1000, 0x1000, 0)], vec![])],
            vec![spec(
                1,
                vec![region(0, 0, 0x2000), region(0x4000, 0x1000, 0x1000)],
                vec![],
            )],
            vec![
                spec(1, vec![region(0, 0, 0x2000)], vec![]),
                spec(2, vec![region(0x1000, 0, 0x1000)], vec![]),
            ],
            vec![spec(1, vec![], vec![(0, 0x200), (0x100, 0x200)])],
            vec![spec(1, vec![], vec![(u64::MAX, 2)])],
        ];
        for zones in cases {
            let debug = format!("{zones:?}");
            assert!(
                matches!(SimHypervisor::new(zones), Err(HsmError::SimConfig(_))),
                "{debug}"
            );
        }
    }
}
