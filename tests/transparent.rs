//! Transparent mode (README "Transparent mode"): senders keep their config, pointing at the
//! aggregator's address; an iptables nat `REDIRECT` rule on their host sends their Forward
//! connections and UDP heartbeats to ackgate instead, and ackgate forwards to the aggregator.
//!
//! The real binary, a real aggregator (`ackgate receive`) in a network namespace the test
//! creates and deletes, real iptables rules in this host's nat OUTPUT chain that match only
//! that namespace's address (and are deleted on drop). Each test checks:
//! - `same_host_…`: a legacy v0.10 sender (no ack) and an acking sender, both addressing the
//!   aggregator, reach it through ackgate exactly once and intact (the receiver counts only
//!   events whose time and fields are as built); the acking sender's ack comes from
//!   ackgate after the commit (the aggregator is down when it is asked: killed once everything
//!   before was acked, so no chunk of it can come twice); UDP heartbeats to the
//!   aggregator's address are answered from that address by ackgate listening on 0.0.0.0
//!   (IP_PKTINFO); a destination outside `ingress.allow_destinations` is refused with the peer
//!   and the destination logged; the per-destination metrics count it all; `ackgate check`
//!   finds nothing to say about the rules;
//! - `without_the_mark_…`: with a rule that does not exclude ackgate's own traffic, ackgate's
//!   upstream connection and UDP heartbeat come back into it and are refused as a loop, loudly;
//!   nothing is lost, and once the rule is gone everything arrives once; `ackgate check` names
//!   the rule;
//! - `gateway_…`: sender host → gateway (ackgate on a dual-stack `[::]` listener, PREROUTING
//!   REDIRECT) → aggregator host, three namespaces: a legacy sender's heartbeat is answered from the aggregator's address, ackgate
//!   sees each connection's original destination, and with the seed's blackhole in front of the
//!   aggregator (SYN passes, data dropped) until a random moment 3–6 s in, at the product's
//!   timing, every event arrives exactly once;
//! - `three_sender_hosts_…`: a deployment, five namespaces around a router: three sender hosts,
//!   each with its own ackgate, spool and same-host rule, in front of two aggregators weighted
//!   60/40; the one every sender addresses is SIGKILLed under load at a random moment and
//!   comes back 2 s later: nothing is lost (a chunk it wrote out but did not ack may come
//!   twice; the count is printed);
//! - `route_original_sends_…`: `upstream.route = "original"`, no `[[upstream.nodes]]`: two
//!   sender hosts each reach the aggregator they addressed, and the seed's blackhole on one
//!   path holds back only that path's events;
//! - `route_original_finds_…`: records queued for a dead aggregator, kill -9, a record damaged
//!   in the file, restart: the records find their node from the spool alone, the damaged one
//!   becomes a dead letter, and nothing is reported queued once the spool is empty.
//!
//! Needs root, `ip` and `iptables`; elsewhere it skips with the reason on stderr, and under
//! `CI` it fails with it.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use support::*;

/// The aggregator's port inside its namespace, and what the senders address.
const AGG_PORT: u16 = 24224;
/// A port of the aggregator's address that the rules also redirect but that
/// `ingress.allow_destinations` does not allow.
const OTHER_PORT: u16 = 24225;
const MARK: u32 = 0x2a;
const EVENTS_PER_REQUEST: usize = 100;

/// One iptables (or, for IPv6, ip6tables) nat OUTPUT rule in this host's namespace, deleted on
/// drop.
struct NatRule {
    tool: &'static str,
    spec: Vec<String>,
}

impl NatRule {
    /// `-t nat -A OUTPUT -p PROTO -d ADDR --dport PORT [mark exclusion] -j REDIRECT --to-ports TO`.
    fn redirect(
        proto: &str,
        to: SocketAddr,
        from_port: u16,
        redirect_port: u16,
        exclude_mark: bool,
    ) -> NatRule {
        let mut spec: Vec<String> = ["-p", proto, "-d"].iter().map(|s| s.to_string()).collect();
        let (tool, host_prefix) = if to.is_ipv6() {
            ("ip6tables", 128)
        } else {
            ("iptables", 32)
        };
        spec.push(format!("{}/{host_prefix}", to.ip()));
        spec.extend(["--dport".to_string(), from_port.to_string()]);
        if exclude_mark {
            spec.extend(["-m", "mark", "!", "--mark"].iter().map(|s| s.to_string()));
            spec.push(format!("0x{MARK:x}"));
        }
        spec.extend(
            ["-j", "REDIRECT", "--to-ports"]
                .iter()
                .map(|s| s.to_string()),
        );
        spec.push(redirect_port.to_string());
        let rule = NatRule { tool, spec };
        rule.run("-A").unwrap_or_else(|e| panic!("{tool} -A: {e}"));
        rule
    }

    fn run(&self, action: &str) -> Result<(), String> {
        let mut cmd = vec![self.tool, "-t", "nat", action, "OUTPUT"];
        cmd.extend(self.spec.iter().map(String::as_str));
        run_command(&cmd)
    }
}

impl Drop for NatRule {
    fn drop(&mut self) {
        let _ = self.run("-D");
    }
}

/// The aggregator in its namespace, ackgate on 0.0.0.0 in transparent mode, and the rules.
struct Setup {
    _ns: Netns,
    agg: SocketAddr,
    receiver: ReceiveProc,
    seen: Arc<Seen>,
    gate: Ackgate,
    admin: SocketAddr,
    rules: Vec<NatRule>,
}

/// IPv4 (ackgate on 0.0.0.0) or IPv6 (the veth pair also gets IPv6 addresses; ackgate on [::]).
#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V6,
}

fn setup(family: Family, exclude_mark: bool, upstream_keys: &str) -> Setup {
    let ns = Netns::create().unwrap_or_else(|e| panic!("cannot create the namespace: {e}"));
    let (agg_ip, any): (std::net::IpAddr, &str) = match family {
        Family::V4 => (ns.ns_addr.into(), "0.0.0.0"),
        Family::V6 => {
            let (_, ns_v6) = ns
                .add_ipv6()
                .unwrap_or_else(|e| panic!("cannot add IPv6 addresses: {e}"));
            (ns_v6.into(), "[::]")
        }
    };
    let agg = SocketAddr::new(agg_ip, AGG_PORT);
    let seen = Seen::new();
    let receiver = ReceiveProc::start(agg, Some(&ns.name), &[], seen.clone());
    let (gate, admin) = start_with_admin(
        Ackgate::builder()
            .node("agg", agg)
            .section(
                "ingress",
                &format!(
                    "listen = \"{any}:0\"\ntransparent = \"redirect\"\nallow_destinations = [\"{agg}\"]"
                ),
            )
            .section("upstream", upstream_keys),
    );
    let port = gate.addr().port();
    // `ackgate check` reads the port from the config, as an operator's would name it.
    gate.edit_config(
        &format!("listen = \"{any}:0\""),
        &format!("listen = \"{any}:{port}\""),
    );
    let rules = vec![
        NatRule::redirect("tcp", agg, AGG_PORT, port, exclude_mark),
        NatRule::redirect("udp", agg, AGG_PORT, port, exclude_mark),
        NatRule::redirect("tcp", agg, OTHER_PORT, port, exclude_mark),
    ];
    Setup {
        _ns: ns,
        agg,
        receiver,
        seen,
        gate,
        admin,
        rules,
    }
}

fn entries_of(ids: &[u64]) -> Vec<u8> {
    ids.iter().flat_map(|&id| event(id, 60)).collect()
}

/// fluentd v0.10: one connection per request, written and closed, no ack.
fn legacy_send(to: SocketAddr, ids: &[u64]) {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
    stream
        .write_all(&legacy_request("legacy.app", &entries_of(ids)))
        .expect("write");
}

/// One acked request; the ack bytes as read.
fn acked_send(to: SocketAddr, ids: &[u64]) -> (Vec<u8>, Vec<u8>) {
    let chunk = random_chunk_id();
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
    stream
        .write_all(&ack_request("acking.app", &entries_of(ids), &chunk))
        .expect("write");
    (
        read_one_ack(&mut stream, Duration::from_secs(10)),
        expected_ack(&chunk),
    )
}

/// A heartbeat from a fresh socket of `to`'s family, answered within 2 s from `to` itself.
fn heartbeat_answered_by(to: SocketAddr) -> bool {
    let any: SocketAddr = if to.is_ipv6() {
        "[::]:0".parse().expect("addr")
    } else {
        "0.0.0.0:0".parse().expect("addr")
    };
    let socket = UdpSocket::bind(any).expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    heartbeat_answered(&socket, to)
}

#[test]
fn same_host_redirect_delivers_legacy_and_acking_senders_and_answers_heartbeats() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    let mut s = setup(Family::V4, true, &format!("socket_mark = {MARK}"));
    let ids = Ids::default();

    // A legacy sender that thinks it talks to the aggregator.
    let legacy: Vec<u64> = ids.take(EVENTS_PER_REQUEST * 5);
    for chunk in legacy.chunks(EVENTS_PER_REQUEST) {
        legacy_send(s.agg, chunk);
    }
    // Delivered and acked (the spool empty), so that killing the aggregator cannot catch a
    // chunk it wrote out but did not ack (that one would come again: a duplicate, not a loss).
    let legacy_set: HashSet<u64> = legacy.iter().copied().collect();
    assert!(
        s.seen
            .wait(Duration::from_secs(30), |seen| seen.has_all(&legacy_set)),
        "the legacy sender's events did not reach the aggregator"
    );
    wait_metric(
        s.admin,
        "ackgate_spool_records",
        Duration::from_secs(30),
        |v| v == Some(0.0),
    );
    // An acking sender, with the aggregator down: the ack can only be ackgate's, after its
    // commit.
    s.receiver.kill9();
    let acked = ids.take(EVENTS_PER_REQUEST);
    let (ack, want) = acked_send(s.agg, &acked);
    assert_eq!(
        ack, want,
        "the acking sender got no ack (or a wrong one) while the aggregator was down"
    );
    assert!(
        heartbeat_answered_by(s.agg),
        "a UDP heartbeat to the aggregator's address got no reply from that address"
    );
    // Committed, not deliverable: queued for its destination.
    let queued_key = format!(
        "ackgate_destination_queued_records{{destination=\"{}\"}}",
        s.agg
    );
    let text = http(s.admin, "GET", "/metrics").1;
    assert_eq!(metric_exact(&text, &queued_key), Some(1.0), "{queued_key}");
    s.receiver.restart();

    let all: HashSet<u64> = legacy.iter().chain(&acked).copied().collect();
    assert!(
        s.seen
            .wait(Duration::from_secs(30), |seen| seen.has_all(&all)),
        "not every event reached the aggregator: missing {}; log:\n{}",
        s.seen.with(|seen| first(&seen.missing(&all), 10)),
        s.gate.log().dump()
    );

    // A destination the allow-list does not name is refused, with peer and destination logged.
    let other = SocketAddr::new(s.agg.ip(), OTHER_PORT);
    // The reset may reach the connect itself.
    if let Ok(mut refused) = TcpStream::connect_timeout(&other, Duration::from_secs(5)) {
        let _ = refused.write_all(&legacy_request("other", &entries_of(&ids.take(1))));
        expect_closed(&mut refused, Duration::from_secs(5));
    }
    let line = s.gate.wait_for_log(
        "original destination not in ingress.allow_destinations",
        Duration::from_secs(5),
    );
    assert!(
        line.contains(&format!("destination={other}")) && line.contains("peer="),
        "{line}"
    );

    let key = format!(
        "ackgate_destination_events_in_total{{destination=\"{}\"}}",
        s.agg
    );
    let text = wait_metric(s.admin, &key, Duration::from_secs(5), |v| {
        v.is_some_and(|v| v >= all.len() as f64)
    });
    assert_eq!(metric_exact(&text, &key), Some(all.len() as f64), "{key}");
    let connections_key = format!(
        "ackgate_destination_connections_total{{destination=\"{}\"}}",
        s.agg
    );
    assert_eq!(
        metric_exact(&text, &connections_key),
        Some(6.0),
        "{connections_key}"
    );
    let delivered_key = format!(
        "ackgate_destination_events_out_total{{destination=\"{}\"}}",
        s.agg
    );
    let text = wait_metric(s.admin, &queued_key, Duration::from_secs(10), |v| {
        v == Some(0.0)
    });
    assert_eq!(
        metric_exact(&text, &delivered_key),
        Some(all.len() as f64),
        "{delivered_key}"
    );
    assert!(
        s.gate.log_lines_with(&["loop"]).is_empty(),
        "a loop was reported although the rule excludes ackgate's mark"
    );

    let check = config_cmd("check", s.gate.config_path(), &[]);
    let warnings = String::from_utf8_lossy(&check.stderr);
    assert!(
        check.status.success() && !warnings.contains("REDIRECT"),
        "{warnings}"
    );
    let status = config_cmd("status", s.gate.config_path(), &[]);
    let status = String::from_utf8_lossy(&status.stdout);
    let line = format!(
        "redirected to {}: 6 connection(s), {n} events in, {n} delivered, 0 B queued (0 records)",
        s.agg,
        n = all.len()
    );
    assert!(
        status.contains(&line),
        "`ackgate status` lacks {line:?}:\n{status}"
    );

    // Exactly once: settle on the spool being empty, then count.
    s.gate.terminate_cleanly();
    s.seen.with(|seen| {
        assert_eq!(seen.duplicated_of(&all), 0, "events delivered twice");
    });
    drop(s.rules);
}

#[test]
fn without_the_mark_exclusion_ackgates_own_traffic_is_refused_as_a_loop_and_nothing_is_lost() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    let mut s = setup(
        Family::V4,
        false,
        "heartbeat_type = \"udp\"\nheartbeat_interval = \"200ms\"",
    );
    // conntrack redirects only new flows: heartbeats sent before the rules existed made a flow
    // straight to the aggregator, which every later heartbeat from that socket keeps alive.
    // A restart (same port, pinned in the config by `setup`) sends from a new socket.
    s.gate.terminate_cleanly();
    s.gate.restart();
    let ids = Ids::default();
    let sent = ids.take(EVENTS_PER_REQUEST * 3);
    for chunk in sent.chunks(EVENTS_PER_REQUEST) {
        legacy_send(s.agg, chunk);
    }
    let tcp_loop = s
        .gate
        .wait_for_log("connection refused: loop", Duration::from_secs(20));
    assert!(tcp_loop.contains("ERROR"), "{tcp_loop}");
    s.gate
        .wait_for_log("came back into its ingress: loop", Duration::from_secs(10));
    let check = config_cmd("check", s.gate.config_path(), &[]);
    let warnings = String::from_utf8_lossy(&check.stderr);
    assert!(
        warnings.contains("does not exclude ackgate's own traffic"),
        "{warnings}"
    );
    s.seen.with(|seen| {
        assert_eq!(
            seen.unique(),
            0,
            "events reached the aggregator through a loop"
        )
    });
    let loops = scrape_sum(s.admin, "ackgate_rejected_connections_total").unwrap_or(0.0);
    assert!(loops >= 1.0, "no rejected connection counted");

    // The rules go: ackgate reaches the aggregator, and every event arrives once.
    s.rules.clear();
    let all: HashSet<u64> = sent.iter().copied().collect();
    assert!(
        s.seen
            .wait(Duration::from_secs(40), |seen| seen.has_all(&all)),
        "events lost after the loop: missing {}",
        s.seen.with(|seen| first(&seen.missing(&all), 10))
    );
    s.gate.terminate_cleanly();
    s.seen
        .with(|seen| assert_eq!(seen.duplicated_of(&all), 0, "events delivered twice"));
    let _ = &mut s.receiver;
}

#[test]
fn gateway_redirect_carries_a_legacy_sender_through_the_seed_blackhole() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    let gw = Gateway::create().unwrap_or_else(|e| panic!("cannot create the namespaces: {e}"));
    let agg = SocketAddr::new(gw.aggregator_addr.into(), AGG_PORT);
    let seen = Seen::new();
    let _receiver = ReceiveProc::start(agg, Some(&gw.aggregator), &[], seen.clone());
    // The product's upstream timing, with the seed scenario's ack timeout.
    let mut gate = Ackgate::builder()
        .netns(&gw.router)
        .node("agg", agg)
        .product_upstream_timing()
        .section(
            "ingress",
            &format!(
                "listen = \"[::]:0\"\ntransparent = \"redirect\"\nallow_destinations = [\"{agg}\"]"
            ),
        )
        .section("upstream", "ack_timeout = \"2s\"")
        .section("log", "level = \"info,ackgate::ingress::connection=debug\"")
        .start();
    let port = gate.addr().port().to_string();
    let agg_ip = format!("{}/32", agg.ip());
    let agg_port = AGG_PORT.to_string();
    for proto in ["tcp", "udp"] {
        gw.exec(
            &gw.router,
            &[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-i",
                gw.router_sender_if,
                "-p",
                proto,
                "-d",
                &agg_ip,
                "--dport",
                &agg_port,
                "-j",
                "REDIRECT",
                "--to-ports",
                &port,
            ],
        )
        .expect("PREROUTING rule");
    }
    assert!(
        in_netns(&gw.sender, move || heartbeat_answered_by(agg)),
        "a UDP heartbeat from the sender's host got no reply from the aggregator's address"
    );

    // The seed's blackhole in front of the aggregator: SYN passes, data is dropped.
    let drop_data = [
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &agg_port, "-j", "DROP",
    ];
    gw.exec(
        &gw.aggregator,
        &[
            "iptables", "-A", "INPUT", "-p", "tcp", "--syn", "--dport", &agg_port, "-j", "ACCEPT",
        ],
    )
    .expect("accept rule");
    gw.exec(&gw.aggregator, &drop_data).expect("drop rule");
    let started = std::time::Instant::now();
    let ids = Ids::default();
    let sent = ids.take(EVENTS_PER_REQUEST * 10);
    let chunks: Vec<Vec<u64>> = sent
        .chunks(EVENTS_PER_REQUEST)
        .map(<[u64]>::to_vec)
        .collect();
    in_netns(&gw.sender, move || {
        for chunk in &chunks {
            legacy_send(agg, chunk);
        }
    });
    let line = gate.wait_for_log("connection closed", Duration::from_secs(10));
    assert!(
        line.contains(&format!("destination={agg}"))
            && line.contains(&format!("peer={}", gw.sender_addr)),
        "the gateway's ackgate did not see the original destination: {line}"
    );
    // The network heals at a random moment 3–6 s after the traffic started, whatever the
    // retry backoff is doing then.
    let heal_at = random_between(Duration::from_secs(3), Duration::from_secs(6));
    std::thread::sleep(heal_at.saturating_sub(started.elapsed()));
    let mut lift = drop_data.to_vec();
    lift[1] = "-D";
    gw.exec(&gw.aggregator, &lift).expect("lift the drop rule");

    let all: HashSet<u64> = sent.iter().copied().collect();
    assert!(
        seen.wait(Duration::from_secs(60), |s| s.has_all(&all)),
        "events lost behind the gateway: missing {}; log:\n{}",
        seen.with(|s| first(&s.missing(&all), 10)),
        gate.log().dump()
    );
    gate.terminate_cleanly();
    seen.with(|s| assert_eq!(s.duplicated_of(&all), 0, "events delivered twice"));
}

/// Sender hosts of the deployment test, each with its own ackgate and spool.
const SENDER_HOSTS: usize = 3;
const REQUESTS_PER_HOST: usize = 30;

/// A deployment: three sender hosts, each with its own ackgate (same-host rule, mark), in front
/// of two weighted aggregators; aggregator A (the one every sender addresses) is SIGKILLed at a
/// random moment under load and comes back 2 s later. Nothing is lost.
#[test]
fn three_sender_hosts_with_their_own_ackgate_lose_nothing_when_an_aggregator_is_killed() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    // Leaves 0..3: sender hosts; 3 and 4: aggregators A and B.
    let star = Star::create(SENDER_HOSTS + 2)
        .unwrap_or_else(|e| panic!("cannot create the namespaces: {e}"));
    let agg_a = SocketAddr::new(star.addr(SENDER_HOSTS).into(), AGG_PORT);
    let agg_b = SocketAddr::new(star.addr(SENDER_HOSTS + 1).into(), AGG_PORT);
    let (seen_a, seen_b) = (Seen::new(), Seen::new());
    let mut receiver_a =
        ReceiveProc::start(agg_a, Some(&star.leaves[SENDER_HOSTS]), &[], seen_a.clone());
    let _receiver_b = ReceiveProc::start(
        agg_b,
        Some(&star.leaves[SENDER_HOSTS + 1]),
        &[],
        seen_b.clone(),
    );
    let nodes = format!(
        "socket_mark = {MARK}\nnodes = [{{ address = \"{agg_a}\", name = \"a\", weight = 60 }}, {{ address = \"{agg_b}\", name = \"b\", weight = 40 }}]"
    );
    let mut gates: Vec<Ackgate> = (0..SENDER_HOSTS)
        .map(|i| gate_on_sender_host(&star, i, &nodes, agg_a))
        .collect();

    let senders = legacy_load(&star, agg_a);
    std::thread::sleep(random_between(
        Duration::from_millis(500),
        Duration::from_millis(2500),
    ));
    receiver_a.kill_and_restart_after(Duration::from_secs(2));
    let all: HashSet<u64> = senders
        .into_iter()
        .flat_map(|t| t.join().expect("sender thread"))
        .collect();
    assert_eq!(
        all.len(),
        SENDER_HOSTS * REQUESTS_PER_HOST * EVENTS_PER_REQUEST
    );

    let lost = wait_for_all(&all, &[&seen_a, &seen_b], Duration::from_secs(60));
    let logs: String = gates.iter().map(|g| g.log().dump()).collect();
    assert_eq!(lost, 0, "events lost; logs:\n{logs}");
    let (a, b) = (seen_a.snapshot(), seen_b.snapshot());
    // Requests keep coming for at least 0.5 s after A is killed: B takes them.
    assert!(
        b.unique() > 0,
        "aggregator A was down for 2 s under load, yet B got nothing (A got {})",
        a.unique()
    );
    for gate in &mut gates {
        gate.terminate_cleanly();
    }
    let twice = all
        .iter()
        .filter(|id| {
            a.counts.get(id).copied().unwrap_or(0) + b.counts.get(id).copied().unwrap_or(0) > 1
        })
        .count();
    eprintln!(
        "deployment: {} events, A {} B {}, delivered twice {twice} (aggregator A was killed after writing some it never acked)",
        all.len(),
        a.unique(),
        b.unique()
    );
}

/// ackgate on sender host `i` of the deployment, with the same-host rule for `agg`.
fn gate_on_sender_host(star: &Star, i: usize, upstream_keys: &str, agg: SocketAddr) -> Ackgate {
    let gate = Ackgate::builder()
        .netns(&star.leaves[i])
        .product_upstream_timing()
        .section("ingress", "transparent = \"redirect\"")
        .section("upstream", upstream_keys)
        .start();
    let port = gate.addr().port().to_string();
    let agg_ip = format!("{}/32", agg.ip());
    let mark = format!("0x{MARK:x}");
    let agg_port = AGG_PORT.to_string();
    let rule = [
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        &agg_ip,
        "--dport",
        &agg_port,
        "-m",
        "mark",
        "!",
        "--mark",
        &mark,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ];
    star.exec(i, &rule).expect("OUTPUT rule");
    gate
}

/// On each sender host, a legacy sender writing `REQUESTS_PER_HOST` requests to `agg`, one
/// every 100 ms; each thread returns the ids it sent.
fn legacy_load(star: &Star, agg: SocketAddr) -> Vec<std::thread::JoinHandle<Vec<u64>>> {
    let ids = Arc::new(Ids::default());
    (0..SENDER_HOSTS)
        .map(|i| {
            let (ns, ids) = (star.leaves[i].clone(), ids.clone());
            std::thread::spawn(move || {
                in_netns(&ns, move || {
                    let mut sent = Vec::new();
                    for _ in 0..REQUESTS_PER_HOST {
                        let chunk = ids.take(EVENTS_PER_REQUEST);
                        legacy_send(agg, &chunk);
                        sent.extend(chunk);
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    sent
                })
            })
        })
        .collect()
}

/// Wait (bounded) until every id of `all` arrived at one of the aggregators; how many did not.
fn wait_for_all(all: &HashSet<u64>, seen: &[&Arc<Seen>], timeout: Duration) -> usize {
    let missing = || {
        let states: Vec<SeenState> = seen.iter().map(|s| s.snapshot()).collect();
        all.iter()
            .filter(|id| !states.iter().any(|s| s.counts.contains_key(id)))
            .count()
    };
    let deadline = std::time::Instant::now() + timeout;
    while missing() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    missing()
}

/// IPv6, same host: the original destination is read in its IPv6 form (ip6tables REDIRECT to
/// ackgate on `[::]`), the events arrive once, and a heartbeat is answered from the
/// aggregator's IPv6 address.
#[test]
fn same_host_ipv6_redirect_reads_the_ipv6_original_destination() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    let s = setup(Family::V6, true, &format!("socket_mark = {MARK}"));
    let (agg, seen, gate, admin) = (s.agg, &s.seen, &s.gate, s.admin);
    let ids = Ids::default();
    let sent = ids.take(EVENTS_PER_REQUEST * 3);
    for chunk in sent.chunks(EVENTS_PER_REQUEST) {
        legacy_send(agg, chunk);
    }
    assert!(
        heartbeat_answered_by(agg),
        "an IPv6 heartbeat to the aggregator's address got no reply from that address"
    );
    let all: HashSet<u64> = sent.iter().copied().collect();
    assert!(
        seen.wait(Duration::from_secs(30), |s| s.has_all(&all)),
        "not every event reached the aggregator; log:\n{}",
        gate.log().dump()
    );
    let key = format!("ackgate_destination_events_in_total{{destination=\"{agg}\"}}");
    let text = wait_metric(admin, &key, Duration::from_secs(5), |v| {
        v.is_some_and(|v| v >= all.len() as f64)
    });
    assert_eq!(metric_exact(&text, &key), Some(all.len() as f64), "{key}");
    seen.with(|s| assert_eq!(s.duplicated_of(&all), 0, "events delivered twice"));
}

/// On the star's router: connections arriving on `sender_if` for the aggregator port go to
/// ackgate's `port` (PREROUTING REDIRECT; the namespaces go with the star).
fn redirect_at_router(star: &Star, sender_if: &str, port: u16) {
    let (port, agg_port) = (port.to_string(), AGG_PORT.to_string());
    let rule = [
        "ip",
        "netns",
        "exec",
        &star.core,
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-i",
        sender_if,
        "-p",
        "tcp",
        "--dport",
        &agg_port,
        "-j",
        "REDIRECT",
        "--to-ports",
        &port,
    ];
    run_command(&rule).expect("PREROUTING rule");
}

/// Route "original" on a gateway: two sender hosts address two different aggregators through
/// the router where ackgate runs (PREROUTING REDIRECT, no `[[upstream.nodes]]`); each event
/// reaches the aggregator its sender addressed, and the seed's blackhole in front of one
/// aggregator holds back only that one's events, which all arrive once it lifts.
#[test]
fn route_original_sends_each_sender_to_its_aggregator_and_a_blackhole_holds_back_only_its_own() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    // Leaves 0 and 1: sender hosts; 2 and 3: aggregators A and B. ackgate runs on the router.
    let star = Star::create(4).unwrap_or_else(|e| panic!("cannot create the namespaces: {e}"));
    let agg_a = SocketAddr::new(star.addr(2).into(), AGG_PORT);
    let agg_b = SocketAddr::new(star.addr(3).into(), AGG_PORT);
    let (seen_a, seen_b) = (Seen::new(), Seen::new());
    let _receiver_a = ReceiveProc::start(agg_a, Some(&star.leaves[2]), &[], seen_a.clone());
    let _receiver_b = ReceiveProc::start(agg_b, Some(&star.leaves[3]), &[], seen_b.clone());
    let (mut gate, _) = start_with_admin(
        Ackgate::builder()
            .netns(&star.core)
            .product_upstream_timing()
            .section(
                "ingress",
                "listen = \"0.0.0.0:0\"\ntransparent = \"redirect\"",
            )
            .section(
                "upstream",
                "route = \"original\"\nnodes = []\nack_timeout = \"2s\"",
            ),
    );
    let agg_port = AGG_PORT.to_string();
    for sender_if in ["l0", "l1"] {
        redirect_at_router(&star, sender_if, gate.addr().port());
    }
    // The seed's blackhole in front of A: SYN passes, data is dropped.
    let drop_data = [
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", &agg_port, "-j", "DROP",
    ];
    star.exec(
        2,
        &[
            "iptables", "-A", "INPUT", "-p", "tcp", "--syn", "--dport", &agg_port, "-j", "ACCEPT",
        ],
    )
    .expect("accept rule");
    star.exec(2, &drop_data).expect("drop rule");

    let ids = Arc::new(Ids::default());
    let send = |leaf: usize, agg: SocketAddr| {
        let (ns, ids) = (star.leaves[leaf].clone(), ids.clone());
        std::thread::spawn(move || {
            in_netns(&ns, move || {
                let sent = ids.take(EVENTS_PER_REQUEST * 10);
                for chunk in sent.chunks(EVENTS_PER_REQUEST) {
                    legacy_send(agg, chunk);
                }
                sent
            })
        })
    };
    let started = std::time::Instant::now();
    let (to_a, to_b) = (send(0, agg_a), send(1, agg_b));
    let ids_a: HashSet<u64> = to_a.join().expect("sender A").into_iter().collect();
    let mut ids_b: HashSet<u64> = to_b.join().expect("sender B").into_iter().collect();
    // B flows while A is blackholed, also once A's node has timed out (2 s) and
    // is in its retry backoff.
    assert!(
        seen_b.wait(Duration::from_secs(20), |s| s.has_all(&ids_b)),
        "B's events are held back by A's blackhole; log:\n{}",
        gate.log().dump()
    );
    gate.wait_for_log(
        "upstream connection failed; aborted it",
        Duration::from_secs(10),
    );
    ids_b.extend(send(1, agg_b).join().expect("sender B"));
    assert!(
        seen_b.wait(Duration::from_secs(20), |s| s.has_all(&ids_b)),
        "B's later events are held back by A's blackhole"
    );
    seen_a.with(|s| {
        assert!(
            s.missing(&ids_a).len() == ids_a.len(),
            "data passed the DROP rule"
        )
    });
    // The network heals at a random moment 3–6 s after the traffic started.
    let heal_at = random_between(Duration::from_secs(3), Duration::from_secs(6));
    std::thread::sleep(heal_at.saturating_sub(started.elapsed()));
    let mut lift = drop_data.to_vec();
    lift[1] = "-D";
    star.exec(2, &lift).expect("lift the drop rule");
    assert!(
        seen_a.wait(Duration::from_secs(60), |s| s.has_all(&ids_a)),
        "A's events lost behind its blackhole; log:\n{}",
        gate.log().dump()
    );
    // `ackgate status` (run where ackgate runs) lists a node per original destination.
    let status = ackgate_in_netns(Some(&star.core))
        .args(["status", "--config"])
        .arg(gate.config_path())
        .output()
        .expect("ackgate status");
    let status = String::from_utf8_lossy(&status.stdout);
    for agg in [agg_a, agg_b] {
        assert!(
            status.contains(&agg.to_string()),
            "no node for {agg}:\n{status}"
        );
    }
    gate.terminate_cleanly();
    seen_a.with(|s| {
        assert_eq!(s.duplicated_of(&ids_a), 0, "A's events delivered twice");
        assert_eq!(
            s.unique(),
            ids_a.len(),
            "A got events its senders did not address"
        );
    });
    seen_b.with(|s| {
        assert_eq!(s.duplicated_of(&ids_b), 0, "B's events delivered twice");
        assert_eq!(
            s.unique(),
            ids_b.len(),
            "B got events its senders did not address"
        );
    });
}

/// Route "original" after a crash: records for an aggregator that was down stay in the spool
/// across a kill -9; the restarted ackgate finds their destination in the spool (no sender
/// connects again) and delivers them once the aggregator is up.
#[test]
fn route_original_finds_the_destinations_of_queued_records_after_a_restart() {
    if !runnable("transparent", netns_unavailable()) {
        return;
    }
    // Leaf 0: the sender host; leaf 1: the aggregator, down at first. ackgate on the router.
    let star = Star::create(2).unwrap_or_else(|e| panic!("cannot create the namespaces: {e}"));
    let agg = SocketAddr::new(star.addr(1).into(), AGG_PORT);
    let (mut gate, admin) = start_with_admin(
        Ackgate::builder()
            .netns(&star.core)
            .section(
                "ingress",
                "listen = \"0.0.0.0:0\"\ntransparent = \"redirect\"",
            )
            .section("upstream", "route = \"original\"\nnodes = []"),
    );
    let port = gate.addr().port();
    gate.edit_config(
        "listen = \"0.0.0.0:0\"",
        &format!("listen = \"0.0.0.0:{port}\""),
    );
    redirect_at_router(&star, "l0", port);
    let ids = Ids::default();
    let sent = ids.take(EVENTS_PER_REQUEST * 5);
    let chunks: Vec<Vec<u64>> = sent
        .chunks(EVENTS_PER_REQUEST)
        .map(<[u64]>::to_vec)
        .collect();
    // Acked, so committed: a kill -9 may lose only what no sender was acked for.
    in_netns(&star.leaves[0], move || {
        for chunk in &chunks {
            let (ack, want) = acked_send(agg, chunk);
            assert_eq!(ack, want, "no ack from ackgate");
        }
    });
    gate.kill9();
    // A damaged record among them: with no [[upstream.nodes]], a destination's pipeline must
    // still move it to the dead letters, and the others must not wait for it.
    let damaged = damage_middle_record(gate.spool_path(), Damage::FutureVersion);
    gate.restart();
    let seen = Seen::new();
    let _receiver = ReceiveProc::start(agg, Some(&star.leaves[1]), &[], seen.clone());
    let all: HashSet<u64> = sent
        .iter()
        .copied()
        .filter(|id| !damaged.events.contains(id))
        .collect();
    assert!(
        seen.wait(Duration::from_secs(60), |s| s.has_all(&all)),
        "queued records did not reach their aggregator after the restart; log:\n{}",
        gate.log().dump()
    );
    // The admin endpoint is on the router's loopback.
    let (dead_letters, queued) = in_netns(&star.core, move || {
        wait_metric(
            admin,
            "ackgate_spool_records",
            Duration::from_secs(10),
            |v| v == Some(0.0),
        );
        let text = http(admin, "GET", "/metrics").1;
        let queued = format!("ackgate_destination_queued_records{{destination=\"{agg}\"}}");
        (
            metric_sum(&text, "ackgate_dead_letters_total"),
            metric_exact(&text, &queued),
        )
    });
    assert_eq!(
        dead_letters,
        Some(1.0),
        "the damaged record is not a dead letter; log:\n{}",
        gate.log().dump()
    );
    // Nothing is reported queued once the spool is empty (the damaged value's count too).
    assert_eq!(queued, Some(0.0), "destination_queued_records for {agg}");
    gate.terminate_cleanly();
    seen.with(|s| {
        assert_eq!(s.duplicated_of(&all), 0, "events delivered twice");
        assert!(
            !damaged.events.iter().any(|id| s.counts.contains_key(id)),
            "damaged events delivered"
        );
    });
}
