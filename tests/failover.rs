//! Several upstream nodes (fluentd out_forward's `<server>` weight / standby and heartbeats,
//! PROTOCOL.md §8, §10).
//!
//! Two primaries weighted 60 and 20 share 10 000 events 75 % / 25 % (±5 points); a standby
//! gets nothing while a primary is up. With both primaries stopped their nodes are marked
//! unavailable and the standby takes the traffic; once a primary is back, new events go to it
//! and the standby gets none of them. With `heartbeat_type = "udp"` against another ackgate
//! (which answers UDP heartbeats), a killed node is detached by `hard_timeout` and recovers by
//! heartbeats when it comes back on the same port, and what was spooled meanwhile is delivered.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::*;

const WAIT: Duration = Duration::from_secs(20);

/// Primaries weighted 60 and 20 and a standby, waking one signal, and ackgate in front of them.
fn weighted_nodes() -> (Arc<RequestSignal>, [Aggregator; 3], Ackgate) {
    let signal = RequestSignal::new();
    let aggs = [(); 3].map(|_| Aggregator::builder().signalling(&signal).start());
    let nodes = format!(
        "heartbeat_type = \"none\"\n{}{}{}",
        node_toml("p60", aggs[0].addr(), "weight = 60"),
        node_toml("p20", aggs[1].addr(), "weight = 20"),
        node_toml("standby", aggs[2].addr(), "weight = 60\nstandby = true"),
    );
    let gate = Ackgate::builder().section("upstream", &nodes).start();
    (signal, aggs, gate)
}

/// `n` acked one-event requests on one connection; returns the events.
fn send_events(gate: &Ackgate, tag: &str, n: u64) -> Vec<Vec<u8>> {
    let mut stream = connect(gate.addr());
    (0..n)
        .map(|i| {
            let event = entry_int(TS, &unique_record(tag));
            send_acked_on(&mut stream, tag, &event, i, WAIT);
            event
        })
        .collect()
}

fn contains_all(have: &[Vec<u8>], want: &[Vec<u8>]) -> bool {
    want.iter().all(|w| have.contains(w))
}

fn count_of(have: &[Vec<u8>], want: &[Vec<u8>]) -> usize {
    want.iter().filter(|w| have.contains(w)).count()
}

#[test]
fn weights_share_the_events_and_the_standby_stays_idle() {
    let (signal, [p60, p20, standby], gate) = weighted_nodes();

    // 10 000 events in 1 000 small requests: 4 senders, each waiting for its acks, so every
    // request is its own record (a record is what the balancer hands out).
    const SENDERS: u64 = 4;
    const REQUESTS: u64 = 250;
    const PER_REQUEST: u64 = 10;
    let addr = gate.addr();
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            std::thread::spawn(move || {
                let tag = format!("failover.w{s}");
                let mut stream = connect(addr);
                for i in 0..REQUESTS {
                    let entries = unique_entries(&tag, PER_REQUEST);
                    send_acked_on(&mut stream, &tag, &entries.concat(), i, WAIT);
                }
            })
        })
        .collect();
    for s in senders {
        s.join().expect("sender panicked");
    }
    let total = (SENDERS * REQUESTS * PER_REQUEST) as usize;
    signal.wait_until(
        "every event at a primary",
        WAIT,
        || p60.event_count() + p20.event_count() >= total,
        || format!("p60 {} p20 {}", p60.event_count(), p20.event_count()),
    );
    let (a, b) = (p60.event_count(), p20.event_count());
    let share = a as f64 / (a + b) as f64;
    eprintln!("p60 got {a}, p20 got {b}: share {share:.3}");
    assert_eq!(a + b, total, "no duplicates with acking aggregators");
    assert!(
        (0.70..=0.80).contains(&share),
        "weights 60:20 must give 75 % ± 5 points to p60; got {:.1} % ({a} / {b})",
        share * 100.0
    );
    assert_eq!(
        standby.requests().len(),
        0,
        "the standby got records while primaries were up"
    );
    assert_eq!(
        standby.connections(),
        0,
        "the standby was even connected to"
    );
}

#[test]
fn standby_takes_over_while_every_primary_is_down_and_hands_back() {
    let (signal, [mut p60, mut p20, standby], gate) = weighted_nodes();
    fn everywhere(aggs: [&Aggregator; 3]) -> Vec<Vec<u8>> {
        aggs.iter().flat_map(|a| a.events()).collect()
    }

    let before = send_events(&gate, "failover.before", 20);
    signal.wait_until(
        "phase 1 at the primaries",
        WAIT,
        || {
            let mut primaries = p60.events();
            primaries.extend(p20.events());
            contains_all(&primaries, &before)
        },
        || format!("p60 {} p20 {}", p60.event_count(), p20.event_count()),
    );
    assert_eq!(
        standby.event_count(),
        0,
        "standby used while primaries were up"
    );

    let mark = gate.log_mark();
    p60.stop();
    p20.stop();
    let during = send_events(&gate, "failover.during", 20);
    signal.wait_until(
        "phase 2 at the standby",
        WAIT,
        || contains_all(&standby.events(), &during),
        || format!("standby has {} of 20", count_of(&standby.events(), &during)),
    );
    for node in ["node=p60", "node=p20"] {
        gate.wait_for_log_since(mark, &["upstream node marked unavailable", node], WAIT);
    }

    // p60 comes back. Without heartbeats it is tried when there is work: probe until it is
    // available again (each probe is delivered somewhere before the next is sent).
    let mark = gate.log_mark();
    p60.restart();
    let back = Instant::now() + WAIT;
    let mut probes = 0;
    while gate
        .log()
        .wait_for_from(mark, Duration::ZERO, |l| {
            l.contains("upstream node available again") && l.contains("node=p60")
        })
        .is_none()
    {
        assert!(
            Instant::now() < back,
            "p60 not used again after {probes} probes"
        );
        let probe = send_events(&gate, "failover.probe", 1);
        signal.wait_until(
            "a probe delivered",
            WAIT,
            || contains_all(&everywhere([&p60, &p20, &standby]), &probe),
            || "probe lost".into(),
        );
        probes += 1;
    }
    eprintln!("p60 available again after {probes} probe(s)");

    let after = send_events(&gate, "failover.after", 20);
    signal.wait_until(
        "phase 3 at p60",
        WAIT,
        || contains_all(&p60.events(), &after),
        || {
            format!(
                "p60 has {}, standby has {} of 20",
                count_of(&p60.events(), &after),
                count_of(&standby.events(), &after)
            )
        },
    );
    assert_eq!(
        count_of(&standby.events(), &after),
        0,
        "the standby got new events although a primary was back"
    );
}

#[test]
fn udp_heartbeats_detach_a_dead_node_and_recover_it_on_the_same_port() {
    let agg = Aggregator::start();
    let mut a = Ackgate::start(agg.addr());
    // Port 0 gave A a free port; pin it, so that A comes back on the same one.
    let port_a = a.addr().port();
    a.edit_config(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port_a}\""),
    );
    let hard_timeout = Duration::from_secs(2);
    let b = Ackgate::builder()
        .section(
            "upstream",
            &format!(
                "heartbeat_type = \"udp\"\nheartbeat_interval = \"200ms\"\nrecover_wait = \"1s\"\nhard_timeout = \"2s\"\n{}",
                node_toml("relay-a", a.addr(), "")
            ),
        )
        .metrics()
        .start();

    let first = send_events(&b, "failover.udp.before", 3);
    agg.wait_for_all(&first, WAIT);
    // A forwards before B has read A's acks: wait until B has, so that killing A leaves B
    // nothing in flight and only the heartbeats can tell that A is gone.
    wait_metric(
        metrics_addr(&b),
        "ackgate_events_out_total{node=\"relay-a\"}",
        WAIT,
        |v| v == Some(3.0),
    );

    let mark = b.log_mark();
    let killed = Instant::now();
    a.kill9();
    // A's TCP port stays reserved while A is down (connects are refused all the same), so
    // that A gets it back. Its UDP port (heartbeats) cannot be held that way: ackgate's UDP
    // socket does not share a port, so that one is rebound by A's restart as it is.
    let held = ReservedPort::hold(a.addr());
    b.wait_for_log_since(
        mark,
        &[
            "upstream node detached by its failure detector",
            "node=relay-a",
        ],
        WAIT,
    );
    let detached = killed.elapsed();
    eprintln!("detached {detached:?} after the kill");
    assert!(
        detached <= hard_timeout + Duration::from_millis(1500),
        "a silent node must be detached about hard_timeout ({hard_timeout:?}) after its last reply; took {detached:?}"
    );

    // Accepted and spooled by B while A is down.
    let during = send_events(&b, "failover.udp.during", 3);

    let mark = b.log_mark();
    a.restart();
    drop(held);
    assert_eq!(a.addr().port(), port_a, "A back on the same port");
    b.wait_for_log_since(
        mark,
        &["upstream node recovered (heartbeats)", "node=relay-a"],
        WAIT,
    );
    agg.wait_for_all(&during, WAIT);
    assert_same_event_set(
        &[first, during].concat(),
        &agg.events(),
        "before and during the outage",
    );
}

/// fluentd's own behaviour is one chunk in flight (`window = 1`): a lone node must go on
/// taking records one at a time. A rounding error in the weighted share once stopped it after
/// the fifth record.
#[test]
fn a_lone_node_with_a_window_of_one_delivers_everything() {
    let agg = Aggregator::start();
    let mut gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("upstream", "window = 1")
        .start();
    let events = send_events(&gate, "window.one", 40);
    agg.wait_for_all(&events, WAIT);
    gate.terminate_cleanly();
}
