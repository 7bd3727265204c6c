//! `ingress.allow`: only senders from the listed networks are served. A refused connection is
//! closed at once, gets no ack, stores nothing, and is logged with its peer address.

mod support;

use std::io::Write;
use std::time::Duration;

use support::*;

const WAIT: Duration = Duration::from_secs(15);

fn gate_allowing(agg: &Aggregator, allow: &str) -> Ackgate {
    Ackgate::builder()
        .node("agg", agg.addr())
        .section("ingress", &format!("allow = {allow}"))
        .metrics()
        .start()
}

#[test]
fn sender_outside_the_allowed_networks_is_refused_and_logged() {
    let agg = Aggregator::start();
    let gate = gate_allowing(&agg, r#"["10.0.0.0/8"]"#);
    // The reset can beat connect() itself (the handshake completes in the kernel, ackgate
    // accepts and resets before the client's poll sees it): that is a refusal too.
    let local = match std::net::TcpStream::connect_timeout(&gate.addr(), WAIT) {
        Ok(mut stream) => {
            let local = stream.local_addr().expect("local addr");
            let entries = entry_int(TS, &unique_record("not-allowed"));
            // The write may already fail if the reset came first; either way there is no ack.
            let _ = stream.write_all(&ack_request("allow.refused", &entries, &v012_chunk_id(1)));
            let answer = expect_closed(&mut stream, WAIT);
            assert!(
                answer.is_empty(),
                "a refused sender got an answer: {}",
                hex(&answer)
            );
            Some(local)
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => None,
        Err(e) => panic!("connect to {}: {e}", gate.addr()),
    };
    let peer = local.map(|l| format!("peer={l}"));
    let mut needles = vec!["source address not in ingress.allow"];
    needles.extend(peer.as_deref());
    let line = gate.wait_for_log_since(0, &needles, WAIT);
    assert!(line.contains("WARN"), "not a warning: {line}");
    let (_, text) = http(metrics_addr(&gate), "GET", "/metrics");
    assert_eq!(
        metric_exact(
            &text,
            "ackgate_rejected_connections_total{reason=\"not_allowed\"}"
        ),
        Some(1.0),
        "counted as refused"
    );
    assert_eq!(
        metric_exact(&text, "ackgate_events_in_total"),
        Some(0.0),
        "nothing received"
    );
    assert_eq!(
        metric_exact(&text, "ackgate_spool_records"),
        Some(0.0),
        "nothing spooled"
    );
    assert_eq!(agg.event_count(), 0, "nothing delivered");
}

#[test]
fn sender_inside_an_allowed_network_is_served() {
    let agg = Aggregator::start();
    let gate = gate_allowing(&agg, r#"["127.0.0.1/32"]"#);
    let entries = entry_int(TS, &unique_record("allowed"));
    send_acked(gate.addr(), "allow.ok", &entries, 2, WAIT);
    agg.wait_for_all(std::slice::from_ref(&entries), WAIT);
    assert_same_events(&[entries], &agg.events(), "allowed sender");
    assert!(
        gate.log_lines_with(&["ingress.allow"]).is_empty(),
        "an allowed sender was logged as refused"
    );
}
