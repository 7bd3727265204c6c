//! Heartbeats (PROTOCOL.md §8.1, §8.2, §13.6, §13.7).
//!
//! fluentd v0.10/v0.12 send a UDP `\0` (v0.10.5–.25: an empty datagram) to the receiver's port
//! every second and count a reply only if it comes from the exact IP:port they targeted;
//! unanswered, they detach the node for good. fluentd v1's transport heartbeat is a TCP
//! connection that opens and closes without a byte: that is normal traffic, not an error.

mod common;

use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;

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
