//! Safe access to a mapped bridge page, for both the daemon and the hypervisor role.
//!
//! Every access goes through an atomic view of the shared page, with the orderings of
//! hvisor-tool's `virtio.c` and hvisor's `virtio_trampoline.rs` (acquire on the index that
//! publishes, release on the index that frees). The daemon side has a SeqCst fence in the
//! `need_wakeup` handshake; the hypervisor side offers hvisor's (none, [`BridgePage::need_wakeup`])
//! and a corrected one ([`BridgePage::need_wakeup_fenced`]). Indices read from the page are
//! masked, never trusted. Field offsets come from the page's [`HvisorAbi`].

use std::fmt;
use std::mem::{offset_of, size_of};
use std::os::fd::BorrowedFd;
use std::sync::atomic::{fence, AtomicU16, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::abi::{BridgeLayout, DeviceReq, DeviceRes, HvisorAbi, VirtioBridge, MMAP_SIZE};
use crate::mmap::{regular_file_size, SharedMapping};
use crate::HsmError;

/// How long [`BridgePage::push_result`] waits for the hypervisor to drain a full result ring.
pub const RESULT_RING_WAIT: Duration = Duration::from_secs(1);

/// Busy-wait iterations before a waiter starts yielding its CPU.
const SPINS_BEFORE_YIELD: u32 = 4096;

// The four indices are at the same offsets in every variant.
const REQ_FRONT: usize = offset_of!(VirtioBridge, req_front);
const REQ_REAR: usize = offset_of!(VirtioBridge, req_rear);
const RES_FRONT: usize = offset_of!(VirtioBridge, res_front);
const RES_REAR: usize = offset_of!(VirtioBridge, res_rear);

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
    layout: BridgeLayout,
    /// `MAX_REQ - 1`.
    ring_mask: u32,
    /// Serialises result-ring producers (hvisor-tool's `RES_MUTEX`).
    result_lock: Mutex<()>,
}

impl fmt::Debug for BridgePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BridgePage")
            .field("addr", &self.map.as_ptr())
            .field("abi", &self.layout.abi)
            .field("req_front", &self.u32_at(REQ_FRONT).load(Ordering::Relaxed))
            .field("req_rear", &self.u32_at(REQ_REAR).load(Ordering::Relaxed))
            .field("res_front", &self.u32_at(RES_FRONT).load(Ordering::Relaxed))
            .field("res_rear", &self.u32_at(RES_REAR).load(Ordering::Relaxed))
            .finish()
    }
}

impl BridgePage {
    /// Maps the bridge page of `fd` at `offset` (MAP_SHARED, read-write, 4096 bytes), with
    /// the layout of [`HvisorAbi::CURRENT`].
    pub fn map(fd: BorrowedFd<'_>, offset: u64) -> Result<BridgePage, HsmError> {
        BridgePage::map_abi(fd, offset, HvisorAbi::CURRENT)
    }

    /// [`BridgePage::map`] with the layout of `abi`.
    pub fn map_abi(
        fd: BorrowedFd<'_>,
        offset: u64,
        abi: HvisorAbi,
    ) -> Result<BridgePage, HsmError> {
        let abi = abi.validate()?;
        // A validated MAX_REQ fits the page, so it is far below u32::MAX.
        let ring_mask = (abi.max_req - 1) as u32;
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
            layout: abi.layout(),
            ring_mask,
            result_lock: Mutex::new(()),
        })
    }

    /// The layout variant this page was mapped with.
    pub fn abi(&self) -> HvisorAbi {
        self.layout.abi
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

    fn req_slot(&self, index: u32) -> usize {
        self.layout.req_list + (index & self.ring_mask) as usize * size_of::<DeviceReq>()
    }

    fn res_slot(&self, index: u32) -> usize {
        self.layout.res_list + (index & self.ring_mask) as usize * size_of::<DeviceRes>()
    }

    fn cpu_index(&self, cpu: u64) -> Result<usize, HsmError> {
        usize::try_from(cpu)
            .ok()
            .filter(|&c| c < self.layout.abi.max_cpus)
            .ok_or(HsmError::BadCpu(cpu))
    }

    fn read_req(&self, index: u32) -> DeviceReq {
        let slot = self.req_slot(index);
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
        let slot = self.req_slot(index);
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
        let front = self.u32_at(REQ_FRONT).load(Ordering::Relaxed) & self.ring_mask;
        let rear = self.u32_at(REQ_REAR).load(Ordering::Acquire) & self.ring_mask;
        if front == rear {
            return None;
        }
        let req = self.read_req(front);
        self.u32_at(REQ_FRONT)
            .store((front + 1) & self.ring_mask, Ordering::Release);
        Some(req)
    }

    /// Whether the request ring holds anything.
    pub fn has_requests(&self) -> bool {
        let front = self.u32_at(REQ_FRONT).load(Ordering::Relaxed) & self.ring_mask;
        let rear = self.u32_at(REQ_REAR).load(Ordering::Acquire) & self.ring_mask;
        front != rear
    }

    /// Completes the synchronous request of `cpu`: `cfg_values[cpu] = value`, then bumps
    /// `cfg_flags[cpu]` with release ordering.
    pub fn reply(&self, cpu: u64, value: u64) -> Result<(), HsmError> {
        let cpu = self.cpu_index(cpu)?;
        self.u64_at(self.layout.cfg_values + cpu * 8)
            .store(value, Ordering::Release);
        self.u64_at(self.layout.cfg_flags + cpu * 8)
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
        let rear = self.u32_at(RES_REAR).load(Ordering::Relaxed) & self.ring_mask;
        let next = (rear + 1) & self.ring_mask;
        let has_room = || self.u32_at(RES_FRONT).load(Ordering::Acquire) & self.ring_mask != next;
        if !spin_until(has_room, Some(Instant::now() + max_wait)) {
            return Err(HsmError::ResultRingFull);
        }
        let slot = self.res_slot(rear);
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
        self.u8_at(self.layout.need_wakeup)
            .store(1, Ordering::Relaxed);
        // Pairs with the fence in `need_wakeup_fenced()`: either we see the new request or
        // the producer sees our flag (Dekker). hvisor itself has no such fence
        // (`need_wakeup()`), so a wakeup can still be lost there: the daemon's sleep needs a
        // timeout.
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
        self.u8_at(self.layout.need_wakeup)
            .store(0, Ordering::Relaxed);
    }

    /// Publishes device base addresses (at most `MAX_DEVS`) and sets `mmio_avail`.
    pub fn publish_mmio_addrs(&self, addrs: &[u64]) {
        for (i, &addr) in addrs.iter().take(self.layout.abi.max_devs).enumerate() {
            self.u64_at(self.layout.mmio_addrs + i * 8)
                .store(addr, Ordering::Relaxed);
        }
        self.u8_at(self.layout.mmio_avail)
            .store(1, Ordering::Release);
    }

    // ---- Hypervisor (simulator / rig) side ----

    /// Queues a request; false when the ring is full. Producers must be serialised by the caller.
    pub fn push_request(&self, req: &DeviceReq) -> bool {
        let rear = self.u32_at(REQ_REAR).load(Ordering::Relaxed) & self.ring_mask;
        let front = self.u32_at(REQ_FRONT).load(Ordering::Acquire) & self.ring_mask;
        let next = (rear + 1) & self.ring_mask;
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
        let cpu = self.cpu_index(cpu).expect("cpu id below MAX_CPUS");
        self.u64_at(self.layout.cfg_flags + cpu * 8)
            .load(Ordering::Acquire)
    }

    /// `cfg_values[cpu]`, read after [`BridgePage::cfg_flag`] moved.
    ///
    /// # Panics
    /// If `cpu >= MAX_CPUS`.
    pub fn cfg_value(&self, cpu: u64) -> u64 {
        let cpu = self.cpu_index(cpu).expect("cpu id below MAX_CPUS");
        self.u64_at(self.layout.cfg_values + cpu * 8)
            .load(Ordering::Acquire)
    }

    /// Whether the daemon asked for a wakeup, read as hvisor's
    /// `check_need_wakeup_and_send_ipi` does right after publishing `req_rear`: a plain load,
    /// then an acquire fence, with no StoreLoad barrier in between. The load may be satisfied
    /// before the `req_rear` store is visible to the daemon, so a daemon that armed its
    /// wakeup and found the ring empty can be left asleep (a lost wakeup).
    pub fn need_wakeup(&self) -> bool {
        let armed = self.u8_at(self.layout.need_wakeup).load(Ordering::Relaxed) != 0;
        fence(Ordering::Acquire);
        armed
    }

    /// [`BridgePage::need_wakeup`] with a SeqCst fence before the load: the corrected
    /// hypervisor side of the handshake, with which no wakeup is lost.
    pub fn need_wakeup_fenced(&self) -> bool {
        fence(Ordering::SeqCst);
        self.u8_at(self.layout.need_wakeup).load(Ordering::Relaxed) != 0
    }

    /// Injection results queued and not yet taken.
    pub fn results_queued(&self) -> usize {
        let front = self.u32_at(RES_FRONT).load(Ordering::Acquire);
        let rear = self.u32_at(RES_REAR).load(Ordering::Acquire);
        (rear.wrapping_sub(front) & self.ring_mask) as usize
    }

    /// Takes the oldest injection result (single consumer).
    pub fn pop_result(&self) -> Option<DeviceRes> {
        let front = self.u32_at(RES_FRONT).load(Ordering::Relaxed) & self.ring_mask;
        let rear = self.u32_at(RES_REAR).load(Ordering::Acquire) & self.ring_mask;
        if front == rear {
            return None;
        }
        let slot = self.res_slot(front);
        let res = DeviceRes {
            target_zone: self
                .u32_at(slot + offset_of!(DeviceRes, target_zone))
                .load(Ordering::Relaxed),
            irq_id: self
                .u32_at(slot + offset_of!(DeviceRes, irq_id))
                .load(Ordering::Relaxed),
        };
        self.u32_at(RES_FRONT)
            .store((front + 1) & self.ring_mask, Ordering::Release);
        Some(res)
    }

    /// `mmio_addrs` (`MAX_DEVS` entries) as published by the daemon, or `None` before
    /// `mmio_avail` is set.
    pub fn mmio_addrs(&self) -> Option<Vec<u64>> {
        if self.u8_at(self.layout.mmio_avail).load(Ordering::Acquire) == 0 {
            return None;
        }
        let addrs = (0..self.layout.abi.max_devs)
            .map(|i| {
                self.u64_at(self.layout.mmio_addrs + i * 8)
                    .load(Ordering::Relaxed)
            })
            .collect();
        Some(addrs)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, OwnedFd};
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    use super::*;
    use crate::abi::{MAX_DEVS, MAX_REQ};
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

    /// Races one push (hypervisor) against one `arm_wakeup` (daemon) per round, `rounds`
    /// times, and counts the rounds where the daemon went to sleep with the request pending
    /// and the hypervisor did not wake it (a lost wakeup).
    /// The hypervisor side reads `need_wakeup` with the fence. Unfenced (hvisor's side), the
    /// store buffer can make a round lose its wakeup, but only when both threads run at the
    /// same instant: too rare on a shared machine to assert.
    fn lost_wakeups(rounds: u64) -> u64 {
        let (fd, daemon, _) = page_pair();
        let hyp = BridgePage::map(fd.as_fd(), 0).unwrap();
        // Round numbers each side has reached, for a spinning two-thread barrier.
        let go = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let woken = Arc::new(AtomicU8::new(0));
        let hypervisor = {
            let (go, done, woken) = (go.clone(), done.clone(), woken.clone());
            std::thread::spawn(move || {
                for round in 1..=rounds {
                    while go.load(Ordering::Acquire) != round {
                        std::hint::spin_loop();
                    }
                    assert!(hyp.push_request(&req(round)));
                    let armed = hyp.need_wakeup_fenced();
                    woken.store(armed.into(), Ordering::Relaxed);
                    done.store(round, Ordering::Release);
                }
            })
        };
        let mut lost = 0;
        for round in 1..=rounds {
            go.store(round, Ordering::Release);
            let slept = daemon.arm_wakeup();
            while done.load(Ordering::Acquire) != round {
                std::hint::spin_loop();
            }
            if slept && woken.load(Ordering::Relaxed) == 0 {
                lost += 1;
            }
            daemon.disarm_wakeup();
            assert_eq!(daemon.pop_request(), Some(req(round)));
        }
        hypervisor.join().unwrap();
        lost
    }

    /// With a StoreLoad fence on the hypervisor side the handshake is a Dekker pair: no
    /// round may lose its wakeup.
    #[test]
    fn fenced_handshake_never_loses_a_wakeup() {
        assert_eq!(lost_wakeups(100_000), 0);
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
    fn older_abi_uses_its_own_offsets() {
        let fd = memfd("bridge-abi", MMAP_SIZE as u64).unwrap();
        let abi = HvisorAbi::new(32, 4, 4);
        let daemon = BridgePage::map_abi(fd.as_fd(), 0, abi).unwrap();
        let raw = BridgePage::map(fd.as_fd(), 0).unwrap();
        assert_eq!(daemon.abi(), abi);
        assert!(daemon.arm_wakeup());
        // hvisor built with 32/4/4 reads need_wakeup at 0x671 and cfg_flags[3] at 0x628.
        assert_eq!(raw.u8_at(0x671).load(Ordering::Relaxed), 1);
        daemon.reply(3, 9).unwrap();
        assert_eq!(raw.u64_at(0x628).load(Ordering::Relaxed), 1);
        assert_eq!(raw.u64_at(0x648).load(Ordering::Relaxed), 9);
        assert!(matches!(daemon.reply(4, 1), Err(HsmError::BadCpu(4))));
        daemon.publish_mmio_addrs(&[1, 2, 3, 4, 5]);
        assert_eq!(daemon.mmio_addrs(), Some(vec![1, 2, 3, 4]));
        assert_eq!(raw.u8_at(0x670).load(Ordering::Relaxed), 1, "mmio_avail");
        assert!(BridgePage::map_abi(fd.as_fd(), 0, HvisorAbi::new(24, 8, 32)).is_err());
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
