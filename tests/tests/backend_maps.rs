//! Backends that map guest memory from the wrong place are refused.
//!
//! hvisor's `/dev/hvisor` hands zone RAM out at a non-zero `mmap_offset` (its physical
//! address), and offset 0 of the same fd is the bridge page followed by root Linux's RAM. A
//! backend that maps the fd from offset 0 with `size + mmap_offset` bytes (libvhost-user
//! before QEMU 9.0, DPDK, SPDK) would use root Linux's memory as the guest's. The simulated
//! hypervisor here lays its RAM fd out as the module does (the bridge page at offset 0,
//! zone RAM at its physical address); the bridge process must refuse a backend that maps
//! from offset 0 (the device goes DEVICE_NEEDS_RESET, and the log says why) and accept
//! backends that honour `mmap_offset`: ours and qemu-storage-daemon.
//!
//! The deliberately wrong backend is a minimal raw vhost-user server: this test binary run
//! again as a separate process, so that its mappings are its own.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hvisor_bridge::config::Config;
use hvisor_hsm::sim::ProviderServer;
use hvisor_hsm::{SimHypervisor, SimOptions, SimRamLayout};
use hvisor_vhost_tests::blk_backend::BlkBackend;
use hvisor_vhost_tests::driver::mmio::{status, VIRTIO_F_VERSION_1};
use hvisor_vhost_tests::driver::{
    BlkDriver, BlkOptions, BlkStatus, GuestAllocator, VirtioMmioDevice,
};
use hvisor_vhost_tests::harness::{bridge_command, sim_zones, Irq, Process, Ram, TempDir, Vcpu};

/// The environment of the raw backend process: its socket, how it maps memory
/// ([`FROM_ZERO`] or [`AT_OFFSET`]) and whether it offers REPLY_ACK (`1` or `0`).
const RAW_SOCKET_ENV: &str = "HVV_RAW_BACKEND_SOCKET";
const RAW_MAPPING_ENV: &str = "HVV_RAW_BACKEND_MAPPING";
const RAW_REPLY_ACK_ENV: &str = "HVV_RAW_BACKEND_REPLY_ACK";
const FROM_ZERO: &str = "from-zero";
const AT_OFFSET: &str = "at-offset";

/// How long the raw backend takes to apply a memory table.
const APPLY_DELAY: Duration = Duration::from_millis(100);

/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// The simulated hypervisor with hvisor.ko's RAM layout, and the bridge process on it,
/// logging to a file.
struct OffsetBridge {
    sim: Arc<SimHypervisor>,
    bridge: Process,
    log: PathBuf,
    _server: ProviderServer,
}

impl OffsetBridge {
    fn start(dir: &TempDir, config_json: &str) -> OffsetBridge {
        let config_path = dir.path().join("virtio_cfg.json");
        std::fs::write(&config_path, config_json).unwrap();
        let config = Config::from_file(&config_path).unwrap();
        let options = SimOptions {
            ram: SimRamLayout::Physical,
            ..SimOptions::default()
        };
        let sim = SimHypervisor::with_options(sim_zones(&config), options).unwrap();
        let socket = dir.path().join("hsm.sock");
        let server = sim.serve(&socket).unwrap();
        let log = dir.path().join("bridge.log");
        let mut cmd = bridge_command(&config_path, &socket, dir.path(), &[]);
        cmd.env("RUST_LOG", "info")
            .stderr(File::create(&log).unwrap());
        let bridge = Process::spawn("hvisor-vhost-bridge", &mut cmd);
        OffsetBridge {
            sim,
            bridge,
            log,
            _server: server,
        }
    }

    /// Stops the bridge and returns its log.
    fn stop(mut self) -> String {
        self.bridge.terminate();
        std::fs::read_to_string(&self.log).unwrap()
    }
}

/// A blk entry served by the backend on `socket`.
fn socket_entry(addr: u64, irq: u32, socket: &Path) -> String {
    format!(
        r#"{{"type":"blk","addr":"{addr:#x}","len":"0x200","irq":{irq},"socket":"{}","status":"enable"}}"#,
        socket.display()
    )
}

/// Starts this test binary as a raw backend on `socket` and waits for the socket.
fn start_raw_backend(socket: &Path, mapping: &str, reply_ack: bool) -> Process {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "raw_backend_process", "--ignored", "--nocapture"])
        .env(RAW_SOCKET_ENV, socket)
        .env(RAW_MAPPING_ENV, mapping)
        .env(RAW_REPLY_ACK_ENV, if reply_ack { "1" } else { "0" })
        .stdout(Stdio::null());
    let mut backend = Process::spawn("raw backend", &mut cmd);
    let deadline = Instant::now() + SOCKET_TIMEOUT;
    // Nothing signals that another process bound a socket but the path appearing.
    while !socket.exists() {
        if let Some(status) = backend.wait_timeout(Duration::from_millis(5)) {
            panic!("the raw backend exited before creating its socket ({status})");
        }
        assert!(Instant::now() < deadline, "no raw backend socket");
    }
    backend
}

#[test]
fn a_backend_that_maps_from_offset_zero_is_refused() {
    let dir = dir_with_images("maps-raw", &[]);
    // (mapping, REPLY_ACK, window, IRQ): without REPLY_ACK the bridge must wait for the
    // backend to have applied the memory table before it looks.
    let cases = [
        (FROM_ZERO, true, 0xa003c00, 78),
        (FROM_ZERO, false, 0xa003a00, 77),
        (AT_OFFSET, true, 0xa003800, 76),
        (AT_OFFSET, false, 0xa003600, 75),
    ];
    let mut entries = Vec::new();
    let mut backends = Vec::new();
    for (i, &(mapping, reply_ack, addr, irq)) in cases.iter().enumerate() {
        let socket = dir.path().join(format!("raw{i}.sock"));
        backends.push(start_raw_backend(&socket, mapping, reply_ack));
        entries.push(socket_entry(addr, irq, &socket));
    }
    let bridge = OffsetBridge::start(&dir, &config(&[zone(1, &entries, None)]));
    let vcpu = Vcpu(bridge.sim.vcpu(1, 0));
    for &(mapping, reply_ack, addr, _) in &cases {
        let dev = VirtioMmioDevice::new(&vcpu, addr);
        dev.init(VIRTIO_F_VERSION_1).unwrap();
        dev.driver_ok();
        let needs_reset = dev.status() & status::DEVICE_NEEDS_RESET != 0;
        assert_eq!(
            needs_reset,
            mapping == FROM_ZERO,
            "{mapping}, REPLY_ACK {reply_ack}: status {:#x}",
            dev.status()
        );
    }
    let log = bridge.stop();
    // Zone RAM is at offset = its physical address, zone0_ipa: a mapping from 0 has to
    // reach its end.
    let zone0_ipa = RAM_BASE + 0x1000_0000;
    let stray = format!(
        "maps file offsets 0x0..{:#x} of the guest memory fd, outside zone RAM",
        zone0_ipa + RAM_SIZE
    );
    assert_eq!(log.matches(&stray).count(), 2, "{log}");
    assert_eq!(log.matches("only inside zone RAM").count(), 2, "{log}");
    drop(backends);
}

/// A guest writes through `backend` and reads the data back, with zone RAM at a non-zero
/// `mmap_offset`; the bridge has checked the backend's mappings and found them fine.
fn honours_mmap_offset(backend: BlkBackend, tag: &str) {
    const BLK: u64 = 0xa003c00;
    const IRQ: u32 = 78;
    let dir = dir_with_images(tag, &["disk.img"]);
    let cfg = config(&[zone(1, &[blk_entry(BLK, IRQ, "disk.img", "")], None)]);
    let (cfg, daemons) = backend.prepare(&cfg, dir.path());
    let bridge = OffsetBridge::start(&dir, &cfg);
    let vcpu = Vcpu(bridge.sim.vcpu(1, 0));
    let ram = Ram(bridge.sim.ram(1));
    let irq = Irq::new(&bridge.sim, 1, IRQ);
    let mut alloc = GuestAllocator::new(RAM_BASE, 0x200_0000);
    let options = BlkOptions::default();
    let mut blk = BlkDriver::new(&vcpu, BLK, &ram, &irq, &mut alloc, &options).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    assert_eq!(blk.write(16, &data).unwrap(), BlkStatus::Ok);
    let mut back = vec![0u8; data.len()];
    assert_eq!(blk.read(16, &mut back).unwrap(), BlkStatus::Ok);
    assert_eq!(back, data);
    assert_eq!(irq.lost_interrupts(), 0, "an interrupt was lost");
    drop(blk);
    let log = bridge.stop();
    assert!(log.contains("only inside zone RAM"), "{log}");
    assert!(!log.contains("Refusing"), "{log}");
    drop(daemons);
}

#[test]
fn our_blk_backend_honours_mmap_offset() {
    honours_mmap_offset(BlkBackend::Ours, "maps-ours");
}

#[test]
fn qemu_storage_daemon_honours_mmap_offset() {
    honours_mmap_offset(BlkBackend::Qsd, "maps-qsd");
}

/// The raw backend process that [`start_raw_backend`] starts; it does nothing when run
/// without its environment.
#[test]
#[ignore = "the raw vhost-user backend process of the tests above, which start it"]
fn raw_backend_process() {
    let Some(socket) = std::env::var_os(RAW_SOCKET_ENV) else {
        return;
    };
    let from_zero = std::env::var(RAW_MAPPING_ENV).unwrap() == FROM_ZERO;
    let reply_ack = std::env::var(RAW_REPLY_ACK_ENV).unwrap() == "1";
    let listener = UnixListener::bind(socket).unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut backend = RawBackend {
        stream,
        from_zero,
        reply_ack,
        mappings: Vec::new(),
    };
    while backend.serve_one() {}
}

// vhost-user requests the raw backend answers.
const GET_FEATURES: u32 = 1;
const SET_MEM_TABLE: u32 = 5;
const GET_PROTOCOL_FEATURES: u32 = 15;
/// Header flags: protocol version 1, a reply, and a request that wants REPLY_ACK.
const VERSION_1: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PROTOCOL_F_REPLY_ACK: u64 = 1 << 3;

/// A vhost-user backend that offers no device feature, serves no queue, and maps each
/// memory region either correctly (at its `mmap_offset`) or as libvhost-user before QEMU
/// 9.0 did: from offset 0, `size + mmap_offset` bytes.
struct RawBackend {
    stream: UnixStream,
    from_zero: bool,
    reply_ack: bool,
    mappings: Vec<(usize, usize)>,
}

impl RawBackend {
    /// Serves one request; false once the frontend has gone.
    fn serve_one(&mut self) -> bool {
        let Some((request, flags, body, fds)) = self.receive() else {
            return false;
        };
        match request {
            GET_FEATURES => self.reply(
                request,
                &(VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES).to_le_bytes(),
            ),
            GET_PROTOCOL_FEATURES => {
                let offered = if self.reply_ack {
                    PROTOCOL_F_REPLY_ACK
                } else {
                    0
                };
                self.reply(request, &offered.to_le_bytes());
            }
            _ => {
                if request == SET_MEM_TABLE {
                    self.map_regions(&body, fds);
                }
                if flags & FLAG_NEED_REPLY != 0 {
                    self.reply(request, &0u64.to_le_bytes());
                }
            }
        }
        true
    }

    fn map_regions(&mut self, body: &[u8], fds: Vec<OwnedFd>) {
        // A backend slow to apply the table: the bridge must wait until it has, not race it.
        std::thread::sleep(APPLY_DELAY);
        for (ptr, len) in self.mappings.drain(..) {
            // SAFETY: unmaps a mapping this backend made and no longer uses.
            unsafe { libc::munmap(ptr as *mut libc::c_void, len) };
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().unwrap());
        let count = u32::from_le_bytes(body[..4].try_into().unwrap()) as usize;
        assert_eq!(count, fds.len());
        for (i, fd) in fds.iter().enumerate() {
            let region = 8 + 32 * i;
            let (size, mmap_offset) = (u64_at(region + 8), u64_at(region + 24));
            let (offset, len) = if self.from_zero {
                (0, size + mmap_offset)
            } else {
                (mmap_offset, size)
            };
            // SAFETY: a fresh shared mapping of the region's fd; nothing else is touched.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    offset as libc::off_t,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
            self.mappings.push((ptr as usize, len as usize));
        }
    }

    /// One request: its code, flags, body and file descriptors; None at end of stream.
    fn receive(&mut self) -> Option<(u32, u32, Vec<u8>, Vec<OwnedFd>)> {
        let mut header = [0u8; 12];
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: header.as_mut_ptr().cast(),
            iov_len: header.len(),
        };
        // SAFETY: an all-zero msghdr is valid; the pointers are filled in below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: recvmsg writes at most the lengths msg describes, into `header` and
        // `control`, which outlive the call.
        let got =
            unsafe { libc::recvmsg(self.stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if got <= 0 {
            return None;
        }
        let got = got as usize;
        self.stream.read_exact(&mut header[got..]).ok()?;
        let mut fds = Vec::new();
        // SAFETY: the CMSG macros walk the control buffer recvmsg filled in, within
        // msg_controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg).cast::<libc::c_int>();
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        // Each received descriptor is new and owned by this process.
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().unwrap());
        let mut body = vec![0u8; word(8) as usize];
        self.stream.read_exact(&mut body).ok()?;
        Some((word(0), word(4), body, fds))
    }

    fn reply(&mut self, request: u32, payload: &[u8]) {
        let mut message = Vec::with_capacity(12 + payload.len());
        message.extend_from_slice(&request.to_le_bytes());
        message.extend_from_slice(&(VERSION_1 | FLAG_REPLY).to_le_bytes());
        message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        message.extend_from_slice(payload);
        self.stream.write_all(&message).unwrap();
    }
}
