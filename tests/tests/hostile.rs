//! Hostile guests, end to end through the real bridge and `vhost-user-blk` processes.
//!
//! Every test runs two blk devices on one bridge (same zone, separate images), attacks device
//! A, checks that A ends in its defined state, and then proves that device B still does
//! verified I/O (a write found in its image file and read back through the device).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::abi::MAX_PENDING_IRQS;
use hvisor_vhost_tests::driver::blk::{request_type, SECTOR_SIZE};
use hvisor_vhost_tests::driver::mmio::{
    reg, status, INTERRUPT_CONFIG, MAGIC_VALUE, VIRTIO_F_VERSION_1,
};
use hvisor_vhost_tests::driver::virtqueue::{
    VIRTIO_F_EVENT_IDX, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
};
use hvisor_vhost_tests::driver::{
    BlkDriver, BlkOptions, BlkStatus, BufferSegment, GuestAllocator, GuestMemory, Interrupts,
    MmioBus, RawDescriptor, RawNext, RawOutcome, SplitQueue, UsedElem, VirtioMmioDevice,
};
use hvisor_vhost_tests::harness::{Irq, Ram, Rng, SimBridge, Vcpu};

/// Device registers with one trap window each (the default).
const DEV_A: u64 = 0xa000000;
const DEV_B: u64 = 0xa000200;
const IRQ_A: u32 = 48;
const IRQ_B: u32 = 49;
/// Device A has a small queue, so that a chain through the whole table is short, and a second
/// queue that the driver leaves unready.
const A_QUEUES: &str = r#","num_queues":2,"queue_size":16"#;
const A_QUEUE_SIZE: u16 = 16;

/// Guest RAM for each driver's rings and buffers, as offsets from `RAM_BASE`.
const A_MEM: u64 = 0x10_0000;
const A_REINIT_MEM: u64 = 0xd0_0000;
const B_MEM: u64 = 0x190_0000;
const DRIVER_MEM_SIZE: u64 = 0xc0_0000;
/// Hand-built requests: header, status byte, data, an indirect table, and a hand-programmed
/// ring, all in scratch RAM no driver allocates from.
const SCRATCH: u64 = RAM_BASE + 0x300_0000;
const HEADER: u64 = SCRATCH;
const STATUS_BYTE: u64 = SCRATCH + 0x100;
const DATA: u64 = SCRATCH + 0x1000;
const TABLE: u64 = SCRATCH + 0x4_0000;
const MANUAL_RING: u64 = SCRATCH + 0x8_0000;
const MANUAL_RING_SIZE: u64 = 0x1_0000;
const RAM_END: u64 = RAM_BASE + RAM_SIZE;

const LIVE: u32 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
const NEGOTIATING: u32 = status::ACKNOWLEDGE | status::DRIVER;
const COMPLETION_TIMEOUT: Duration = Duration::from_secs(10);
const IOERR: u8 = 1;
/// The status byte before the device writes it.
const UNWRITTEN: u8 = 0xff;
/// What the backend does with a chain it cannot parse to a status byte: it returns the chain
/// with used length 0 and writes nothing.
const DROPPED: RawOutcome = RawOutcome::Completed {
    used_len: 0,
    status: Some(UNWRITTEN),
};
/// A request the backend parsed but could not carry out: IOERR, only the status written.
const FAILED_WITH_IOERR: RawOutcome = RawOutcome::Completed {
    used_len: 1,
    status: Some(IOERR),
};

type Blk<'g> = BlkDriver<'g, Vcpu, Ram, Irq>;

/// A bridge with devices A and B in zone 1; A is driven from vCPU 0, B from vCPU 1.
struct Rig {
    sb: SimBridge,
    a: Guest,
    b: Guest,
    base_a: u64,
    base_b: u64,
    log: Option<PathBuf>,
}

impl Rig {
    /// One trap window per device.
    fn start(tag: &str) -> Rig {
        Rig::launch(tag, DEV_A, DEV_B, None, false)
    }

    fn launch(tag: &str, base_a: u64, base_b: u64, windows: Option<&str>, capture: bool) -> Rig {
        let dir = dir_with_images(tag, &["a.img", "b.img"]);
        let cfg = config(&[zone(
            1,
            &[
                blk_entry(base_a, IRQ_A, "a.img", A_QUEUES),
                blk_entry(base_b, IRQ_B, "b.img", ""),
            ],
            windows,
        )]);
        let log = capture.then(|| dir.path().join("bridge.log"));
        let stderr = log
            .as_ref()
            .map(|path| File::create(path).expect("create bridge log"));
        let sb = SimBridge::start_with(dir, &cfg, &[], stderr);
        let a = Guest::new(&sb, 1, 0, IRQ_A);
        let b = Guest::new(&sb, 1, 1, IRQ_B);
        Rig {
            sb,
            a,
            b,
            base_a,
            base_b,
            log,
        }
    }

    fn image(&self, name: &str) -> PathBuf {
        self.sb.dir.path().join(name)
    }

    fn blk_a(&self, mem_offset: u64) -> Blk<'_> {
        driver(&self.a, self.base_a, mem_offset)
    }

    fn blk_b(&self) -> Blk<'_> {
        driver(&self.b, self.base_b, B_MEM)
    }

    /// Device A's registers, for hand-written sequences.
    fn dev_a(&self) -> VirtioMmioDevice<'_, Vcpu> {
        VirtioMmioDevice::new(&self.a.vcpu, self.base_a)
    }

    /// The pid of device A's `vhost-user-blk`, a child of the bridge.
    fn backend_a(&self) -> u32 {
        backend_pid(self.sb.bridge.pid(), "a.img")
    }

    /// Device B survived: verified I/O through the driver set up before the attack.
    fn check_b(&self, b: &mut Blk<'_>) {
        assert_io_works(b, &self.image("b.img"), 200, 0xb0b);
    }
}

fn driver(guest: &Guest, base: u64, mem_offset: u64) -> Blk<'_> {
    let mut alloc = GuestAllocator::new(RAM_BASE + mem_offset, DRIVER_MEM_SIZE);
    BlkDriver::new(
        &guest.vcpu,
        base,
        &guest.ram,
        &guest.irq,
        &mut alloc,
        &BlkOptions::default(),
    )
    .unwrap_or_else(|e| panic!("blk init at {base:#x}: {e}"))
}

/// A write that reaches the image file and reads back the same through the device.
fn assert_io_works(blk: &mut Blk<'_>, image: &Path, sector: u64, seed: u64) {
    let mut data = vec![0u8; 8192];
    Rng::new(seed).fill(&mut data);
    assert_eq!(
        blk.write(sector, &data).unwrap(),
        BlkStatus::Ok,
        "write at {sector}"
    );
    let mut on_disk = vec![0u8; data.len()];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut on_disk, sector * SECTOR_SIZE as u64)
        .unwrap();
    assert!(
        on_disk == data,
        "{}: write at {sector} not in the image",
        image.display()
    );
    let mut back = vec![0u8; data.len()];
    assert_eq!(blk.read(sector, &mut back).unwrap(), BlkStatus::Ok);
    assert!(back == data, "read-back at {sector} differs");
}

/// The image bytes at `sector` are still zero (the image starts sparse).
fn assert_image_untouched(image: &Path, sector: u64, len: usize) {
    let mut on_disk = vec![0xffu8; len];
    File::open(image)
        .unwrap()
        .read_exact_at(&mut on_disk, sector * SECTOR_SIZE as u64)
        .unwrap();
    assert!(
        on_disk.iter().all(|byte| *byte == 0),
        "sector {sector} was written"
    );
}

/// `(state, ppid)` from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// The one `vhost-user-blk` child of `bridge` whose arguments name `image`.
fn backend_pid(bridge: u32, image: &str) -> u32 {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if proc_stat(pid).is_none_or(|(_, ppid)| ppid != bridge) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|byte| *byte == 0)
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect();
        let is_blk = args.first().is_some_and(|a| a.ends_with("vhost-user-blk"));
        if is_blk && args.iter().any(|a| a.ends_with(image)) {
            found.push(pid);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "vhost-user-blk children of {bridge} for {image}"
    );
    found[0]
}

fn assert_alive(pid: u32) {
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let exists = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    let state = proc_stat(pid).map(|(state, _)| state);
    assert!(
        exists && state.is_some_and(|s| s != 'Z'),
        "backend {pid} is gone (state {state:?})"
    );
}

fn write_header(ram: &Ram, request: u32, sector: u64) {
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&request.to_le_bytes());
    header[8..].copy_from_slice(&sector.to_le_bytes());
    ram.write(HEADER, &header);
}

/// A descriptor with NEXT set, linked to entry `next` of the same raw chain.
fn link(addr: u64, len: u32, writable: bool, next: usize) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        flags: VIRTQ_DESC_F_NEXT | if writable { VIRTQ_DESC_F_WRITE } else { 0 },
        next: RawNext::Entry(next),
    }
}

/// The last descriptor of a chain.
fn end(addr: u64, len: u32, writable: bool) -> RawDescriptor {
    RawDescriptor {
        addr,
        len,
        flags: if writable { VIRTQ_DESC_F_WRITE } else { 0 },
        next: RawNext::Index(0),
    }
}

/// A descriptor in guest RAM (an indirect table entry), as the device reads it.
fn write_table_entry(ram: &Ram, table: u64, index: u64, desc: (u64, u32, u16, u16)) {
    let (addr, len, flags, next) = desc;
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&addr.to_le_bytes());
    bytes[8..12].copy_from_slice(&len.to_le_bytes());
    bytes[12..14].copy_from_slice(&flags.to_le_bytes());
    bytes[14..].copy_from_slice(&next.to_le_bytes());
    ram.write(table + 16 * index, &bytes);
}

/// Submits `chain` on queue 0 with the status byte reset, and waits for the device to return
/// it: a hostile chain must never hang the queue.
fn submit_raw(blk: &mut Blk<'_>, ram: &Ram, what: &str, chain: &[RawDescriptor]) -> RawOutcome {
    ram.write(STATUS_BYTE, &[UNWRITTEN]);
    let outcome = blk
        .raw_submit(0, chain, Some(STATUS_BYTE), COMPLETION_TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_ne!(outcome, RawOutcome::NoCompletion, "{what}: never completed");
    outcome
}

/// Programs queue `index` register by register, as a driver that checks nothing would.
fn program_queue(dev: &VirtioMmioDevice<'_, Vcpu>, index: u32, size: u32, rings: [u64; 3]) {
    dev.write_reg(reg::QUEUE_SEL, 4, u64::from(index));
    dev.write_reg(reg::QUEUE_NUM, 4, u64::from(size));
    for (low, gpa) in [
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_DRIVER_LOW,
        reg::QUEUE_DEVICE_LOW,
    ]
    .into_iter()
    .zip(rings)
    {
        dev.write_reg(low, 4, gpa & 0xffff_ffff);
        dev.write_reg(low + 4, 4, gpa >> 32);
    }
    dev.write_reg(reg::QUEUE_READY, 4, 1);
}

/// A well-formed ring layout for a queue of 16 in scratch RAM.
fn scratch_rings() -> [u64; 3] {
    [MANUAL_RING, MANUAL_RING + 0x1000, MANUAL_RING + 0x2000]
}

/// Negotiates VERSION_1 on device A, lets `program` lay out its queues, sets DRIVER_OK and
/// checks that the device refused to start: DEVICE_NEEDS_RESET, the config bit in
/// InterruptStatus, a new ConfigGeneration and an interrupt. Then acknowledges the interrupt
/// (or, with `acknowledge` false, leaves it pending) and resets.
fn expect_needs_reset(
    rig: &Rig,
    what: &str,
    acknowledge: bool,
    program: impl FnOnce(&VirtioMmioDevice<'_, Vcpu>),
) {
    let dev = rig.dev_a();
    dev.init(VIRTIO_F_VERSION_1)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let generation = dev.config_generation();
    program(&dev);
    dev.driver_ok();
    assert_eq!(dev.status(), LIVE | status::DEVICE_NEEDS_RESET, "{what}");
    assert!(
        rig.a.irq.wait(COMPLETION_TIMEOUT),
        "{what}: no config interrupt"
    );
    assert_eq!(dev.interrupt_status(), INTERRUPT_CONFIG, "{what}");
    assert_eq!(
        dev.config_generation(),
        generation.wrapping_add(1),
        "{what}"
    );
    if acknowledge {
        dev.ack_interrupt(INTERRUPT_CONFIG);
        assert_eq!(dev.interrupt_status(), 0, "{what}");
    }
    // A device that needs a reset ignores kicks.
    dev.notify(0);
    assert_eq!(dev.status(), LIVE | status::DEVICE_NEEDS_RESET, "{what}");
    dev.reset().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(dev.interrupt_status(), 0, "{what}: after the reset");
}

/// Makes a one-sector write available on a hand-programmed queue; returns its head.
fn add_write(queue: &mut SplitQueue<'_, Ram>, ram: &Ram, sector: u64, data: &[u8]) -> u16 {
    write_header(ram, request_type::OUT, sector);
    ram.write(STATUS_BYTE, &[UNWRITTEN]);
    ram.write(DATA, data);
    queue
        .add_chain(&[
            BufferSegment::readable(HEADER, 16),
            BufferSegment::readable(DATA, data.len() as u32),
            BufferSegment::writable(STATUS_BYTE, 1),
        ])
        .unwrap()
}

/// Waits for the next used entry of a hand-programmed queue, taking interrupts like Linux's
/// `vm_interrupt` (read InterruptStatus, acknowledge, look at the ring).
fn wait_used(
    dev: &VirtioMmioDevice<'_, Vcpu>,
    queue: &mut SplitQueue<'_, Ram>,
    irq: &Irq,
) -> UsedElem {
    let deadline = Instant::now() + COMPLETION_TIMEOUT;
    loop {
        if let Some(used) = queue.pop_used().unwrap() {
            return used;
        }
        let now = Instant::now();
        assert!(now < deadline, "no completion on the hand-programmed queue");
        if irq.wait(deadline - now) {
            let pending = dev.interrupt_status();
            dev.ack_interrupt(pending);
        }
    }
}

fn status_byte(ram: &Ram) -> u8 {
    let mut byte = [0u8];
    ram.read(STATUS_BYTE, &mut byte);
    byte[0]
}

/// A queue of 16 in scratch RAM for hand-written initialization sequences.
fn manual_queue(ram: &Ram) -> SplitQueue<'_, Ram> {
    let mut alloc = GuestAllocator::new(MANUAL_RING, MANUAL_RING_SIZE);
    SplitQueue::new(ram, &mut alloc, A_QUEUE_SIZE).unwrap()
}

/// Data descriptors outside guest RAM fail the request with IOERR when the status byte can be
/// written; a status byte outside RAM leaves nothing to report to, so the backend returns the
/// chain with used length 0 and does not carry the request out. The backend survives.
#[test]
fn descriptors_outside_guest_ram() {
    let rig = Rig::start("outside");
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let backend = rig.backend_a();
    let ram = &rig.a.ram;
    let image = rig.image("a.img");
    ram.write(DATA, &[0x5a; 1024]);

    write_header(ram, request_type::OUT, 8);
    let cases = [
        ("write data at the end of RAM", RAM_END, false),
        ("write data across the end of RAM", RAM_END - 256, false),
        ("write data at a wrapping address", u64::MAX - 255, false),
        ("write data below RAM", RAM_BASE - 4096, false),
    ];
    for (what, addr, writable) in cases {
        let chain = [
            link(HEADER, 16, false, 1),
            link(addr, 512, writable, 2),
            end(STATUS_BYTE, 1, true),
        ];
        assert_eq!(
            submit_raw(&mut a, ram, what, &chain),
            FAILED_WITH_IOERR,
            "{what}"
        );
    }
    write_header(ram, request_type::IN, 8);
    for (what, addr) in [
        ("read into the end of RAM", RAM_END),
        ("read across the end of RAM", RAM_END - 256),
    ] {
        let chain = [
            link(HEADER, 16, false, 1),
            link(addr, 512, true, 2),
            end(STATUS_BYTE, 1, true),
        ];
        assert_eq!(
            submit_raw(&mut a, ram, what, &chain),
            FAILED_WITH_IOERR,
            "{what}"
        );
    }
    let chain = [
        link(RAM_END, 16, false, 1),
        link(DATA, 512, false, 2),
        end(STATUS_BYTE, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "header outside RAM", &chain),
        FAILED_WITH_IOERR
    );

    // Status byte outside RAM: the request is not carried out at all.
    write_header(ram, request_type::OUT, 8);
    for (what, addr) in [
        ("status at the end of RAM", RAM_END),
        ("status at the top of the address space", u64::MAX),
    ] {
        let chain = [
            link(HEADER, 16, false, 1),
            link(DATA, 512, false, 2),
            end(addr, 1, true),
        ];
        assert_eq!(submit_raw(&mut a, ram, what, &chain), DROPPED, "{what}");
    }
    assert_image_untouched(&image, 8, 1024);
    write_header(ram, request_type::IN, 8);
    let chain = [
        link(HEADER, 16, false, 1),
        link(DATA, 512, true, 2),
        end(RAM_END + 4096, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "read with its status outside RAM", &chain),
        DROPPED
    );
    let mut data = [0u8; 512];
    ram.read(DATA, &mut data);
    assert_eq!(data, [0x5a; 512], "the dropped read wrote guest memory");

    // Device A is still live, served by the same backend process.
    assert_eq!(a.device().status(), LIVE);
    assert_eq!(rig.backend_a(), backend);
    assert_alive(backend);
    assert_io_works(&mut a, &image, 64, 1);
    rig.check_b(&mut b);
}

/// Rings outside guest RAM (or misaligned) are refused when the driver sets DRIVER_OK: the
/// device needs a reset, and a proper initialization afterwards works.
#[test]
fn ring_addresses_outside_guest_ram_need_reset() {
    let rig = Rig::start("rings");
    let mut b = rig.blk_b();
    let backend = rig.backend_a();
    let [desc, driver_area, device_area] = scratch_rings();
    let cases = [
        (
            "descriptor table at the end of RAM",
            [RAM_END, driver_area, device_area],
        ),
        (
            "available ring across the end of RAM",
            [desc, RAM_END - 8, device_area],
        ),
        ("used ring below RAM", [desc, driver_area, 0x1000]),
        (
            "used ring at the top of the address space",
            [desc, driver_area, u64::MAX - 3],
        ),
        (
            "misaligned descriptor table",
            [desc + 8, driver_area, device_area],
        ),
    ];
    for (what, rings) in cases {
        expect_needs_reset(&rig, what, true, |dev| {
            program_queue(dev, 0, u32::from(A_QUEUE_SIZE), rings)
        });
    }
    assert_alive(backend);
    let mut a = rig.blk_a(A_MEM);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 2);
    rig.check_b(&mut b);
}

/// Loops, chains longer than the queue, bad `next` indexes and malformed indirect tables are
/// cut short by the backend: the chain comes back with used length 0 and nothing is done.
#[test]
fn descriptor_loops_and_overlong_chains_are_dropped() {
    let rig = Rig::start("loops");
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let backend = rig.backend_a();
    let ram = &rig.a.ram;
    let image = rig.image("a.img");
    ram.write(DATA, &[0x77; 32 * 512]);
    write_header(ram, request_type::OUT, 16);

    let two_loop = [link(HEADER, 16, false, 1), link(DATA, 512, false, 0)];
    assert_eq!(
        submit_raw(&mut a, ram, "two-entry loop", &two_loop),
        DROPPED
    );
    let self_loop = [link(HEADER, 16, false, 0)];
    assert_eq!(submit_raw(&mut a, ram, "self loop", &self_loop), DROPPED);
    // Through every entry of the table and around again: longer than the queue.
    let size = usize::from(A_QUEUE_SIZE);
    let whole_table: Vec<_> = (0..size)
        .map(|i| match i {
            0 => link(HEADER, 16, false, 1),
            _ => link(DATA + 512 * i as u64, 512, false, (i + 1) % size),
        })
        .collect();
    assert_eq!(
        submit_raw(&mut a, ram, "loop through the whole table", &whole_table),
        DROPPED
    );
    let past_table = [RawDescriptor {
        next: RawNext::Index(A_QUEUE_SIZE + 3),
        ..link(HEADER, 16, false, 0)
    }];
    assert_eq!(
        submit_raw(&mut a, ram, "next past the table", &past_table),
        DROPPED
    );

    // Indirect tables.
    let indirect_head = [RawDescriptor {
        addr: TABLE,
        len: 32,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: RawNext::Index(0),
    }];
    write_table_entry(ram, TABLE, 0, (HEADER, 16, VIRTQ_DESC_F_NEXT, 1));
    write_table_entry(ram, TABLE, 1, (DATA, 512, VIRTQ_DESC_F_NEXT, 0));
    assert_eq!(
        submit_raw(&mut a, ram, "indirect table with a loop", &indirect_head),
        DROPPED
    );
    write_table_entry(ram, TABLE, 1, (TABLE, 32, VIRTQ_DESC_F_INDIRECT, 0));
    assert_eq!(
        submit_raw(&mut a, ram, "indirect table inside a table", &indirect_head),
        DROPPED
    );
    write_table_entry(ram, TABLE, 1, (STATUS_BYTE, 1, VIRTQ_DESC_F_WRITE, 0));
    let odd_length = [RawDescriptor {
        len: 24,
        ..indirect_head[0]
    }];
    assert_eq!(
        submit_raw(&mut a, ram, "indirect table of 1.5 entries", &odd_length),
        DROPPED
    );
    let outside = [RawDescriptor {
        addr: RAM_END,
        ..indirect_head[0]
    }];
    assert_eq!(
        submit_raw(&mut a, ram, "indirect table outside RAM", &outside),
        DROPPED
    );
    assert_image_untouched(&image, 16, 32 * 512);

    // A well-formed indirect table with more entries than the queue has is accepted.
    let entries = 2 * u64::from(A_QUEUE_SIZE) + 2;
    write_header(ram, request_type::OUT, 100);
    write_table_entry(ram, TABLE, 0, (HEADER, 16, VIRTQ_DESC_F_NEXT, 1));
    for i in 1..entries - 1 {
        let addr = DATA + 512 * (i - 1);
        write_table_entry(ram, TABLE, i, (addr, 512, VIRTQ_DESC_F_NEXT, i as u16 + 1));
    }
    let last = (STATUS_BYTE, 1, VIRTQ_DESC_F_WRITE, 0);
    write_table_entry(ram, TABLE, entries - 1, last);
    let long_table = [RawDescriptor {
        len: 16 * entries as u32,
        ..indirect_head[0]
    }];
    assert_eq!(
        submit_raw(
            &mut a,
            ram,
            "indirect table longer than the queue",
            &long_table
        ),
        RawOutcome::Completed {
            used_len: 1,
            status: Some(0)
        }
    );
    let mut on_disk = vec![0u8; 32 * 512];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 100 * SECTOR_SIZE as u64)
        .unwrap();
    assert_eq!(on_disk, vec![0x77; 32 * 512]);

    // A head index past the ring is never completed; the next request is.
    a.publish_raw_head(0, 0xffff).unwrap();
    assert_io_works(&mut a, &image, 64, 3);

    assert_eq!(a.device().status(), LIVE);
    assert_eq!(rig.backend_a(), backend);
    assert_alive(backend);
    rig.check_b(&mut b);
}

/// Chains whose lengths pass 4 GiB are cut where the total overflows (used length 0); a chain
/// just under 4 GiB is complete, but its data runs out of RAM: IOERR.
#[test]
fn data_lengths_over_4_gib() {
    let rig = Rig::start("4gib");
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let backend = rig.backend_a();
    let ram = &rig.a.ram;
    let image = rig.image("a.img");
    ram.write(DATA, &[0x33; 4096]);

    write_header(ram, request_type::OUT, 24);
    let sum_past_u32 = [
        link(HEADER, 16, false, 1),
        link(DATA, 0x6000_0000, false, 2),
        link(DATA, 0x6000_0000, false, 3),
        link(DATA, 0x6000_0000, false, 4),
        end(STATUS_BYTE, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "three 1.5 GiB descriptors", &sum_past_u32),
        DROPPED
    );
    let all_ones = [
        link(HEADER, 16, false, 1),
        link(DATA, u32::MAX, false, 2),
        end(STATUS_BYTE, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "a 0xffffffff-byte descriptor", &all_ones),
        DROPPED
    );
    let alone = [end(DATA, u32::MAX, true)];
    assert_eq!(
        submit_raw(&mut a, ram, "a lone 0xffffffff-byte descriptor", &alone),
        DROPPED
    );
    let mut data = [0u8; 4096];
    ram.read(DATA, &mut data);
    assert_eq!(data, [0x33; 4096], "a dropped chain wrote guest memory");

    let under_4_gib = [
        link(HEADER, 16, false, 1),
        link(DATA, 0xffff_0000, false, 2),
        end(STATUS_BYTE, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "a write of almost 4 GiB", &under_4_gib),
        FAILED_WITH_IOERR
    );
    write_header(ram, request_type::IN, 24);
    let read_under_4_gib = [
        link(HEADER, 16, false, 1),
        link(DATA, 0xffff_0000, true, 2),
        end(STATUS_BYTE, 1, true),
    ];
    assert_eq!(
        submit_raw(&mut a, ram, "a read of almost 4 GiB", &read_under_4_gib),
        FAILED_WITH_IOERR
    );
    assert_image_untouched(&image, 24, 4096);

    assert_eq!(a.device().status(), LIVE);
    assert_eq!(rig.backend_a(), backend);
    assert_alive(backend);
    assert_io_works(&mut a, &image, 64, 4);
    rig.check_b(&mut b);
}

/// QueueNum 0, not a power of two, above QueueNumMax, or wider than 16 bits: DRIVER_OK leaves
/// the device needing a reset, with a config interrupt; a reset and a proper init work.
#[test]
fn bad_queue_sizes_need_reset() {
    let rig = Rig::start("qnum");
    let mut b = rig.blk_b();
    let backend = rig.backend_a();
    // 0x1_0010 truncated to 16 bits would be a valid 16.
    for size in [0, 3, 2 * u32::from(A_QUEUE_SIZE), 0x1_0010] {
        let what = format!("QueueNum {size}");
        expect_needs_reset(&rig, &what, true, |dev| {
            assert_eq!(dev.queue_num_max(0), u32::from(A_QUEUE_SIZE));
            program_queue(dev, 0, size, scratch_rings());
        });
    }
    assert_alive(backend);
    let mut a = rig.blk_a(A_MEM);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 5);
    rig.check_b(&mut b);
}

/// A guest that resets a device without acknowledging its interrupt, again and again: the
/// reset drops the line each time, so the device keeps getting interrupts and the zone never
/// reaches hvisor's limit of pending interrupts (which would starve device B).
#[test]
fn resets_with_an_unacknowledged_interrupt_release_the_line() {
    let rig = Rig::start("noack");
    let mut b = rig.blk_b();
    for round in 0..2 * MAX_PENDING_IRQS {
        let what = format!("round {round}");
        expect_needs_reset(&rig, &what, false, |dev| {
            program_queue(dev, 0, 3, scratch_rings());
        });
    }
    rig.check_b(&mut b);
    let mut a = rig.blk_a(A_MEM);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 13);
}

/// A QueueSel past the last queue reads QueueNumMax 0 and QueueReady 0, and its queue
/// register writes change nothing: the real queues start cleanly afterwards.
#[test]
fn queue_select_out_of_range_is_inert() {
    let rig = Rig::start("qsel");
    let mut b = rig.blk_b();
    let ram = &rig.a.ram;
    let image = rig.image("a.img");
    let dev = rig.dev_a();
    dev.init(VIRTIO_F_VERSION_1).unwrap();
    // 0x1_0000 and 0x1_0001 would select queues 0 and 1 if the selector were truncated.
    for select in [2u32, 7, 0xffff, 0x1_0000, 0x1_0001, u32::MAX] {
        dev.write_reg(reg::QUEUE_SEL, 4, u64::from(select));
        assert_eq!(dev.read_reg(reg::QUEUE_NUM_MAX, 4), 0, "QueueSel {select}");
        assert_eq!(dev.read_reg(reg::QUEUE_READY, 4), 0, "QueueSel {select}");
        // A bad size and misaligned rings, made ready: fatal if they reached a real queue.
        program_queue(&dev, select, 3, [0x1, 0x3, 0x5]);
        assert_eq!(dev.read_reg(reg::QUEUE_READY, 4), 0, "QueueSel {select}");
    }
    for queue in [0, 1] {
        assert_eq!(dev.queue_num_max(queue), u32::from(A_QUEUE_SIZE));
        assert_eq!(dev.read_reg(reg::QUEUE_READY, 4), 0, "queue {queue}");
    }
    let mut queue = manual_queue(ram);
    dev.setup_queue(0, A_QUEUE_SIZE, &queue.memory()).unwrap();
    dev.driver_ok();
    assert_eq!(dev.status(), LIVE);
    let head = add_write(&mut queue, ram, 40, &[0x41; 512]);
    dev.notify(0);
    assert_eq!(
        wait_used(&dev, &mut queue, &rig.a.irq),
        UsedElem { id: head, len: 1 }
    );
    assert_eq!(status_byte(ram), 0);
    let mut on_disk = [0u8; 512];
    File::open(&image)
        .unwrap()
        .read_exact_at(&mut on_disk, 40 * SECTOR_SIZE as u64)
        .unwrap();
    assert_eq!(on_disk, [0x41; 512]);

    let mut a = rig.blk_a(A_MEM);
    assert_io_works(&mut a, &image, 64, 6);
    rig.check_b(&mut b);
}

/// Registers are 32 bits wide and aligned: narrower and wider accesses, unaligned and unknown
/// offsets read 0 and their writes are ignored, read-only registers keep their values, and a
/// live device stays live through all of it.
#[test]
fn odd_register_accesses_are_ignored() {
    let rig = Rig::start("regs");
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let dev = a.device();
    assert_eq!(dev.status(), LIVE);
    let generation = dev.config_generation();
    let features = dev.device_features();
    let readable = [
        reg::MAGIC_VALUE,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
        reg::QUEUE_NUM_MAX,
        reg::QUEUE_READY,
        reg::STATUS,
        reg::CONFIG_GENERATION,
    ];
    for size in [1u8, 2, 8] {
        for offset in readable {
            assert_eq!(
                dev.read_reg(offset, size),
                0,
                "{size}-byte read of {offset:#x}"
            );
        }
        // Honoured, these would reset the device, deselect queue 0 or stop it.
        dev.write_reg(reg::STATUS, size, 0);
        dev.write_reg(reg::QUEUE_SEL, size, 5);
        dev.write_reg(reg::QUEUE_READY, size, 0);
        assert_eq!(dev.status(), LIVE, "after {size}-byte writes");
    }
    // Sizes hvisor never produces are answered with 0 and change nothing.
    for size in [0u8, 3, 16] {
        assert_eq!(dev.read_reg(reg::MAGIC_VALUE, size), 0, "{size}-byte read");
        dev.write_reg(reg::STATUS, size, 0);
        assert_eq!(dev.status(), LIVE, "after a {size}-byte write");
    }
    for offset in [0x071, 0x072, 0x073, 0x031, 0x001] {
        assert_eq!(dev.read_reg(offset, 4), 0, "unaligned read of {offset:#x}");
        dev.write_reg(offset, 4, 0);
    }
    // Unknown offsets, and the legacy GuestPageSize, QueueAlign and QueuePFN.
    for offset in [
        0x018, 0x028, 0x03c, 0x040, 0x048, 0x0a8, 0x0c4, 0x0f0, 0x0f8,
    ] {
        assert_eq!(dev.read_reg(offset, 4), 0, "read of {offset:#x}");
        dev.write_reg(offset, 4, 0);
        dev.write_reg(offset, 4, 0xffff_ffff);
        assert_eq!(
            dev.read_reg(offset, 4),
            0,
            "read of {offset:#x} after a write"
        );
    }
    assert_eq!(dev.status(), LIVE);
    assert_eq!(dev.read_reg(reg::QUEUE_NUM_MAX, 4), u64::from(A_QUEUE_SIZE));
    assert_eq!(
        dev.read_reg(reg::QUEUE_READY, 4),
        1,
        "queue 0 still selected"
    );

    // Read-only registers keep their values. SHMLen (0x0b0, 0x0b4) says "no region".
    let read_only = [
        (reg::MAGIC_VALUE, u64::from(MAGIC_VALUE)),
        (reg::VERSION, 2),
        (reg::DEVICE_ID, 2),
        (reg::VENDOR_ID, 0x4856_4953),
        (reg::QUEUE_NUM_MAX, u64::from(A_QUEUE_SIZE)),
        (reg::INTERRUPT_STATUS, 0),
        (0x0b0, 0xffff_ffff),
        (0x0b4, 0xffff_ffff),
        (reg::CONFIG_GENERATION, u64::from(generation)),
    ];
    for (offset, value) in read_only {
        assert_eq!(dev.read_reg(offset, 4), value, "{offset:#x} before");
        for written in [0, 0xdead_beef] {
            dev.write_reg(offset, 4, written);
            assert_eq!(
                dev.read_reg(offset, 4),
                value,
                "{offset:#x} after {written:#x}"
            );
        }
    }
    dev.write_reg(reg::DEVICE_FEATURES_SEL, 4, 0);
    dev.write_reg(reg::DEVICE_FEATURES, 4, 0);
    assert_eq!(dev.device_features(), features);
    assert_eq!(dev.status(), LIVE);

    assert_io_works(&mut a, &rig.image("a.img"), 64, 7);
    rig.check_b(&mut b);
}

/// Notifies before DRIVER_OK, for the unready queue 1 and for queues that do not exist are
/// dropped: no interrupt, no status change, and the device keeps working.
#[test]
fn notifies_for_unready_or_missing_queues_are_dropped() {
    let rig = Rig::start("notify");
    let mut b = rig.blk_b();
    let dev = rig.dev_a();
    dev.reset().unwrap();
    dev.notify(0);
    // Notifies are asynchronous; this synchronous read is handled after them.
    assert_eq!(dev.status(), 0);

    let mut a = rig.blk_a(A_MEM);
    let dev = a.device();
    assert_eq!(
        dev.queue_num_max(1),
        u32::from(A_QUEUE_SIZE),
        "queue 1 exists"
    );
    assert_eq!(dev.read_reg(reg::QUEUE_READY, 4), 0, "queue 1 is not ready");
    for queue in [1u32, 2, 7, 0xffff, 0x1_0000, u32::MAX] {
        dev.write_reg(reg::QUEUE_NOTIFY, 4, u64::from(queue));
    }
    assert_eq!(dev.status(), LIVE);
    assert_eq!(dev.interrupt_status(), 0);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 8);
    rig.check_b(&mut b);
}

/// DRIVER_OK without FEATURES_OK is refused: the other bits of the write stick, DRIVER_OK
/// does not, and nothing starts. Finishing the initialization properly then works, and so
/// does a fresh one.
#[test]
fn driver_ok_without_features_ok_is_refused() {
    let rig = Rig::start("driverok");
    let mut b = rig.blk_b();
    let ram = &rig.a.ram;
    let dev = rig.dev_a();
    dev.reset().unwrap();
    dev.set_status(status::DRIVER_OK);
    assert_eq!(dev.status(), 0, "DRIVER_OK straight after reset");
    dev.set_status(status::ACKNOWLEDGE | status::DRIVER_OK);
    assert_eq!(dev.status(), status::ACKNOWLEDGE);
    dev.reset().unwrap();

    dev.add_status(status::ACKNOWLEDGE);
    dev.add_status(status::DRIVER);
    dev.write_driver_features(VIRTIO_F_VERSION_1);
    let mut queue = manual_queue(ram);
    dev.setup_queue(0, A_QUEUE_SIZE, &queue.memory()).unwrap();
    let head = add_write(&mut queue, ram, 48, &[0x42; 512]);
    dev.add_status(status::DRIVER_OK);
    assert_eq!(dev.status(), NEGOTIATING);
    dev.notify(0);
    assert_eq!(dev.interrupt_status(), 0);
    assert_eq!(
        queue.pop_used().unwrap(),
        None,
        "a request ran on a device never started"
    );

    // The refused write did not spoil the negotiation: finish it, and the device starts and
    // runs the request that was waiting.
    dev.add_status(status::FEATURES_OK);
    dev.driver_ok();
    assert_eq!(dev.status(), LIVE);
    assert_eq!(
        wait_used(&dev, &mut queue, &rig.a.irq),
        UsedElem { id: head, len: 1 }
    );
    assert_eq!(status_byte(ram), 0);

    let mut a = rig.blk_a(A_REINIT_MEM);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 9);
    rig.check_b(&mut b);
}

/// Acked features the device did not offer are dropped (so FEATURES_OK still sticks and the
/// device runs split rings); FEATURES_OK without VERSION_1 does not stick.
#[test]
fn feature_negotiation_masks_and_requires_version_1() {
    let rig = Rig::start("features");
    let mut b = rig.blk_b();
    let ram = &rig.a.ram;
    let dev = rig.dev_a();
    dev.reset().unwrap();
    dev.add_status(status::ACKNOWLEDGE);
    dev.add_status(status::DRIVER);
    let offered = dev.device_features();
    assert_ne!(offered, u64::MAX);
    dev.write_driver_features(u64::MAX);
    // Selectors past 1 select nothing.
    dev.write_reg(reg::DRIVER_FEATURES_SEL, 4, 2);
    dev.write_reg(reg::DRIVER_FEATURES, 4, 0xffff_ffff);
    dev.add_status(status::FEATURES_OK);
    assert_eq!(dev.status(), NEGOTIATING | status::FEATURES_OK);
    // The device now runs with everything it offered, EVENT_IDX included.
    let mut queue = manual_queue(ram);
    queue.set_features(offered & VIRTIO_F_EVENT_IDX);
    dev.setup_queue(0, A_QUEUE_SIZE, &queue.memory()).unwrap();
    dev.driver_ok();
    assert_eq!(dev.status(), LIVE);
    let head = add_write(&mut queue, ram, 56, &[0x43; 512]);
    dev.notify(0);
    assert_eq!(
        wait_used(&dev, &mut queue, &rig.a.irq),
        UsedElem { id: head, len: 1 }
    );
    assert_eq!(status_byte(ram), 0);

    dev.reset().unwrap();
    dev.add_status(status::ACKNOWLEDGE);
    dev.add_status(status::DRIVER);
    dev.write_driver_features(offered & !VIRTIO_F_VERSION_1);
    dev.add_status(status::FEATURES_OK);
    assert_eq!(dev.status(), NEGOTIATING, "FEATURES_OK without VERSION_1");
    dev.add_status(status::DRIVER_OK);
    assert_eq!(dev.status(), NEGOTIATING);
    assert_eq!(dev.interrupt_status(), 0);

    let mut a = rig.blk_a(A_REINIT_MEM);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 10);
    rig.check_b(&mut b);
}

/// A zone window larger than its devices: an access inside it that hits no device reaches the
/// bridge (hvisor traps the whole window), reads 0, and an asynchronous notify there gets no
/// reply.
#[test]
fn trapped_access_outside_every_device() {
    const WINDOW: u64 = 0xa000000;
    const WINDOW_SIZE: u64 = 0x1000;
    let rig = Rig::launch(
        "hole",
        WINDOW + 0x200,
        WINDOW + 0x400,
        Some(r#"[{"base":"0xa000000","size":"0x1000"}]"#),
        false,
    );
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let vcpu = &rig.a.vcpu;
    let before = rig.sb.sim.stats();
    let holes = [
        (WINDOW, 4),
        (WINDOW + reg::STATUS, 4),
        (WINDOW + reg::CONFIG, 8),
        (WINDOW + 0x1ff, 1),
        (WINDOW + 0x600, 2),
        (WINDOW + WINDOW_SIZE - 4, 4),
    ];
    for (addr, size) in holes {
        assert_eq!(vcpu.read(addr, size), 0, "read of {addr:#x}");
        vcpu.write(addr, size, u64::MAX);
    }
    let after = rig.sb.sim.stats();
    assert_eq!(
        after.unhandled_accesses, before.unhandled_accesses,
        "inside the window, so hvisor forwards them"
    );
    assert!(after.requests - before.requests >= 2 * holes.len() as u64);

    // The window's notify offset belongs to no device.
    let page = rig.sb.sim.hsm();
    let flag = page.bridge().cfg_flag(0);
    vcpu.write(WINDOW + reg::QUEUE_NOTIFY, 4, 0);
    assert_eq!(rig.sb.sim.stats().async_requests, after.async_requests + 1);
    // vCPU 1's synchronous access is queued behind the notify: once it is answered, the
    // notify has been handled.
    assert_eq!(
        rig.b.vcpu.read(rig.base_b + reg::MAGIC_VALUE, 4),
        u64::from(MAGIC_VALUE)
    );
    assert_eq!(
        page.bridge().cfg_flag(0),
        flag,
        "a reply to an async request"
    );
    assert_eq!(
        vcpu.read(rig.base_a + reg::MAGIC_VALUE, 4),
        u64::from(MAGIC_VALUE)
    );

    assert_eq!(a.device().status(), LIVE);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 11);
    rig.check_b(&mut b);
}

/// 100k bogus register reads cost a few log lines per kind of anomaly, not one per trap.
#[test]
fn a_register_flood_does_not_flood_the_log() {
    const READS: usize = 100_000;
    const BOGUS: [(u64, u8, &str); 4] = [
        (0x0f0, 4, "UnknownRegister"),
        (0x071, 4, "UnalignedRegister"),
        (reg::MAGIC_VALUE, 1, "AccessWidth"),
        (reg::QUEUE_NOTIFY, 4, "WriteOnlyRegister"),
    ];
    let rig = Rig::launch("flood", DEV_A, DEV_B, None, true);
    let mut b = rig.blk_b();
    let mut a = rig.blk_a(A_MEM);
    let dev = a.device();
    let started = Instant::now();
    for i in 0..READS {
        let (offset, size, kind) = BOGUS[i % BOGUS.len()];
        assert_eq!(dev.read_reg(offset, size), 0, "{kind} read {i}");
    }
    eprintln!("{READS} bogus reads in {:?}", started.elapsed());
    assert_eq!(dev.status(), LIVE);
    assert_io_works(&mut a, &rig.image("a.img"), 64, 12);
    rig.check_b(&mut b);

    // Each warning was logged before its read was answered, so the log is complete.
    let log = std::fs::read_to_string(rig.log.as_ref().unwrap()).unwrap();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ")).collect();
    assert!(
        warnings.len() < 100,
        "{} warning lines:\n{}",
        warnings.len(),
        warnings.join("\n")
    );
    for (_, _, kind) in BOGUS {
        let lines: Vec<&&str> = warnings
            .iter()
            .filter(|l| l.contains(&format!("({kind} #")))
            .collect();
        // The first ten, then every power of ten.
        assert_eq!(lines.len(), 13, "{kind}: {lines:#?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("({kind} #10000)"))),
            "{kind}: the flood must stay visible"
        );
    }
}
