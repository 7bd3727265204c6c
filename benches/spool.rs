//! Group commit cost of the real spool ([`ackgate::spool::Spool`]) per batch size, against the
//! raw cost of writing the same bytes with one `fdatasync`, in the same directory, same run.
//!
//! Group `spool_group_commit/N`: N requests of 100 events × 150 bytes (15 KB each) are handed
//! to the spool back to back and every reply is awaited (N = 1, 16, 256, 4096). The writer
//! thread groups whatever is waiting, so N is an upper bound on requests per commit; the
//! requests per commit actually reached are printed once per N (from `SpoolStats::commits`).
//! Group `raw_write_fdatasync/N`: the same N × 15 KB written with one `write` and one
//! `fdatasync` to a plain file. Both report events/s; their ratio is the spool's overhead
//! (redb pages, copies, merging, the writer hand-off) over the disk itself.
//!
//! Each sample uses a fresh spool (or file), removed afterwards, so the file never grows past
//! one sample. Directory: `$ACKGATE_BENCH_DIR` or the system temp dir.
//! Run: `cargo bench --bench spool -- --sample-size 10` (about a minute and a half).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ackgate::bench::load::EventLayout;
use ackgate::config::{Config, SpoolConfig};
use ackgate::forward::Signal;
use ackgate::spool::Spool;
use bytes::Bytes;
use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};

const EVENTS_PER_REQUEST: u32 = 100;
const EVENT_BYTES: usize = 150;
const BATCHES: [u64; 4] = [1, 16, 256, 4096];

fn bench_dir() -> PathBuf {
    std::env::var_os("ACKGATE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// The spool section of a config with every default, a budget that never blocks, and a group
/// bound above the largest batch (4096 × 15 KB ≈ 61 MB), so only timing splits a group.
fn spool_config(path: &Path) -> SpoolConfig {
    let text = format!(
        "[ingress]\nlisten = \"127.0.0.1:0\"\n\
         [spool]\npath = {:?}\nmax_bytes = \"64GiB\"\ngroup_commit_bytes = \"64MiB\"\n\
         [[upstream.nodes]]\naddress = \"127.0.0.1:9\"\n",
        path.display().to_string()
    );
    Config::parse(&text, Path::new("bench.toml"))
        .expect("bench config is valid")
        .spool
}

fn entries() -> Bytes {
    let one = EventLayout::new(EVENT_BYTES, false).template();
    Bytes::from(one.repeat(EVENTS_PER_REQUEST as usize))
}

/// `iters` rounds of: append `n` requests, await every commit. Returns the time spent and the
/// commits the spool made.
fn spool_rounds(n: u64, iters: u64, entries: &Bytes) -> (Duration, u64) {
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    let (spool, writer) = Spool::open(&spool_config(&dir.path().join("spool.redb"))).expect("open");
    let tag = Bytes::from_static(b"bench.spool");
    let cost = Spool::cost(Signal::Logs, None, &tag, entries);
    let before = spool.stats().commits;
    let mut replies = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for _ in 0..iters {
        for _ in 0..n {
            assert!(spool.try_reserve(cost), "budget is 64 GiB");
            replies.push(spool.append(
                Signal::Logs,
                None,
                tag.clone(),
                entries.clone(),
                EVENTS_PER_REQUEST,
                cost,
            ));
        }
        for reply in replies.drain(..) {
            reply
                .blocking_recv()
                .expect("writer alive")
                .expect("commit succeeded");
        }
    }
    let elapsed = start.elapsed();
    let commits = spool.stats().commits - before;
    writer.shutdown();
    (elapsed, commits)
}

/// `iters` rounds of one write of `n` × 15 KB and one fdatasync.
fn raw_rounds(n: u64, iters: u64, entries: &Bytes) -> Duration {
    let dir = tempfile::tempdir_in(bench_dir()).expect("temp dir");
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(dir.path().join("raw"))
        .expect("raw file");
    let block = entries.repeat(n as usize);
    let start = Instant::now();
    for _ in 0..iters {
        file.write_all(&block).expect("write");
        file.sync_data().expect("fdatasync");
    }
    start.elapsed()
}

fn group_commit(c: &mut Criterion) {
    let entries = entries();
    for n in BATCHES {
        let (elapsed, commits) = spool_rounds(n, 3, &entries);
        eprintln!(
            "spool: {n} request(s) per round → {:.1} requests per commit, {:.2} ms per round",
            (3 * n) as f64 / commits.max(1) as f64,
            elapsed.as_secs_f64() * 1e3 / 3.0
        );
    }
    let mut group = c.benchmark_group("spool_group_commit");
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(4));
    for n in BATCHES {
        group.throughput(Throughput::Elements(n * u64::from(EVENTS_PER_REQUEST)));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| spool_rounds(n, iters, &entries).0)
        });
    }
    group.finish();

    let mut group = c.benchmark_group("raw_write_fdatasync");
    group.sampling_mode(SamplingMode::Flat);
    group.measurement_time(Duration::from_secs(4));
    for n in BATCHES {
        group.throughput(Throughput::Elements(n * u64::from(EVENTS_PER_REQUEST)));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter_custom(|iters| raw_rounds(n, iters, &entries))
        });
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
