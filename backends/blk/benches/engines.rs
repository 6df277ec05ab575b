//! The I/O engines of `FileStorage` side by side, on the host alone: 4 KiB random reads and
//! writes and 1 MiB sequential reads of one image, through `preadv`/`pwritev` (the baseline)
//! and through io_uring, in the same process and from one thread, as a queue thread does.
//!
//! Run: `cargo bench -p vhost-user-blk --bench engines [-- SECONDS [DIR]]` (default 2 s per
//! row, image in /dev/shm).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vhost_user_blk::blk::BlockStorage;
use vhost_user_blk::file_storage::{FileStorage, IoEngine, StorageOptions};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const IMAGE_MIB: u64 = 256;
const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;

/// A xorshift generator, so both engines see the same offsets.
struct Offsets(u64);

impl Offsets {
    fn next_block(&mut self, blocks: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % blocks
    }
}

/// Operations per second of `op`, run for `duration`.
fn rate(duration: Duration, mut op: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    let mut done = 0u64;
    while start.elapsed() < duration {
        for _ in 0..64 {
            op(done);
            done += 1;
        }
    }
    done as f64 / start.elapsed().as_secs_f64()
}

fn measure(storage: &FileStorage, mem: &GuestMemoryMmap, duration: Duration) -> [f64; 3] {
    let small = mem.get_slice(GuestAddress(0), SMALL).unwrap();
    let large = mem.get_slice(GuestAddress(0), LARGE).unwrap();
    let size = IMAGE_MIB << 20;
    let mut offsets = Offsets(0x9e37_79b9_7f4a_7c15);
    let read_iops = rate(duration, |_| {
        let at = offsets.next_block(size / SMALL as u64) * SMALL as u64;
        storage.read_vectored_at(at, &[small]).expect("read");
    });
    let write_iops = rate(duration, |_| {
        let at = offsets.next_block(size / SMALL as u64) * SMALL as u64;
        storage.write_vectored_at(at, &[small]).expect("write");
    });
    let chunks = size / LARGE as u64;
    let seq = rate(duration, |i| {
        storage
            .read_vectored_at((i % chunks) * LARGE as u64, &[large])
            .expect("read");
    });
    [read_iops, write_iops, seq * LARGE as f64 / 1e6]
}

fn main() {
    // `cargo bench` passes `--bench`; the optional arguments are the seconds and the directory.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let seconds: f64 = args.first().map_or(2.0, |s| s.parse().expect("seconds"));
    let dir = PathBuf::from(args.get(1).map_or("/dev/shm", String::as_str));
    let duration = Duration::from_secs_f64(seconds);

    let path = dir.join(format!("engines-bench-{}.img", std::process::id()));
    let mut file = std::fs::File::create(&path).expect("image");
    let block: Vec<u8> = (0..LARGE).map(|i| (i % 251) as u8).collect();
    for _ in 0..IMAGE_MIB {
        file.write_all(&block).expect("fill image");
    }
    drop(file);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LARGE)]).unwrap();

    let mut results = Vec::new();
    for engine in [IoEngine::Sync, IoEngine::IoUring] {
        let options = StorageOptions {
            engine,
            ..StorageOptions::default()
        };
        let storage = FileStorage::open(&path, &options).expect("open image");
        results.push(measure(&storage, &mem, duration));
    }
    std::fs::remove_file(&path).expect("remove image");

    println!(
        "FileStorage engines, {IMAGE_MIB} MiB image in {}, {seconds} s per row, one thread",
        dir.display()
    );
    println!(
        "{:<24} {:>14} {:>14} {:>8}",
        "", "sync", "io_uring", "ratio"
    );
    let rows = [
        "4 KiB random read IOPS",
        "4 KiB random write IOPS",
        "1 MiB seq read MB/s",
    ];
    for (row, name) in rows.iter().enumerate() {
        let (sync, uring) = (results[0][row], results[1][row]);
        println!(
            "{name:<24} {sync:>14.0} {uring:>14.0} {:>8.3}",
            uring / sync
        );
    }
}
