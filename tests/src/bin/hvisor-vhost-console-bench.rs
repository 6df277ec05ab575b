//! Console throughput through the real bridge and the simulated hypervisor: the project's
//! `vhost-user-console` against rust-vmm's `vhost-device-console` in the same run.
//!
//! For each backend, one guest driver session measures:
//! - guest to host: the driver writes `--mib` MiB, a host client reads it all;
//! - keystrokes: `--keystrokes` single bytes from the host, each waited for by the guest
//!   (a round trip per byte, as typing is);
//! - host to guest: the client writes `--mib` MiB, the driver reads it all. Not measured for
//!   vhost-device-console 0.1.0, whose receive path adds one used entry per byte it copies
//!   into a buffer, which breaks the ring for any input longer than a byte.
//!
//! Output is printable ASCII, since vhost-device-console 0.1.0 panics on anything else.
//! Every transfer is checked byte for byte. Ratios are ours / theirs; above 1 is better.
//!
//! `--rounds N` runs both backends N times, back to back in each round (ours first in odd
//! rounds, theirs first in even ones), and prints median [min–max] over the rounds for each
//! backend, and the median [min–max] of the per-round ratios.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use hvisor_vhost_tests::driver::console::{ConsoleDriver, ConsoleOptions, ControlRx};
use hvisor_vhost_tests::driver::GuestAllocator;
use hvisor_vhost_tests::harness::{bin_path, Irq, Process, Ram, Rng, SimBridge, TempDir, Vcpu};

const CONSOLE: u64 = 0xa003e00;
const IRQ: u32 = 79;
const RAM_BASE: u64 = 0x5000_0000;
const RAM_SIZE: u64 = 0x400_0000;
const MIB: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "Console throughput: vhost-user-console against vhost-device-console")]
struct Args {
    /// MiB moved in each bulk direction.
    #[arg(long, default_value_t = 8)]
    mib: usize,
    /// Single bytes sent one at a time from the host.
    #[arg(long, default_value_t = 500)]
    keystrokes: usize,
    /// Bytes per guest buffer, both directions.
    #[arg(long, default_value_t = 4096)]
    buffer: u32,
    /// vhost-device-console binary [default: build/thirdparty/bin/vhost-device-console].
    #[arg(long)]
    thirdparty: Option<PathBuf>,
    /// Measure only the project's backend.
    #[arg(long)]
    ours_only: bool,
    /// Rounds, each running both backends back to back.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
}

/// One backend's numbers.
#[derive(Debug, Default, Clone, Copy)]
struct Results {
    guest_to_host: f64,
    host_to_guest: Option<f64>,
    keystrokes_per_s: f64,
}

/// The host end of a console: a UNIX or TCP stream.
trait HostStream: Read + Write + Send + 'static {}
impl<T: Read + Write + Send + 'static> HostStream for T {}

fn config_json(socket: &Path, num_queues: u16) -> String {
    format!(
        r#"{{"zones":[{{"id":1,"memory_region":[{{"zone0_ipa":"{:#x}","zonex_ipa":"{RAM_BASE:#x}","size":"{RAM_SIZE:#x}"}}],"devices":[{{"type":"console","addr":"{CONSOLE:#x}","len":"0x200","irq":{IRQ},"socket":"{}","num_queues":{num_queues},"status":"enable"}}]}}]}}"#,
        RAM_BASE + 0x1000_0000,
        socket.display()
    )
}

fn text(seed: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    Rng::new(seed).fill(&mut data);
    data.iter_mut().for_each(|b| *b = b' ' + *b % 95);
    data
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}

fn check(got: &[u8], want: &[u8], what: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        let at = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        Err(format!(
            "{what}: {} bytes, first difference at {at}",
            got.len()
        ))
    }
}

/// Runs the three measurements on a started bridge; `connect` opens the host end.
fn measure(
    sb: &SimBridge,
    args: &Args,
    connect: &dyn Fn() -> std::io::Result<Box<dyn HostStream>>,
    bulk_input: bool,
) -> Result<Results, String> {
    let (vcpu, ram, irq): (Vcpu, Ram, Irq) = (sb.vcpu(1, 0), sb.ram(1), sb.irq(1, IRQ));
    let mut alloc = GuestAllocator::new(RAM_BASE + 0x10_0000, 0x200_0000);
    // Receive buffers are posted by hand: vhost-device-console loses buffers posted while
    // it is looking for input, so its keystrokes get one buffer each, and its control
    // buffers only come with its replies (ours runs without MULTIPORT, so that part is
    // its alone).
    let options = ConsoleOptions {
        control_rx: ControlRx::VHOST_DEVICE_CONSOLE,
        rx_slots: 64,
        rx_buffers: 0,
        repost_rx: false,
        rx_buffer_len: args.buffer,
        tx_buffer_len: args.buffer,
        ..ConsoleOptions::default()
    };
    let mut console = ConsoleDriver::new(&vcpu, CONSOLE, &ram, &irq, &mut alloc, &options)
        .map_err(|e| format!("driver: {e}"))?;
    if console.multiport() {
        console
            .wait_port_open()
            .map_err(|e| format!("port handshake: {e}"))?;
    }
    let mut results = Results::default();
    let len = args.mib * MIB;

    // Guest to host.
    let data = text(0xbe7c, len);
    let mut client = connect().map_err(|e| format!("connect: {e}"))?;
    let reader = thread::spawn(move || {
        let mut got = vec![0u8; len];
        let result = client.read_exact(&mut got).map(|()| (got, Instant::now()));
        (client, result)
    });
    let started = Instant::now();
    console
        .write(&data)
        .map_err(|e| format!("guest write: {e}"))?;
    console.flush().map_err(|e| format!("guest flush: {e}"))?;
    let (mut client, result) = reader.join().map_err(|_| "reader panicked")?;
    let (got, finished) = result.map_err(|e| format!("host read: {e}"))?;
    check(&got, &data, "guest to host")?;
    results.guest_to_host = mb_per_s(len, finished - started);

    // Keystrokes: a buffer, a byte, wait for it.
    let keys = text(0x6e75, args.keystrokes);
    let started = Instant::now();
    for (i, &key) in keys.iter().enumerate() {
        console
            .post_rx_buffers(1)
            .map_err(|e| format!("post: {e}"))?;
        client
            .write_all(&[key])
            .map_err(|e| format!("host write: {e}"))?;
        let got = console
            .read_exact(1)
            .map_err(|e| format!("keystroke {i}: {e}"))?;
        check(&got, &[key], "keystroke")?;
    }
    results.keystrokes_per_s = args.keystrokes as f64 / started.elapsed().as_secs_f64();

    // Host to guest.
    if bulk_input {
        let data = text(0x1a9e, len);
        let to_send = data.clone();
        let started = Instant::now();
        let writer = thread::spawn(move || client.write_all(&to_send).map(|()| client));
        let mut got = Vec::with_capacity(len);
        while got.len() < len {
            console
                .post_rx_buffers(usize::MAX)
                .map_err(|e| format!("post: {e}"))?;
            let chunk = console
                .read(Duration::from_secs(10))
                .map_err(|e| format!("guest read: {e}"))?;
            if chunk.is_empty() {
                return Err(format!("host to guest stalled after {} bytes", got.len()));
            }
            got.extend(chunk);
        }
        let elapsed = started.elapsed();
        writer
            .join()
            .map_err(|_| "writer panicked")?
            .map_err(|e| format!("host write: {e}"))?;
        check(&got, &data, "host to guest")?;
        results.host_to_guest = Some(mb_per_s(len, elapsed));
    }
    Ok(results)
}

fn run_ours(args: &Args) -> Result<Results, String> {
    let dir = Arc::new(TempDir::new("console-bench-ours"));
    let vhost_user = dir.path().join("console-vu.sock");
    let console = dir.path().join("console.sock");
    let mut cmd = Command::new(bin_path("vhost-user-console"));
    cmd.arg("-s")
        .arg(&vhost_user)
        .arg("--socket")
        .arg(&console)
        .env("RUST_LOG", "warn");
    let _backend = Process::spawn("vhost-user-console", &mut cmd);
    let sb = SimBridge::start(dir.clone(), &config_json(&vhost_user, 2), &[]);
    let connect = move || -> std::io::Result<Box<dyn HostStream>> {
        Ok(Box::new(std::os::unix::net::UnixStream::connect(&console)?))
    };
    measure(&sb, args, &connect, true)
}

fn run_theirs(args: &Args, binary: &Path) -> Result<Results, String> {
    let dir = Arc::new(TempDir::new("console-bench-theirs"));
    let socket = dir.path().join("vdc.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("free port: {e}"))?
        .port();
    let mut cmd = Command::new(binary);
    cmd.arg("--socket-path")
        .arg(&socket)
        .args(["--backend", "network", "--tcp-port", &port.to_string()])
        .env("RUST_LOG", "warn")
        // It prints each connection on stdout, which is the bench's report.
        .stdout(std::process::Stdio::null());
    let _backend = Process::spawn("vhost-device-console", &mut cmd);
    // It serves `<socket-path>0` with 4 queues (MULTIPORT).
    let mut served = socket.into_os_string();
    served.push("0");
    let sb = SimBridge::start(dir.clone(), &config_json(Path::new(&served), 4), &[]);
    let connect = move || -> std::io::Result<Box<dyn HostStream>> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_nodelay(true)?;
        Ok(Box::new(stream))
    };
    measure(&sb, args, &connect, false)
}

/// "median [min–max]" of the values with `decimals` decimals (the median of an even count is
/// the mean of the middle two), or "n/a" when there are none.
fn spread(mut values: Vec<f64>, decimals: usize) -> String {
    if values.is_empty() {
        return "n/a".into();
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    };
    if n == 1 {
        format!("{median:.decimals$}")
    } else {
        format!(
            "{median:.decimals$} [{:.decimals$}–{:.decimals$}]",
            values[0],
            values[n - 1]
        )
    }
}

/// One round: both backends, back to back, in the given order. A failure of ours ends the
/// bench; a failure of vhost-device-console (it loses keystrokes now and then) leaves its
/// figures out of this round, with the reason printed.
fn round(
    args: &Args,
    theirs: Option<&Path>,
    theirs_first: bool,
    r: u32,
) -> Result<(Results, Option<Results>), String> {
    let ours = || run_ours(args).map_err(|e| format!("vhost-user-console: {e}"));
    let theirs = || {
        theirs.and_then(|binary| match run_theirs(args, binary) {
            Ok(results) => Some(results),
            Err(e) => {
                println!("round {r}: vhost-device-console failed, no figures: {e}");
                None
            }
        })
    };
    if theirs_first {
        let t = theirs();
        Ok((ours()?, t))
    } else {
        let o = ours()?;
        Ok((o, theirs()))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    println!(
        "console bench: {} MiB each way, {} keystrokes, {}-byte buffers, {} round(s)",
        args.mib, args.keystrokes, args.buffer, args.rounds
    );
    let binary = if args.ours_only {
        None
    } else {
        let binary = args.thirdparty.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../build/thirdparty/bin/vhost-device-console")
        });
        if !binary.exists() {
            eprintln!(
                "{} is missing: run tests/thirdparty/install.sh (or pass --ours-only)",
                binary.display()
            );
            return ExitCode::FAILURE;
        }
        Some(binary)
    };
    let mut runs = Vec::new();
    for r in 1..=args.rounds {
        match round(&args, binary.as_deref(), r % 2 == 0, r) {
            Ok(results) => runs.push(results),
            Err(e) => {
                eprintln!("round {r}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "{:<16} | {:>30} | {:>30} | {:>20}",
        "", "vhost-user-console", "vhost-device-console", "ratio"
    );
    type Figure = fn(&Results) -> Option<f64>;
    let rows: [(&str, Figure); 3] = [
        ("guest->host MB/s", |r| Some(r.guest_to_host)),
        ("host->guest MB/s", |r| r.host_to_guest),
        ("keystrokes/s", |r| Some(r.keystrokes_per_s)),
    ];
    for (name, figure) in rows {
        let ours: Vec<f64> = runs.iter().filter_map(|(o, _)| figure(o)).collect();
        let theirs: Vec<f64> = runs
            .iter()
            .filter_map(|(_, t)| t.as_ref().and_then(figure))
            .collect();
        let ratios: Vec<f64> = runs
            .iter()
            .filter_map(|(o, t)| {
                Some(figure(o)? / t.as_ref().and_then(figure).filter(|t| *t > 0.0)?)
            })
            .collect();
        println!(
            "{name:<16} | {:>30} | {:>30} | {:>20}",
            spread(ours, 1),
            spread(theirs, 1),
            spread(ratios, 2)
        );
    }
    if binary.is_some() {
        println!(
            "host->guest n/a for vhost-device-console 0.1.0: it returns a receive buffer once \
             per byte copied into it, which breaks the ring for input longer than one byte"
        );
    }
    if args.rounds > 1 {
        println!(
            "median [min–max] over the rounds; a ratio is the median [min–max] of the per-round \
             ratios (ours / theirs)"
        );
    }
    ExitCode::SUCCESS
}
