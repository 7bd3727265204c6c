//! A stop that loses nothing the kernel accepted (issue: "SIGTERM stops taking new
//! connections while it accepts, reads and commits every connection the kernel had already
//! completed").
//!
//! Closing a listening socket resets every connection in its accept queue, and a handshake
//! the kernel answered (SYN-ACK) but that completes after the close is reset too: the
//! sender's connect succeeded, its write succeeded, and a fluentd v0.10 sender then deletes its
//! buffer. So a stop first makes the listener drop new SYNs (a classic BPF socket filter on
//! it: the sender's connect is not answered, so it keeps its data and retries), accepts
//! everything already queued, waits until no handshake for its port is still half-open
//! (`/proc/net/tcp{,6}`, state SYN_RECV), and only then closes the listener: from then on new
//! connections are refused.

use std::collections::HashSet;
use std::io;
use std::os::fd::BorrowedFd;

use socket2::{SockFilter, SockRef};

/// `SYN_RECV` in `/proc/net/tcp`'s `st` column.
const SYN_RECV: &str = "03";

/// Make the listener drop every incoming SYN (a handshake already under way still
/// completes: its final ACK carries no SYN).
pub fn drop_new_handshakes(listener: BorrowedFd<'_>) -> io::Result<()> {
    // The program sees the TCP header: byte 13 holds the flags, 0x02 is SYN.
    const LDB_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
    const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    let program = [
        SockFilter::new(LDB_ABS, 0, 0, 13),
        SockFilter::new(JSET_K, 1, 0, 0x02),
        SockFilter::new(RET_K, 0, 0, u32::MAX),
        SockFilter::new(RET_K, 0, 0, 0),
    ];
    SockRef::from(&listener).attach_filter(&program)
}

/// Undo [`drop_new_handshakes`] (a listener inherited from an earlier stop of a socket unit).
pub fn accept_handshakes(listener: BorrowedFd<'_>) {
    let _ = SockRef::from(&listener).detach_filter();
}

/// The local TCP ports of `listeners`.
pub fn ports(listeners: &[BorrowedFd<'_>]) -> HashSet<u16> {
    listeners
        .iter()
        .filter_map(|fd| SockRef::from(fd).local_addr().ok())
        .filter_map(|addr| addr.as_socket())
        .map(|addr| addr.port())
        .collect()
}

/// Whether a handshake to one of `ports` is half-open (SYN received, final ACK not yet).
pub fn handshakes_pending(ports: &HashSet<u16>) -> bool {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .map(|text| syn_recv_on(&text, ports))
            .unwrap_or(false)
    })
}

/// `/proc/net/tcp` lines are `sl local_address rem_address st …`, addresses `HEXIP:HEXPORT`.
fn syn_recv_on(table: &str, ports: &HashSet<u16>) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        let port = local
            .and_then(|l| l.rsplit_once(':'))
            .and_then(|(_, port)| u16::from_str_radix(port, 16).ok());
        state == Some(SYN_RECV) && port.is_some_and(|p| ports.contains(&p))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn half_open_handshakes_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:5EA0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:5EA0 0100007F:D431 03 00000000:00000000 00:00000000 00000000     0        0 0 1 0 100 0 0 10 0\n";
        assert!(syn_recv_on(table, &HashSet::from([0x5EA0])));
        assert!(!syn_recv_on(table, &HashSet::from([24225])));
    }

    #[test]
    fn a_filtered_listener_answers_no_new_handshake_but_keeps_its_queue() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let queued = TcpStream::connect(addr).unwrap();
        drop_new_handshakes(listener.as_fd()).unwrap();
        // A new connect gets no SYN-ACK: it times out instead of completing.
        let late = TcpStream::connect_timeout(&addr, Duration::from_millis(300));
        assert!(late.is_err(), "a new handshake completed: {late:?}");
        // The connection queued before the filter is still there to accept.
        let (accepted, _) = listener.accept().unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), queued.local_addr().unwrap());
        accept_handshakes(listener.as_fd());
        assert!(TcpStream::connect_timeout(&addr, Duration::from_secs(5)).is_ok());
    }
}
