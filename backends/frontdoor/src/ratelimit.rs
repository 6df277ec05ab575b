//! A guest must not be able to flood a backend's log. Most warnings and errors a backend
//! prints can be triggered by the guest (a bad chain, a ring index that runs away, a queue
//! used before it is ready), including the `error!` lines of `virtio-queue`, which we cannot
//! change. So every backend logs through [`RateLimitedLogger`]: each warning or error call
//! site prints its first few lines, then only every power of ten, with a count.

use std::collections::HashMap;
use std::sync::Mutex;

use log::{Level, Log, Metadata, Record};

/// Allows the first few occurrences, then every power of ten, so a flood stays visible but
/// costs a handful of lines.
#[derive(Debug, Default)]
pub struct RateLimited {
    count: u64,
}

/// Occurrences logged before thinning out.
const FIRST: u64 = 10;

impl RateLimited {
    /// A fresh counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one occurrence; true if this one should be logged.
    pub fn hit(&mut self) -> bool {
        self.count = self.count.saturating_add(1);
        self.count <= FIRST || is_power_of_ten(self.count)
    }

    /// Occurrences so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

fn is_power_of_ten(mut n: u64) -> bool {
    while n >= 10 && n.is_multiple_of(10) {
        n /= 10;
    }
    n == 1
}

/// Where a log line comes from: its source file and line (or, for a record without a static
/// file, its target).
type CallSite = (&'static str, u32);

/// Passes every record to `inner`, but warnings and errors only as [`RateLimited`] allows,
/// counted per call site.
#[derive(Debug)]
pub struct RateLimitedLogger<L> {
    inner: L,
    sites: Mutex<HashMap<CallSite, RateLimited>>,
}

impl<L: Log> RateLimitedLogger<L> {
    /// Wraps `inner`.
    pub fn new(inner: L) -> Self {
        Self {
            inner,
            sites: Mutex::new(HashMap::new()),
        }
    }

    /// How many times the call site of `record` has logged, this one included; `None` when
    /// this one is to be dropped.
    fn admit(&self, record: &Record<'_>) -> Option<u64> {
        let file = record
            .file_static()
            .or(record.module_path_static())
            .unwrap_or("");
        let site = (file, record.line().unwrap_or(0));
        let mut sites = self.sites.lock().unwrap_or_else(|p| p.into_inner());
        let limiter = sites.entry(site).or_default();
        limiter.hit().then(|| limiter.count())
    }
}

impl<L: Log> Log for RateLimitedLogger<L> {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        // A record the filter drops is not counted either.
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        if record.level() > Level::Warn {
            self.inner.log(record);
            return;
        }
        match self.admit(record) {
            None => {}
            Some(count) if count <= FIRST => self.inner.log(record),
            Some(count) => self.inner.log(
                &Record::builder()
                    .metadata(record.metadata().clone())
                    .args(format_args!(
                        "{} ({count} times so far, rate-limited)",
                        record.args()
                    ))
                    .module_path(record.module_path())
                    .file(record.file())
                    .line(record.line())
                    .build(),
            ),
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

/// Installs env_logger (`RUST_LOG`, default `info`) behind a [`RateLimitedLogger`].
pub fn init_logger() {
    let logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).build();
    let max_level = logger.filter();
    if log::set_boxed_logger(Box::new(RateLimitedLogger::new(logger))).is_ok() {
        log::set_max_level(max_level);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_ten_then_powers_of_ten() {
        let mut r = RateLimited::new();
        let mut logged = Vec::new();
        for n in 1..=10_000u64 {
            if r.hit() {
                logged.push(n);
            }
        }
        let mut expected: Vec<u64> = (1..=10).collect();
        expected.extend([100, 1000, 10_000]);
        assert_eq!(logged, expected);
    }

    /// Keeps what it is given.
    #[derive(Debug, Default)]
    struct Capture(Mutex<Vec<(Level, String)>>);

    impl Log for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.level() <= Level::Info
        }

        fn log(&self, record: &Record<'_>) {
            let line = (record.level(), record.args().to_string());
            self.0.lock().unwrap().push(line);
        }

        fn flush(&self) {}
    }

    fn record(level: Level, line: u32, text: &str, log: &RateLimitedLogger<Capture>) {
        log.log(
            &Record::builder()
                .level(level)
                .args(format_args!("{text}"))
                .file_static(Some("src/site.rs"))
                .line(Some(line))
                .build(),
        );
    }

    #[test]
    fn each_warning_or_error_site_is_limited_on_its_own() {
        let log = RateLimitedLogger::new(Capture::default());
        for _ in 0..1000 {
            record(Level::Warn, 1, "bad chain", &log);
            record(Level::Error, 2, "avail index ran away", &log);
            record(Level::Info, 3, "connected", &log);
            // Not enabled: never counted, never passed on.
            record(Level::Debug, 4, "detail", &log);
        }
        let lines = log.inner.0.lock().unwrap();
        let count = |level, text: &str| {
            lines
                .iter()
                .filter(|(l, t)| *l == level && t.starts_with(text))
                .count()
        };
        assert_eq!(count(Level::Warn, "bad chain"), 12);
        assert_eq!(count(Level::Error, "avail index ran away"), 12);
        assert_eq!(count(Level::Info, "connected"), 1000);
        assert_eq!(count(Level::Debug, "detail"), 0);
        assert!(lines.contains(&(
            Level::Warn,
            "bad chain (1000 times so far, rate-limited)".into()
        )));
    }
}
