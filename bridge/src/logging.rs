//! Where the bridge's log goes (`--log-target`, `--log-level`), and the lines of the backends
//! it spawns, which it forwards to the same place with the zone, device and backend pid.
//!
//! - `stderr`: env_logger's format, as before.
//! - `syslog`: RFC 3164 datagrams on `/dev/log` (rsyslog, busybox syslogd, journald), facility
//!   daemon, identifier `hvisor-vhost-bridge[pid]`: what hvisor-tool's daemon users already
//!   read with `grep` or `journalctl -t`.
//! - `journald`: journald's native protocol on `/run/systemd/journal/socket`, with the
//!   priority, identifier and pid as fields.
//!
//! Both sockets take one datagram per record, so no library is needed. Filtering is
//! env_logger's: `--log-level` if given (and passed to spawned backends as `RUST_LOG`), else
//! `RUST_LOG`, else `info`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Where log records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogTarget {
    /// Standard error, in env_logger's format.
    #[default]
    Stderr,
    /// The system log (`/dev/log`), facility daemon.
    Syslog,
    /// systemd's journal, natively (`/run/systemd/journal/socket`).
    Journald,
}

/// The log could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The log socket could not be reached.
    #[error("cannot reach the log socket {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A logger was installed already.
    #[error("a logger is installed already")]
    Installed(#[source] log::SetLoggerError),
}

/// The identifier records carry in the system log.
pub const IDENT: &str = "hvisor-vhost-bridge";
const SYSLOG_SOCKET: &str = "/dev/log";
const JOURNALD_SOCKET: &str = "/run/systemd/journal/socket";
/// syslog facility "daemon" (3), shifted as in the PRI field.
const FACILITY_DAEMON: u8 = 3 << 3;

/// Installs the global logger. Call it first thing in `main`, before any thread starts: with
/// `level`, it also sets `RUST_LOG` for the backends the bridge will spawn.
pub fn init(target: LogTarget, level: Option<LevelFilter>) -> Result<(), LogError> {
    let mut builder = match level {
        Some(level) => {
            // Backends read RUST_LOG; no other thread exists yet to race with set_var.
            std::env::set_var("RUST_LOG", level.as_str().to_ascii_lowercase());
            let mut builder = env_logger::Builder::new();
            builder.filter_level(level);
            builder
        }
        None => env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")),
    };
    let socket = match target {
        LogTarget::Stderr => return builder.try_init().map_err(LogError::Installed),
        LogTarget::Syslog => SYSLOG_SOCKET,
        LogTarget::Journald => JOURNALD_SOCKET,
    };
    let logger = SocketLogger::connect(target, Path::new(socket), builder.build())?;
    log::set_max_level(logger.filter.filter());
    log::set_boxed_logger(Box::new(logger)).map_err(LogError::Installed)
}

/// A connected datagram socket that reconnects once when the log daemon restarted.
#[derive(Debug)]
struct DatagramSink {
    path: PathBuf,
    socket: Mutex<UnixDatagram>,
}

impl DatagramSink {
    fn connect(path: &Path) -> Result<DatagramSink, LogError> {
        let socket = Self::open(path).map_err(|source| LogError::Connect {
            path: path.to_owned(),
            source,
        })?;
        Ok(DatagramSink {
            path: path.to_owned(),
            socket: Mutex::new(socket),
        })
    }

    fn open(path: &Path) -> std::io::Result<UnixDatagram> {
        let socket = UnixDatagram::unbound()?;
        socket.connect(path)?;
        Ok(socket)
    }

    fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        let mut socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if socket.send(datagram).is_ok() {
            return Ok(());
        }
        *socket = Self::open(&self.path)?;
        socket.send(datagram).map(|_| ())
    }
}

#[derive(Debug)]
struct SocketLogger {
    filter: env_logger::Logger,
    sink: DatagramSink,
    target: LogTarget,
    pid: u32,
}

impl SocketLogger {
    fn connect(
        target: LogTarget,
        socket: &Path,
        filter: env_logger::Logger,
    ) -> Result<SocketLogger, LogError> {
        Ok(SocketLogger {
            filter,
            sink: DatagramSink::connect(socket)?,
            target,
            pid: std::process::id(),
        })
    }
}

impl Log for SocketLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let message = format!("{}: {}", record.target(), record.args());
        let datagram = match self.target {
            LogTarget::Journald => journald_datagram(record.level(), self.pid, &message),
            _ => syslog_datagram(record.level(), self.pid, &message),
        };
        if let Err(e) = self.sink.send(&datagram) {
            // The log daemon is gone: standard error is the last place left to say it.
            let _ = writeln!(std::io::stderr(), "{IDENT}: log socket: {e}; {message}");
        }
    }

    fn flush(&self) {}
}

/// syslog's severity for a log level.
fn severity(level: Level) -> u8 {
    match level {
        Level::Error => 3,
        Level::Warn => 4,
        Level::Info => 6,
        Level::Debug | Level::Trace => 7,
    }
}

/// `<PRI>ident[pid]: message`: no timestamp, the log daemon adds its own.
fn syslog_datagram(level: Level, pid: u32, message: &str) -> Vec<u8> {
    let pri = FACILITY_DAEMON | severity(level);
    format!("<{pri}>{IDENT}[{pid}]: {message}").into_bytes()
}

/// journald's native format: `FIELD=value` lines; a value with a newline is sent as the field
/// name, a newline, its length as 64-bit little endian, the bytes and a newline.
fn journald_datagram(level: Level, pid: u32, message: &str) -> Vec<u8> {
    let mut out = format!(
        "PRIORITY={}\nSYSLOG_FACILITY=3\nSYSLOG_IDENTIFIER={IDENT}\nSYSLOG_PID={pid}\n",
        severity(level)
    )
    .into_bytes();
    if message.contains('\n') {
        out.extend_from_slice(b"MESSAGE\n");
        out.extend_from_slice(&(message.len() as u64).to_le_bytes());
        out.extend_from_slice(message.as_bytes());
        out.push(b'\n');
    } else {
        out.extend_from_slice(format!("MESSAGE={message}\n").as_bytes());
    }
    out
}

/// The longest backend line forwarded whole; the rest of a longer one is dropped.
const MAX_LINE: usize = 4096;

/// Forwards what a spawned backend writes on `output` (its standard error) to the bridge's
/// log, each line prefixed with `prefix` (zone, device, program and pid), from a thread of
/// its own that ends when the backend closes its end.
pub fn forward_backend_output(
    output: impl Read + Send + 'static,
    prefix: String,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("backend-log".into())
        .spawn(move || {
            let mut reader = BufReader::new(output);
            let mut line = Vec::new();
            loop {
                line.clear();
                match read_line_bounded(&mut reader, &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let text = String::from_utf8_lossy(&line);
                let (level, text) = parse_backend_line(text.trim_end());
                log::log!(target: "backend", level, "{prefix}: {text}");
            }
        })
        .map(|_| ())
}

/// Reads one line into `line` (without the newline), keeping at most [`MAX_LINE`] bytes of
/// it. Returns the bytes consumed, 0 at the end of the stream.
fn read_line_bounded(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut consumed = 0;
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(consumed);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LINE.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let used = done.unwrap_or(buf.len());
        reader.consume(used);
        consumed += used;
        if done.is_some() {
            return Ok(consumed);
        }
    }
}

/// A backend's env_logger line, `[<time> <LEVEL> <module>] <text>`, as its level and
/// `<module>: <text>` (the bridge's log adds its own time); any other line as info, unchanged.
fn parse_backend_line(line: &str) -> (Level, String) {
    let parsed = line.strip_prefix('[').and_then(|rest| {
        let (header, text) = rest.split_once("] ")?;
        let mut words = header.split_whitespace();
        let _time = words.next()?;
        let level: Level = words.next()?.parse().ok()?;
        let module = words.next()?;
        Some((level, format!("{module}: {text}")))
    });
    parsed.unwrap_or_else(|| (Level::Info, line.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_lines_keep_their_level_and_module() {
        assert_eq!(
            parse_backend_line("[2026-12-07T13:00:00Z WARN  vhost_user_blk] queue 0: bad"),
            (Level::Warn, "vhost_user_blk: queue 0: bad".to_owned())
        );
        assert_eq!(
            parse_backend_line("thread 'main' panicked at x"),
            (Level::Info, "thread 'main' panicked at x".to_owned())
        );
        assert_eq!(
            parse_backend_line("[odd] x"),
            (Level::Info, "[odd] x".to_owned())
        );
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        let mut input = vec![b'a'; MAX_LINE + 100];
        input.extend_from_slice(b"\nnext\n");
        let mut reader = BufReader::with_capacity(64, &input[..]);
        let mut line = Vec::new();
        assert_eq!(
            read_line_bounded(&mut reader, &mut line).unwrap(),
            MAX_LINE + 101
        );
        assert_eq!(line.len(), MAX_LINE);
        line.clear();
        assert_eq!(read_line_bounded(&mut reader, &mut line).unwrap(), 5);
        assert_eq!(line, b"next");
        line.clear();
        assert_eq!(read_line_bounded(&mut reader, &mut line).unwrap(), 0);
    }

    fn log_at(logger: &SocketLogger, level: Level, text: &str) {
        logger.log(
            &Record::builder()
                .level(level)
                .target("hvisor_bridge::x")
                .args(format_args!("{text}"))
                .build(),
        );
    }

    #[test]
    fn syslog_logger_filters_sends_and_survives_a_log_daemon_restart() {
        let path = std::env::temp_dir().join(format!("hvv-syslog-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let daemon = UnixDatagram::bind(&path).unwrap();
        daemon.set_nonblocking(true).unwrap();
        let filter = env_logger::Builder::new()
            .filter_level(LevelFilter::Info)
            .build();
        let logger = SocketLogger::connect(LogTarget::Syslog, &path, filter).unwrap();
        log_at(&logger, Level::Debug, "filtered out");
        log_at(&logger, Level::Error, "bad");
        let mut buf = [0u8; 256];
        let n = daemon.recv(&mut buf).unwrap();
        let expected = format!(
            "<27>hvisor-vhost-bridge[{}]: hvisor_bridge::x: bad",
            std::process::id()
        );
        assert_eq!(String::from_utf8_lossy(&buf[..n]), expected);
        assert!(daemon.recv(&mut buf).is_err(), "the debug record was sent");
        // The daemon restarts on the same path: the next record reaches the new socket.
        drop(daemon);
        std::fs::remove_file(&path).unwrap();
        let daemon = UnixDatagram::bind(&path).unwrap();
        log_at(&logger, Level::Info, "again");
        let n = daemon.recv(&mut buf).unwrap();
        assert!(buf[..n].ends_with(b": hvisor_bridge::x: again"));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn syslog_datagram_has_priority_ident_and_pid() {
        assert_eq!(
            syslog_datagram(Level::Warn, 42, "m: x"),
            b"<28>hvisor-vhost-bridge[42]: m: x".to_vec()
        );
    }

    #[test]
    fn journald_datagram_encodes_multiline_messages_by_length() {
        let d = journald_datagram(Level::Error, 7, "a\nb");
        let text = b"PRIORITY=3\nSYSLOG_FACILITY=3\nSYSLOG_IDENTIFIER=hvisor-vhost-bridge\nSYSLOG_PID=7\nMESSAGE\n";
        assert!(d.starts_with(text));
        assert_eq!(&d[text.len()..], b"\x03\0\0\0\0\0\0\0a\nb\n");
        let d = journald_datagram(Level::Info, 7, "one line");
        assert!(d.starts_with(b"PRIORITY=6\n"));
        assert!(d.ends_with(b"\nMESSAGE=one line\n"));
    }
}
