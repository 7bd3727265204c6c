//! Unit-test fixtures shared by the spool's, the dispatcher's and the node's tests: a spool
//! config on a temp dir, log entries, and an append that waits for its commit.

use std::time::Duration;

use bytes::Bytes;
use tokio::time::timeout;

use super::{Spool, SpoolError, SpoolWriter};
use crate::config::{ByteSize, SpoolConfig};
use crate::forward::frame::Signal;

/// Bound on every wait of these tests.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn config(dir: &tempfile::TempDir) -> SpoolConfig {
    SpoolConfig {
        path: dir.path().join("spool.redb"),
        max_bytes: ByteSize(1 << 30),
        group_commit_bytes: ByteSize(8 << 20),
        // Small, so that reads after a restart go to the file.
        cache_bytes: ByteSize(64 << 10),
        dead_letter_max_bytes: ByteSize(1 << 20),
        max_age: None,
    }
}

/// One `[int time, {"n": i}]` entry.
pub fn entry(i: u8) -> Vec<u8> {
    vec![0x92, 0x01, 0x81, 0xa1, b'n', i & 0x7f]
}

pub async fn append(
    spool: &Spool,
    tag: &str,
    entries: &[u8],
    events: u32,
) -> Result<u64, SpoolError> {
    append_to(spool, None, tag, entries, events).await
}

/// [`append`] of a request from a connection redirected on its way to `destination`.
pub async fn append_to(
    spool: &Spool,
    destination: Option<std::net::SocketAddr>,
    tag: &str,
    entries: &[u8],
    events: u32,
) -> Result<u64, SpoolError> {
    let cost = Spool::cost(Signal::Logs, destination, tag.as_bytes(), entries);
    assert!(spool.try_reserve(cost), "budget refused {cost} bytes");
    let rx = spool.append(
        Signal::Logs,
        destination,
        Bytes::copy_from_slice(tag.as_bytes()),
        Bytes::copy_from_slice(entries),
        events,
        cost,
    );
    timeout(WAIT, rx)
        .await
        .expect("no commit answer")
        .expect("writer gone")
}

/// Every record key once everything pending is committed.
pub async fn keys_after_flush(spool: &Spool) -> Vec<u64> {
    spool.flush().await.unwrap();
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || spool.keys())
        .await
        .unwrap()
        .unwrap()
}

/// Stop the writer from async code (its shutdown blocks).
pub async fn stop(writer: SpoolWriter) {
    tokio::task::spawn_blocking(move || writer.shutdown())
        .await
        .unwrap();
}

/// Replace a record's stored bytes behind the spool's back (the spool must be stopped).
pub fn overwrite_record(path: &std::path::Path, key: u64, value: &[u8]) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(super::store::RECORDS)
        .unwrap()
        .insert(key, value)
        .unwrap();
    txn.commit().unwrap();
}
