//! Heartbeats (PROTOCOL.md §8.1, §8.2, §13.6, §13.7).
//!
//! fluentd v0.10/v0.12 send a UDP `\0` (v0.10.5–.25: an empty datagram) to the receiver's port
//! every second and count a reply only if it comes from the exact IP:port they targeted;
//! unanswered, they detach the node for good. fluentd v1's transport heartbeat is a TCP
//! connection that opens and closes without a byte: that is normal traffic, not an error.

mod support;

use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use support::*;

fn heartbeat(target: std::net::SocketAddr, payload: &[u8]) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    socket.send_to(payload, target).expect("send heartbeat");
    let mut buf = [0u8; 64];
    let (n, from) = socket
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no heartbeat reply to {payload:?}: {e}"));
    assert_eq!(
        &buf[..n],
        b"\0",
        "heartbeat reply must be exactly one 0x00 byte"
    );
    assert_eq!(
        from, target,
        "the reply must come from the address the sender targeted (fluentd ignores others)"
    );
}

#[test]
fn udp_heartbeats_are_answered_from_the_listen_address() {
    let agg = Aggregator::start();
    let gate = Ackgate::start(agg.addr());
    // The byte every fluentd since v0.10.26 sends, the captured datagram, and the empty
    // datagram of v0.10.5–.25.
    heartbeat(gate.addr(), b"\0");
    let captured =
        std::fs::read(captures_dir().join("fluentd-0.12.43-out_forward-heartbeat.udp.bin"))
            .expect("heartbeat capture");
    heartbeat(gate.addr(), &captured);
    heartbeat(gate.addr(), b"");
    // Several in a row from one socket, as a sender does every second.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    for _ in 0..5 {
        socket.send_to(b"\0", gate.addr()).expect("send");
        let mut buf = [0u8; 8];
        let (n, from) = socket.recv_from(&mut buf).expect("reply");
        assert_eq!((&buf[..n], from), (&b"\0"[..], gate.addr()));
    }
}

#[test]
fn tcp_connection_without_bytes_is_not_a_warning() {
    let agg = Aggregator::start();
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("log", "level = \"info,ackgate=debug\"")
        .start();
    let mut peers = Vec::new();
    for _ in 0..3 {
        let stream = TcpStream::connect(gate.addr()).expect("connect");
        peers.push(stream.local_addr().expect("local addr"));
        drop(stream);
    }
    // Wait until ackgate has seen each close (its debug line names the peer), then check that
    // nothing about these peers was logged as a warning or an error.
    for peer in &peers {
        gate.wait_for_log_since(
            0,
            &["connection closed", &format!("peer={peer}")],
            Duration::from_secs(10),
        );
    }
    for peer in &peers {
        let alarming: Vec<String> = gate
            .log_lines_with(&[&format!("{peer}")])
            .into_iter()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .collect();
        assert!(
            alarming.is_empty(),
            "zero-byte connection logged as a problem: {alarming:?}"
        );
    }
    // And the relay is unaffected.
    let entry = entry_int(TS, &unique_record("after-heartbeat"));
    let mut stream = connect(gate.addr());
    std::io::Write::write_all(&mut stream, &legacy_request("hb.after", &entry)).expect("write");
    drop(stream);
    agg.wait_for_all(&[entry], Duration::from_secs(10));
}

/// A full spool cannot take data: heartbeats go unanswered so senders with a standby fail
/// over (PROTOCOL.md §13.7), and are answered again once upstream has drained it.
#[test]
fn heartbeats_stop_while_the_spool_is_full_and_resume_after_it_drains() {
    let agg = Aggregator::start_with(Behaviour::NeverAck);
    let gate = Ackgate::builder()
        .node("agg", agg.addr())
        .section("ingress", "max_frame_bytes = \"16KiB\"")
        .section("spool", "max_bytes = \"64KiB\"")
        .section(
            "upstream",
            "ack_timeout = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"300ms\"",
        )
        .start();
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind udp");
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    assert!(
        heartbeat_answered(&socket, gate.addr()),
        "answered while there is room"
    );

    // Fill the spool: 8 KiB legacy requests, each on its own connection, never acked upstream.
    let record = vec![b'x'; 8000];
    let mut body = vec![0x81, 0xa1, b'm', 0xda];
    body.extend_from_slice(&(record.len() as u16).to_be_bytes());
    body.extend_from_slice(&record);
    for _ in 0..12 {
        let mut stream = TcpStream::connect(gate.addr()).expect("connect");
        let request = legacy_request("hb.fill", &entry_int(1_700_000_000, &body));
        std::io::Write::write_all(&mut stream, &request).expect("write");
    }
    // An answered heartbeat returns at once, so a count of tries is no wait: the requests may
    // not be committed yet (40 quick tries passed before the spool filled, 1 run in 20 beside
    // a CI run). Wait for the spool to fill, bounded in time.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut silent = false;
    while std::time::Instant::now() < deadline {
        if !heartbeat_answered(&socket, gate.addr()) {
            silent = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        silent,
        "heartbeats must go unanswered once the spool is full"
    );
    gate.wait_for_log("UDP heartbeats go unanswered", Duration::from_secs(10));

    agg.set_behaviour(Behaviour::Ack);
    let mut back = false;
    for _ in 0..100 {
        if heartbeat_answered(&socket, gate.addr()) {
            back = true;
            break;
        }
    }
    assert!(
        back,
        "heartbeats must be answered again after the spool drained"
    );
    gate.wait_for_log("answering UDP heartbeats", Duration::from_secs(10));
}
