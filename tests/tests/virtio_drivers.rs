//! A guest driver nobody on this project wrote: rcore-os `virtio-drivers`, which hvisor's
//! ArceOS and RuxOS guests use, runs unmodified against the real bridge and backends. Its
//! `MmioTransport` touches a `PROT_NONE` window and every access traps into the simulated
//! hypervisor (see `trap`), so the bridge sees exactly what a board's guest would make it see.
//!
//! x86_64 only: the trap harness decodes x86 instructions and edits x86 register contexts.

#![cfg(target_arch = "x86_64")]

mod common;
mod trap;

use std::arch::asm;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hvisor_hsm::{DeviceReq, SimHypervisor, SimRegion, SimZoneSpec};
use hvisor_vhost_tests::blk_backend::BlkBackend;
use hvisor_vhost_tests::driver::net::frames;
use hvisor_vhost_tests::harness::{bin_path, Process, Rng, SimBridge, TempDir};
use hvisor_vhost_tests::netns::{self, NetBackend, NetNs, PacketSocket};
use trap::{TrapGuest, ZoneHal, WINDOW_SIZE};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONet;

/// Guest-physical base of the trapping window; each device gets its own 0x200 of it, and so
/// (as in hvisor's board configs) its own virtio region with an asynchronous QueueNotify.
const WINDOW: u64 = 0xa00_0000;
const BLK: u64 = WINDOW;
const CONSOLE: u64 = WINDOW + 0x200;
const NET: u64 = WINDOW + 0x400;
const DEVICE_LEN: usize = 0x200;
const IRQ: u32 = 78;
/// Zone RAM the driver's DMA pages come from.
const DMA_BASE: u64 = RAM_BASE + 0x100_0000;
const DMA_SIZE: usize = 0x100_0000;
/// How long a host-side wait may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

const _: () = assert!(NET + DEVICE_LEN as u64 <= WINDOW + WINDOW_SIZE as u64);

fn device_entry(kind: &str, addr: u64, fields: &str) -> String {
    format!(
        r#"{{"type":"{kind}","addr":"{addr:#x}","len":"{DEVICE_LEN:#x}","irq":{IRQ},"status":"enable",{fields}}}"#
    )
}

fn trap_guest(sb: &SimBridge) -> TrapGuest {
    TrapGuest::new(&sb.sim, 1, 0, WINDOW, DMA_BASE, DMA_SIZE)
}

/// Every trapped access became exactly one `device_req`, and the notifies among them went
/// asynchronously, as hvisor sends a write at window offset 0x50.
fn assert_trapped_like_hvisor(guest: &TrapGuest, sb: &SimBridge) {
    let trapped = guest.stats();
    let sim = sb.sim.stats();
    eprintln!(
        "trapped {} loads and {} stores ({} by single-stepped instructions); {} of the stores \
         were asynchronous notifies",
        trapped.loads, trapped.stores, trapped.stepped, sim.async_requests
    );
    assert!(trapped.loads > 0 && trapped.stores > 0, "{trapped:?}");
    assert_eq!(
        sim.requests,
        trapped.loads + trapped.stores,
        "{sim:?} {trapped:?}"
    );
    assert!(
        sim.async_requests > 0 && sim.async_requests < trapped.stores,
        "QueueNotify writes are asynchronous, the other stores are not: {sim:?} {trapped:?}"
    );
    assert_eq!(sim.unhandled_accesses, 0, "{sim:?}");
}

/// Writes random data at a few places (single and multi-sector, the first and last sectors),
/// reads it back through the driver and from the image file.
fn blocks_round_trip(sb: &SimBridge, image: &Path, seed: u64) {
    let guest = trap_guest(sb);
    let mut blk = VirtIOBlk::<ZoneHal, _>::new(guest.transport(BLK, DEVICE_LEN))
        .unwrap_or_else(|e| panic!("VirtIOBlk::new: {e}"));
    let sectors = DISK_SIZE / SECTOR_SIZE as u64;
    assert_eq!(blk.capacity(), sectors);
    assert!(!blk.readonly());

    let mut rng = Rng::new(seed);
    let extents = [(0, 1), (1, 8), (4097, 32), (sectors - 3, 3)];
    let written: Vec<(u64, Vec<u8>)> = extents
        .iter()
        .map(|&(sector, count)| {
            let mut data = vec![0u8; count * SECTOR_SIZE];
            rng.fill(&mut data);
            blk.write_blocks(sector as usize, &data)
                .unwrap_or_else(|e| panic!("write of sector {sector}: {e}"));
            (sector, data)
        })
        .collect();
    blk.flush().unwrap_or_else(|e| panic!("flush: {e}"));

    let file = File::open(image).expect("open the image");
    for (sector, data) in &written {
        let mut back = vec![0u8; data.len()];
        blk.read_blocks(*sector as usize, &mut back)
            .unwrap_or_else(|e| panic!("read of sector {sector}: {e}"));
        assert!(
            back == *data,
            "sector {sector}: the driver read other data (seed {seed})"
        );
        file.read_exact_at(&mut back, sector * SECTOR_SIZE as u64)
            .expect("read the image");
        assert!(
            back == *data,
            "sector {sector}: the image holds other data (seed {seed})"
        );
    }
    assert_trapped_like_hvisor(&guest, sb);
}

#[test]
fn blk_through_our_backend() {
    let dir = dir_with_images("vd-blk", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let sb = SimBridge::start(Arc::clone(&dir), &cfg, &[]);
    blocks_round_trip(&sb, &dir.path().join("disk.img"), 0x7a11);
}

#[test]
fn blk_through_qemu_storage_daemon() {
    let dir = dir_with_images("vd-qsd", &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let (cfg, _daemons) = BlkBackend::Qsd.prepare(&cfg, dir.path());
    assert!(
        cfg.contains("\"socket\""),
        "the entry names the daemon's socket: {cfg}"
    );
    let sb = SimBridge::start(Arc::clone(&dir), &cfg, &[]);
    blocks_round_trip(&sb, &dir.path().join("disk.img"), 0x9e5d);
}

/// Waits for another process to create `path`: nothing else signals it.
fn wait_for_path(path: &Path, owner: &mut Process) {
    let deadline = Instant::now() + WAIT;
    while !path.exists() {
        if let Some(status) = owner.wait_timeout(Duration::from_millis(5)) {
            panic!(
                "the backend exited ({status}) before creating {}",
                path.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
    }
}

#[test]
fn console_round_trips_bytes() {
    let dir = Arc::new(TempDir::new("vd-console"));
    let vhost_user = dir.path().join("console-vu.sock");
    let console_socket = dir.path().join("console.sock");
    let mut backend = Process::spawn(
        "vhost-user-console",
        Command::new(bin_path("vhost-user-console"))
            .arg("-s")
            .arg(&vhost_user)
            .arg("--socket")
            .arg(&console_socket),
    );
    wait_for_path(&console_socket, &mut backend);
    let mut client = UnixStream::connect(&console_socket).expect("attach to the console");
    client.set_read_timeout(Some(WAIT)).unwrap();

    let entry = device_entry(
        "console",
        CONSOLE,
        &format!(r#""socket":"{}""#, vhost_user.display()),
    );
    let sb = SimBridge::start(Arc::clone(&dir), &config(&[zone(1, &[entry], None)]), &[]);
    let guest = trap_guest(&sb);
    let mut console = VirtIOConsole::<ZoneHal, _>::new(guest.transport(CONSOLE, DEVICE_LEN))
        .unwrap_or_else(|e| panic!("VirtIOConsole::new: {e}"));

    // More than the driver's one-page receive buffer, so that it re-posts it several times.
    let mut sent = vec![0u8; 10_000];
    Rng::new(0xc0de).fill(&mut sent);
    client.write_all(&sent).expect("host to guest");
    let mut received = Vec::with_capacity(sent.len());
    let deadline = Instant::now() + WAIT;
    while received.len() < sent.len() {
        match console.recv(true).unwrap_or_else(|e| panic!("recv: {e}")) {
            Some(byte) => received.push(byte),
            None => assert!(
                Instant::now() < deadline,
                "the guest got {} of {} bytes",
                received.len(),
                sent.len()
            ),
        }
    }
    assert!(received == sent, "host to guest: other bytes arrived");

    for chunk in received.chunks(1500) {
        console
            .send_bytes(chunk)
            .unwrap_or_else(|e| panic!("send_bytes: {e}"));
    }
    let mut echoed = vec![0u8; sent.len()];
    client.read_exact(&mut echoed).expect("guest to host");
    assert!(echoed == sent, "guest to host: other bytes arrived");
    assert_trapped_like_hvisor(&guest, &sb);
}

const TAP: &str = "vdtap0";
const GUEST_MAC: [u8; 6] = [0x02, 0x48, 0x56, 0x00, 0x00, 0x02];
const RX_QUEUE_SIZE: usize = 16;
const NET_BUFFER_LEN: usize = 2048;

#[test]
fn net_frames_cross_the_host_tap() {
    let dir = Arc::new(TempDir::new("vd-net"));
    let ns = NetNs::new("vdnet");
    let socket = dir.path().join("net.sock");
    let mac = netns::format_mac(&GUEST_MAC);
    let backend = NetBackend::spawn(&ns, &socket, TAP, &["--mac", &mac]);
    ns.configure_host_side(TAP);
    let packets = PacketSocket::open(&ns, TAP).expect("packet socket on the TAP");
    let tap_mac = ns.mac(TAP);

    let entry = device_entry(
        "net",
        NET,
        &format!(r#""socket":"{}""#, backend.socket.display()),
    );
    let sb = SimBridge::start(Arc::clone(&dir), &config(&[zone(1, &[entry], None)]), &[]);
    let guest = trap_guest(&sb);
    let mut net = VirtIONet::<ZoneHal, _, RX_QUEUE_SIZE>::new(
        guest.transport(NET, DEVICE_LEN),
        NET_BUFFER_LEN,
    )
    .unwrap_or_else(|e| panic!("VirtIONet::new: {e}"));
    assert_eq!(net.mac_address(), GUEST_MAC);

    let mut rng = Rng::new(0x4e7);
    let mut payload = vec![0u8; 600];
    rng.fill(&mut payload);
    let out = frames::ethernet(tap_mac, GUEST_MAC, frames::ETHERTYPE_EXPERIMENTAL, &payload);
    let mut tx = net.new_tx_buffer(out.len());
    tx.packet_mut().copy_from_slice(&out);
    net.send(tx).unwrap_or_else(|e| panic!("send: {e}"));
    let seen = packets
        .recv_matching(WAIT, |frame| frame == out.as_slice())
        .expect("packet socket");
    assert!(seen.is_some(), "the guest's frame never reached the TAP");

    rng.fill(&mut payload);
    let back = frames::ethernet(GUEST_MAC, tap_mac, frames::ETHERTYPE_EXPERIMENTAL, &payload);
    packets.send(&back).expect("host to guest");
    let deadline = Instant::now() + WAIT;
    loop {
        match net.receive() {
            Ok(rx) => {
                let ours = frames::ethertype(rx.packet()) == Some(frames::ETHERTYPE_EXPERIMENTAL);
                if ours {
                    assert!(
                        rx.packet() == back.as_slice(),
                        "host to guest: another frame arrived"
                    );
                }
                net.recycle_rx_buffer(rx)
                    .unwrap_or_else(|e| panic!("recycle: {e}"));
                if ours {
                    break;
                }
            }
            Err(virtio_drivers::Error::NotReady) => {
                assert!(
                    Instant::now() < deadline,
                    "the host's frame never reached the guest"
                )
            }
            Err(e) => panic!("receive: {e}"),
        }
    }
    assert_trapped_like_hvisor(&guest, &sb);
}

// ---- The harness itself ------------------------------------------------------------------
//
// These run without a bridge: a fake device thread answers the ring, so that each trapped
// instruction form can be checked against the exact `device_req`s it must produce.

/// A simulated zone whose only trapping region is the blk device's 0x200 at the window base.
fn bridgeless_sim() -> Arc<SimHypervisor> {
    SimHypervisor::new(vec![SimZoneSpec {
        id: 1,
        regions: vec![SimRegion {
            zone0_ipa: RAM_BASE + 0x1000_0000,
            zonex_ipa: RAM_BASE,
            size: RAM_SIZE,
        }],
        windows: vec![(BLK, DEVICE_LEN as u64)],
    }])
    .expect("simulated hypervisor")
}

/// Plays the bridge: answers every synchronous request (a read of `addr` with
/// `register_value(addr)`), and reports every request.
struct FakeDevice {
    stop: Arc<AtomicBool>,
    seen: mpsc::Receiver<DeviceReq>,
    thread: Option<thread::JoinHandle<()>>,
}

fn register_value(addr: u64) -> u64 {
    0x8877_6655_4433_2211 ^ addr
}

impl FakeDevice {
    fn start(sim: &Arc<SimHypervisor>) -> FakeDevice {
        let hsm = sim.hsm();
        let stop = Arc::new(AtomicBool::new(false));
        let (report, seen) = mpsc::channel();
        let thread_stop = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            while !thread_stop.load(Ordering::Relaxed) {
                let Some(req) = hsm.bridge().pop_request() else {
                    // The guest spins on its reply slot; polling is what the bridge does too.
                    thread::yield_now();
                    continue;
                };
                if req.need_interrupt == 0 {
                    let reply = if req.is_write == 0 {
                        register_value(req.address)
                    } else {
                        0
                    };
                    hsm.bridge().reply(req.src_cpu, reply).expect("reply");
                }
                report.send(req).expect("the test is listening");
            }
        });
        FakeDevice {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Every request so far, as (offset in the window, size, value, is_write, need_interrupt).
    fn requests(&self) -> Vec<(u64, u64, u64, u8, u8)> {
        self.seen
            .try_iter()
            .map(|r| {
                (
                    r.address - WINDOW,
                    r.size,
                    r.value,
                    r.is_write,
                    r.need_interrupt,
                )
            })
            .collect()
    }
}

impl Drop for FakeDevice {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn each_instruction_form_becomes_the_right_device_requests() {
    let sim = bridgeless_sim();
    let device = FakeDevice::start(&sim);
    let guest = TrapGuest::new(&sim, 1, 0, WINDOW, DMA_BASE, DMA_SIZE);
    let reg = |offset: u64| guest.window_ptr(WINDOW + offset);
    let value = |offset: u64| register_value(WINDOW + offset);
    const READ: u8 = 0;
    const WRITE: u8 = 1;

    // Emulated: the reply lands in the destination register, extended as the CPU would.
    let mut full: u64 = u64::MAX;
    // SAFETY: this and each asm block below make one access to a register of the trap window,
    // which the handler replays; the operands are plain registers and the stack is untouched.
    unsafe {
        asm!("mov {v:e}, dword ptr [{p}]", v = inout(reg) full, p = in(reg) reg(0x70), options(nostack))
    };
    assert_eq!(
        full,
        value(0x70) & 0xffff_ffff,
        "a 32-bit load clears the upper half"
    );
    let mut low: u64 = u64::MAX;
    // SAFETY: see above.
    unsafe {
        asm!("mov {v:x}, word ptr [{p}]", v = inout(reg) low, p = in(reg) reg(0x102), options(nostack))
    };
    assert_eq!(
        low,
        0xffff_ffff_ffff_0000 | (value(0x102) & 0xffff),
        "a 16-bit load merges"
    );
    let mut signed: u64 = 0;
    // SAFETY: see above.
    unsafe {
        asm!("movsx {v}, byte ptr [{p}]", v = out(reg) signed, p = in(reg) reg(0x101), options(nostack))
    };
    assert_eq!(signed, i64::from(value(0x101) as u8 as i8) as u64);
    let mut rax: u64 = 0;
    // SAFETY: see above.
    unsafe {
        asm!("mov ah, byte ptr [{p}]", p = in(reg) reg(0x100), inout("rax") rax, options(nostack))
    };
    assert_eq!(rax, (value(0x100) & 0xff) << 8);
    // SAFETY: see above.
    unsafe {
        asm!("mov byte ptr [{p}], ah", p = in(reg) reg(0x104), in("rax") 0xabcd_u64, options(nostack));
        asm!("mov dword ptr [{p}], 0x5a5a", p = in(reg) reg(0x70), options(nostack));
        asm!("mov qword ptr [{p}], {v}", p = in(reg) reg(0x108), v = in(reg) u64::MAX - 1, options(nostack));
        // QueueNotify at window offset 0x50: asynchronous, nobody replies.
        asm!("mov dword ptr [{p}], {v:e}", p = in(reg) reg(0x50), v = in(reg) 3_u32, options(nostack));
    }
    let emulated = guest.stats();
    assert_eq!(
        (emulated.loads, emulated.stores, emulated.stepped),
        (4, 4, 0)
    );

    // Stepped: the instruction runs natively, flags and all.
    let mut sum: u32 = 1;
    // SAFETY: see above.
    unsafe {
        asm!("add {v:e}, dword ptr [{p}]", v = inout(reg) sum, p = in(reg) reg(0x70), options(nostack))
    };
    assert_eq!(sum, (value(0x70) as u32).wrapping_add(1));
    let (mut equal, mut differs): (u8, u8) = (0, 0);
    // SAFETY: see above.
    unsafe {
        asm!(
            "cmp dword ptr [{p}], {same:e}",
            "sete {equal}",
            "cmp dword ptr [{p}], {other:e}",
            "sete {differs}",
            p = in(reg) reg(0x34),
            same = in(reg) value(0x34) as u32,
            other = in(reg) !(value(0x34) as u32),
            equal = out(reg_byte) equal,
            differs = out(reg_byte) differs,
            options(nostack),
        )
    };
    assert_eq!(
        (equal, differs),
        (1, 0),
        "the flags come from the device's value"
    );
    // SAFETY: see above.
    unsafe { asm!("or dword ptr [{p}], 0x100", p = in(reg) reg(0x64), options(nostack)) };

    let requests = device.requests();
    let low32 = |offset| value(offset) & 0xffff_ffff;
    assert_eq!(
        requests,
        vec![
            (0x70, 4, 0, READ, 0),
            (0x102, 2, 0, READ, 0),
            (0x101, 1, 0, READ, 0),
            (0x100, 1, 0, READ, 0),
            (0x104, 1, 0xab, WRITE, 0),
            (0x70, 4, 0x5a5a, WRITE, 0),
            (0x108, 8, u64::MAX - 1, WRITE, 0),
            (0x50, 4, 3, WRITE, 1),
            (0x70, 4, 0, READ, 0),
            (0x34, 4, 0, READ, 0),
            (0x34, 4, 0, READ, 0),
            (0x64, 4, 0, READ, 0),
            (0x64, 4, low32(0x64) | 0x100, WRITE, 0),
        ]
    );
    let all = guest.stats();
    assert_eq!((all.loads, all.stores, all.stepped), (8, 5, 4));
    assert_eq!(sim.stats().async_requests, 1);
}

// A fault the harness cannot replay must end the process loudly, never be skipped or
// misreplayed. The faulting code runs in a child process: a copy of this test binary that
// runs only the ignored test named.

/// Runs the ignored test `name` of this binary alone in a child process.
fn run_in_child(name: &str) -> std::process::Output {
    let exe = std::env::current_exe().expect("current_exe");
    Command::new(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .expect("run the child test")
}

/// A core dump of a deliberate crash would only litter the working directory.
fn no_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct we pass; it affects only this (child) process.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
}

#[test]
#[ignore = "a deliberate crash, run in a child process by an_unsupported_access_aborts_with_a_message"]
fn child_makes_an_unsupported_access() {
    no_core_dumps();
    let sim = bridgeless_sim();
    let guest = TrapGuest::new(&sim, 1, 0, WINDOW, DMA_BASE, DMA_SIZE);
    // SAFETY: a 16-byte SSE load from the trap window: the handler refuses it and aborts the
    // process before the instruction could complete; xmm0 is declared clobbered.
    unsafe {
        asm!("movups xmm0, xmmword ptr [{p}]", p = in(reg) guest.window_ptr(BLK + 0x100), out("xmm0") _, options(nostack))
    };
    panic!("the access was not refused");
}

#[test]
fn an_unsupported_access_aborts_with_a_message() {
    let output = run_in_child("child_makes_an_unsupported_access");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(
        stderr.contains("trap harness: cannot replay the access at")
            && stderr.contains("Movups_xmm_xmmm128"),
        "{stderr}"
    );
}

#[test]
#[ignore = "a deliberate crash, run in a child process by a_fault_outside_the_window_is_not_swallowed"]
fn child_faults_outside_the_window() {
    no_core_dumps();
    let sim = bridgeless_sim();
    let _guest = TrapGuest::new(&sim, 1, 0, WINDOW, DMA_BASE, DMA_SIZE);
    // SAFETY: a fresh anonymous PROT_NONE page, distinct from the window; the result is
    // checked.
    let elsewhere = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            WINDOW_SIZE,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(elsewhere, libc::MAP_FAILED);
    // SAFETY: deliberately invalid: the read faults outside the window, and the handler must
    // pass the fault on so that it kills the process.
    let value = unsafe { elsewhere.cast::<u32>().read_volatile() };
    panic!("the fault was swallowed (read {value:#x})");
}

#[test]
fn a_fault_outside_the_window_is_not_swallowed() {
    let output = run_in_child("child_faults_outside_the_window");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGSEGV), "{stderr}");
    assert!(!stderr.contains("trap harness:"), "{stderr}");
}
