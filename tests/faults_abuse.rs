//! Scenario 7 of FAULTS.md: connection abuse (DESIGN.md invariants 4, 5; STYLE.md "a limit is
//! a permit", "every await on a peer has a deadline").
//!
//! - Thousands of idle connections: good senders are still served at once, idle ones are closed
//!   at `idle_timeout`, memory stays bounded.
//! - More connections than `max_connections`: the cap holds (the rest wait in the kernel's
//!   backlog) and a good sender behind them is served within a bounded time.
//! - Half-written frames (slowloris): connections that stop mid-frame are closed at
//!   `idle_timeout`; connections at the cap that trickle one byte at a time must not lock good
//!   senders out for longer than a bounded time either.
//! - Hundreds of large requests started at once: they share one memory budget
//!   (`ingress.max_partial_bytes`), small good requests are served meanwhile.
//! - Frames over `max_frame_bytes`, declared or streamed: refused at once, logged with the
//!   peer, memory bounded by the limit, dead-lettered bytes bounded, good senders go on.
//!
//! Good senders' events are accounted for like everywhere else: acked ones must arrive.

mod support;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

fn gate_with(ingress: &str, agg: &Aggregator) -> (Ackgate, SocketAddr) {
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("ingress", ingress)
        .metrics()
        .start();
    let metrics = metrics_addr(&gate);
    (gate, metrics)
}

/// Wait (bounded) until every acked good event arrived; whether they did, and what arrived.
fn good_events_arrived(agg: &Aggregator, acked: &HashSet<u64>) -> (bool, SeenState) {
    let seen = agg.seen();
    let arrived = seen.wait(Duration::from_secs(20), |s| s.has_all(acked));
    (arrived, seen.snapshot())
}

/// `n` good requests of 5 events, one connection each; their latencies, and the acked ids.
fn good_sender(
    addr: SocketAddr,
    ids: &Ids,
    n: usize,
    wait: Duration,
) -> (Vec<Duration>, HashSet<u64>, Vec<String>) {
    let mut latencies = Vec::new();
    let mut acked = HashSet::new();
    let mut errors = Vec::new();
    for _ in 0..n {
        let batch = ids.take(5);
        match timed_request(addr, "abuse.good", &batch, wait) {
            Ok(d) => {
                latencies.push(d);
                acked.extend(batch);
            }
            Err(e) => errors.push(e),
        }
    }
    (latencies, acked, errors)
}

fn max_ms(latencies: &[Duration]) -> u128 {
    latencies.iter().map(|d| d.as_millis()).max().unwrap_or(0)
}

/// Open `n` connections to `addr` (the kernel completes them even while ackgate does not
/// accept: they wait in the backlog).
fn open_idle(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("idle connection {i}: {e}"))
        })
        .collect()
}

/// How many of `conns` the peer has closed, each given until `deadline`.
fn count_closed(conns: &mut [TcpStream], deadline: Instant) -> usize {
    let mut closed = 0;
    let mut buf = [0u8; 64];
    for c in conns.iter_mut() {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let _ = c.set_read_timeout(Some(left));
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => closed += 1,
        }
    }
    closed
}

#[test]
fn thousands_of_idle_connections_do_not_stop_good_senders() {
    let started = Instant::now();
    const IDLE: usize = 2000;
    let agg = Aggregator::start();
    let (gate, metrics) = gate_with("idle_timeout = \"4s\"", &agg);
    let ids = Ids::default();
    let rss_before = rss_kib(gate.pid()).unwrap_or(0);
    let mut idle = open_idle(gate.addr(), IDLE);
    let opened = Instant::now();
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 20, Duration::from_secs(5));
    let open_now = scrape_sum(metrics, "ackgate_connections_open").unwrap_or(-1.0);
    let rss_with = rss_kib(gate.pid()).unwrap_or(0);
    let fds_with = open_fds(gate.pid()).unwrap_or(0);
    // Idle connections are closed at idle_timeout (4 s), each observed by its EOF.
    let closed = count_closed(&mut idle, opened + Duration::from_secs(15));
    let rss_after = rss_kib(gate.pid()).unwrap_or(0);
    drop(idle);
    let (arrived, s) = good_events_arrived(&agg, &acked);
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "thousands_of_idle"),
        notes: format!(
            "good requests while {IDLE} idle: slowest ack {} ms; connections_open {open_now}; ackgate fds {fds_with}; \
             RSS {rss_before} KiB → {rss_with} KiB with them → {rss_after} KiB after; {closed}/{IDLE} closed by idle_timeout 4s",
            max_ms(&latencies)
        ),
        ..Row::acked_only(format!("7a {IDLE} idle connections"), 100, &acked, &s)
    }
    .save();
    assert!(errors.is_empty(), "good sender failed: {errors:?}");
    assert!(
        max_ms(&latencies) < 2000,
        "good requests slowed down: {latencies:?}"
    );
    assert_eq!(closed, IDLE, "idle connections left open past idle_timeout");
    assert!(arrived, "good events lost");
    // Memory: bounded per connection (a read buffer each), and given back after.
    let per_conn = rss_with.saturating_sub(rss_before) / IDLE as u64;
    assert!(
        per_conn <= 80,
        "{per_conn} KiB resident per idle connection"
    );
}

#[test]
fn connections_beyond_max_connections_wait_and_a_good_sender_gets_through() {
    let started = Instant::now();
    const CAP: usize = 64;
    const IDLE: usize = 300;
    let agg = Aggregator::start();
    let (gate, metrics) = gate_with(
        &format!("max_connections = {CAP}\nidle_timeout = \"2s\""),
        &agg,
    );
    let ids = Ids::default();
    let idle = open_idle(gate.addr(), IDLE);
    let open_peak = scrape_sum(metrics, "ackgate_connections_open").unwrap_or(-1.0);
    // Behind 300 idle connections: served once idle_timeout has cycled through them (bounded).
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 1, Duration::from_secs(30));
    let open_later = scrape_sum(metrics, "ackgate_connections_open").unwrap_or(-1.0);
    drop(idle);
    let (after, acked_after, errors_after) =
        good_sender(gate.addr(), &ids, 5, Duration::from_secs(10));
    let all: HashSet<u64> = acked.union(&acked_after).copied().collect();
    let (arrived, s) = good_events_arrived(&agg, &all);
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "connections_beyond"),
        notes: format!(
            "connections_open {open_peak} then {open_later} (cap {CAP}); good request behind them acked after {} ms \
             (idle_timeout 2s × {} waves); after they left: {} ms",
            max_ms(&latencies),
            IDLE.div_ceil(CAP),
            max_ms(&after)
        ),
        ..Row::acked_only(format!("7b {IDLE} connections over max_connections = {CAP}"), 30, &all, &s)
    }
    .save();
    assert!(
        open_peak <= CAP as f64 && open_later <= CAP as f64,
        "the connection cap did not hold"
    );
    assert!(
        errors.is_empty() && errors_after.is_empty(),
        "{errors:?} {errors_after:?}"
    );
    assert!(arrived, "good events lost");
}

/// A PackedForward request header declaring `len` bytes of entries, never completed.
fn half_frame(len: u32) -> Vec<u8> {
    let mut out = vec![0x93, 0xa1, b'x', 0xdb];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&event(0, 20));
    out
}

/// ackgate with `max_connections = cap` and `idle_timeout = "2s"`, and `cap` connections that
/// each wrote the header of a 1 MiB request and stopped.
fn half_frames_at_the_cap(cap: usize, agg: &Aggregator) -> (Ackgate, SocketAddr, Vec<TcpStream>) {
    let (gate, metrics) = gate_with(
        &format!("max_connections = {cap}\nidle_timeout = \"2s\""),
        agg,
    );
    let mut loris = open_idle(gate.addr(), cap);
    for c in &mut loris {
        c.write_all(&half_frame(1 << 20)).expect("half frame");
    }
    (gate, metrics, loris)
}

#[test]
fn half_written_frames_are_closed_at_idle_timeout() {
    let started = Instant::now();
    const CAP: usize = 64;
    let agg = Aggregator::start();
    let (gate, metrics, mut loris) = half_frames_at_the_cap(CAP, &agg);
    let ids = Ids::default();
    let opened = Instant::now();
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 3, Duration::from_secs(20));
    let closed = count_closed(&mut loris, opened + Duration::from_secs(10));
    // The log arrives through a pipe: wait (bounded) for one warning per connection.
    let counted = std::cell::Cell::new(0usize);
    gate.log().wait_for_from(0, Duration::from_secs(5), |l| {
        if l.contains("request incomplete after idle_timeout") && l.contains("peer=") {
            counted.set(counted.get() + 1);
        }
        counted.get() >= CAP
    });
    let warned = counted.get();
    let spooled = scrape_sum(metrics, "ackgate_events_in_total").unwrap_or(-1.0);
    let (arrived, s) = good_events_arrived(&agg, &acked);
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "half_written_frames"),
        notes: format!(
            "{closed}/{CAP} closed at idle_timeout 2s, {warned} WARN lines naming the peer; good request behind them acked after {} ms; \
             events committed {spooled} (none from the half frames)",
            max_ms(&latencies)
        ),
        ..Row::acked_only(format!("7c {CAP} half-written frames at max_connections = {CAP}"), 15, &acked, &s)
    }
    .save();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(closed, CAP, "half-written frames kept their connections");
    assert!(warned >= CAP, "the incomplete requests were not logged");
    assert_eq!(spooled, 15.0, "only the good events may be committed");
    assert!(arrived, "good events lost");
}

#[test]
fn slowloris_trickling_at_the_connection_cap_does_not_lock_out_good_senders() {
    let started = Instant::now();
    const CAP: usize = 32;
    const BOUND: Duration = Duration::from_secs(10);
    let agg = Aggregator::start();
    let (gate, _metrics, mut loris) = half_frames_at_the_cap(CAP, &agg);
    let ids = Ids::default();
    // One byte per connection every 500 ms: never idle for idle_timeout, never done.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let until = Instant::now() + Duration::from_secs(25);
            let mut bytes = 0usize;
            while !stop.load(Ordering::Acquire) && Instant::now() < until {
                for c in &mut loris {
                    if c.write_all(b"x").is_ok() {
                        bytes += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            let open = loris.len();
            drop(loris);
            (bytes, open)
        })
    };
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 1, BOUND);
    stop.store(true, Ordering::Release);
    let (trickled, _) = trickle.join().expect("trickle thread");
    let (after, acked_after, _) = good_sender(gate.addr(), &ids, 1, Duration::from_secs(10));
    let all: HashSet<u64> = acked.union(&acked_after).copied().collect();
    let (arrived, s) = good_events_arrived(&agg, &all);
    let scenario = format!(
        "7d slowloris: {CAP} connections trickling 1 B / 500 ms at max_connections = {CAP}"
    );
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "slowloris"),
        notes: format!(
            "good request while they trickle ({trickled} B sent): {} (bound {BOUND:?}); after they stopped: {} ms",
            match (&errors[..], latencies.first()) {
                ([], Some(d)) => format!("acked after {} ms", d.as_millis()),
                (e, _) => format!("NOT SERVED: {e:?}"),
            },
            max_ms(&after)
        ),
        ..Row::acked_only(scenario, 10, &all, &s)
    }
    .save();
    assert!(arrived, "good events lost");
    assert!(
        errors.is_empty(),
        "a good sender was locked out for {BOUND:?} by {CAP} connections trickling one byte every 500 ms \
         (idle_timeout 2s is re-armed by every read, and nothing bounds the time a request may take): {errors:?}"
    );
}

#[test]
fn frames_over_the_size_limit_are_refused_and_memory_stays_bounded() {
    let started = Instant::now();
    const LIMIT: usize = 256 * 1024;
    let agg = Aggregator::start();
    let (mut gate, _metrics) = gate_with("max_frame_bytes = \"256KiB\"", &agg);
    let ids = Ids::default();
    let rss_before = rss_kib(gate.pid()).unwrap_or(0);

    // A header declaring 100 MiB: refused before the bytes come.
    let mut declared = TcpStream::connect(gate.addr()).expect("connect");
    declared.write_all(&half_frame(100 << 20)).expect("write");
    let refused_declared = expect_closed(&mut declared, Duration::from_secs(5)).is_empty();

    // 16 connections streaming 8 MiB each of a frame without a declared total (a Forward-mode
    // array of many entries): each must be cut off near the limit.
    let streams: Vec<_> = (0..16)
        .map(|_| {
            let addr = gate.addr();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).expect("connect");
                let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
                let mut head = vec![0x92, 0xa1, b'x', 0xdd];
                head.extend_from_slice(&1_000_000u32.to_be_bytes());
                let mut written = 0usize;
                let mut ok = s.write_all(&head).is_ok();
                let body = event(1, 1000).repeat(64);
                while ok && written < 8 << 20 {
                    ok = s.write_all(&body).is_ok();
                    if ok {
                        written += body.len();
                    }
                }
                (written, ok)
            })
        })
        .collect();
    // Good senders meanwhile.
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 10, Duration::from_secs(10));
    let rss_peak = rss_kib(gate.pid()).unwrap_or(0);
    let results: Vec<(usize, bool)> = streams
        .into_iter()
        .map(|t| t.join().expect("stream"))
        .collect();
    let rss_after = rss_kib(gate.pid()).unwrap_or(0);
    let cut_off = results.iter().filter(|(_, ok)| !ok).count();
    let most_written = results.iter().map(|(w, _)| *w).max().unwrap_or(0);
    let counted = std::cell::Cell::new(0usize);
    gate.log().wait_for_from(0, Duration::from_secs(5), |l| {
        if l.contains("closing connection: invalid request") && l.contains("peer=") {
            counted.set(counted.get() + 1);
        }
        counted.get() >= 17
    });
    let refused_lines = counted.get();
    let (arrived, s) = good_events_arrived(&agg, &acked);
    let status = gate.terminate(Duration::from_secs(20));
    let dead = snapshot_spool(gate.spool_path())
        .map(|s| s.dead_letters)
        .unwrap_or_default();
    let largest_dead = dead.iter().map(|d| d.payload.len()).max().unwrap_or(0);
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "frames_over_the_size_limit"),
        notes: format!(
            "declared 100 MiB refused before any byte came back: {refused_declared}; streamed: {cut_off}/16 cut off, \
             at most {} KiB written by one (kernel buffers included); {refused_lines} WARN lines naming the peer; \
             RSS {rss_before} → {rss_peak} → {rss_after} KiB; {} rejected requests kept, largest {} KiB; good requests slowest {} ms",
            most_written / 1024,
            dead.len(),
            largest_dead / 1024,
            max_ms(&latencies)
        ),
        ..Row::acked_only("7e frames over max_frame_bytes = 256 KiB (declared 100 MiB; 16 × 8 MiB streamed)", 50, &acked, &s)
    }
    .save();
    assert!(
        refused_declared,
        "a frame declaring 100 MiB was not refused"
    );
    assert_eq!(
        cut_off, 16,
        "oversized streamed frames were read to the end: {results:?}"
    );
    assert!(refused_lines >= 17, "refusals not logged with the peer");
    assert!(errors.is_empty(), "{errors:?}");
    assert!(arrived, "good events lost");
    assert!(
        largest_dead <= 64 * 1024,
        "rejected bytes kept unbounded: {largest_dead}"
    );
    // 16 connections at a 256 KiB limit: a few MiB of buffers, not 16 × 8 MiB.
    let growth = rss_peak.saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024,
        "RSS grew {growth} KiB for 16 oversized frames of a 256 KiB limit"
    );
    assert!(status.success(), "ackgate exited with {status}");
    let _ = LIMIT;
}

/// Write to every connection without blocking, round robin, until `until`. Returns the bytes
/// ackgate (or the kernel on its behalf) took off each.
fn push_nonblocking(conns: &mut [TcpStream], per_conn: usize, until: Instant) -> Vec<usize> {
    let chunk = vec![b'x'; 64 << 10];
    let mut written = vec![0usize; conns.len()];
    let mut done = vec![false; conns.len()];
    for c in conns.iter() {
        c.set_nonblocking(true).expect("nonblocking");
    }
    while Instant::now() < until && done.iter().any(|d| !d) {
        let mut progress = false;
        for ((c, w), d) in conns
            .iter_mut()
            .zip(written.iter_mut())
            .zip(done.iter_mut())
        {
            if *d {
                continue;
            }
            match c.write(&chunk[..chunk.len().min(per_conn - *w)]) {
                Ok(n) => {
                    *w += n;
                    *d = *w >= per_conn;
                    progress |= n > 0;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Closed by ackgate: the request was refused, which this test must not see.
                Err(_) => *d = true,
            }
        }
        if !progress {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    written
}

/// 7f: hundreds of connections each declare a 15 MiB request and stream megabytes of it.
/// Without a global bound ackgate would hold every byte it read of each (hundreds of MiB);
/// with `ingress.max_partial_bytes` it reads at most that much in all, leaves the rest in the
/// kernel (backpressure), still serves small good requests at once, and frees everything when
/// the unfinished requests are cut at `idle_timeout`.
#[test]
fn declared_large_requests_share_one_memory_budget() {
    let started = Instant::now();
    const CONNS: usize = 200;
    const PUSH: usize = 2 << 20;
    let agg = Aggregator::start();
    let (gate, metrics) = gate_with("max_partial_bytes = \"32MiB\"\nidle_timeout = \"4s\"", &agg);
    let ids = Ids::default();
    let rss_before = rss_kib(gate.pid()).unwrap_or(0);
    let mut hostile = open_idle(gate.addr(), CONNS);
    for c in &mut hostile {
        // Under max_frame_bytes (16 MiB), so ackgate must wait for the rest.
        c.write_all(&half_frame(15 << 20)).expect("header");
    }
    let pushed = push_nonblocking(&mut hostile, PUSH, Instant::now() + Duration::from_secs(2));
    let pushed_total: usize = pushed.iter().sum();
    let refused = gate
        .log_lines_with(&["closing connection: invalid request"])
        .len();
    let (latencies, acked, errors) = good_sender(gate.addr(), &ids, 3, Duration::from_secs(10));
    let peak = peak_rss_kib(gate.pid()).unwrap_or(u64::MAX);
    for c in &hostile {
        let _ = c.set_nonblocking(false);
    }
    let closed = count_closed(&mut hostile, Instant::now() + Duration::from_secs(15));
    drop(hostile);
    // Once they are gone, a large honest request still gets through (the budget came back).
    let big = ids.take(2000);
    let big_acked = timed_request(gate.addr(), "abuse.big", &big, Duration::from_secs(20));
    let mut expected = acked.clone();
    if big_acked.is_ok() {
        expected.extend(big.iter().copied());
    }
    let (arrived, s) = good_events_arrived(&agg, &expected);
    let spooled = scrape_sum(metrics, "ackgate_events_in_total").unwrap_or(-1.0);
    let scenario =
        format!("7f {CONNS} connections declaring 15 MiB requests, max_partial_bytes = 32 MiB");
    Row {
        seconds: started.elapsed().as_secs_f64(),
        command: rerun_command("faults_abuse", "declared_large_requests"),
        notes: format!(
            "{} MiB pushed by the hostile senders in 2 s; ackgate RSS {} MiB before, peak {} MiB; good requests acked after at most {} ms; \
             {closed}/{CONNS} cut at idle_timeout; a 2000-event request afterwards acked: {}",
            pushed_total >> 20,
            rss_before >> 10,
            peak >> 10,
            max_ms(&latencies),
            big_acked.is_ok()
        ),
        ..Row::acked_only(scenario, 15 + big.len(), &expected, &s)
    }
    .save();
    assert_eq!(
        refused, 0,
        "the hostile requests are valid so far and must not be refused"
    );
    assert!(
        errors.is_empty(),
        "good senders were not served: {errors:?}"
    );
    assert!(
        pushed_total > 64 << 20,
        "the hostile senders pushed only {} MiB: the test does not load ackgate",
        pushed_total >> 20
    );
    // 32 MiB of budget + 16 KiB per connection + the spool's cache and the process itself.
    assert!(
        peak < rss_before + (96 << 10),
        "ackgate held {} MiB at peak ({} MiB before) for {} MiB of unfinished requests",
        peak >> 10,
        rss_before >> 10,
        pushed_total >> 20
    );
    assert_eq!(closed, CONNS, "unfinished requests kept their connections");
    assert!(
        big_acked.is_ok(),
        "a large request after the attack: {big_acked:?}"
    );
    assert!(arrived, "good events lost");
    assert_eq!(
        spooled,
        expected.len() as f64,
        "only the good events may be committed"
    );
}
