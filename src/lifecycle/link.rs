//! The worker's end of its supervisor's control channel: sender connections come in on it,
//! each with its name ([`super::names::ConnState`]), and so do the supervisor's requests
//! (activate, hand over, the accept queue drained). One task reads it and sorts messages
//! into two queues, so ingress waits only on connections and the relay only on requests.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::names::ConnState;
use super::protocol::Control;
use super::socket;

/// A connection the supervisor holds and hands to this worker.
#[derive(Debug)]
pub struct Handed {
    pub fd: OwnedFd,
    pub state: ConnState,
}

/// What ingress takes from the supervisor, in the order it was sent.
#[derive(Debug)]
pub enum Feed {
    Conn(Handed),
    /// Every connection an earlier worker left was handed over (this many): what follows is
    /// new, sent on credit.
    Adopted(u64),
    /// A stop: the supervisor closed its listeners; no connection comes after this one. In the
    /// same queue as the connections, so that every one sent before it is served.
    Drained,
}

/// A request of the supervisor's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Handover,
    Activate,
    Notice(String),
    /// The control channel closed: the supervisor is gone.
    Gone,
}

/// The two queues the reader fills.
pub struct Link {
    pub connections: mpsc::UnboundedReceiver<Feed>,
    pub requests: mpsc::UnboundedReceiver<Request>,
}

/// Start reading the control channel `control` (the `supervisor` descriptor).
pub fn start(control: OwnedFd) -> io::Result<Link> {
    let control = socket::reactor(control, Interest::READABLE)?;
    let (conn_tx, connections) = mpsc::unbounded_channel();
    let (request_tx, requests) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let packet = match control.readable().await {
                Ok(mut guard) => match guard.try_io(|fd| socket::receive(fd.get_ref().as_fd())) {
                    Ok(result) => result,
                    Err(_would_block) => continue,
                },
                Err(e) => Err(e),
            };
            let packet = match packet {
                Ok(packet) if packet.bytes.is_empty() => {
                    let _ = request_tx.send(Request::Gone);
                    return;
                }
                Ok(packet) => packet,
                Err(e) => {
                    warn!(error = %e, "cannot read the supervisor's control channel");
                    let _ = request_tx.send(Request::Gone);
                    return;
                }
            };
            let Some(message) = Control::decode(&packet.bytes) else {
                warn!(
                    bytes = packet.bytes.len(),
                    "ignoring a control message that does not parse"
                );
                continue;
            };
            let request = match message {
                Control::Conn(name) => {
                    let (Some(state), Some(fd)) =
                        (ConnState::parse(&name), packet.fds.into_iter().next())
                    else {
                        warn!(%name, "ignoring a handed connection without a usable name or descriptor");
                        continue;
                    };
                    let _ = conn_tx.send(Feed::Conn(Handed { fd, state }));
                    continue;
                }
                Control::Adopted(count) => {
                    let _ = conn_tx.send(Feed::Adopted(count));
                    continue;
                }
                Control::Handover => Request::Handover,
                Control::Activate => Request::Activate,
                Control::Drained => {
                    let _ = conn_tx.send(Feed::Drained);
                    continue;
                }
                Control::Notice(text) => Request::Notice(text),
            };
            debug!(?request, "request from the supervisor");
            let _ = request_tx.send(request);
        }
    });
    Ok(Link {
        connections,
        requests,
    })
}
