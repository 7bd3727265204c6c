//! Memory of recently committed chunk ids, per sender address.
//!
//! A sender that lost an ack resends the same chunk with the same id (PROTOCOL.md §13.3). If
//! it was committed, it is acked again without being spooled twice. Ids alone are not unique
//! (fluent-bit ids are content hashes, fluentd v0.12 file-buffer ids repeat timestamps), so the
//! memory is scoped to the sender's IP and keyed on id *and* a hash of tag and entries: a hit
//! means the same sender sent the same bytes under the same id. Bounded per peer and in peers.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;

use bytes::Bytes;

/// Most sender addresses remembered; past it the whole memory is reset (a duplicate then
/// costs a second copy upstream, never a loss).
const MAX_PEERS: usize = 16 * 1024;

/// Identity of a request for retransmit detection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkKey {
    chunk: Bytes,
    /// 128-bit XXH3 of tag and entries: every acked request is hashed whole, and SipHash
    /// (std's DefaultHasher) cost 9% of ackgate's CPU at full load. A hit also needs the same
    /// sender and chunk id, so only an accidental 128-bit collision could skip a batch.
    content: u128,
}

impl ChunkKey {
    pub fn new(chunk: &Bytes, tag: &[u8], entries: &[u8]) -> ChunkKey {
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        // The tag's length first, so tag/entries boundaries cannot shift between requests.
        hasher.update(&(tag.len() as u64).to_le_bytes());
        hasher.update(tag);
        hasher.update(entries);
        ChunkKey {
            // A copy: a slice would keep the whole read buffer of the request alive.
            chunk: Bytes::copy_from_slice(chunk),
            content: hasher.digest128(),
        }
    }
}

/// Per-peer ring of recently committed chunks.
pub struct RecentChunks {
    per_peer: usize,
    peers: Mutex<HashMap<IpAddr, VecDeque<ChunkKey>>>,
}

impl RecentChunks {
    pub fn new(per_peer: usize) -> Self {
        RecentChunks {
            per_peer,
            peers: Mutex::new(HashMap::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_peer > 0
    }

    /// Whether this peer already had this chunk committed.
    pub fn seen(&self, peer: IpAddr, key: &ChunkKey) -> bool {
        if !self.enabled() {
            return false;
        }
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers.get(&peer).is_some_and(|ring| ring.contains(key))
    }

    /// Remember a committed chunk.
    pub fn remember(&self, peer: IpAddr, key: ChunkKey) {
        if !self.enabled() {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= MAX_PEERS && !peers.contains_key(&peer) {
            peers.clear();
        }
        let ring = peers.entry(peer).or_default();
        if ring.len() >= self.per_peer {
            ring.pop_front();
        }
        ring.push_back(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_peer_same_bytes_same_id_only() {
        let recent = RecentChunks::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let id = Bytes::from_static(b"\xa2id");
        let key = ChunkKey::new(&id, b"t", b"entries");
        recent.remember(a, key.clone());
        assert!(recent.seen(a, &key));
        assert!(!recent.seen(b, &key), "other sender");
        assert!(
            !recent.seen(a, &ChunkKey::new(&id, b"t", b"other entries")),
            "same id, new content"
        );
        recent.remember(a, ChunkKey::new(&id, b"t", b"1"));
        recent.remember(a, ChunkKey::new(&id, b"t", b"2"));
        assert!(!recent.seen(a, &key), "bounded per peer");
        assert!(!RecentChunks::new(0).seen(a, &key));
    }
}
