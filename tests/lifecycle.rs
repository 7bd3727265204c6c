//! Invariant 10: ackgate's own lifecycle loses nothing a sender finished writing to it. The
//! real binary, real sockets, a real spool; `ackgate run` is the supervisor that holds the
//! sockets, its child the worker that reads them.
//!
//! - A worker killed with SIGKILL, at a random moment, while a persistent no-ack sender and
//!   one-connection-per-chunk senders write: every event arrives, and the persistent sender's
//!   writes never fail (its connection was never reset).
//! - A request larger than the socket's receive buffer (8 and 16 MB, fluentd v0.10's chunk
//!   sizes) with the worker killed in its middle: the part already read was kept in the spool,
//!   the rest was still in the socket, and the request arrives whole, once.
//! - Upgrades: with the same executable and with a replaced one, the supervisor keeps its pid,
//!   the worker is new, the persistent sender's connection goes on and acking senders see every
//!   ack; to an executable that fails, the running version goes on serving and `ackgate upgrade`
//!   says why.
//! - A stop: connections the kernel had completed but nobody had accepted yet are read and
//!   committed; a connection attempted after the stop began is not accepted.
//! - systemd: `LISTEN_FDS` from `systemd-socket-activate`, READY / RELOADING / STOPPING and the
//!   fd store on `NOTIFY_SOCKET`, and both unit files pass `systemd-analyze verify`.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(30);

/// A sender on one long-lived connection that never reads, as docker's fluentd log driver
/// and fluent-logger without `require_ack` are: Forward-mode requests of 10 events, back to
/// back. What it wrote successfully is what it handed over; a failed write is a reset it saw.
struct Persistent {
    stop: Arc<AtomicBool>,
    written: Arc<Mutex<Vec<u64>>>,
    resets: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Persistent {
    fn start(addr: SocketAddr, ids: Arc<Ids>, pace: Duration) -> Persistent {
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(Mutex::new(Vec::new()));
        let resets = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, written, resets) = (stop.clone(), written.clone(), resets.clone());
            std::thread::spawn(move || {
                let mut stream = connect(addr);
                while !stop.load(Ordering::Acquire) {
                    let batch = ids.take(10);
                    let entries: Vec<u8> = batch.iter().flat_map(|id| event(*id, 40)).collect();
                    match stream.write_all(&forward_request("lifecycle.persistent", &entries)) {
                        Ok(()) => lock(&written).extend(batch),
                        Err(_) => {
                            // Like fluent-logger: count it, reconnect, resend what failed.
                            resets.fetch_add(1, Ordering::AcqRel);
                            stream = connect(addr);
                            if stream
                                .write_all(&forward_request("lifecycle.persistent", &entries))
                                .is_ok()
                            {
                                lock(&written).extend(batch);
                            }
                        }
                    }
                    std::thread::sleep(pace);
                }
            })
        };
        Persistent {
            stop,
            written,
            resets,
            thread: Some(thread),
        }
    }

    /// Stop writing; what was written, and how many resets were seen.
    fn finish(mut self) -> (Vec<u64>, u64) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let written = lock(&self.written).clone();
        (written, self.resets.load(Ordering::Acquire))
    }
}

/// `[tag, [entries…]]`: Forward mode, what fluent-logger writes without acks.
fn forward_request(tag: &str, entries: &[u8]) -> Vec<u8> {
    let count = split_entries(entries).len();
    let mut out = vec![0x92];
    mp_str(&mut out, tag.as_bytes());
    mp_array_header(&mut out, count);
    out.extend_from_slice(entries);
    out
}

/// The supervisor's worker, and the log mark of its ready line.
fn wait_new_worker(gate: &Ackgate, mark: usize, what: &str) -> u32 {
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("ackgate ready"))
        .unwrap_or_else(|| {
            panic!(
                "no worker ready after {what} within {WAIT:?}; log:\n{}",
                gate.log().dump()
            )
        });
    gate.worker_pid()
}

/// Everything handed over arrived, at least once; returns the duplicates.
fn assert_all_arrived(agg: &Aggregator, handed: &HashSet<u64>, what: &str) -> u64 {
    let seen = agg.seen();
    let arrived = seen.wait(WAIT, |s| s.has_all(handed));
    let s = seen.snapshot();
    let missing = s.missing(handed);
    assert!(
        arrived && missing.is_empty(),
        "{what}: {} of {} events lost, e.g. {}",
        missing.len(),
        handed.len(),
        first(&missing, 10)
    );
    s.duplicated_of(handed) as u64
}

#[test]
fn a_worker_killed_at_any_moment_loses_nothing_and_resets_no_connection() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .product_upstream_timing()
        .metrics()
        .start();
    let supervisor = gate.pid();
    let mut senders = Senders::to(gate.addr());
    let ledger = senders.ledger();
    let mut legacy = Load::new("lifecycle.legacy");
    legacy.events_per_request = 10;
    legacy.pace = Duration::from_millis(2);
    senders.legacy(2, &legacy);
    let persistent = Persistent::start(gate.addr(), senders.ids(), Duration::from_millis(2));
    let seen = agg.seen();
    for kill in 1..=3 {
        let before = seen.with(|s| s.unique());
        assert!(
            seen.wait(WAIT, |s| s.unique() > before),
            "kill {kill}: nothing arrives; log:\n{}",
            gate.log().dump()
        );
        std::thread::sleep(random_between(
            Duration::from_millis(50),
            Duration::from_millis(700),
        ));
        let worker = gate.worker_pid();
        let mark = gate.log().len();
        send_signal(worker, libc::SIGKILL);
        let next = wait_new_worker(&gate, mark, "a SIGKILL");
        assert_ne!(next, worker, "kill {kill}: a new worker serves");
        assert_eq!(gate.pid(), supervisor, "the supervisor stays");
    }
    let before = seen.with(|s| s.unique());
    assert!(
        seen.wait(WAIT, |s| s.unique() > before),
        "traffic after the last kill"
    );
    senders.stop();
    let (written, resets) = persistent.finish();
    let sent = ledger.snapshot();
    let handed: HashSet<u64> = sent
        .legacy_written
        .iter()
        .chain(written.iter())
        .copied()
        .collect();
    let duplicates = assert_all_arrived(&agg, &handed, "worker SIGKILLed three times");
    assert_eq!(
        resets, 0,
        "the persistent sender saw a reset: its connection did not outlive the worker"
    );
    eprintln!(
        "{} events handed over ({} legacy, {} persistent), all arrived, {duplicates} duplicates",
        handed.len(),
        sent.legacy_written.len(),
        written.len()
    );
    gate.terminate_cleanly();
}

/// A fluentd v0.10 request of about `size` bytes (events of ~1 KB), and its event ids.
fn big_request(ids: &Ids, size: usize) -> (Vec<u64>, Vec<u8>) {
    let pad = 900;
    let count = size / (event(0, pad).len());
    let batch = ids.take(count);
    let entries: Vec<u8> = batch.iter().flat_map(|id| event(*id, pad)).collect();
    (batch, legacy_request("lifecycle.big", &entries))
}

/// Write the rest of a big request to the next worker and close: every event of it arrives,
/// once.
fn finish_big_request(
    agg: &Aggregator,
    mut stream: TcpStream,
    tail: &[u8],
    batch: Vec<u64>,
    size: usize,
) {
    stream
        .write_all(tail)
        .expect("second half, to the next worker");
    drop(stream);
    let handed: HashSet<u64> = batch.into_iter().collect();
    let duplicates = assert_all_arrived(agg, &handed, &format!("a {size}-byte request"));
    assert_eq!(
        duplicates, 0,
        "a {size}-byte request arrived more than once"
    );
}

/// ackgate at the product's upstream timing with the disk fault shim preloaded (mode off).
fn gate_with_shim(agg: &Aggregator, shim: &EioShim) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .product_upstream_timing()
        .metrics()
        .envs(&shim.env())
        .start()
}

#[test]
fn a_request_larger_than_the_socket_survives_a_worker_killed_in_its_middle() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .product_upstream_timing()
        .metrics()
        .start();
    let metrics = metrics_addr(&gate);
    let ids = Arc::new(Ids::default());
    for size in [8 << 20, 16 << 20] {
        let (batch, request) = big_request(&ids, size);
        let (head, tail) = request.split_at(request.len() / 2);
        let kept_before = scrape_sum(metrics, "ackgate_kept_bytes_total").unwrap_or(0.0);
        let mut stream = connect(gate.addr());
        stream.write_all(head).expect("first half");
        // The worker keeps what it read in the spool once the sender pauses (or the socket's
        // buffer is half full): wait for that, then kill it.
        poll_metric_sum(metrics, "ackgate_kept_bytes_total", WAIT, |v| {
            v > kept_before
        });
        let mark = gate.log().len();
        send_signal(gate.worker_pid(), libc::SIGKILL);
        wait_new_worker(&gate, mark, "a SIGKILL mid-request");
        finish_big_request(&agg, stream, tail, batch, size);
        let resumed = gate.log_lines_with(&["going on with a request an earlier worker kept"]);
        assert!(
            !resumed.is_empty(),
            "the new worker did not go on from the kept part; log:\n{}",
            gate.log().dump()
        );
    }
}

/// Upgrade under load (SIGUSR2): same main pid, a new worker, every connection kept, every
/// ack seen.
fn upgrade_under_load(gate: &mut Ackgate, agg: &Aggregator, upgrade: impl FnOnce(&Ackgate)) {
    let supervisor = gate.pid();
    let old_worker = gate.worker_pid();
    let mut senders = Senders::to(gate.addr());
    let ledger = senders.ledger();
    let mut acking = Load::new("lifecycle.upgrade.ack");
    acking.pace = Duration::from_millis(5);
    senders.ack(2, &acking);
    let mut legacy = Load::new("lifecycle.upgrade.legacy");
    legacy.pace = Duration::from_millis(5);
    senders.legacy(2, &legacy);
    let persistent = Persistent::start(gate.addr(), senders.ids(), Duration::from_millis(2));
    let seen = agg.seen();
    assert!(seen.wait(WAIT, |s| s.unique() > 100), "load flows");
    std::thread::sleep(random_between(
        Duration::from_millis(50),
        Duration::from_millis(500),
    ));
    let mark = gate.log().len();
    upgrade(gate);
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("upgrade complete"))
        .unwrap_or_else(|| panic!("no upgrade within {WAIT:?}; log:\n{}", gate.log().dump()));
    let new_worker = gate.worker_pid();
    assert_eq!(gate.pid(), supervisor, "the main pid stays");
    assert_ne!(new_worker, old_worker, "a new worker serves");
    let before = seen.with(|s| s.unique());
    assert!(
        seen.wait(WAIT, |s| s.unique() > before + 100),
        "load flows after"
    );
    senders.stop();
    let (written, resets) = persistent.finish();
    let sent = ledger.snapshot();
    let handed: HashSet<u64> = sent
        .legacy_written
        .iter()
        .chain(sent.acked.iter())
        .chain(written.iter())
        .copied()
        .collect();
    assert_all_arrived(agg, &handed, "an upgrade");
    assert_eq!(resets, 0, "the persistent sender saw its connection reset");
    assert_eq!(
        sent.acked.len(),
        sent.ack_sent.len(),
        "acking senders did not see every ack"
    );
    let dead: Vec<String> = gate.log_lines_with(&["supervisor is gone"]);
    assert!(dead.is_empty(), "{dead:?}");
}

#[test]
fn an_upgrade_with_the_same_executable_keeps_the_main_pid_and_every_connection() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .product_upstream_timing()
        .metrics()
        .start();
    upgrade_under_load(&mut gate, &agg, |gate| {
        send_signal(gate.pid(), libc::SIGUSR2)
    });
    gate.terminate_cleanly();
}

/// A copy of the built executable in its own directory (the tests replace it).
fn executable_copy() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ackgate");
    std::fs::copy(env!("CARGO_BIN_EXE_ackgate"), &path).expect("copy the executable");
    (dir, path)
}

/// Put `contents` at `path` the way a package manager does: a new file renamed over it.
fn replace_executable(path: &Path, contents: &[u8]) {
    let new = path.with_extension("new");
    std::fs::write(&new, contents).expect("write the new executable");
    let mut permissions = std::fs::metadata(&new).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&new, permissions).expect("chmod");
    std::fs::rename(&new, path).expect("rename over the executable");
}

fn exe_inode(pid: u32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe"))
        .expect("stat /proc/pid/exe")
        .ino()
}

#[test]
fn an_upgrade_to_a_replaced_executable_runs_it_everywhere() {
    let (_dir, exe) = executable_copy();
    let agg = Aggregator::start();
    let (mut gate, _admin) = start_with_admin(
        Ackgate::builder()
            .node("agg", agg.addr())
            .product_upstream_timing()
            .binary(&exe),
    );
    let config = gate.config_path().to_path_buf();
    upgrade_under_load(&mut gate, &agg, |_| {
        let built = std::fs::read(env!("CARGO_BIN_EXE_ackgate")).expect("read the build");
        replace_executable(&exe, &built);
        // `ackgate upgrade` asks through the admin API and waits for the outcome.
        let out = ackgate_command(["upgrade", "--config"])
            .arg(&config)
            .output()
            .expect("run ackgate upgrade");
        assert!(
            out.status.success(),
            "ackgate upgrade failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("upgraded: worker"));
    });
    // No old code runs: both processes run the file now at the path.
    let now = std::fs::metadata(&exe).expect("stat").ino();
    assert_eq!(
        exe_inode(gate.pid()),
        now,
        "the supervisor re-executed itself"
    );
    assert_eq!(exe_inode(gate.worker_pid()), now, "the worker runs it");
    gate.terminate_cleanly();
}

#[test]
fn an_upgrade_to_an_executable_that_fails_keeps_the_running_one_and_says_why() {
    let (_dir, exe) = executable_copy();
    let agg = Aggregator::start();
    let (mut gate, _admin) =
        start_with_admin(Ackgate::builder().node("agg", agg.addr()).binary(&exe));
    let worker = gate.worker_pid();
    let original = std::fs::read(&exe).expect("read");
    replace_executable(
        &exe,
        b"#!/bin/sh\necho 'ackgate 9.9: cannot start here' >&2\nexit 3\n",
    );
    let out = ackgate_command(["upgrade", "--config"])
        .arg(gate.config_path())
        .output()
        .expect("run ackgate upgrade");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("upgrade failed") && stderr.contains("exit status 3"),
        "{stderr}"
    );
    assert_eq!(
        gate.worker_pid(),
        worker,
        "the running worker was not touched"
    );
    // It still relays.
    let ids = Ids::default();
    let batch = ids.take(5);
    let entries: Vec<u8> = batch.iter().flat_map(|id| event(*id, 10)).collect();
    send_acked(gate.addr(), "lifecycle.after", &entries, 1, WAIT);
    assert_all_arrived(&agg, &batch.into_iter().collect(), "after a failed upgrade");
    // With the executable fixed, the next upgrade goes through.
    replace_executable(&exe, &original);
    let mark = gate.log().len();
    send_signal(gate.pid(), libc::SIGUSR2);
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("upgrade complete"))
        .unwrap_or_else(|| panic!("no upgrade; log:\n{}", gate.log().dump()));
    assert_ne!(gate.worker_pid(), worker);
    gate.terminate_cleanly();
}

#[test]
fn a_stop_commits_what_the_kernel_accepted_and_takes_no_new_connection() {
    let agg = Aggregator::start();
    // One connection slot, held by an idle sender: the next ones complete their handshake in
    // the kernel's accept queue, write their chunk and close, and nobody accepts them.
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("ingress", "max_connections = 1")
        .metrics()
        .start();
    let idle = connect(gate.addr());
    let metrics = metrics_addr(&gate);
    poll_metric_sum(metrics, "ackgate_connections_open", WAIT, |v| v == 1.0);
    let ids = Ids::default();
    let mut handed = HashSet::new();
    for _ in 0..20 {
        let batch = ids.take(10);
        let entries: Vec<u8> = batch.iter().flat_map(|id| event(*id, 20)).collect();
        let mut queued = connect(gate.addr());
        queued
            .write_all(&legacy_request("lifecycle.queued", &entries))
            .expect("a v0.10 write succeeds into the kernel's buffers");
        drop(queued);
        handed.extend(batch);
    }
    assert_eq!(
        scrape_sum(metrics, "ackgate_connections_total"),
        Some(1.0),
        "the queued connections were not accepted before the stop"
    );
    let addr = gate.addr();
    let mark = gate.log().len();
    send_signal(gate.pid(), libc::SIGTERM);
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("new connections are refused"))
        .unwrap_or_else(|| panic!("no stop; log:\n{}", gate.log().dump()));
    // After the stop began, a new handshake is not answered (then refused): never accepted.
    let late = TcpStream::connect_timeout(&addr, Duration::from_millis(500));
    assert!(
        late.is_err(),
        "a connection was accepted after the stop began"
    );
    let status = gate.reap(WAIT).expect("ackgate exits after SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", gate.log().dump());
    drop(idle);
    // Committed during the stop: the next start delivers them.
    gate.restart();
    assert_all_arrived(&agg, &handed, "chunks queued in the kernel at the stop");
    gate.terminate_cleanly();
}

/// The worst moment of a large request's kill: a part of it is committed in the spool (the
/// commit's fdatasync returned) and not yet released from the socket, so its last bytes are in
/// both. The LD_PRELOAD shim SIGKILLs the worker right after that fdatasync. The next worker
/// must release those bytes, not read them again after the kept part: read again, they would
/// join the request wrongly, and it would be refused and lost.
#[test]
fn a_worker_killed_between_keeping_a_part_and_releasing_it_reads_none_of_it_twice() {
    let Some(shim) = EioShim::for_test("lifecycle kill after keeping a part", "spool.redb") else {
        return;
    };
    for size in [8 << 20, 16 << 20] {
        let agg = Aggregator::start();
        let mut gate = gate_with_shim(&agg, &shim);
        let ids = Ids::default();
        let (batch, request) = big_request(&ids, size);
        let (head, tail) = request.split_at(request.len() / 2);
        let mut stream = connect(gate.addr());
        // Nothing else commits in an idle ackgate: the next commit keeps a part of the head.
        let mark = gate.log().len();
        shim.set(EioMode::KillAfterSync);
        stream.write_all(head).expect("first half");
        wait_new_worker(&gate, mark, "a SIGKILL right after keeping a part");
        assert!(!shim.kill_pending(), "the shim did not kill");
        finish_big_request(&agg, stream, tail, batch, size);
        let skipped = gate.log_lines_with(&["were still in the socket: released, not read again"]);
        assert_eq!(
            skipped.len(),
            1,
            "the next worker did not find the kept bytes in the socket; log:\n{}",
            gate.log().dump()
        );
        gate.terminate_cleanly();
    }
}

/// The other worst moment: the request kept in part is complete and stored whole (its kept
/// parts give way to a mark of where it ends), and the worker dies before it released the
/// request's last bytes from the socket. The next worker must release them by the mark, and
/// read the sender's next request, written on the same connection, as the next request.
#[test]
fn a_worker_killed_after_storing_a_kept_request_whole_reads_the_next_one_right() {
    let Some(shim) = EioShim::for_test("lifecycle kill after storing a kept request", "spool.redb")
    else {
        return;
    };
    let agg = Aggregator::start();
    let mut gate = gate_with_shim(&agg, &shim);
    let metrics = metrics_addr(&gate);
    let ids = Ids::default();
    let (big, request) = big_request(&ids, 8 << 20);
    let tail_len = 100;
    let (head, tail) = request.split_at(request.len() - tail_len);
    let mut stream = connect(gate.addr());
    stream.write_all(head).expect("all but the last bytes");
    // The sender pauses: all of the head is kept in the spool and released.
    poll_metric_sum(metrics, "ackgate_kept_bytes_total", WAIT, |v| {
        v >= head.len() as f64
    });
    let mark = gate.log().len();
    // The next commit stores the request whole: the worker dies right after it.
    shim.set(EioMode::KillAfterSync);
    stream.write_all(tail).expect("the last bytes");
    wait_new_worker(&gate, mark, "a SIGKILL right after storing the request");
    assert!(!shim.kill_pending(), "the shim did not kill");
    let next_batch = ids.take(10);
    let entries: Vec<u8> = next_batch.iter().flat_map(|&id| event(id, 40)).collect();
    stream
        .write_all(&legacy_request("lifecycle.next", &entries))
        .expect("the next request, to the next worker");
    drop(stream);
    let handed: HashSet<u64> = big.into_iter().chain(next_batch).collect();
    let duplicates = assert_all_arrived(&agg, &handed, "a stored request and the next one");
    assert_eq!(duplicates, 0, "the stored request arrived more than once");
    let skipped = gate.log_lines_with(&["were still in the socket: released, not read again"]);
    assert!(
        skipped.len() == 1 && skipped[0].contains(&format!("bytes={tail_len}")),
        "the next worker did not release the stored request's last bytes: {skipped:?}; log:\n{}",
        gate.log().dump()
    );
    gate.terminate_cleanly();
}

#[test]
fn on_a_kernel_without_peek_offsets_ackgate_says_so_and_an_upgrade_still_loses_nothing() {
    let shim = match old_kernel_shim() {
        Ok(shim) => shim,
        Err(reason) => {
            skip("old kernel shim", &reason);
            return;
        }
    };
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .product_upstream_timing()
        .env("LD_PRELOAD", &shim.to_string_lossy())
        .metrics()
        .start();
    let ready = gate.log_lines_with(&["ackgate ready"]);
    assert!(
        ready.iter().all(|l| l.contains("crash_safe_reading=false")),
        "{ready:?}"
    );
    assert!(
        !gate
            .log_lines_with(&["cannot peek TCP at an offset"])
            .is_empty(),
        "ackgate did not say what a crash can lose here; log:\n{}",
        gate.log().dump()
    );
    // Without peeking, connections park at a request boundary (what was read is stored).
    upgrade_under_load(&mut gate, &agg, |gate| {
        send_signal(gate.pid(), libc::SIGUSR2)
    });
    gate.terminate_cleanly();
}

/// Ten events of `ids`, as one request's entries.
fn events_of(ids: &Ids) -> (Vec<u64>, Vec<u8>) {
    let batch = ids.take(10);
    let entries = batch.iter().flat_map(|id| event(*id, 20)).collect();
    (batch, entries)
}

/// Whether a PONG accepted the PING (`["PONG", true, …]`).
fn pong_accepts(pong: &[u8]) -> bool {
    array_elements(pong).get(1).copied() == Some(&[0xc3][..])
}

#[test]
fn a_shared_key_handshake_goes_on_across_an_upgrade_and_a_crash_wherever_it_was() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section(
            "ingress",
            "[security]\nself_hostname = \"ackgate-lc\"\nshared_key = \"k3y\"",
        )
        .start();
    let ids = Ids::default();
    let mut handed = HashSet::new();
    let mut send = |stream: &mut TcpStream, chunk: u64| {
        let (batch, entries) = events_of(&ids);
        send_acked_on(stream, "lifecycle.secured", &entries, chunk, WAIT);
        handed.extend(batch);
    };
    // A: authenticated before the upgrade.
    let mut a = connect(gate.addr());
    client_handshake(&mut a, "sender-a", "k3y", WAIT);
    send(&mut a, 1);
    // B: has the HELO, has not answered it yet.
    let mut b = connect(gate.addr());
    let helo_b = parse_helo(&read_values(&mut b, 1, WAIT).remove(0));
    let mark = gate.log().len();
    send_signal(gate.pid(), libc::SIGUSR2);
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("upgrade complete"))
        .unwrap_or_else(|| panic!("no upgrade; log:\n{}", gate.log().dump()));
    // The new worker checks B's PING against the HELO the old one sent.
    b.write_all(&ping_for(&helo_b, "sender-b", "k3y"))
        .expect("PING");
    assert!(
        pong_accepts(&read_values(&mut b, 1, WAIT).remove(0)),
        "B's PING accepted after the upgrade"
    );
    send(&mut b, 2);
    send(&mut a, 3);
    // C: has the HELO when the worker is killed; answers the next one.
    let mut c = connect(gate.addr());
    let helo_c = parse_helo(&read_values(&mut c, 1, WAIT).remove(0));
    let mark = gate.log().len();
    send_signal(gate.worker_pid(), libc::SIGKILL);
    wait_new_worker(&gate, mark, "a SIGKILL");
    c.write_all(&ping_for(&helo_c, "sender-c", "k3y"))
        .expect("PING");
    assert!(
        pong_accepts(&read_values(&mut c, 1, WAIT).remove(0)),
        "C's PING accepted after the crash"
    );
    send(&mut c, 4);
    send(&mut a, 5);
    send(&mut b, 6);
    // Duplicates may come from the crash (deliveries whose deletes it lost), not loss.
    assert_all_arrived(&agg, &handed, "secured senders");
    gate.terminate_cleanly();
}

#[test]
fn a_json_connection_stays_json_across_an_upgrade() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder().node("agg", agg.addr()).start();
    let mut stream = connect(gate.addr());
    let line = |n: u32| format!("[\"lifecycle.json\",1700000000,{{\"n\":{n}}}]\n");
    stream
        .write_all(line(1).as_bytes())
        .expect("first JSON request");
    agg.wait_for_events(1, WAIT);
    let mark = gate.log().len();
    send_signal(gate.pid(), libc::SIGUSR2);
    gate.log()
        .wait_for_from(mark, WAIT, |l| l.contains("upgrade complete"))
        .unwrap_or_else(|| panic!("no upgrade; log:\n{}", gate.log().dump()));
    // After the newline that ended the last request, the next byte is `[`: without the
    // connection's state the new worker would still guess right, so send whitespace first,
    // which only a JSON decoder skips.
    stream
        .write_all(format!(" {}", line(2)).as_bytes())
        .expect("second JSON request");
    agg.wait_for_events(2, WAIT);
    let rejected = gate.log_lines_with(&["invalid request"]);
    assert!(rejected.is_empty(), "{rejected:?}");
    gate.terminate_cleanly();
}
