//! Sender retransmits (PROTOCOL.md §13.3, §13.5; `ingress.recent_chunks_per_peer`).
//!
//! A sender that lost an ack resends the same request with the same chunk id on a new
//! connection. ackgate acks it again without spooling a second copy, so the aggregator gets the
//! events once, and `ackgate_retransmits_total` counts it. Chunk ids alone are not unique
//! (fluent-bit ids are content hashes), so the same id with different content is a new request:
//! spooled and delivered.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(15);

/// One request on a fresh connection; asserts the ack.
fn send(gate: &Ackgate, request: &[u8], chunk: &str) {
    let mut stream = connect(gate.addr());
    stream.write_all(request).expect("write");
    assert_eq!(
        hex(&read_one_ack(&mut stream, WAIT)),
        hex(&expected_ack(chunk)),
        "ack for chunk {chunk:?}"
    );
}

/// A request sent after the ones under test; once it arrived, everything committed before it
/// has been sent too (records go upstream in key order).
fn send_sentinel(gate: &Ackgate, agg: &Aggregator) {
    let entries = entry_int(TS, &unique_record("sentinel"));
    let chunk = v012_chunk_id(999);
    send(
        gate,
        &ack_request("retransmit.sentinel", &entries, &chunk),
        &chunk,
    );
    agg.wait_for_all(&[entries], WAIT);
}

fn count(events: &[Vec<u8>], event: &[u8]) -> usize {
    events.iter().filter(|e| e.as_slice() == event).count()
}

#[test]
fn identical_resend_is_acked_again_but_delivered_once() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder().node("agg", agg.addr()).metrics().start();
    let metrics = metrics_addr(&gate);

    let entries: Vec<Vec<u8>> = (0..3)
        .map(|_| entry_int(TS, &unique_record("resent")))
        .collect();
    let chunk = v012_chunk_id(1);
    let request = ack_request("retransmit.same", &entries.concat(), &chunk);
    send(&gate, &request, &chunk);
    // The sender "lost" that ack: same bytes, same id, new connection, same source IP.
    send(&gate, &request, &chunk);

    send_sentinel(&gate, &agg);
    let got = agg.events();
    for e in &entries {
        assert_eq!(count(&got, e), 1, "a retransmitted event must arrive once");
    }
    wait_metric(metrics, "ackgate_events_in_total", WAIT, |v| v == Some(4.0));
    // The counter moves just after the ack write returns, which can be after the sender read
    // it: wait for it rather than racing it.
    let text = wait_metric(metrics, "ackgate_acks_sent_total", WAIT, |v| v == Some(3.0));
    assert_eq!(
        metric_exact(&text, "ackgate_retransmits_total"),
        Some(1.0),
        "ackgate_retransmits_total must count the resend; metrics:\n{text}"
    );
    assert_eq!(
        metric_exact(&text, "ackgate_acks_sent_total"),
        Some(3.0),
        "three acks sent"
    );
}

#[test]
fn same_id_with_different_content_is_spooled_again() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    let chunk = v012_chunk_id(2);
    let first = entry_int(TS, &unique_record("first content"));
    let second = entry_int(TS, &unique_record("second content"));
    send(
        &gate,
        &ack_request("retransmit.reused", &first, &chunk),
        &chunk,
    );
    send(
        &gate,
        &ack_request("retransmit.reused", &second, &chunk),
        &chunk,
    );
    send_sentinel(&gate, &agg);
    let got = agg.events();
    assert_eq!(count(&got, &first), 1, "first content delivered");
    assert_eq!(
        count(&got, &second),
        1,
        "second content under the same id delivered too"
    );
}
