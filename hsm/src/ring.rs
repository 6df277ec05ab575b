//! Safe access to a mapped bridge page, for both the daemon and the hypervisor role.
//!
//! Every access goes through an atomic view of the shared page, with the orderings of
//! hvisor-tool's `virtio.c` and hvisor's `virtio_trampoline.rs` (acquire on the index that
//! publishes, release on the index that frees), plus a SeqCst fence on both sides of the
//! `need_wakeup` handshake. Indices read from the page are masked, never trusted.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::abi::{DeviceReq, DeviceRes, VirtioBridge, MAX_CPUS, MAX_DEVS, MAX_REQ, MMAP_SIZE};
use crate::mmap::{regular_file_size, SharedMapping};
use crate::HsmError;

/// How long [`BridgePage::push_result`] waits for the hypervisor to drain a full result ring.
pub const RESULT_RING_WAIT: Duration = Duration::from_secs(1);

/// Busy-wait iterations before a waiter starts yielding its CPU.
const SPINS_BEFORE_YIELD: u32 = 4096;

const RING_MASK: u32 = MAX_REQ as u32 - 1;

const REQ_FRONT: usize = offset_of!(VirtioBridge, req_front);
const REQ_REAR: usize = offset_of!(VirtioBridge, req_rear);
const RES_FRONT: usize = offset_of!(VirtioBridge, res_front);
const RES_REAR: usize = offset_of!(VirtioBridge, res_rear);
const REQ_LIST: usize = offset_of!(VirtioBridge, req_list);
const RES_LIST: usize = offset_of!(VirtioBridge, res_list);
const CFG_FLAGS: usize = offset_of!(VirtioBridge, cfg_flags);
const CFG_VALUES: usize = offset_of!(VirtioBridge, cfg_values);
const MMIO_ADDRS: usize = offset_of!(VirtioBridge, mmio_addrs);
const MMIO_AVAIL: usize = offset_of!(VirtioBridge, mmio_avail);
const NEED_WAKEUP: usize = offset_of!(VirtioBridge, need_wakeup);

/// Waits until `done()` holds: spins first, then yields between checks so that the other
/// side makes progress even when it shares our CPU. Gives up at `deadline`.
pub(crate) fn spin_until(mut done: impl FnMut() -> bool, deadline: Option<Instant>) -> bool {
    let mut spins: u32 = 0;
    loop {
        if done() {
            return true;
        }
        if spins < SPINS_BEFORE_YIELD {
            spins += 1;
            std::hint::spin_loop();
            if spins & 1023 != 0 {
                continue;
            }
        } else {
            std::thread::yield_now();
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return done();
        }
    }
}

/// A mapped bridge page (owns its mapping, unmaps on drop).
pub struct BridgePage {
    map: SharedMapping,
    /// Serialises result-ring producers (hvisor-tool's `RES_MUTEX`).
    result_lock: Mutex<()>,
}

impl fmt::Debug for BridgePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgePage")
            .field("addr", &self.map.as_ptr())
            .field("req_front", &self.u32_at(REQ_FRONT).load(Ordering::Relaxed))
            .field("req_rear", &self.u32_at(REQ_REAR).load(Ordering::Relaxed))
            .field("res_front", &self.u32_at(RES_FRONT).load(Ordering::Relaxed))
            .field("res_rear", &self.u32_at(RES_REAR).load(Ordering::Relaxed))
            .finish()
    }
}

impl BridgePage {
    /// Maps the bridge page of `fd` at `offset` (MAP_SHARED, read-write, 4096 bytes).
    pub fn map(fd: BorrowedFd<'_>, offset: u64) -> Result<BridgePage, HsmError> {
        // A too-short regular file would SIGBUS on first access: refuse it up front.
        if let Some(file_size) =
            regular_file_size(fd).map_err(|e| HsmError::io("fstat of the bridge fd", e))?
        {
            if offset.saturating_add(MMAP_SIZE as u64) > file_size {
                return Err(HsmError::Protocol(format!(
                    "bridge page at {offset:#x} is beyond the end of its file ({file_size:#x} bytes)"
                )));
            }
        }
        let map = SharedMapping::new(fd, offset, MMAP_SIZE)
            .map_err(|e| HsmError::io("mmap of the bridge page", e))?;
        Ok(BridgePage {
            map,
            result_lock: Mutex::new(()),
        })
    }

    fn check_field<T>(&self, offset: usize) {
        assert!(
            offset + size_of::<T>() <= self.map.len() && offset & (align_of::<T>() - 1) == 0,
            "bridge field offset {offset:#x} out of the page or misaligned"
        );
    }

    fn u8_at(&self, offset: usize) -> &AtomicU8 {
        self.check_field::<AtomicU8>(offset);
        // SAFETY: the offset is inside the mapping (checked above), which lives as long as
        // `self`; the page is only ever accessed atomically by this process.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU8>() }
    }

    fn u16_at(&self, offset: usize) -> &AtomicU16 {
        self.check_field::<AtomicU16>(offset);
        // SAFETY: in bounds and aligned (checked above); the mapping outlives the reference.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU16>() }
    }

    fn u32_at(&self, offset: usize) -> &AtomicU32 {
        self.check_field::<AtomicU32>(offset);
        // SAFETY: in bounds and aligned (checked above); the mapping outlives the reference.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn u64_at(&self, offset: usize) -> &AtomicU64 {
        self.check_field::<AtomicU64>(offset);
        // SAFETY: in bounds and aligned (checked above); the mapping outlives the reference.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU64>() }
    }

    fn req_slot(index: u32) -> usize {
        REQ_LIST + (index & RING_MASK) as usize * size_of::<DeviceReq>()
    }

    fn res_slot(index: u32) -> usize {
        RES_LIST + (index & RING_MASK) as usize * size_of::<DeviceRes>()
    }

    fn cpu_index(cpu: u64) -> Result<usize, HsmError> {
        usize::try_from(cpu)
            .ok()
            .filter(|&c| c < MAX_CPUS)
            .ok_or(HsmError::BadCpu(cpu))
    }

    fn read_req(&self, index: u32) -> DeviceReq {
        let slot = Self::req_slot(index);
        let field = |name_offset| slot + name_offset;
        DeviceReq {
            src_cpu: self
                .u64_at(field(offset_of!(DeviceReq, src_cpu)))
                .load(Ordering::Relaxed),
            address: self
                .u64_at(field(offset_of!(DeviceReq, address)))
                .load(Ordering::Relaxed),
            size: self
                .u64_at(field(offset_of!(DeviceReq, size)))
                .load(Ordering::Relaxed),
            value: self
                .u64_at(field(offset_of!(DeviceReq, value)))
                .load(Ordering::Relaxed),
            src_zone: self
                .u32_at(field(offset_of!(DeviceReq, src_zone)))
                .load(Ordering::Relaxed),
            is_write: self
                .u8_at(field(offset_of!(DeviceReq, is_write)))
                .load(Ordering::Relaxed),
            need_interrupt: self
                .u8_at(field(offset_of!(DeviceReq, need_interrupt)))
                .load(Ordering::Relaxed),
            padding: self
                .u16_at(field(offset_of!(DeviceReq, padding)))
                .load(Ordering::Relaxed),
        }
    }

    fn write_req(&self, index: u32, req: &DeviceReq) {
        let slot = Self::req_slot(index);
        let field = |name_offset| slot + name_offset;
        self.u64_at(field(offset_of!(DeviceReq, src_cpu)))
            .store(req.src_cpu, Ordering::Relaxed);
        self.u64_at(field(offset_of!(DeviceReq, address)))
            .store(req.address, Ordering::Relaxed);
        self.u64_at(field(offset_of!(DeviceReq, size)))
            .store(req.size, Ordering::Relaxed);
        self.u64_at(field(offset_of!(DeviceReq, value)))
            .store(req.value, Ordering::Relaxed);
        self.u32_at(field(offset_of!(DeviceReq, src_zone)))
            .store(req.src_zone, Ordering::Relaxed);
        self.u8_at(field(offset_of!(DeviceReq, is_write)))
            .store(req.is_write, Ordering::Relaxed);
        self.u8_at(field(offset_of!(DeviceReq, need_interrupt)))
            .store(req.need_interrupt, Ordering::Relaxed);
        self.u16_at(field(offset_of!(DeviceReq, padding)))
            .store(req.padding, Ordering::Relaxed);
    }

    // ---- Daemon (bridge) side ----

    /// Takes the oldest request (single consumer). Acquire on `req_rear`, release of the slot
    /// through `req_front`.
    pub fn pop_request(&self) -> Option<DeviceReq> {
        let front = self.u32_at(REQ_FRONT).load(Ordering::Relaxed) & RING_MASK;
        let rear = self.u32_at(REQ_REAR).load(Ordering::Acquire) & RING_MASK;
        if front == rear {
            return None;
        }
        let req = self.read_req(front);
        self.u32_at(REQ_FRONT)
            .store((front + 1) & RING_MASK, Ordering::Release);
        Some(req)
    }

    /// Whether the request ring holds anything.
    pub fn has_requests(&self) -> bool {
        let front = self.u32_at(REQ_FRONT).load(Ordering::Relaxed) & RING_MASK;
        let rear = self.u32_at(REQ_REAR).load(Ordering::Acquire) & RING_MASK;
        front != rear
    }

    /// Completes the synchronous request of `cpu`: `cfg_values[cpu] = value`, then bumps
    /// `cfg_flags[cpu]` with release ordering.
    pub fn reply(&self, cpu: u64, value: u64) -> Result<(), HsmError> {
        let cpu = Self::cpu_index(cpu)?;
        self.u64_at(CFG_VALUES + cpu * 8)
            .store(value, Ordering::Release);
        self.u64_at(CFG_FLAGS + cpu * 8)
            .fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// Queues an IRQ injection for `zone`, waiting up to [`RESULT_RING_WAIT`] while the ring is full.
    pub fn push_result(&self, zone: u32, irq: u32) -> Result<(), HsmError> {
        self.push_result_within(zone, irq, RESULT_RING_WAIT)
    }

    /// [`BridgePage::push_result`] with an explicit bound on the wait for a full ring.
    pub fn push_result_within(
        &self,
        zone: u32,
        irq: u32,
        max_wait: Duration,
    ) -> Result<(), HsmError> {
        let _producer = self
            .result_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let rear = self.u32_at(RES_REAR).load(Ordering::Relaxed) & RING_MASK;
        let next = (rear + 1) & RING_MASK;
        let has_room = || self.u32_at(RES_FRONT).load(Ordering::Acquire) & RING_MASK != next;
        if !spin_until(has_room, Some(Instant::now() + max_wait)) {
            return Err(HsmError::ResultRingFull);
        }
        let slot = Self::res_slot(rear);
        self.u32_at(slot + offset_of!(DeviceRes, target_zone))
            .store(zone, Ordering::Relaxed);
        self.u32_at(slot + offset_of!(DeviceRes, irq_id))
            .store(irq, Ordering::Relaxed);
        self.u32_at(RES_REAR).store(next, Ordering::Release);
        Ok(())
    }

    /// Asks for a wakeup before sleeping. Returns true when it is safe to sleep (the ring is
    /// still empty after the flag became visible); otherwise clears the flag and returns false.
    pub fn arm_wakeup(&self) -> bool {
        self.u8_at(NEED_WAKEUP).store(1, Ordering::Relaxed);
        // Pairs with the fence in `need_wakeup()`: either we see the new request or the
        // producer sees our flag (Dekker).
        fence(Ordering::SeqCst);
        if self.has_requests() {
            self.disarm_wakeup();
            false
        } else {
            true
        }
    }

    /// Clears `need_wakeup` (the daemon is polling).
    pub fn disarm_wakeup(&self) {
        self.u8_at(NEED_WAKEUP).store(0, Ordering::Relaxed);
    }

    /// Publishes device base addresses (at most [`MAX_DEVS`]) and sets `mmio_avail`.
    pub fn publish_mmio_addrs(&self, addrs: &[u64]) {
        for (i, &addr) in addrs.iter().take(MAX_DEVS).enumerate() {
            self.u64_at(MMIO_ADDRS + i * 8)
                .store(addr, Ordering::Relaxed);
        }
        self.u8_at(MMIO_AVAIL).store(1, Ordering::Release);
    }

    // ---- Hypervisor (simulator / rig) side ----

    /// Queues a request; false when the ring is full. Producers must be serialised by the caller.
    pub fn push_request(&self, req: &DeviceReq) -> bool {
        let rear = self.u32_at(REQ_REAR).load(Ordering::Relaxed) & RING_MASK;
        let front = self.u32_at(REQ_FRONT).load(Ordering::Acquire) & RING_MASK;
        let next = (rear + 1) & RING_MASK;
        if next == front {
            return false;
        }
        self.write_req(rear, req);
        fence(Ordering::Release);
        self.u32_at(REQ_REAR).store(next, Ordering::Release);
        true
    }

    /// `cfg_flags[cpu]` (acquire).
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS` (hvisor itself would panic on such a CPU).
    pub fn cfg_flag(&self, cpu: u64) -> u64 {
        let cpu = Self::cpu_index(cpu).expect("cpu id below MAX_CPUS");
        self.u64_at(CFG_FLAGS + cpu * 8).load(Ordering::Acquire)
    }

    /// `cfg_values[cpu]`, read after [`BridgePage::cfg_flag`] moved.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    pub fn cfg_value(&self, cpu: u64) -> u64 {
        let cpu = Self::cpu_index(cpu).expect("cpu id below MAX_CPUS");
        self.u64_at(CFG_VALUES + cpu * 8).load(Ordering::Acquire)
    }

    /// Whether the daemon asked for a wakeup. SeqCst fence before the load: the corrected
    /// hvisor side of the handshake (a StoreLoad barrier after publishing `req_rear`).
    pub fn need_wakeup(&self) -> bool {
        fence(Ordering::SeqCst);
        self.u8_at(NEED_WAKEUP).load(Ordering::Relaxed) != 0
    }

    /// Takes the oldest injection result (single consumer).
    pub fn pop_result(&self) -> Option<DeviceRes> {
        let front = self.u32_at(RES_FRONT).load(Ordering::Relaxed) & RING_MASK;
        let rear = self.u32_at(RES_REAR).load(Ordering::Acquire) & RING_MASK;
        if front == rear {
            return None;
        }
        let slot = Self::res_slot(front);
        let res = DeviceRes {
            target_zone: self
                .u32_at(slot + offset_of!(DeviceRes, target_zone))
                .load(Ordering::Relaxed),
            irq_id: self
                .u32_at(slot + offset_of!(DeviceRes, irq_id))
                .load(Ordering::Relaxed),
        };
        self.u32_at(RES_FRONT)
            .store((front + 1) & RING_MASK, Ordering::Release);
        Some(res)
    }

    /// `mmio_addrs` as published by the daemon, or `None` before `mmio_avail` is set.
    pub fn mmio_addrs(&self) -> Option<[u64; MAX_DEVS]> {
        if self.u8_at(MMIO_AVAIL).load(Ordering::Acquire) == 0 {
            return None;
        }
        Some(std::array::from_fn(|i| {
            self.u64_at(MMIO_ADDRS + i * 8).load(Ordering::Relaxed)
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::Arc;

    use super::*;
    use crate::mmap::memfd;

    fn page_pair() -> (OwnedFd, BridgePage, BridgePage) {
        let fd = memfd("bridge-test", MMAP_SIZE as u64).unwrap();
        let daemon = BridgePage::map(fd.as_fd(), 0).unwrap();
        let hyp = BridgePage::map(fd.as_fd(), 0).unwrap();
        (fd, daemon, hyp)
    }

    fn req(n: u64) -> DeviceReq {
        DeviceReq {
            src_cpu: n % 4,
            address: 0xa000000 + n,
            size: 4,
            value: n,
            src_zone: 1,
            is_write: 1,
            need_interrupt: 1,
            padding: 0,
        }
    }

    #[test]
    fn requests_are_fifo() {
        let (_fd, daemon, hyp) = page_pair();
        assert!(!daemon.has_requests());
        assert_eq!(daemon.pop_request(), None);
        for n in 0..5 {
            assert!(hyp.push_request(&req(n)));
        }
        assert!(daemon.has_requests());
        for n in 0..5 {
            assert_eq!(daemon.pop_request(), Some(req(n)));
        }
        assert_eq!(daemon.pop_request(), None);
    }

    #[test]
    fn ring_wraps_around_many_times() {
        let (_fd, daemon, hyp) = page_pair();
        for n in 0..(MAX_REQ as u64 * 20 + 7) {
            assert!(hyp.push_request(&req(n)));
            if n % 3 == 0 {
                assert!(hyp.push_request(&req(n + 1_000_000)));
                assert_eq!(daemon.pop_request(), Some(req(n)));
                assert_eq!(daemon.pop_request(), Some(req(n + 1_000_000)));
            } else {
                assert_eq!(daemon.pop_request(), Some(req(n)));
            }
        }
        assert_eq!(daemon.pop_request(), None);
    }

    #[test]
    fn full_ring_holds_31() {
        let (_fd, daemon, hyp) = page_pair();
        for n in 0..31 {
            assert!(hyp.push_request(&req(n)), "push {n}");
        }
        assert!(!hyp.push_request(&req(99)));
        assert_eq!(daemon.pop_request(), Some(req(0)));
        assert!(hyp.push_request(&req(31)));
        for n in 1..32 {
            assert_eq!(daemon.pop_request(), Some(req(n)));
        }
        assert_eq!(daemon.pop_request(), None);
    }

    #[test]
    fn corrupt_indices_are_masked() {
        let (_fd, daemon, hyp) = page_pair();
        // A hostile peer writes huge indices: they are masked, never used raw.
        hyp.u32_at(REQ_REAR).store(0xffff_ff03, Ordering::Relaxed);
        hyp.u32_at(REQ_FRONT).store(0x8000_0001, Ordering::Relaxed);
        assert!(daemon.has_requests());
        assert!(daemon.pop_request().is_some());
        assert!(daemon.pop_request().is_some());
        assert_eq!(daemon.pop_request(), None);
        hyp.u32_at(RES_FRONT).store(u32::MAX, Ordering::Relaxed);
        assert!(daemon.push_result(1, 2).is_ok());
    }

    #[test]
    fn reply_bumps_flag_and_sets_value() {
        let (_fd, daemon, hyp) = page_pair();
        assert_eq!(hyp.cfg_flag(3), 0);
        daemon.reply(3, 0x1234).unwrap();
        assert_eq!(hyp.cfg_flag(3), 1);
        assert_eq!(hyp.cfg_value(3), 0x1234);
        daemon.reply(3, 7).unwrap();
        assert_eq!(hyp.cfg_flag(3), 2);
        assert_eq!(hyp.cfg_value(3), 7);
        assert_eq!(hyp.cfg_flag(2), 0);
        daemon.reply(31, 1).unwrap();
        assert_eq!(hyp.cfg_flag(31), 1);
    }

    #[test]
    fn reply_rejects_bad_cpu() {
        let (_fd, daemon, _hyp) = page_pair();
        assert!(matches!(daemon.reply(32, 1), Err(HsmError::BadCpu(32))));
        assert!(matches!(
            daemon.reply(u64::MAX, 1),
            Err(HsmError::BadCpu(u64::MAX))
        ));
    }

    #[test]
    fn results_round_trip() {
        let (_fd, daemon, hyp) = page_pair();
        assert_eq!(hyp.pop_result(), None);
        daemon.push_result(1, 78).unwrap();
        daemon.push_result(2, 76).unwrap();
        assert_eq!(
            hyp.pop_result(),
            Some(DeviceRes {
                target_zone: 1,
                irq_id: 78
            })
        );
        assert_eq!(
            hyp.pop_result(),
            Some(DeviceRes {
                target_zone: 2,
                irq_id: 76
            })
        );
        assert_eq!(hyp.pop_result(), None);
    }

    #[test]
    fn full_result_ring_times_out() {
        let (_fd, daemon, hyp) = page_pair();
        for irq in 0..31 {
            daemon.push_result(1, irq).unwrap();
        }
        let started = Instant::now();
        let wait = Duration::from_millis(30);
        assert!(matches!(
            daemon.push_result_within(1, 99, wait),
            Err(HsmError::ResultRingFull)
        ));
        assert!(started.elapsed() >= wait);
        assert_eq!(
            hyp.pop_result(),
            Some(DeviceRes {
                target_zone: 1,
                irq_id: 0
            })
        );
        daemon.push_result_within(1, 31, wait).unwrap();
    }

    #[test]
    fn full_result_ring_waits_for_the_consumer() {
        let (fd, daemon, _hyp) = page_pair();
        for irq in 0..31 {
            daemon.push_result(1, irq).unwrap();
        }
        let hyp = BridgePage::map(fd.as_fd(), 0).unwrap();
        let consumer = std::thread::spawn(move || {
            let mut got = Vec::new();
            while got.len() < 32 {
                match hyp.pop_result() {
                    Some(res) => got.push(res.irq_id),
                    None => std::thread::yield_now(),
                }
            }
            got
        });
        daemon
            .push_result_within(1, 31, Duration::from_secs(30))
            .unwrap();
        let got = consumer.join().unwrap();
        assert_eq!(got, (0..32).collect::<Vec<_>>());
    }

    #[test]
    fn arm_wakeup_refuses_when_requests_pending() {
        let (_fd, daemon, hyp) = page_pair();
        assert!(!hyp.need_wakeup());
        assert!(daemon.arm_wakeup());
        assert!(hyp.need_wakeup());
        daemon.disarm_wakeup();
        assert!(!hyp.need_wakeup());

        assert!(hyp.push_request(&req(1)));
        assert!(!daemon.arm_wakeup());
        assert!(!hyp.need_wakeup(), "a refused arm leaves the flag clear");
        daemon.pop_request().unwrap();
        assert!(daemon.arm_wakeup());
    }

    #[test]
    fn mmio_addrs_are_published() {
        let (_fd, daemon, hyp) = page_pair();
        assert_eq!(hyp.mmio_addrs(), None);
        let addrs: Vec<u64> = (0..10).map(|i| 0xa000000 + i * 0x200).collect();
        daemon.publish_mmio_addrs(&addrs);
        let published = hyp.mmio_addrs().unwrap();
        assert_eq!(&published[..], &addrs[..MAX_DEVS]);
    }

    #[test]
    fn short_file_is_refused() {
        let fd = memfd("short", 100).unwrap();
        assert!(matches!(
            BridgePage::map(fd.as_fd(), 0),
            Err(HsmError::Protocol(_))
        ));
        let fd = memfd("short", 4096).unwrap();
        assert!(BridgePage::map(fd.as_fd(), 4096).is_err());
    }

    /// Two vCPU threads push synchronous requests (each waits for its reply) while a daemon
    /// thread consumes: every request arrives exactly once and in per-CPU order.
    #[test]
    fn stress_sync_requests_two_producers() {
        const PER_CPU: u64 = 10_000;
        let (fd, daemon, _) = page_pair();
        let producer_lock = Arc::new(Mutex::new(()));
        let mut producers = Vec::new();
        for cpu in [0u64, 1] {
            let hyp = BridgePage::map(fd.as_fd(), 0).unwrap();
            let producer_lock = producer_lock.clone();
            producers.push(std::thread::spawn(move || {
                for seq in 0..PER_CPU {
                    let old = hyp.cfg_flag(cpu);
                    let request = DeviceReq {
                        src_cpu: cpu,
                        value: seq,
                        size: 4,
                        ..Default::default()
                    };
                    spin_until(
                        || {
                            let _guard = producer_lock.lock().unwrap();
                            hyp.push_request(&request)
                        },
                        None,
                    );
                    spin_until(|| hyp.cfg_flag(cpu) != old, None);
                    assert_eq!(hyp.cfg_value(cpu), seq * 3 + cpu);
                }
            }));
        }
        let mut next = [0u64; 2];
        while next.iter().any(|&n| n < PER_CPU) {
            let mut request = None;
            spin_until(
                || {
                    request = daemon.pop_request();
                    request.is_some()
                },
                None,
            );
            let request = request.unwrap();
            let cpu = request.src_cpu as usize;
            assert!(cpu < 2);
            assert_eq!(request.value, next[cpu], "cpu {cpu} out of order");
            next[cpu] += 1;
            daemon
                .reply(request.src_cpu, request.value * 3 + request.src_cpu)
                .unwrap();
        }
        for producer in producers {
            producer.join().unwrap();
        }
        assert_eq!(daemon.pop_request(), None);
    }
}
