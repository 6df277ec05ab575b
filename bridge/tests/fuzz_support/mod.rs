//! The engine of the fuzz-style property tests: a seeded generator, a runner that names the
//! seed of any failing execution, and a watchdog that turns a hang into a failure.
//!
//! Each execution `i` draws from its own generator seeded with `HVV_FUZZ_SEED + i`, so a
//! failure reported with seed `s` replays alone with `HVV_FUZZ_SEED=s HVV_FUZZ_ITERS=1`.
//! `HVV_FUZZ_ITERS` sets the number of executions (each target has a CI-sized default) and
//! `HVV_FUZZ_STALL_SECS` how long one execution may run before it counts as a hang.
//!
//! The blk backend's fuzz test includes this file too, so it stays free of crate-specific code.

// Each test binary uses a different subset of the generator's helpers.
#![allow(dead_code)]

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// CI's seed, so that the bounded pass is reproducible; the long script picks a fresh one.
const DEFAULT_SEED: u64 = 0x6876_762d_6675_7a7a;
const DEFAULT_STALL_SECS: u64 = 10;

/// xorshift64* over a splitmix64-scrambled seed: tiny, fast and deterministic.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // splitmix64, so that neighbouring seeds give unrelated streams; xorshift needs a
        // nonzero state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    /// Uniform in `0..n`; `n` must be nonzero.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `0..n` as an index; `n` must be nonzero.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    /// Uniform in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    /// True with probability 1/n.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 != 0
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    /// A value that is often an edge case: 0, 1, a power of two and its neighbours, the
    /// maximum, or anything.
    pub fn interesting_u64(&mut self) -> u64 {
        match self.below(8) {
            0 => 0,
            1 => 1,
            2 => u64::MAX - self.below(4),
            3 => {
                let power = 1u64 << self.below(64);
                power.wrapping_add(self.below(3)).wrapping_sub(1)
            }
            4 => self.below(0x1000),
            _ => self.next_u64(),
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let text = text.trim().replace('_', "");
    let parsed = match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    Some(parsed.unwrap_or_else(|_| panic!("{name}={text:?} is not a number")))
}

/// Runs `execute` once per seed, prints one summary line and returns the number of
/// executions. A panic inside an execution is reported with its seed, then re-raised; an
/// execution that runs longer than the stall limit aborts the process after printing its seed.
pub fn run(target: &str, default_executions: u64, mut execute: impl FnMut(&mut Rng)) -> u64 {
    let executions = env_u64("HVV_FUZZ_ITERS").unwrap_or(default_executions);
    let base_seed = env_u64("HVV_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let stall = Duration::from_secs(env_u64("HVV_FUZZ_STALL_SECS").unwrap_or(DEFAULT_STALL_SECS));
    let current_seed = Arc::new(AtomicU64::new(base_seed));
    let finished = Arc::new(AtomicU64::new(0));
    let (done, watchdog) = start_watchdog(target, stall, current_seed.clone(), finished.clone());

    let start = Instant::now();
    for i in 0..executions {
        let seed = base_seed.wrapping_add(i);
        current_seed.store(seed, Ordering::Relaxed);
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| execute(&mut Rng::new(seed))));
        if let Err(payload) = outcome {
            eprintln!(
                "{target}: execution {i} failed; replay it alone with \
                 HVV_FUZZ_SEED={seed:#x} HVV_FUZZ_ITERS=1"
            );
            panic::resume_unwind(payload);
        }
        finished.store(i + 1, Ordering::Relaxed);
    }
    let elapsed = start.elapsed();
    drop(done);
    watchdog.join().expect("the watchdog thread does not panic");

    let rate = executions as f64 / elapsed.as_secs_f64().max(1e-9);
    println!(
        "fuzz-summary: {target}: {executions} executions in {:.1} s ({rate:.0}/s), \
         seeds {base_seed:#x}..+{executions}",
        elapsed.as_secs_f64()
    );
    executions
}

/// A thread that aborts the process when `finished` stops moving for `stall`; it ends when
/// the returned sender is dropped.
fn start_watchdog(
    target: &str,
    stall: Duration,
    current_seed: Arc<AtomicU64>,
    finished: Arc<AtomicU64>,
) -> (mpsc::Sender<()>, std::thread::JoinHandle<()>) {
    let (done, stop) = mpsc::channel::<()>();
    let target = target.to_owned();
    let handle = std::thread::spawn(move || {
        let mut last = finished.load(Ordering::Relaxed);
        let mut since = Instant::now();
        loop {
            match stop.recv_timeout(Duration::from_millis(200)) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
            let now = finished.load(Ordering::Relaxed);
            if now != last {
                last = now;
                since = Instant::now();
            } else if since.elapsed() > stall {
                let seed = current_seed.load(Ordering::Relaxed);
                eprintln!(
                    "{target}: execution {now} made no progress for {stall:?} (a hang); replay \
                     it alone with HVV_FUZZ_SEED={seed:#x} HVV_FUZZ_ITERS=1"
                );
                std::process::abort();
            }
        }
    });
    (done, handle)
}
