//! End to end through real processes: the simulated hypervisor and a console guest driver in
//! this process, `hvisor-vhost-bridge` and `vhost-user-console` (or rust-vmm's
//! `vhost-device-console`) as separate processes, and a host-side client of the console.
//!
//! The heart of these tests is that no byte is lost in either direction when one side is
//! slow, absent or late.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use hvisor_vhost_tests::driver::console::{
    event, feature, ConsoleDriver, ConsoleOptions, ControlRx,
};
use hvisor_vhost_tests::driver::mmio::{INTERRUPT_CONFIG, VIRTIO_F_VERSION_1};
use hvisor_vhost_tests::driver::{GuestAllocator, Interrupts};
use hvisor_vhost_tests::harness::{bin_path, Irq, Process, Ram, Rng, SimBridge, TempDir, Vcpu};

const CONSOLE: u64 = 0xa003e00;
const IRQ: u32 = 79;
const MIB: usize = 1 << 20;

/// A console device entry backed by the vhost-user backend listening on `socket`.
fn console_entry(socket: &Path, extra: &str) -> String {
    format!(
        r#"{{"type":"console","addr":"{CONSOLE:#x}","len":"0x200","irq":{IRQ},"socket":"{}","status":"enable"{extra}}}"#,
        socket.display()
    )
}

/// Our backend, a bridge in front of it, and the paths a test needs.
struct Rig {
    sb: SimBridge,
    /// The console's UNIX socket, in `--socket` mode.
    console: PathBuf,
    backend: Process,
}

impl Rig {
    /// Starts `vhost-user-console` with `mode_args` (the console socket is `console.sock`
    /// in the scratch directory), then the bridge with a console entry pointing at it.
    fn start(tag: &str, mode_args: &[&str], extra_entry: &str) -> Rig {
        Rig::start_in(dir_with_images(tag, &[]), mode_args, extra_entry)
    }

    /// [`Rig::start`] in a scratch directory the test prepared.
    fn start_in(dir: Arc<TempDir>, mode_args: &[&str], extra_entry: &str) -> Rig {
        let vhost_user = dir.path().join("console-vu.sock");
        let console = dir.path().join("console.sock");
        let mut cmd = Command::new(bin_path("vhost-user-console"));
        cmd.arg("-s").arg(&vhost_user);
        for arg in mode_args {
            // `@` stands for the scratch directory.
            cmd.arg(arg.replace('@', &dir.path().display().to_string()));
        }
        let backend = Process::spawn("vhost-user-console", &mut cmd);
        let cfg = config(&[zone(1, &[console_entry(&vhost_user, extra_entry)], None)]);
        let sb = SimBridge::start(dir, &cfg, &[]);
        Rig {
            sb,
            console,
            backend,
        }
    }

    /// Starts the backend in `--socket` mode.
    fn socket(tag: &str) -> Rig {
        Rig::start(tag, &["--socket", "@/console.sock"], "")
    }

    fn dir(&self) -> &Arc<TempDir> {
        &self.sb.dir
    }
}

/// A guest's accessors; the driver borrows them.
fn guest(sb: &SimBridge) -> Guest {
    Guest::new(sb, 1, 0, IRQ)
}

fn driver<'a>(g: &'a Guest, options: &ConsoleOptions) -> ConsoleDriver<'a, Vcpu, Ram, Irq> {
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x200_0000);
    ConsoleDriver::new(&g.vcpu, CONSOLE, &g.ram, &g.irq, &mut alloc, options)
        .unwrap_or_else(|e| panic!("console init: {e}"))
}

/// Options without MULTIPORT: the classic two queues.
fn classic() -> ConsoleOptions {
    ConsoleOptions {
        features: feature::SIZE | VIRTIO_F_VERSION_1 | 1 << 29,
        ..ConsoleOptions::default()
    }
}

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    data
}

/// FNV-1a, printed so that a failure shows which side diverged.
fn digest(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: {} bytes instead of {}",
        got.len(),
        want.len()
    );
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} (digest {:#x} vs {:#x})",
            digest(got),
            digest(want)
        );
    }
}

fn connect(path: &Path) -> UnixStream {
    let stream =
        UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads exactly `len` bytes in `chunk`-byte reads, sleeping `pause` after each: a slow
/// terminal.
fn read_slowly(stream: &mut UnixStream, len: usize, chunk: usize, pause: Duration) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut done = 0;
    while done < len {
        let end = (done + chunk).min(len);
        let count = stream
            .read(&mut data[done..end])
            .unwrap_or_else(|e| panic!("client read after {done} bytes: {e}"));
        assert_ne!(count, 0, "the console closed after {done} of {len} bytes");
        done += count;
        thread::sleep(pause);
    }
    data
}

#[test]
fn probe_shows_a_console_with_size_and_event_idx() {
    let rig = Rig::socket("con-probe");
    let g = guest(&rig.sb);
    let console = driver(&g, &classic());
    let info = console.device().probe().unwrap();
    assert_eq!(info.device_id, 3);
    assert_eq!(console.features() & feature::MULTIPORT, 0);
    assert_ne!(console.features() & feature::SIZE, 0);
    assert_ne!(console.features() & (1 << 29), 0, "EVENT_IDX");
    // A socket has no terminal: the default size.
    assert_eq!(console.config().cols, Some(80));
    assert_eq!(console.config().rows, Some(25));
    assert_eq!(console.config().max_nr_ports, None);
}

#[test]
fn guest_to_host_1mib_with_a_slow_and_pausing_reader() {
    let rig = Rig::socket("con-g2h");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    let data = random_bytes(0x6011, MIB);
    let mut client = connect(&rig.console);
    let reader = thread::spawn(move || {
        let mut got = read_slowly(&mut client, MIB / 2, 4096, Duration::from_micros(200));
        // The terminal stops reading for a while; the guest must wait, not lose output.
        thread::sleep(Duration::from_millis(500));
        got.extend(read_slowly(&mut client, MIB / 2, 8192, Duration::ZERO));
        got
    });
    let started = Instant::now();
    console.write(&data).unwrap();
    console.flush().unwrap();
    let elapsed = started.elapsed();
    let got = reader.join().unwrap();
    assert_same(&got, &data, "guest to host");
    assert_eq!(
        console.overlong_used(),
        0,
        "used lengths within the buffers"
    );
    assert!(
        console.tx_stalls() > 0,
        "the slow reader never held the guest back"
    );
    assert!(
        elapsed >= Duration::from_millis(500),
        "the guest finished in {elapsed:?}, during the reader's pause"
    );
}

#[test]
fn host_to_guest_1mib_with_late_buffers_and_a_slow_guest() {
    let rig = Rig::socket("con-h2g");
    let g = guest(&rig.sb);
    let mut console = driver(
        &g,
        &ConsoleOptions {
            rx_buffers: 0,
            ..classic()
        },
    );
    let data = random_bytes(0x6012, MIB);
    let mut client = connect(&rig.console);
    let (progress_tx, progress_rx) = mpsc::channel();
    let to_send = data.clone();
    let writer = thread::spawn(move || {
        for (i, chunk) in to_send.chunks(16 * 1024).enumerate() {
            client.write_all(chunk).unwrap();
            let _ = progress_tx.send((i + 1) * chunk.len());
        }
        client
    });
    // The host types 1 MiB while the guest has posted no buffer. The client must be held
    // back (its socket fills) instead of the backend reading and dropping the input.
    let early = console.read(Duration::from_millis(500)).unwrap();
    assert!(
        early.is_empty(),
        "{} bytes arrived without buffers",
        early.len()
    );
    let sent_early = progress_rx.try_iter().last().unwrap_or(0);
    assert!(
        sent_early < MIB,
        "the client wrote all {sent_early} bytes with no guest buffers: input went somewhere"
    );
    // Buffers arrive late, a few at a time; the guest reads slowly.
    let mut got = Vec::with_capacity(MIB);
    console.post_rx_buffers(4).unwrap();
    while got.len() < MIB {
        let chunk = console.read(Duration::from_secs(10)).unwrap();
        assert!(!chunk.is_empty(), "stalled after {} bytes", got.len());
        got.extend(chunk);
        if got.len() < MIB / 4 {
            thread::sleep(Duration::from_millis(1));
        } else {
            console.post_rx_buffers(64).unwrap();
        }
    }
    let _client = writer.join().unwrap();
    assert_same(&got, &data, "host to guest");
    assert_eq!(
        console.overlong_used(),
        0,
        "used lengths within the buffers"
    );
}

#[test]
fn client_detaches_mid_stream_and_reattaches_losing_nothing() {
    let rig = Rig::socket("con-reattach");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    let data = random_bytes(0x6013, MIB);
    let path = rig.console.clone();
    let reader = thread::spawn(move || {
        let mut client = connect(&path);
        let mut got = read_slowly(&mut client, 300 * 1024, 4096, Duration::ZERO);
        // Detach in the middle of the stream without losing what is in flight: stop
        // receiving, take what the socket already holds, then go.
        client.shutdown(std::net::Shutdown::Read).unwrap();
        client.read_to_end(&mut got).unwrap();
        drop(client);
        // Away for a while; the guest keeps writing.
        thread::sleep(Duration::from_millis(300));
        let mut client = connect(&path);
        let rest = MIB - got.len();
        got.extend(read_slowly(&mut client, rest, 65536, Duration::ZERO));
        got
    });
    console.write(&data).unwrap();
    console.flush().unwrap();
    let got = reader.join().unwrap();
    assert_same(&got, &data, "across a reattach");
}

#[test]
fn output_while_detached_is_kept_up_to_the_bound_then_held_in_the_guest() {
    let rig = Rig::socket("con-bound");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    let first = random_bytes(0x6014, 64 * 1024);
    let rest = random_bytes(0x6015, MIB + 256 * 1024);
    let path = rig.console.clone();
    let (detached_tx, detached_rx) = mpsc::channel();
    let expected = first.len();
    let reader = thread::spawn(move || {
        let mut client = connect(&path);
        let got = read_slowly(&mut client, expected, 65536, Duration::ZERO);
        // Everything the guest sent was read: an ordinary close loses nothing.
        drop(client);
        detached_tx.send(()).unwrap();
        thread::sleep(Duration::from_millis(500));
        let mut client = connect(&path);
        (
            got,
            read_slowly(&mut client, MIB + 256 * 1024, 65536, Duration::ZERO),
        )
    });
    console.write(&first).unwrap();
    console.flush().unwrap();
    detached_rx.recv().unwrap();
    // No client: 1 MiB is kept by the backend, the last 256 KiB wait in the guest until
    // the client is back.
    let stalls_before = console.tx_stalls();
    let started = Instant::now();
    console.write(&rest).unwrap();
    console.flush().unwrap();
    let elapsed = started.elapsed();
    let (got_first, got_rest) = reader.join().unwrap();
    assert_same(&got_first, &first, "before detaching");
    assert_same(&got_rest, &rest, "kept while detached");
    assert!(console.tx_stalls() > stalls_before, "nothing was held back");
    assert!(
        elapsed >= Duration::from_millis(300),
        "more than the bound was accepted without a client ({elapsed:?})"
    );
}

#[test]
fn input_and_output_interleave_in_both_directions() {
    let rig = Rig::socket("con-echo");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    let mut client = connect(&rig.console);
    for round in 0..50u32 {
        let line = format!("line {round} from the host\n");
        client.write_all(line.as_bytes()).unwrap();
        let got = console.read_exact(line.len()).unwrap();
        assert_eq!(got, line.as_bytes());
        // The guest echoes it back, as a shell would.
        console.write(&got).unwrap();
        let mut back = vec![0u8; line.len()];
        client.read_exact(&mut back).unwrap();
        assert_eq!(back, line.as_bytes(), "round {round}");
    }
}

#[test]
fn file_mode_appends_guest_output() {
    let dir = dir_with_images("con-file", &[]);
    let log = dir.path().join("guest.log");
    std::fs::write(&log, b"earlier boot\n").unwrap();
    let rig = Rig::start_in(dir, &["--file", "@/guest.log"], "");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    let data = random_bytes(0x6016, 256 * 1024);
    console.write(&data).unwrap();
    console.flush().unwrap();
    let contents = std::fs::read(&log).unwrap();
    assert_eq!(&contents[..13], b"earlier boot\n");
    assert_same(&contents[13..], &data, "appended to the file");
    // No input in file mode: nothing ever arrives.
    assert!(console.read(Duration::from_millis(100)).unwrap().is_empty());
}

#[test]
fn pty_mode_round_trips_through_the_link() {
    let rig = Rig::start("con-pty", &["--pty", "--pty-link", "@/console"], "");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    // The link exists once the backend accepted the bridge.
    let link = rig.dir().path().join("console");
    let target = std::fs::read_link(&link).unwrap();
    assert!(target.starts_with("/dev/pts/"), "{}", target.display());
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&link)
        .unwrap();
    console.write(b"login: ").unwrap();
    let mut prompt = [0u8; 7];
    pty.read_exact(&mut prompt).unwrap();
    assert_eq!(&prompt, b"login: ");
    pty.write_all(b"root\r").unwrap();
    assert_eq!(
        console.read_exact(5).unwrap(),
        b"root\r",
        "raw: no echo or mapping"
    );
}

#[test]
fn hvisor_tool_console_entry_gets_a_spawned_pty_backend() {
    // hvisor-tool's form: no backend fields. The bridge starts vhost-user-console --pty
    // itself, with the pty's link next to the backend socket in its runtime directory.
    let dir = dir_with_images("con-spawn", &[]);
    let entry = format!(
        r#"{{"type":"console","addr":"{CONSOLE:#x}","len":"0x200","irq":{IRQ},"status":"enable"}}"#
    );
    let sb = SimBridge::start(dir, &config(&[zone(1, &[entry], None)]), &[]);
    let g = guest(&sb);
    let mut console = driver(&g, &classic());
    let link = sb
        .dir
        .path()
        .join(format!("run/zone1-console-{CONSOLE:x}.pty"));
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&link)
        .unwrap_or_else(|e| panic!("{}: {e}", link.display()));
    let data = random_bytes(0x6019, 64 * 1024);
    console.write(&data).unwrap();
    let mut got = vec![0u8; data.len()];
    pty.read_exact(&mut got).unwrap();
    assert_same(&got, &data, "through the spawned pty");
    pty.write_all(b"ls\r").unwrap();
    assert_eq!(console.read_exact(3).unwrap(), b"ls\r");
}

/// Sets the window size of the terminal behind `fd` (TIOCSWINSZ), as a terminal emulator
/// does when its window is resized.
fn set_window_size(fd: &impl AsRawFd, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the struct we pass.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &size) };
    assert_eq!(ret, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

/// Waits for the guest's configuration-change interrupt the way Linux's `vm_interrupt` takes
/// it: InterruptStatus, then InterruptACK. Queue interrupts met on the way are acknowledged;
/// the driver finds their buffers on the rings anyway.
fn wait_for_config_interrupt(g: &Guest, console: &ConsoleDriver<'_, Vcpu, Ram, Irq>, why: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        assert!(now < deadline, "no configuration interrupt after {why}");
        if !g.irq.wait(deadline - now) {
            continue;
        }
        let status = console.device().interrupt_status();
        console.device().ack_interrupt(status);
        if status & INTERRUPT_CONFIG != 0 {
            return;
        }
    }
}

/// The cols and rows the guest reads from the configuration space now.
fn config_size(console: &ConsoleDriver<'_, Vcpu, Ram, Irq>) -> (u16, u16) {
    (
        console.device().read_config_u16(0),
        console.device().read_config_u16(2),
    )
}

#[test]
fn pty_resize_reaches_the_guest_as_a_config_change() {
    let rig = Rig::start("con-resize", &["--pty", "--pty-link", "@/console"], "");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    // A new pty has no size: the default.
    assert_eq!(
        (console.config().cols, console.config().rows),
        (Some(80), Some(25))
    );
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(rig.dir().path().join("console"))
        .unwrap();
    let generation = console.device().config_generation();
    // Activity without a resize is no configuration change.
    pty.write_all(b"a").unwrap();
    assert_eq!(console.read_exact(1).unwrap(), b"a");
    console.write(b"a").unwrap();
    let mut echo = [0u8; 1];
    pty.read_exact(&mut echo).unwrap();
    assert_eq!(
        console.device().config_generation(),
        generation,
        "a keystroke changed the configuration"
    );

    // The terminal is resized, then the user types: the keystroke is when a pty resize
    // can be seen (only the pty's own process group gets SIGWINCH).
    set_window_size(&pty, 132, 43);
    pty.write_all(b"x").unwrap();
    wait_for_config_interrupt(&g, &console, "a resize and a keystroke");
    let after_first = console.device().config_generation();
    assert_ne!(after_first, generation, "ConfigGeneration must change");
    assert_eq!(config_size(&console), (132, 43));
    assert_eq!(console.read_exact(1).unwrap(), b"x", "the keystroke itself");

    // Resized again, and this time the guest speaks first.
    set_window_size(&pty, 100, 30);
    console.write(b"$ ").unwrap();
    wait_for_config_interrupt(&g, &console, "a resize and guest output");
    assert_ne!(console.device().config_generation(), after_first);
    assert_eq!(config_size(&console), (100, 30));
    let mut prompt = [0u8; 2];
    pty.read_exact(&mut prompt).unwrap();
    assert_eq!(&prompt, b"$ ");
}

/// A pty pair (master, slave).
fn open_pty() -> (OwnedFd, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the ints we pass; the name, termios and
    // winsize pointers may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened for us and nothing else owns them.
    unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

#[test]
fn stdio_terminal_resize_is_pushed_on_sigwinch_alone() {
    let dir = dir_with_images("con-winch", &[]);
    let vhost_user = dir.path().join("console-vu.sock");
    let (master, slave) = open_pty();
    set_window_size(&master, 90, 20);
    let mut cmd = Command::new(bin_path("vhost-user-console"));
    cmd.arg("-s")
        .arg(&vhost_user)
        .arg("--stdio")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave);
    // SAFETY: between fork and exec the child only makes async-signal-safe calls: it starts a
    // session and takes its stdin, the pty, as controlling terminal, as a login shell would,
    // so that the kernel sends it SIGWINCH.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let _backend = StdioBackend(cmd.spawn().unwrap());
    let cfg = config(&[zone(1, &[console_entry(&vhost_user, "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = guest(&sb);
    let console = driver(&g, &classic());
    assert_eq!(
        (console.config().cols, console.config().rows),
        (Some(90), Some(20)),
        "the terminal's size at start"
    );
    let generation = console.device().config_generation();
    // No byte moves either way: the signal alone carries the change.
    set_window_size(&master, 120, 50);
    wait_for_config_interrupt(&g, &console, "SIGWINCH");
    assert_ne!(console.device().config_generation(), generation);
    assert_eq!(config_size(&console), (120, 50));
}

/// A backend whose standard streams the test holds; killed on drop.
struct StdioBackend(std::process::Child);

impl Drop for StdioBackend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stdio_mode_uses_the_backend_standard_streams() {
    let dir = dir_with_images("con-stdio", &[]);
    let vhost_user = dir.path().join("console-vu.sock");
    let child = Command::new(bin_path("vhost-user-console"))
        .arg("-s")
        .arg(&vhost_user)
        .arg("--stdio")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut backend = StdioBackend(child);
    let cfg = config(&[zone(1, &[console_entry(&vhost_user, "")], None)]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = guest(&sb);
    let mut console = driver(&g, &classic());
    let mut stdin = backend.0.stdin.take().unwrap();
    let mut stdout = backend.0.stdout.take().unwrap();
    // Output the pipe cannot take at once waits in the guest, and all of it arrives.
    let data = random_bytes(0x6018, 256 * 1024);
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; 256 * 1024];
        stdout.read_exact(&mut got).unwrap();
        (got, stdout)
    });
    console.write(&data).unwrap();
    console.flush().unwrap();
    let (got, mut stdout) = reader.join().unwrap();
    assert_same(&got, &data, "to stdout");
    stdin.write_all(b"from stdin").unwrap();
    assert_eq!(console.read_exact(10).unwrap(), b"from stdin");
    // The end of stdin is the end of input, not of the console.
    drop(stdin);
    console.write(b"still here").unwrap();
    let mut tail = [0u8; 10];
    stdout.read_exact(&mut tail).unwrap();
    assert_eq!(&tail, b"still here");
}

#[test]
fn multiport_names_ports_and_carries_port_zero() {
    let rig = Rig::start(
        "con-multi",
        &[
            "--socket",
            "@/console.sock",
            "--ports",
            "3",
            "--port-name",
            "org.hvisor.console",
        ],
        r#","num_queues":8"#,
    );
    let g = guest(&rig.sb);
    let mut console = driver(&g, &ConsoleOptions::default());
    assert!(console.multiport());
    assert_eq!(console.config().max_nr_ports, Some(3));
    console.wait_port_open().unwrap();
    let ports = console.ports().clone();
    assert_eq!(ports.len(), 3, "{ports:?}");
    assert!(ports[&0].console);
    assert_eq!(ports[&0].name.as_deref(), Some("org.hvisor.console"));
    assert!(ports.values().all(|p| p.added));
    // The guest answered DEVICE_ADD with PORT_READY for all three; port 0 is the console.
    assert!(console.control_log().contains(&(0, event::CONSOLE_PORT, 1)));
    let mut client = connect(&rig.console);
    console.write(b"on port 0\n").unwrap();
    let mut got = [0u8; 10];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"on port 0\n");
    client.write_all(b"typed").unwrap();
    assert_eq!(console.read_exact(5).unwrap(), b"typed");
    assert_eq!(
        console.overlong_used(),
        0,
        "control and data lengths are exact"
    );
    // The other ports have sockets of their own.
    assert!(rig.dir().path().join("console.sock.1").exists());
    assert!(rig.dir().path().join("console.sock.2").exists());
}

#[test]
fn sigterm_stops_the_backend_cleanly_and_removes_its_sockets() {
    let mut rig = Rig::socket("con-sigterm");
    let g = guest(&rig.sb);
    let mut console = driver(&g, &classic());
    console.write(b"bye\n").unwrap();
    console.flush().unwrap();
    let status = rig.backend.terminate();
    assert!(status.success(), "{status:?}");
    assert!(!rig.console.exists(), "console socket removed");
    assert!(
        !rig.dir().path().join("console-vu.sock").exists(),
        "vhost-user socket removed"
    );
}

/// rust-vmm's `vhost-device-console`, installed by `tests/thirdparty/install.sh`.
fn vhost_device_console() -> PathBuf {
    let path = std::env::var_os("HVV_THIRDPARTY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/thirdparty/bin"))
        .join("vhost-device-console");
    assert!(
        path.exists(),
        "{} is missing: run tests/thirdparty/install.sh",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1 (the listener is closed before the backend binds it).
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn interop_with_vhost_device_console() {
    let binary = vhost_device_console();
    let dir = dir_with_images("con-interop", &[]);
    let socket = dir.path().join("vdc.sock");
    let port = free_tcp_port();
    let mut cmd = Command::new(binary);
    cmd.arg("--socket-path").arg(&socket).args([
        "--backend",
        "network",
        "--tcp-port",
        &port.to_string(),
    ]);
    let _backend = Process::spawn("vhost-device-console", &mut cmd);
    // It serves `<socket-path>0`, and always has 4 queues (MULTIPORT).
    let mut served = socket.into_os_string();
    served.push("0");
    let cfg = config(&[zone(
        1,
        &[console_entry(Path::new(&served), r#","num_queues":4"#)],
        None,
    )]);
    let sb = SimBridge::start(dir, &cfg, &[]);
    let g = guest(&sb);
    // Its receive paths take every posted buffer off the ring when they look for input
    // and return only those they filled; a buffer posted while one is busy is lost. So the
    // guest posts one data buffer before each byte the host sends and none while it works,
    // and control buffers only for the replies the device owes.
    let options = ConsoleOptions {
        rx_slots: 1,
        rx_buffers: 0,
        repost_rx: false,
        control_rx: ControlRx::VHOST_DEVICE_CONSOLE,
        ..ConsoleOptions::default()
    };
    let mut console = driver(&g, &options);
    assert!(console.multiport());
    console.wait_port_open().unwrap();
    assert!(console.ports()[&0].console);
    let mut client = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    // Guest to host. Version 0.1.0 panics on output that is not UTF-8, so the text is
    // printable ASCII. It passes input on only after the guest transmitted once.
    let data: Vec<u8> = random_bytes(0x6017, 64 * 1024)
        .iter()
        .map(|b| b' ' + b % 95)
        .collect();
    console.write(&data).unwrap();
    console.flush().unwrap();
    let mut got = vec![0u8; data.len()];
    client.read_exact(&mut got).unwrap();
    assert_same(&got, &data, "guest to host through vhost-device-console");
    // Host to guest: one byte. Version 0.1.0 completes a receive buffer once per byte it
    // holds and takes every posted buffer off the ring while it looks for input, so after
    // the first byte whether a later one arrives depends on the timing of its input thread
    // (seen to lose the second byte under load); a single byte is what it reliably does.
    for (i, &byte) in b"e".iter().enumerate() {
        assert_eq!(console.post_rx_buffers(1).unwrap(), 1);
        client.write_all(&[byte]).unwrap();
        let got = console.read_exact(1).unwrap_or_else(|e| {
            panic!(
                "byte {i}: {e} ({} receive buffers posted)",
                console.rx_posted()
            )
        });
        assert_eq!(got, [byte], "byte {i}");
    }
    // It reports the bytes it read from output buffers as the used length, which the
    // driver tolerates (the length of an output buffer means nothing to Linux either).
    eprintln!(
        "vhost-device-console: {} used entries longer than their writable bytes",
        console.overlong_used()
    );
}
