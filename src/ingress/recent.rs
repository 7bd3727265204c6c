//! Memory of recently committed chunk ids, per sender address.
//!
//! A sender that lost an ack resends the same chunk with the same id (PROTOCOL.md §13.3). If
//! it was committed, it is acked again without being spooled twice. Ids alone are not unique
//! (fluent-bit ids are content hashes, fluentd v0.12 file-buffer ids repeat timestamps), so the
//! memory is scoped to the sender's IP and keyed on id *and* a hash of tag and entries: a hit
//! means the same sender sent the same bytes under the same id. Bounded per peer and in peers.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use bytes::Bytes;

/// Most sender addresses remembered; past it the whole memory is reset (a duplicate then
/// costs a second copy upstream, never a loss).
const MAX_PEERS: usize = 16 * 1024;
/// Most bytes of chunk ids remembered in all, whatever the senders send: past it the whole
/// memory is reset too. Real ids are 24-byte base64 or 32 hex characters.
const MAX_BYTES: usize = 8 << 20;
/// Longer chunk ids are acked but not remembered (no real sender writes them).
const MAX_CHUNK_ID_BYTES: usize = 256;
/// Bytes one remembered key costs beyond its id (hash, ring slot).
const KEY_OVERHEAD: usize = 48;

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
    /// Memory this key takes while remembered.
    fn cost(&self) -> usize {
        self.chunk.len() + KEY_OVERHEAD
    }

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
    /// `ingress.recent_chunks_per_peer`; a reload may change it (longer rings shrink as
    /// their peers commit more).
    per_peer: AtomicUsize,
    peers: Mutex<Peers>,
}

#[derive(Default)]
struct Peers {
    rings: HashMap<IpAddr, VecDeque<ChunkKey>>,
    /// Sum of [`ChunkKey::cost`] over every ring.
    bytes: usize,
}

impl RecentChunks {
    pub fn new(per_peer: usize) -> Self {
        RecentChunks {
            per_peer: AtomicUsize::new(per_peer),
            peers: Mutex::new(Peers::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.per_peer.load(Ordering::Relaxed) > 0
    }

    /// A reload changed `ingress.recent_chunks_per_peer`; 0 turns the memory off (and frees it).
    pub fn set_per_peer(&self, per_peer: usize) {
        self.per_peer.store(per_peer, Ordering::Relaxed);
        if per_peer == 0 {
            *self.peers.lock().unwrap_or_else(|p| p.into_inner()) = Peers::default();
        }
    }

    /// Whether this peer already had this chunk committed.
    pub fn seen(&self, peer: IpAddr, key: &ChunkKey) -> bool {
        if !self.enabled() {
            return false;
        }
        let peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        peers
            .rings
            .get(&peer)
            .is_some_and(|ring| ring.contains(key))
    }

    /// Remember a committed chunk.
    pub fn remember(&self, peer: IpAddr, key: ChunkKey) {
        if !self.enabled() || key.chunk.len() > MAX_CHUNK_ID_BYTES {
            return;
        }
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let new_peer = !peers.rings.contains_key(&peer);
        if (new_peer && peers.rings.len() >= MAX_PEERS) || peers.bytes + key.cost() > MAX_BYTES {
            *peers = Peers::default();
        }
        peers.bytes += key.cost();
        let per_peer = self.per_peer.load(Ordering::Relaxed);
        let ring = peers.rings.entry(peer).or_default();
        let mut evicted = 0;
        // A loop, not one eviction: a reload may have lowered the bound below this ring.
        while ring.len() >= per_peer {
            match ring.pop_front() {
                Some(old) => evicted += old.cost(),
                None => break,
            }
        }
        ring.push_back(key);
        peers.bytes = peers.bytes.saturating_sub(evicted);
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

    #[test]
    fn memory_is_bounded_in_bytes_whatever_the_ids() {
        let recent = RecentChunks::new(1 << 20);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let long = Bytes::from(vec![b'x'; MAX_CHUNK_ID_BYTES + 1]);
        let key = ChunkKey::new(&long, b"t", b"e");
        recent.remember(a, key.clone());
        assert!(!recent.seen(a, &key), "oversized ids are not kept");
        let id = Bytes::from(vec![b'y'; MAX_CHUNK_ID_BYTES]);
        for n in 0..(2 * MAX_BYTES / (MAX_CHUNK_ID_BYTES + KEY_OVERHEAD)) {
            recent.remember(a, ChunkKey::new(&id, b"t", &n.to_le_bytes()));
            let bytes = recent.peers.lock().unwrap().bytes;
            assert!(bytes <= MAX_BYTES, "{bytes} bytes after {n} keys");
        }
        let last = ChunkKey::new(&id, b"t", b"last");
        recent.remember(a, last.clone());
        assert!(recent.seen(a, &last), "still remembers after a reset");
    }
}
