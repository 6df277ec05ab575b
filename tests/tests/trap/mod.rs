//! A trap harness that runs a third-party guest driver, unmodified, against the bridge.
//!
//! The driver's virtio-mmio registers live in a `PROT_NONE` host mapping (the *window*), so
//! each of its loads and stores there faults. The `SIGSEGV` handler ([`handler`]) decodes the
//! faulting instruction ([`decode`]) and replays the access as a `device_req` on the simulated
//! hypervisor exactly as hvisor's `mmio_virtio_handler` does: synchronous, except a write at
//! window offset 0x50. DMA memory is the zone's RAM, so the addresses the driver hands the
//! device are guest-physical.
//!
//! Only x86_64 Linux: the decoder and the saved register layout are per architecture.
//! `docs/testing-trap-harness.md` describes the design and its limits.

mod decode;
mod handler;

use std::cell::{Cell, UnsafeCell};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hvisor_hsm::{SimHypervisor, SimRam, SimVcpu};
use iced_x86::InstructionInfoFactory;
use virtio_drivers::transport::mmio::{MmioTransport, VirtIOHeader};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};

/// Size of the trapping window: one page, the unit the host can protect.
pub const WINDOW_SIZE: usize = 0x1000;

// ---- State shared with the signal handler -------------------------------------------------

/// Host address range of the live window; `[0, 0)` while no guest runs. The handler checks a
/// fault against these before it touches anything else.
static WINDOW_START: AtomicUsize = AtomicUsize::new(0);
static WINDOW_END: AtomicUsize = AtomicUsize::new(0);
/// The live guest's trap state, valid while the window range above is nonempty.
static TRAP: AtomicPtr<TrapState> = AtomicPtr::new(std::ptr::null_mut());
/// One trap guest at a time: `Hal` has no `self`, so its DMA pool is process-wide.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// What the handlers need: where the window is, the vCPU that traps, and scratch space that
/// they may not allocate themselves. Only the guest thread's handlers touch the cells.
struct TrapState {
    window_gpa: u64,
    /// The guest's thread: a fault in the window from any other thread is a harness bug.
    thread: libc::pid_t,
    vcpu: SimVcpu,
    /// The decoder's operand-access tables (they own vectors: made here, not in a handler).
    info: UnsafeCell<InstructionInfoFactory>,
    /// The access being single-stepped, from its `SIGSEGV` to its `SIGTRAP`.
    step: Cell<Option<handler::PendingStep>>,
    loads: AtomicU64,
    stores: AtomicU64,
    stepped: AtomicU64,
}

/// Counters of the trapped accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrapStats {
    /// Loads replayed as synchronous reads.
    pub loads: u64,
    /// Stores replayed as writes (QueueNotify at window offset 0x50 asynchronously).
    pub stores: u64,
    /// Instructions single-stepped rather than emulated. Their accesses count above too (a
    /// read-modify-write as a load and a store).
    pub stepped: u64,
}

// ---- The guest ----------------------------------------------------------------------------

/// A zone's guest as a third-party driver sees it: a trapping register window and DMA memory
/// from the zone's RAM. Drop the drivers before it (their transports borrow it).
#[derive(Debug)]
pub struct TrapGuest {
    window: NonNull<u8>,
    window_gpa: u64,
    _one_guest: MutexGuard<'static, ()>,
}

impl TrapGuest {
    /// Maps the window for guest-physical `window_gpa..+WINDOW_SIZE`, trapping into vCPU `cpu`
    /// of `zone`, and gives [`ZoneHal`] the zone's RAM `dma_gpa..+dma_size` for DMA. The
    /// calling thread becomes the vCPU: only it may touch the window. Waits for any other
    /// trap guest of this process to be dropped.
    pub fn new(
        sim: &Arc<SimHypervisor>,
        zone: u32,
        cpu: u64,
        window_gpa: u64,
        dma_gpa: u64,
        dma_size: usize,
    ) -> TrapGuest {
        let one_guest = ONE_GUEST.lock().unwrap_or_else(|p| p.into_inner());
        handler::install();
        // SAFETY: a fresh anonymous mapping chosen by the kernel aliases no Rust object; the
        // result is checked before use.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                WINDOW_SIZE,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(
            addr,
            libc::MAP_FAILED,
            "mmap of the trap window: {}",
            std::io::Error::last_os_error()
        );
        let window = NonNull::new(addr.cast::<u8>()).expect("mmap never returns NULL here");

        *dma_pool() = Some(DmaPool::new(sim.ram(zone), dma_gpa, dma_size));
        let state = Box::new(TrapState {
            window_gpa,
            // SAFETY: gettid has no preconditions.
            thread: unsafe { libc::gettid() },
            vcpu: sim.vcpu(zone, cpu),
            info: UnsafeCell::new(InstructionInfoFactory::new()),
            step: Cell::new(None),
            loads: AtomicU64::new(0),
            stores: AtomicU64::new(0),
            stepped: AtomicU64::new(0),
        });
        TRAP.store(Box::into_raw(state), Ordering::Release);
        let start = window.as_ptr() as usize;
        WINDOW_START.store(start, Ordering::Release);
        WINDOW_END.store(start + WINDOW_SIZE, Ordering::Release);
        TrapGuest {
            window,
            window_gpa,
            _one_guest: one_guest,
        }
    }

    /// An unmodified virtio-drivers `MmioTransport` for the device at guest-physical `gpa`,
    /// whose registers span `len` bytes of the window.
    pub fn transport(&self, gpa: u64, len: usize) -> MmioTransport<'_> {
        let offset = gpa
            .checked_sub(self.window_gpa)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.is_multiple_of(4))
            .filter(|&o| o.checked_add(len).is_some_and(|end| end <= WINDOW_SIZE))
            .unwrap_or_else(|| {
                panic!("device {gpa:#x}+{len:#x} is misaligned or outside the window")
            });
        // SAFETY: offset + len lies inside the window mapping, which lives as long as `self`
        // (the transport borrows it); the driver only ever accesses it through volatile MMIO
        // accessors, which trap and are replayed, so no Rust reference to it exists.
        let header = unsafe { self.window.add(offset) }.cast::<VirtIOHeader>();
        // SAFETY: `header` is a 4-byte-aligned (checked; the window is page-aligned) pointer to
        // a virtio-mmio register block of `len` bytes that stays valid for the transport's lifetime (above).
        unsafe { MmioTransport::new(header, len) }
            .unwrap_or_else(|e| panic!("virtio-mmio probe at {gpa:#x}: {e}"))
    }

    /// The host address of guest-physical `gpa` in the window.
    pub fn window_ptr(&self, gpa: u64) -> *mut u8 {
        let offset = gpa
            .checked_sub(self.window_gpa)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o < WINDOW_SIZE)
            .unwrap_or_else(|| panic!("{gpa:#x} is outside the window"));
        // SAFETY: the offset is inside the window mapping (checked above).
        unsafe { self.window.as_ptr().add(offset) }
    }

    /// Accesses trapped so far.
    pub fn stats(&self) -> TrapStats {
        // SAFETY: TRAP points to the live state this guest installed and frees only on drop.
        let state = unsafe { &*TRAP.load(Ordering::Acquire) };
        TrapStats {
            loads: state.loads.load(Ordering::Relaxed),
            stores: state.stores.load(Ordering::Relaxed),
            stepped: state.stepped.load(Ordering::Relaxed),
        }
    }
}

impl Drop for TrapGuest {
    fn drop(&mut self) {
        // Empty the range first: from here on no fault is taken for ours.
        WINDOW_END.store(0, Ordering::Release);
        WINDOW_START.store(0, Ordering::Release);
        let state = TRAP.swap(std::ptr::null_mut(), Ordering::AcqRel);
        if !state.is_null() {
            // SAFETY: the pointer came from Box::into_raw in `new`; the window range is empty,
            // so no handler can be reading it.
            drop(unsafe { Box::from_raw(state) });
        }
        *dma_pool() = None;
        // SAFETY: the window is this guest's own mapping; the drivers that used it are gone
        // (their transports borrowed `self`).
        unsafe { libc::munmap(self.window.as_ptr().cast(), WINDOW_SIZE) };
    }
}

// ---- DMA: the zone's RAM ------------------------------------------------------------------

/// Page allocator over a range of zone RAM: every DMA address is guest-physical.
struct DmaPool {
    ram: SimRam,
    base_gpa: u64,
    /// One entry per page: in use?
    used: Vec<bool>,
}

impl DmaPool {
    fn new(ram: SimRam, base_gpa: u64, size: usize) -> DmaPool {
        assert!(base_gpa.is_multiple_of(PAGE_SIZE as u64) && size.is_multiple_of(PAGE_SIZE));
        ram.host_ptr(base_gpa, size)
            .unwrap_or_else(|e| panic!("DMA pool: {e}"));
        DmaPool {
            ram,
            base_gpa,
            used: vec![false; size / PAGE_SIZE],
        }
    }

    /// First fit of `pages` zeroed pages: (guest-physical, host) address.
    fn alloc(&mut self, pages: usize) -> (PhysAddr, NonNull<u8>) {
        assert!(pages > 0, "zero-page DMA allocation");
        let first = (0..=self.used.len().saturating_sub(pages))
            .find(|&i| self.used[i..i + pages].iter().all(|&used| !used))
            .unwrap_or_else(|| panic!("DMA pool exhausted: no {pages} free pages"));
        self.used[first..first + pages].fill(true);
        let gpa = self.base_gpa + (first * PAGE_SIZE) as u64;
        let host = self.host(gpa, pages * PAGE_SIZE);
        // SAFETY: `host` maps `pages` pages of zone RAM that were free until now, so nothing
        // else (in this process or the device's) uses them.
        unsafe { host.as_ptr().write_bytes(0, pages * PAGE_SIZE) };
        (gpa, host)
    }

    fn free(&mut self, gpa: PhysAddr, pages: usize) {
        let first = gpa
            .checked_sub(self.base_gpa)
            .map(|off| off as usize / PAGE_SIZE)
            .filter(|&first| first + pages <= self.used.len())
            .unwrap_or_else(|| panic!("DMA free of {gpa:#x} outside the pool"));
        let range = &mut self.used[first..first + pages];
        assert!(
            range.iter().all(|&used| used),
            "double DMA free at {gpa:#x}"
        );
        range.fill(false);
    }

    fn host(&self, gpa: PhysAddr, len: usize) -> NonNull<u8> {
        self.ram
            .host_ptr(gpa, len)
            .unwrap_or_else(|e| panic!("DMA address: {e}"))
    }
}

fn dma_pool() -> MutexGuard<'static, Option<DmaPool>> {
    static POOL: Mutex<Option<DmaPool>> = Mutex::new(None);
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

fn with_pool<T>(f: impl FnOnce(&mut DmaPool) -> T) -> T {
    f(dma_pool()
        .as_mut()
        .expect("virtio-drivers used DMA with no TrapGuest alive"))
}

/// virtio-drivers' `Hal` for a guest whose RAM is identity-mapped, as on hvisor: DMA pages
/// come from the zone's RAM, and `share` bounces a buffer through zone RAM because the
/// driver's own buffers live in host memory the device cannot see.
#[derive(Debug)]
pub struct ZoneHal;

// SAFETY: dma_alloc returns zeroed, page-aligned pages of a live zone RAM mapping that the
// pool hands out once until freed; mmio_phys_to_virt only returns window addresses; share
// and unshare copy within the caller's buffer and pages they own.
unsafe impl Hal for ZoneHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        with_pool(|pool| pool.alloc(pages))
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, pages: usize) -> i32 {
        with_pool(|pool| pool.free(paddr, pages));
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // SAFETY: TRAP is live while a guest (and so a driver) exists.
        let state = unsafe { TRAP.load(Ordering::Acquire).as_ref() }
            .expect("MMIO mapping with no TrapGuest alive");
        let offset = paddr
            .checked_sub(state.window_gpa)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.checked_add(size).is_some_and(|end| end <= WINDOW_SIZE))
            .unwrap_or_else(|| panic!("MMIO {paddr:#x}+{size:#x} is outside the window"));
        NonNull::new((WINDOW_START.load(Ordering::Acquire) + offset) as *mut u8)
            .expect("window is mapped")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        with_pool(|pool| {
            let (gpa, bounce) = pool.alloc(len.div_ceil(PAGE_SIZE));
            // Copied whatever the direction, as Linux's swiotlb does: where a device fills
            // only part of a device-writable buffer, unshare must give back the driver's
            // own bytes for the rest.
            // SAFETY: the caller keeps `buffer` valid and unaliased for this call; the bounce
            // pages are fresh and at least `len` long.
            unsafe {
                bounce
                    .as_ptr()
                    .copy_from_nonoverlapping(buffer.cast::<u8>().as_ptr(), len)
            };
            gpa
        })
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let len = buffer.len();
        with_pool(|pool| {
            if direction != BufferDirection::DriverToDevice {
                let bounce = pool.host(paddr, len);
                // SAFETY: `paddr` came from `share` of this same buffer, so the bounce pages
                // hold `len` bytes; the caller keeps `buffer` valid and unaliased.
                unsafe {
                    buffer
                        .cast::<u8>()
                        .as_ptr()
                        .copy_from_nonoverlapping(bounce.as_ptr(), len)
                };
            }
            pool.free(paddr, len.div_ceil(PAGE_SIZE));
        });
    }
}
