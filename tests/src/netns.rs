//! The host side of the network tests: a private network namespace, the `vhost-user-net`
//! backend running inside it on a TAP, and packet sockets on that TAP.
//!
//! Every interface, address and route these helpers create lives inside the test's own
//! namespace, which is deleted (taking its TAPs with it) on drop. The root namespace is never
//! touched.

use std::ffi::CString;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use hvisor_hsm::SimRam;

use crate::driver::GuestMemory;
use crate::harness::bin_path;

/// The address the host side of every test TAP gets, inside the test's namespace.
pub const HOST_IP: [u8; 4] = [10, 77, 0, 1];
/// The address the guest side uses.
pub const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
/// How long a backend may take to create its TAP and listen.
const BACKEND_START_TIMEOUT: Duration = Duration::from_secs(30);

const ETH_P_ALL: u16 = 0x0003;

/// Runs `cmd`, panicking with its output if it fails.
fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A network namespace of its own, deleted on drop.
#[derive(Debug)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `hvv-<tag>-<pid>-<n>` with its loopback up and IPv6 off, so that the kernel
    /// sends no router or multicast-listener chatter on the test TAPs.
    pub fn new(tag: &str) -> NetNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("hvv-{tag}-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        for key in ["all", "default"] {
            ns.exec("sysctl")
                .args(["-q", "-w", &format!("net.ipv6.conf.{key}.disable_ipv6=1")])
                .status()
                .expect("sysctl");
        }
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>` and returns its output.
    pub fn ip(&self, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a thread that has joined the namespace, so that sockets it creates belong
    /// to the namespace (a socket keeps its namespace wherever it is used later).
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(self.path()).expect("open the namespace");
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns only changes this thread's network namespace; `ns` is an
                    // open namespace file.
                    let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(ret, 0, "setns: {}", io::Error::last_os_error());
                    f()
                })
                .join()
                .expect("namespace thread panicked")
        })
    }

    /// The MAC address of `interface`.
    pub fn mac(&self, interface: &str) -> [u8; 6] {
        let json = self.ip(&["-j", "link", "show", "dev", interface]);
        let links: serde_json::Value = serde_json::from_str(&json).expect("ip -j output");
        let text = links[0]["address"].as_str().expect("link address");
        parse_mac(text)
    }

    /// Gives the host side of `tap` [`HOST_IP`]/24 and brings it up.
    pub fn configure_host_side(&self, tap: &str) {
        let address = format!(
            "{}.{}.{}.{}/24",
            HOST_IP[0], HOST_IP[1], HOST_IP[2], HOST_IP[3]
        );
        self.ip(&["addr", "add", &address, "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// `aa:bb:cc:dd:ee:ff` to bytes.
pub fn parse_mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|part| u8::from_str_radix(part, 16).expect("hex byte"))
        .collect();
    bytes.try_into().expect("six bytes")
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.map(|byte| format!("{byte:02x}")).join(":")
}

/// A `vhost-user-net` process inside a namespace, stopped with SIGTERM on drop.
#[derive(Debug)]
pub struct NetBackend {
    child: Child,
    pub socket: PathBuf,
    pub tap: String,
    log: Option<thread::JoinHandle<()>>,
}

impl NetBackend {
    /// Starts the backend inside `ns` on `tap` (created by the backend), listening on
    /// `socket`, and waits until it serves. `extra` goes to its command line.
    pub fn spawn(ns: &NetNs, socket: &Path, tap: &str, extra: &[&str]) -> NetBackend {
        let ns_file = File::open(ns.path()).expect("open the namespace");
        let mut cmd = Command::new(bin_path("vhost-user-net"));
        cmd.arg("--socket-path")
            .arg(socket)
            .args(["--tap", tap])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stderr(Stdio::piped());
        let ns_fd = ns_file.as_raw_fd();
        // SAFETY: the hook runs in the forked child before exec and only calls setns, which
        // is async-signal-safe; `ns_file` outlives the spawn.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start vhost-user-net");
        drop(ns_file);
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = thread::spawn(move || {
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("[vhost-user-net] {line}");
                if line.contains("Serving") {
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
            }
        });
        let mut backend = NetBackend {
            child,
            socket: socket.to_path_buf(),
            tap: tap.to_string(),
            log: Some(log),
        };
        match ready_rx.recv_timeout(BACKEND_START_TIMEOUT) {
            Ok(()) => backend,
            Err(_) => {
                let status = backend.child.try_wait();
                panic!("vhost-user-net did not start serving (exit: {status:?})")
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits up to 10 s for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child; no memory is touched.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(log) = self.log.take() {
                    let _ = log.join();
                }
                return status;
            }
            assert!(Instant::now() < deadline, "vhost-user-net ignored SIGTERM");
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for NetBackend {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child; no memory is touched.
            unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) {
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            let _ = self.child.wait();
        }
    }
}

/// A raw packet socket on one interface of a namespace: it sees every frame the guest sends
/// into the TAP and can inject frames towards the guest.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Opens and binds the socket to `interface` inside `ns`.
    pub fn open(ns: &NetNs, interface: &str) -> io::Result<PacketSocket> {
        let name = CString::new(interface).map_err(|_| io::ErrorKind::InvalidInput)?;
        ns.enter(|| {
            let protocol = ETH_P_ALL.to_be();
            // SAFETY: socket() takes no pointers; the result is checked.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    libc::c_int::from(protocol),
                )
            };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a new descriptor nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: `name` is NUL-terminated.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if index == 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: sockaddr_ll is plain C data; zero is a valid value.
            let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            address.sll_family = libc::AF_PACKET as u16;
            address.sll_protocol = protocol;
            address.sll_ifindex = index as i32;
            // SAFETY: the address is a valid sockaddr_ll of the size passed.
            let ret = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&address as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(PacketSocket { fd })
        })
    }

    /// Sets the receive buffer to `bytes`, past the system limit (needs CAP_NET_ADMIN), so a
    /// fast sender does not overflow it.
    pub fn set_receive_buffer(&self, bytes: usize) -> io::Result<()> {
        let value = libc::c_int::try_from(bytes).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: setsockopt reads one int from the reference for the size given.
        let ret = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sends `frame` out of the interface, towards the guest.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the kernel reads `frame.len()` bytes from the borrowed slice.
        let ret = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for a frame that arrived from the guest (frames the host sends
    /// towards the guest are skipped). `None` on timeout.
    pub fn recv(&self, timeout: Duration) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65_536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut poll, 1, millis) };
            if ready < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error);
            }
            if ready == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain C data; zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: the kernel writes at most `buf.len()` bytes and a sockaddr_ll of at most
            // `from_len` bytes into memory we own.
            let len = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut from as *mut libc::sockaddr_ll).cast(),
                    &mut from_len,
                )
            };
            if len < 0 {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::WouldBlock {
                    continue;
                }
                return Err(error);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(buf[..len as usize].to_vec()));
        }
    }

    /// Waits up to `timeout` for a frame from the guest that `wanted` accepts.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        mut wanted: impl FnMut(&[u8]) -> bool,
    ) -> io::Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left)? {
                Some(frame) if wanted(&frame) => return Ok(Some(frame)),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    }
}

impl AsRawFd for PacketSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// A zone's guest RAM whose naturally aligned 2-, 4- and 8-byte accesses are single loads and
/// stores, as the driver's [`GuestMemory`] contract asks; other accesses are copies.
/// (`SimRam::read` copies with `memcpy`, which may split a 2-byte ring index into two loads
/// and read it torn while the backend updates it: a used index of 0xcefb becoming 0xcf00
/// was read as 0xcffb under load.)
#[derive(Debug)]
pub struct SingleAccessRam(pub SimRam);

impl SingleAccessRam {
    /// The host address of `gpa` if a `len`-byte access there is naturally aligned.
    fn aligned(&self, gpa: u64, len: usize) -> Option<*mut u8> {
        if !matches!(len, 2 | 4 | 8) {
            return None;
        }
        let ptr = self.0.host_ptr(gpa, len).ok()?.as_ptr();
        (ptr as usize).is_multiple_of(len).then_some(ptr)
    }
}

impl GuestMemory for SingleAccessRam {
    fn read(&self, gpa: u64, buf: &mut [u8]) {
        let Some(ptr) = self.aligned(gpa, buf.len()) else {
            return self
                .0
                .read(gpa, buf)
                .unwrap_or_else(|e| panic!("guest RAM read {gpa:#x}: {e}"));
        };
        // SAFETY: `ptr` is aligned for the access size and points into the shared guest RAM
        // mapping, which lives as long as `self.0`; other processes touch it only with
        // single accesses or plain copies, never Rust references.
        unsafe {
            match buf.len() {
                2 => buf.copy_from_slice(
                    &AtomicU16::from_ptr(ptr.cast())
                        .load(Ordering::Acquire)
                        .to_ne_bytes(),
                ),
                4 => buf.copy_from_slice(
                    &AtomicU32::from_ptr(ptr.cast())
                        .load(Ordering::Acquire)
                        .to_ne_bytes(),
                ),
                _ => buf.copy_from_slice(
                    &AtomicU64::from_ptr(ptr.cast())
                        .load(Ordering::Acquire)
                        .to_ne_bytes(),
                ),
            }
        }
    }

    fn write(&self, gpa: u64, data: &[u8]) {
        let Some(ptr) = self.aligned(gpa, data.len()) else {
            return self
                .0
                .write(gpa, data)
                .unwrap_or_else(|e| panic!("guest RAM write {gpa:#x}: {e}"));
        };
        // SAFETY: as in `read`.
        unsafe {
            match *data {
                [a, b] => AtomicU16::from_ptr(ptr.cast())
                    .store(u16::from_ne_bytes([a, b]), Ordering::Release),
                [a, b, c, d] => AtomicU32::from_ptr(ptr.cast())
                    .store(u32::from_ne_bytes([a, b, c, d]), Ordering::Release),
                [a, b, c, d, e, f, g, h] => AtomicU64::from_ptr(ptr.cast()).store(
                    u64::from_ne_bytes([a, b, c, d, e, f, g, h]),
                    Ordering::Release,
                ),
                _ => unreachable!("aligned() accepts only 2, 4 and 8 bytes"),
            }
        }
    }
}
