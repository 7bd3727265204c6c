//! The machine's durable-write ceiling, measured in the spool's own directory: what any
//! fsync-per-commit store could reach there, the baseline every ackgate figure is set against.
//!
//! Two bounded loops: 4 KiB write + `fdatasync` (commits per second and the fsync latency a
//! sender's ack can never beat), and 1 MiB write + `fdatasync` (bytes per second when each
//! commit carries a big group). Both append to a fresh file, as a growing spool does.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::histogram::{Histogram, LatencySummary};

const SMALL_WRITE: usize = 4096;
const BIG_WRITE: usize = 1 << 20;
/// Upper bounds on the iterations, whatever the disk does (≈ 400 MiB and 4 GiB).
const MAX_SMALL: u64 = 100_000;
const MAX_BIG: u64 = 4096;

/// The ceiling figures.
#[derive(Debug, Clone, Serialize)]
pub struct DiskCeiling {
    /// 4 KiB write + fdatasync per second.
    pub commits_per_s: f64,
    pub commits: u64,
    /// Latency of one 4 KiB write + fdatasync.
    pub fsync: LatencySummary,
    /// 1 MiB write + fdatasync, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
    pub big_writes: u64,
}

/// Run both loops for about `each` apiece; the scratch file is removed afterwards.
pub fn measure(dir: &Path, each: Duration) -> std::io::Result<DiskCeiling> {
    let path = dir.join(".ackgate-bench-ceiling");
    let result = run(&path, each);
    let _ = std::fs::remove_file(&path);
    result
}

fn run(path: &Path, each: Duration) -> std::io::Result<DiskCeiling> {
    let pattern: Vec<u8> = (0..BIG_WRITE).map(|i| (i % 251) as u8 | 1).collect();

    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let mut fsync = Histogram::default();
    let start = Instant::now();
    let mut commits = 0u64;
    while commits < MAX_SMALL && start.elapsed() < each {
        let t = Instant::now();
        file.write_all(&pattern[..SMALL_WRITE])?;
        file.sync_data()?;
        fsync.record(t.elapsed().as_nanos() as u64);
        commits += 1;
    }
    let small_seconds = start.elapsed().as_secs_f64();
    drop(file);

    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(path)?;
    let start = Instant::now();
    let mut big_writes = 0u64;
    while big_writes < MAX_BIG && start.elapsed() < each {
        file.write_all(&pattern)?;
        file.sync_data()?;
        big_writes += 1;
    }
    let big_seconds = start.elapsed().as_secs_f64();

    Ok(DiskCeiling {
        commits_per_s: commits as f64 / small_seconds.max(1e-9),
        commits,
        fsync: fsync.summary(),
        mb_per_s: (big_writes * BIG_WRITE as u64) as f64 / 1e6 / big_seconds.max(1e-9),
        big_writes,
    })
}
