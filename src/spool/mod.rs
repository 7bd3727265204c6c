//! The redb spool: every accepted batch waits here until an aggregator has acked it.
//!
//! [`Spool`] is the handle every task uses; one thread owns all writes ([`writer`]): it takes
//! every request that is waiting, writes them in one transaction ([`group`]), commits once with
//! `Durability::Immediate`, and only then answers the waiting connections, which only then ack
//! their senders (invariant 1). Records are only removed by [`Spool::delete`], which the
//! dispatcher calls after an ack (invariant 2), or moved to the dead letters with their reason
//! (invariant 8). Each record's chunk id is drawn once, when it is written (invariant 3).
//!
//! The parts, one role each:
//! - [`budget`]: the byte budget that turns a full spool into TCP backpressure (invariant 5);
//! - [`store`]: the redb handle, its tables, and the reopen that every I/O error leads to
//!   (invariant 9: reads wait for a reopen instead of failing);
//! - [`writer`] and [`group`]: the writer thread, its group commit and failure paths;
//! - [`reserve`]: disk space kept aside so that a full disk can be recovered from;
//! - [`record`]: the on-disk layout of records, retry notes and dead letters (pure);
//! - [`fresh`]: records just committed, sent from memory instead of read back;
//! - [`error`]: typed errors that keep redb's as their source.

mod budget;
mod error;
#[cfg(test)]
pub(crate) mod fault;
mod fresh;
mod group;
mod queued;
mod read;
mod reader;
pub mod record;
mod reserve;
mod staged;
mod store;
#[cfg(test)]
pub(crate) mod testing;
mod writer;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use bytes::Bytes;
use redb::{ReadTransaction, ReadableDatabase};
use tokio::sync::{oneshot, watch};

pub use error::{is_disk_full, needs_reopen, SpoolError};
pub use group::MERGE_LIMIT;
pub use queued::Queued;
pub use reader::SpoolReader;
pub use record::{DeadKind, DeadLetter, Entries, RecordError, StoredRecord};
pub use staged::{Kept, Unstage};
pub use writer::LAZY_FLUSH;

use budget::Budget;
use fresh::Fresh;
use reserve::DiskReserve;
use store::{Counters, Opener, Store, READ_WAITS_FOR_REOPEN};
use writer::{Append, Command, Maintenance, Stopped, Writer};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::forward::frame::Signal;

/// Counters for logs, metrics and `ackgate spool stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    pub commits: u64,
    pub dead_letter_bytes: u64,
    /// The last commit failed for lack of disk space; ingress is paused.
    pub disk_full: bool,
    /// No room for more requests now: some wait for room, or the bytes reached max_bytes, or
    /// the disk is full.
    pub full: bool,
    /// The database is open. False while a reopen after an I/O error has not succeeded yet:
    /// nothing is stored or delivered meanwhile, and /health says so.
    pub available: bool,
    /// When the last commit finished (ms since the epoch; 0: none since start).
    pub last_commit_ms: u64,
    /// How long it took, fsync included (µs).
    pub last_commit_micros: u64,
}

/// A record whose stored bytes do not decode (damaged, or written by a newer build).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamagedRecord {
    pub key: u64,
    /// Bytes it takes in the spool budget (its whole value).
    pub stored_len: u64,
    pub error: RecordError,
}

/// Records read in key order: those that decode, and those that do not.
#[derive(Debug, Default)]
pub struct ReadBatch {
    pub records: Vec<StoredRecord>,
    pub damaged: Vec<DamagedRecord>,
}

impl ReadBatch {
    /// The highest key read, decodable or not: where the next read starts after.
    pub fn last_key(&self) -> Option<u64> {
        let records = self.records.last().map(|r| r.key);
        let damaged = self.damaged.last().map(|d| d.key);
        records.max(damaged)
    }
}

/// What the writer thread and every handle share.
pub(crate) struct Shared {
    store: Store,
    budget: Budget,
    records: AtomicU64,
    dead_bytes: AtomicU64,
    commits: AtomicU64,
    last_commit_ms: AtomicU64,
    last_commit_micros: AtomicU64,
    /// Highest key committed so far (0 = none): the dispatcher waits on it for new records.
    committed: watch::Sender<u64>,
    /// Records just committed, for the dispatcher to send without reading them back.
    fresh: Fresh,
    /// Records and bytes queued per original destination, as last committed.
    queued: queued::QueuedByDestination,
    /// `spool.group_commit_bytes`, read by the writer for each group (a reload may change it).
    group_bytes: AtomicU64,
    /// `spool.dead_letter_max_bytes`, read by the writer for each group.
    dead_max_bytes: AtomicU64,
}

/// The spool bounds a reload may change; the rest of `[spool]` needs a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub group_commit_bytes: u64,
    pub dead_letter_max_bytes: u64,
}

impl SpoolLimits {
    pub fn of(config: &SpoolConfig) -> SpoolLimits {
        SpoolLimits {
            max_bytes: config.max_bytes.0,
            group_commit_bytes: config.group_commit_bytes.0,
            dead_letter_max_bytes: config.dead_letter_max_bytes.0,
        }
    }

    /// Bytes handed to the writer and not yet committed, at most: four groups (and 1 MiB).
    fn max_uncommitted(&self) -> u64 {
        self.group_commit_bytes.saturating_mul(4).max(1 << 20)
    }
}

/// Handle to the spool: cheap to clone, usable from any task or thread.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

/// How the writer thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fate {
    Running,
    Stopped,
    Died(String),
}

/// Owns the writer thread; [`SpoolWriter::shutdown`] commits what is pending and joins it.
pub struct SpoolWriter {
    commands: mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
    fate: watch::Receiver<Fate>,
}

impl SpoolWriter {
    /// Commit pending work (deletes included) and stop the writer thread.
    pub fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Shutdown(tx)).is_ok() {
            let _ = rx.blocking_recv();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    /// Resolves, with the reason, if the writer thread dies without being asked to stop (a
    /// bug: the process must then exit rather than look healthy, invariant 9).
    pub fn died(&self) -> impl Future<Output = String> + Send + 'static {
        let mut fate = self.fate.clone();
        async move {
            loop {
                if let Fate::Died(reason) = &*fate.borrow_and_update() {
                    return reason.clone();
                }
                if fate.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-text payload".into())
}

impl Spool {
    /// Open (or create) the spool and start its writer thread.
    pub fn open(config: &SpoolConfig) -> Result<(Spool, SpoolWriter), SpoolError> {
        Spool::open_with(config, Opener::File)
    }

    /// Unit tests: open through a backend that injects OS errors.
    #[cfg(test)]
    pub(crate) fn open_faulty(
        config: &SpoolConfig,
        faults: Arc<fault::Faults>,
    ) -> Result<(Spool, SpoolWriter), SpoolError> {
        Spool::open_with(config, Opener::Faulty(faults))
    }

    fn open_with(config: &SpoolConfig, opener: Opener) -> Result<(Spool, SpoolWriter), SpoolError> {
        let cache_bytes = usize::try_from(config.cache_bytes.0).unwrap_or(usize::MAX);
        let store = Store::open(&config.path, cache_bytes, opener)?;
        let (counters, queued_now) = match store.current() {
            Some((db, _)) => {
                let counters = Counters::read(db.as_ref())?;
                (counters, queued::load(db.as_ref(), counters.records)?)
            }
            None => return Err(SpoolError::Unavailable),
        };
        let reserve = DiskReserve::for_spool(&config.path, config.group_commit_bytes.0);
        if let Err(error) = reserve.take() {
            tracing::warn!(path = %config.path.display(), %error,
                "cannot allocate the spool's disk reserve: a full disk may stall until space frees up");
        }
        let (committed, _) = watch::channel(counters.next_key - 1);
        let limits = SpoolLimits::of(config);
        let shared = Arc::new(Shared {
            store,
            budget: Budget::new(counters.bytes, limits.max_bytes, limits.max_uncommitted()),
            records: AtomicU64::new(counters.records),
            dead_bytes: AtomicU64::new(counters.dead_bytes),
            commits: AtomicU64::new(0),
            last_commit_ms: AtomicU64::new(0),
            last_commit_micros: AtomicU64::new(0),
            committed,
            fresh: Fresh::default(),
            queued: queued::QueuedByDestination::default(),
            group_bytes: AtomicU64::new(limits.group_commit_bytes),
            dead_max_bytes: AtomicU64::new(limits.dead_letter_max_bytes),
        });
        shared.queued.replace(queued_now);
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            commands: rx,
            counters,
            reserve,
            pending: Vec::new(),
            oldest_pending: None,
            held: Vec::new(),
            last_compaction: None,
            freed_while_held: 0,
        };
        let (fate_tx, fate) = watch::channel(Fate::Running);
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || {
                let ended = std::panic::catch_unwind(AssertUnwindSafe(|| writer.run()));
                fate_tx.send_replace(match ended {
                    Ok(Stopped::Shutdown | Stopped::Disconnected) => Fate::Stopped,
                    Err(panic) => Fate::Died(format!(
                        "the spool writer thread panicked: {}",
                        panic_message(panic.as_ref())
                    )),
                });
            })
            .map_err(|e| SpoolError::Thread(Arc::new(e)))?;
        Ok((
            Spool {
                shared,
                commands: tx.clone(),
            },
            SpoolWriter {
                commands: tx,
                thread: Some(thread),
                fate,
            },
        ))
    }

    pub fn path(&self) -> &Path {
        self.shared.store.path()
    }

    /// Put new bounds in force (a reload). A smaller `max_bytes` stops reservations until
    /// deletes bring the spool under it; a smaller `dead_letter_max_bytes` evicts the oldest
    /// dead letters at the next commit; the next group is cut at the new `group_commit_bytes`.
    /// The disk reserve keeps the size it was given at start.
    pub fn set_limits(&self, limits: SpoolLimits) {
        let shared = &self.shared;
        shared
            .group_bytes
            .store(limits.group_commit_bytes, Ordering::Release);
        shared
            .dead_max_bytes
            .store(limits.dead_letter_max_bytes, Ordering::Release);
        shared
            .budget
            .set_bounds(limits.max_bytes, limits.max_uncommitted());
    }

    /// The bounds in force.
    pub fn limits(&self) -> SpoolLimits {
        let shared = &self.shared;
        SpoolLimits {
            max_bytes: shared.budget.max(),
            group_commit_bytes: shared.group_bytes.load(Ordering::Acquire),
            dead_letter_max_bytes: shared.dead_max_bytes.load(Ordering::Acquire),
        }
    }

    /// Bytes a request will take in the spool (what [`Spool::reserve`] must be given).
    pub fn cost(
        signal: Signal,
        destination: Option<SocketAddr>,
        tag: &[u8],
        entries: &[u8],
    ) -> u64 {
        record::record_len(signal, destination, tag, entries.len()) as u64
    }

    /// Wait until `bytes` fit under `max_bytes`, then take them. While a connection waits
    /// here it does not read its socket: that is the backpressure of invariant 5.
    pub async fn reserve(&self, bytes: u64) {
        self.shared.budget.reserve(bytes).await
    }

    /// Wait while the spool is full (requests wait for room, or the disk is full): the accept
    /// loop stops taking connections meanwhile, so new senders wait in the kernel's backlog
    /// instead of each holding a request in memory.
    pub async fn wait_for_room(&self) {
        self.shared.budget.wait_for_room().await
    }

    /// Take `bytes` of the budget if they fit now.
    pub fn try_reserve(&self, bytes: u64) -> bool {
        self.shared.budget.try_reserve(bytes)
    }

    /// Hand a request (already reserved) to the writer. The receiver resolves once the group
    /// that carries it is committed with fsync, with the record key it went into.
    pub fn append(
        &self,
        signal: Signal,
        destination: Option<SocketAddr>,
        tag: Bytes,
        entries: Bytes,
        events: u32,
        reserved: u64,
    ) -> oneshot::Receiver<Result<u64, SpoolError>> {
        self.append_unstaging(signal, destination, tag, entries, events, reserved, None)
    }

    /// [`Spool::append`] a request whose prefix was staged ([`Spool::stage`]): in the same
    /// transaction its parts are replaced by the mark of where it ends.
    #[allow(clippy::too_many_arguments)]
    pub fn append_unstaging(
        &self,
        signal: Signal,
        destination: Option<SocketAddr>,
        tag: Bytes,
        entries: Bytes,
        events: u32,
        reserved: u64,
        unstage: Option<Unstage>,
    ) -> oneshot::Receiver<Result<u64, SpoolError>> {
        let (reply, rx) = oneshot::channel();
        let append = Append {
            signal,
            destination,
            tag,
            entries,
            events,
            received_ms: now_ms(),
            queued_at: Instant::now(),
            reserved,
            unstage,
            reply,
        };
        if let Err(mpsc::SendError(Command::Append(append))) =
            self.commands.send(Command::Append(append))
        {
            self.shared.budget.refund(append.reserved);
            let _ = append.reply.send(Err(SpoolError::Closed));
        }
        rx
    }

    /// Keep `bytes`, part of a request still arriving on connection `conn` at `offset` in it
    /// and ending at `stream_end` in the connection's stream, durably (invariant 10: it may
    /// then leave its socket). Resolves once committed.
    pub fn stage(
        &self,
        conn: u128,
        offset: u64,
        stream_end: u64,
        bytes: Bytes,
    ) -> oneshot::Receiver<Result<(), SpoolError>> {
        let (reply, rx) = oneshot::channel();
        self.maintain(Maintenance::Stage {
            conn,
            offset,
            stream_end,
            bytes,
            reply,
        });
        rx
    }

    /// Forget what was staged for `conn` (it ended without completing its request).
    pub fn unstage(&self, conn: u128) {
        self.maintain(Maintenance::Unstage(conn));
    }

    /// What was staged for `conn`, in order (a worker going on with a connection an earlier
    /// one left). Blocking.
    pub fn staged(&self, conn: u128) -> Result<Kept, SpoolError> {
        self.with_read(|txn| read::staged(txn, conn))
    }

    /// The connections with something staged. Blocking.
    pub fn staged_connections(&self) -> Result<Vec<u128>, SpoolError> {
        self.with_read(read::staged_connections)
    }

    /// Remove a record after its upstream ack (invariant 2). Its bytes are released at once;
    /// the delete itself is committed with the next group.
    pub fn delete(&self, key: u64, stored_len: u64) {
        self.shared.budget.release(stored_len);
        self.maintain(Maintenance::Delete(key));
    }

    /// Remember a failed attempt (committed lazily, shown by `ackgate spool list`).
    pub fn note_failure(&self, key: u64, attempts: u32, error: String) {
        self.maintain(Maintenance::Failure {
            key,
            attempts,
            error,
        });
    }

    /// Move a record that can never be delivered to the dead letters, with the reason and the
    /// node that refused it. It is never dropped silently: it stays until requeued or purged,
    /// and a failed commit keeps the move pending for the next one.
    pub fn dead_letter(&self, key: u64, stored_len: u64, reason: String, origin: String) {
        self.shared.budget.release(stored_len);
        self.maintain(Maintenance::DeadLetter {
            key,
            reason,
            origin,
        });
    }

    /// Keep the bytes of a rejected request for inspection (invariant 4). Never sent upstream.
    pub fn reject(&self, origin: String, reason: String, bytes: Bytes) {
        self.maintain(Maintenance::Reject {
            origin,
            reason,
            bytes,
        });
    }

    /// Replace a record by several smaller ones (new keys, new chunk ids, same tag and
    /// received time), in one transaction. Resolves with the new keys (none if the record was
    /// gone).
    pub fn split(
        &self,
        key: u64,
        parts: Vec<(u32, Bytes)>,
    ) -> oneshot::Receiver<Result<Vec<u64>, SpoolError>> {
        let (reply, rx) = oneshot::channel();
        self.maintain(Maintenance::Split { key, parts, reply });
        rx
    }

    /// Put a dead-lettered record back in the queue (with its original chunk id).
    pub fn requeue_dead(&self, id: u64) -> oneshot::Receiver<Result<Option<u64>, SpoolError>> {
        let (reply, rx) = oneshot::channel();
        self.maintain(Maintenance::Requeue { id, reply });
        rx
    }

    /// Delete every dead letter. Resolves with how many there were.
    pub fn purge_dead(&self) -> oneshot::Receiver<Result<u64, SpoolError>> {
        let (reply, rx) = oneshot::channel();
        self.maintain(Maintenance::Purge { reply });
        rx
    }

    fn maintain(&self, work: Maintenance) {
        // The writer is gone only at shutdown or if it died, and then the process exits.
        let _ = self.commands.send(Command::Maintenance(work));
    }

    /// Unit tests: make the writer thread panic.
    #[cfg(test)]
    pub(crate) fn panic_writer(&self) {
        let _ = self.commands.send(Command::Panic);
    }

    /// Run `read` in a read transaction. If the handle turns out poisoned (an I/O error now or
    /// before), ask the writer to reopen it and wait for that, bounded, then read again: a
    /// transient disk error delays a read, it does not fail it (invariant 9).
    fn with_read<T>(
        &self,
        read: impl Fn(&ReadTransaction) -> Result<T, SpoolError>,
    ) -> Result<T, SpoolError> {
        let deadline = Instant::now() + READ_WAITS_FOR_REOPEN;
        loop {
            let Some((db, generation)) = self.shared.store.current() else {
                // A reopen is under way or gave up: ask (again) and wait for it.
                let generation = self.shared.store.generation();
                if self.commands.send(Command::Reopen { generation }).is_err() {
                    return Err(SpoolError::Closed);
                }
                if !self.shared.store.wait_for_newer(generation, deadline) {
                    return Err(SpoolError::Unavailable);
                }
                continue;
            };
            let result = db
                .begin_read()
                .map_err(SpoolError::read)
                .and_then(|txn| read(&txn));
            drop(db);
            match result {
                Err(error) if error.needs_reopen() => {
                    tracing::warn!(%error, path = %self.path().display(),
                        "spool read failed: reopening the spool and reading again");
                    if self.commands.send(Command::Reopen { generation }).is_err() {
                        return Err(SpoolError::Closed);
                    }
                    if !self.shared.store.wait_for_newer(generation, deadline) {
                        return Err(SpoolError::Unavailable);
                    }
                }
                other => return other,
            }
        }
    }

    /// Dead letters with ids ≥ `from`, oldest first. Blocking.
    pub fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        self.with_read(|txn| read::dead_letters(txn, from, max))
    }

    /// How many dead letters there are. Blocking.
    pub fn dead_letter_count(&self) -> Result<u64, SpoolError> {
        self.with_read(read::dead_letter_count)
    }

    /// The highest committed key, to wait on for new records.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    pub fn stats(&self) -> SpoolStats {
        let budget = &self.shared.budget;
        SpoolStats {
            records: self.shared.records.load(Ordering::Acquire),
            bytes: budget.used(),
            max_bytes: budget.max(),
            commits: self.shared.commits.load(Ordering::Acquire),
            dead_letter_bytes: self.shared.dead_bytes.load(Ordering::Acquire),
            disk_full: budget.is_blocked(),
            full: budget.is_full(),
            available: self.shared.store.is_open(),
            last_commit_ms: self.shared.last_commit_ms.load(Ordering::Acquire),
            last_commit_micros: self.shared.last_commit_micros.load(Ordering::Acquire),
        }
    }

    /// Read up to `max_records` records (and about `max_bytes` of entries) with keys ≥ `from`,
    /// oldest first; records that do not decode are reported apart, never skipped silently.
    /// Blocking: call from a blocking context.
    pub fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<ReadBatch, SpoolError> {
        self.with_read(|txn| read::batch(txn, from, max_records, max_bytes))
    }

    /// Records just committed with keys `cursor`, `cursor + 1`, … (no gap), from memory: the
    /// caller reads from redb when this is empty. Never blocks on I/O.
    pub fn take_fresh(
        &self,
        cursor: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Vec<StoredRecord> {
        self.shared.fresh.take_from(cursor, max_records, max_bytes)
    }

    /// Read one record. Blocking.
    pub fn read(
        &self,
        key: u64,
    ) -> Result<Option<Result<StoredRecord, DamagedRecord>>, SpoolError> {
        let batch = self.read_from(key, 1, 0)?;
        if let Some(record) = batch.records.into_iter().find(|r| r.key == key) {
            return Ok(Some(Ok(record)));
        }
        Ok(batch.damaged.into_iter().find(|d| d.key == key).map(Err))
    }

    /// When the oldest record still queued was received (ms since the epoch). Blocking.
    pub fn oldest_received_ms(&self) -> Option<u64> {
        self.with_read(read::oldest_received_ms).ok().flatten()
    }

    /// Every record key, in order (tests audit the dispatcher with it). Blocking.
    pub fn keys(&self) -> Result<Vec<u64>, SpoolError> {
        self.with_read(read::keys)
    }

    /// Records and stored bytes queued per original destination, as last committed (records
    /// without one are not in it).
    pub fn queued_by_destination(&self) -> Vec<(SocketAddr, Queued)> {
        self.shared.queued.snapshot()
    }

    /// Commit every pending delete, note and dead letter durably, and wait for it.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.maintain(Maintenance::Flush { reply });
        rx.await.map_err(|_| SpoolError::Closed)?
    }
}

#[cfg(test)]
mod tests;
