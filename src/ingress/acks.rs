//! A connection's requests waiting for their group commit, and the acks they are owed.
//!
//! Requests are answered strictly in the order they arrived (PROTOCOL.md §13.2), and only once
//! the spool reported their commit (invariant 1). A group commit settles many requests at once:
//! every request at the front of the queue whose commit is known goes out in one write, instead
//! of one write (and one wake-up of the sender) per ack. No socket here: the caller writes
//! [`Settled::acks`].

use std::collections::VecDeque;

use bytes::Bytes;
use tokio::sync::oneshot::{self, error::TryRecvError};

use super::recent::ChunkKey;
use crate::forward::ack::encode_ack;
use crate::forward::json::{chunk_json_value, encode_json_ack};
use crate::spool::SpoolError;

/// What a request's commit comes to: its record key, or why it was not stored.
pub(super) type Commit = Result<u64, SpoolError>;

/// A request handed to the spool (or settled without it), waiting for its commit.
pub(super) struct Pending {
    commit: oneshot::Receiver<Commit>,
    /// Raw msgpack bytes of the sender's `chunk` option, if it asked for an ack.
    pub chunk: Option<Bytes>,
    pub events: u32,
    /// Entry bytes, for metrics.
    pub bytes: u64,
    /// Identity for retransmit detection, remembered once committed.
    pub key: Option<ChunkKey>,
    /// When the request was complete on the socket.
    pub arrived: tokio::time::Instant,
    /// When it was handed to the spool.
    pub submitted: tokio::time::Instant,
    /// Where it starts in the connection's byte stream: until it is settled, nothing from
    /// here on may leave the socket.
    pub start: u64,
}

impl Pending {
    pub(super) fn new(
        commit: oneshot::Receiver<Commit>,
        chunk: Option<Bytes>,
        events: u32,
        bytes: u64,
        key: Option<ChunkKey>,
        arrived: tokio::time::Instant,
        start: u64,
    ) -> Pending {
        Pending {
            commit,
            chunk,
            events,
            bytes,
            key,
            arrived,
            submitted: tokio::time::Instant::now(),
            start,
        }
    }

    /// A request that needs no commit (a retransmit of a stored chunk, or an empty batch):
    /// acked in its turn, stores nothing.
    pub(super) fn stored_already(chunk: Option<Bytes>, start: u64) -> Pending {
        let (done, commit) = oneshot::channel();
        let _ = done.send(Ok(0));
        Pending::new(
            commit,
            chunk,
            0,
            0,
            None,
            tokio::time::Instant::now(),
            start,
        )
    }
}

/// The requests of one connection, oldest first.
#[derive(Default)]
pub(super) struct AckQueue {
    pending: VecDeque<Pending>,
}

/// Requests settled together, and the one write of acks they are owed.
#[derive(Default)]
pub(super) struct Settled {
    /// Stored (or needing no store), in arrival order.
    pub stored: Vec<Pending>,
    /// The acks of `stored` that asked for one, concatenated in order.
    pub acks: Vec<u8>,
    /// How many acks `acks` holds.
    pub ack_count: u64,
    /// The commit that failed after `stored`: later requests are not answered at all.
    pub failed: Option<SpoolError>,
}

impl AckQueue {
    pub(super) fn len(&self) -> usize {
        self.pending.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Where the oldest request not yet settled starts in the stream.
    pub(super) fn oldest_unsettled_start(&self) -> Option<u64> {
        self.pending.front().map(|p| p.start)
    }

    pub(super) fn push(&mut self, pending: Pending) {
        self.pending.push_back(pending);
    }

    /// Forget every request still waiting: the connection closes without answering them, so
    /// their senders resend (a duplicate at worst, never a loss).
    pub(super) fn clear(&mut self) {
        self.pending.clear();
    }

    /// Wait until the oldest request's commit is known. Cancel-safe: nothing is taken off the
    /// queue here; [`AckQueue::settle`] does that.
    pub(super) async fn front_commit(&mut self) -> Commit {
        match self.pending.front_mut() {
            Some(front) => (&mut front.commit).await.unwrap_or(Err(SpoolError::Closed)),
            None => std::future::pending().await,
        }
    }

    /// Take the front request, whose commit came to `first`, and every request after it whose
    /// commit is already known, up to the first failure; build their acks (JSON on a JSON
    /// connection).
    pub(super) fn settle(&mut self, first: Commit, json: bool) -> Settled {
        let mut settled = Settled::default();
        let mut result = Some(first);
        while let Some(commit) = result.take() {
            let Some(done) = self.pending.pop_front() else {
                break;
            };
            if let Err(error) = commit {
                settled.failed = Some(error);
                break;
            }
            if let Some(chunk) = &done.chunk {
                push_ack(&mut settled.acks, chunk, json);
                settled.ack_count += 1;
            }
            settled.stored.push(done);
            result = self
                .pending
                .front_mut()
                .and_then(|next| match next.commit.try_recv() {
                    Ok(commit) => Some(commit),
                    Err(TryRecvError::Closed) => Some(Err(SpoolError::Closed)),
                    Err(TryRecvError::Empty) => None,
                });
        }
        settled
    }
}

/// One ack in the connection's format: `{"ack": chunk}` in msgpack, or JSON when the sender
/// spoke JSON and its chunk id is a string.
fn push_ack(out: &mut Vec<u8>, chunk: &[u8], json: bool) {
    match json.then(|| chunk_json_value(chunk)).flatten() {
        Some(text) => out.extend_from_slice(&encode_json_ack(&text)),
        None => encode_ack(chunk, out),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pending request whose commit the test answers later.
    fn waiting(chunk: Option<&[u8]>) -> (Pending, oneshot::Sender<Commit>) {
        let (tx, rx) = oneshot::channel();
        let chunk = chunk.map(Bytes::copy_from_slice);
        (
            Pending::new(rx, chunk, 1, 10, None, tokio::time::Instant::now(), 0),
            tx,
        )
    }

    fn msgpack_chunk(id: &str) -> Vec<u8> {
        let mut v = vec![0xa0 | id.len() as u8];
        v.extend_from_slice(id.as_bytes());
        v
    }

    fn ack(id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_ack(&msgpack_chunk(id), &mut out);
        out
    }

    #[tokio::test]
    async fn every_request_already_committed_is_acked_in_one_write_in_arrival_order() {
        let mut queue = AckQueue::default();
        let mut senders = Vec::new();
        for id in ["a", "b", "c"] {
            let (pending, tx) = waiting(Some(&msgpack_chunk(id)));
            queue.push(pending);
            senders.push(tx);
        }
        // One group commit answered all three; the third arrives after the first is awaited.
        let mut senders = senders.into_iter();
        senders.next().unwrap().send(Ok(1)).unwrap();
        senders.next().unwrap().send(Ok(1)).unwrap();
        let first = queue.front_commit().await;
        senders.next().unwrap().send(Ok(1)).unwrap();
        let settled = queue.settle(first, false);
        assert_eq!(settled.ack_count, 3);
        assert_eq!(settled.acks, [ack("a"), ack("b"), ack("c")].concat());
        assert!(settled.failed.is_none());
        assert!(queue.is_empty());
    }

    #[tokio::test]
    async fn a_request_whose_commit_is_not_known_yet_waits_with_everything_after_it() {
        let mut queue = AckQueue::default();
        let (a, a_tx) = waiting(Some(&msgpack_chunk("a")));
        let (b, _b_tx) = waiting(Some(&msgpack_chunk("b")));
        let (c, c_tx) = waiting(Some(&msgpack_chunk("c")));
        queue.push(a);
        queue.push(b);
        queue.push(c);
        a_tx.send(Ok(1)).unwrap();
        c_tx.send(Ok(2)).unwrap();
        let first = queue.front_commit().await;
        let settled = queue.settle(first, false);
        assert_eq!(
            settled.acks,
            ack("a"),
            "c is committed but b is not: c waits"
        );
        assert_eq!(queue.len(), 2);
    }

    #[tokio::test]
    async fn a_failed_commit_stops_the_acks_at_the_request_before_it() {
        let mut queue = AckQueue::default();
        let (a, a_tx) = waiting(Some(&msgpack_chunk("a")));
        let (b, b_tx) = waiting(Some(&msgpack_chunk("b")));
        let (c, c_tx) = waiting(Some(&msgpack_chunk("c")));
        queue.push(a);
        queue.push(b);
        queue.push(c);
        a_tx.send(Ok(1)).unwrap();
        b_tx.send(Err(SpoolError::Unavailable)).unwrap();
        c_tx.send(Ok(2)).unwrap();
        let first = queue.front_commit().await;
        let settled = queue.settle(first, false);
        assert_eq!(settled.acks, ack("a"));
        assert!(matches!(settled.failed, Some(SpoolError::Unavailable)));
        assert_eq!(queue.len(), 1, "c stays unanswered: the connection closes");
    }

    #[tokio::test]
    async fn requests_without_a_chunk_settle_without_an_ack_and_retransmits_need_no_commit() {
        let mut queue = AckQueue::default();
        let (legacy, legacy_tx) = waiting(None);
        queue.push(legacy);
        queue.push(Pending::stored_already(
            Some(Bytes::from(msgpack_chunk("r"))),
            0,
        ));
        legacy_tx.send(Ok(5)).unwrap();
        let first = queue.front_commit().await;
        let settled = queue.settle(first, false);
        assert_eq!(settled.stored.len(), 2);
        assert_eq!(settled.ack_count, 1);
        assert_eq!(settled.acks, ack("r"));
    }

    #[tokio::test]
    async fn a_writer_that_went_away_is_a_failed_commit() {
        let mut queue = AckQueue::default();
        let (a, a_tx) = waiting(Some(&msgpack_chunk("a")));
        queue.push(a);
        drop(a_tx);
        let first = queue.front_commit().await;
        let settled = queue.settle(first, false);
        assert!(matches!(settled.failed, Some(SpoolError::Closed)));
        assert!(settled.acks.is_empty());
    }

    #[tokio::test]
    async fn json_connections_get_json_acks() {
        let mut queue = AckQueue::default();
        let (a, a_tx) = waiting(Some(&msgpack_chunk("abc")));
        queue.push(a);
        a_tx.send(Ok(1)).unwrap();
        let first = queue.front_commit().await;
        let settled = queue.settle(first, true);
        assert_eq!(settled.acks, encode_json_ack("abc"));
    }
}
