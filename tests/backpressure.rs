//! A full spool turns into TCP backpressure, never into loss (DESIGN.md invariant 5).
//!
//! The spool holds at most 64 KiB and the aggregator is down, so ackgate must stop reading
//! the sender's socket: the kernel buffers fill and the sender's `write_all` blocks. The total
//! sent is sized well above what the kernel can buffer on loopback (3× the sum of the
//! tcp_rmem and tcp_wmem maxima), so "blocked" cannot be faked by socket buffers. Once the
//! aggregator comes up the sender finishes and every event arrives exactly once, byte for
//! byte.

mod support;

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use support::*;

const FRAME_BYTES: usize = 8 * 1024;
const EVENTS_PER_FRAME: usize = 4;
const SPOOL_MAX: u64 = 64 * 1024;

/// Third field of a `/proc/sys/net/ipv4/tcp_[rw]mem` file: the autotuning maximum.
fn sysctl_max(path: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
        .unwrap_or(8 << 20)
}

/// The events of frame `i`: four ~2 KiB records, unique by (i, j), so the main thread can
/// rebuild what the sender thread sent.
fn frame_events(i: u64) -> Vec<Vec<u8>> {
    let filler = "x".repeat(FRAME_BYTES / EVENTS_PER_FRAME - 60);
    (0..EVENTS_PER_FRAME as u64)
        .map(|j| {
            let r = record(
                i * EVENTS_PER_FRAME as u64 + j,
                &format!("bp {i}/{j} {filler}"),
            );
            entry_int(TS + i as u32, &r)
        })
        .collect()
}

#[test]
fn full_spool_blocks_the_sender_and_loses_nothing() {
    let kernel_buffers =
        sysctl_max("/proc/sys/net/ipv4/tcp_rmem") + sysctl_max("/proc/sys/net/ipv4/tcp_wmem");
    let total = (3 * kernel_buffers).max(8 << 20) + (1 << 20);
    let frames = total / FRAME_BYTES as u64 + 1;
    eprintln!(
        "backpressure: kernel buffer maxima {kernel_buffers} B, sending {frames} frames of ~{FRAME_BYTES} B ({} MiB)",
        (frames * FRAME_BYTES as u64) >> 20
    );

    let node = ReservedPort::new();
    let mut gate = Ackgate::builder()
        .node("agg", node.addr())
        .section("ingress", "max_frame_bytes = \"16KiB\"")
        .section("spool", "max_bytes = \"64KiB\"")
        .section(
            "upstream",
            "retry_initial = \"50ms\"\nretry_max = \"200ms\"",
        )
        .start();

    let written = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = mpsc::channel();
    let sender = {
        let written = written.clone();
        let addr = gate.addr();
        std::thread::spawn(move || {
            let mut stream = connect(addr);
            stream
                .set_write_timeout(Some(Duration::from_secs(60)))
                .expect("write timeout");
            for i in 0..frames {
                let entries = frame_events(i).concat();
                stream
                    .write_all(&legacy_request("bp.load", &entries))
                    .unwrap_or_else(|e| panic!("sender write of frame {i} failed: {e}"));
                written.fetch_add(1, Ordering::Release);
            }
            drop(stream);
            let _ = done_tx.send(Instant::now());
        })
    };

    // The sender cannot finish while nothing drains the spool.
    match done_rx.recv_timeout(Duration::from_secs(3)) {
        Err(mpsc::RecvTimeoutError::Timeout) => {}
        other => panic!("the sender finished ({other:?}) although the spool was full"),
    }
    // And it is stuck, not merely slow: nothing more is accepted.
    let stalled_at = written.load(Ordering::Acquire);
    std::thread::sleep(Duration::from_secs(1));
    let still = written.load(Ordering::Acquire);
    assert_eq!(
        stalled_at, still,
        "ackgate kept reading ({stalled_at} -> {still} frames) with a full spool"
    );
    let accepted = still * FRAME_BYTES as u64;
    let bound = SPOOL_MAX + kernel_buffers + (2 << 20);
    assert!(
        accepted <= bound,
        "{accepted} bytes left the sender, more than spool + kernel buffers ({bound}): \
         ackgate is buffering or dropping beyond its spool limit"
    );
    assert!(gate.is_running(), "ackgate died under backpressure");
    let suspicious: Vec<String> = gate
        .log_lines_with(&[" WARN "])
        .into_iter()
        .chain(gate.log_lines_with(&[" ERROR "]))
        // The aggregator is down: upstream warnings are expected, nothing else is.
        .filter(|l| !l.contains("ackgate::upstream"))
        .collect();
    assert!(suspicious.is_empty(), "unexpected warnings: {suspicious:?}");

    // The aggregator comes up: the sender finishes and everything arrives exactly once.
    eprintln!("backpressure: {accepted} bytes accepted while blocked");
    let agg_started = Instant::now();
    let agg = Aggregator::start_on(node, Behaviour::Ack);
    let finished = done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the sender never finished after the aggregator came up");
    sender.join().expect("sender thread");
    let expected: Vec<Vec<u8>> = (0..frames).flat_map(frame_events).collect();
    eprintln!(
        "backpressure: sender finished {:?} after the aggregator started",
        finished - agg_started
    );
    // Counting is cheap; the byte comparison below proves they are the right events.
    agg.wait_for_events(expected.len(), Duration::from_secs(60));
    eprintln!(
        "backpressure: all arrived {:?} after the aggregator started",
        agg_started.elapsed()
    );
    let got = agg.events();
    assert_eq!(got.len(), expected.len(), "event count differs");
    assert_same_events(&expected, &got, "backpressure relay");
    eprintln!(
        "backpressure: drained in {:?} after the sender finished",
        finished.elapsed()
    );
    assert!(gate.is_running());
    let status = gate.terminate(Duration::from_secs(15));
    assert!(status.success(), "ackgate exited with {status}");
}
