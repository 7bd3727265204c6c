//! The redb spool: every accepted batch waits here until an aggregator has acked it.
//!
//! One thread owns all writes (redb allows one write transaction at a time, and a single owner
//! makes group commit natural): it takes every request that is waiting, up to
//! `group_commit_bytes`, writes them in one transaction, commits once with
//! `Durability::Immediate`, and only then answers the waiting connections, which only then ack
//! their senders (invariant 1). Requests with the same tag in one group become one record.
//! Deletes after upstream acks ride in the next group commit; with no ingest they are flushed
//! at most every [`LAZY_FLUSH`] (a lost delete is a duplicate upstream, never a loss).
//! Records are only removed by [`Spool::delete`], which the dispatcher calls after an ack
//! (invariant 2). Each record's chunk id is drawn here, once (invariant 3).
//!
//! The byte budget ([`Spool::reserve`]) is what turns a full spool into TCP backpressure
//! (invariant 5): ingress waits for room before it hands a request over, and does not read its
//! socket while it waits.

pub mod record;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{oneshot, watch, Notify};

pub use record::{DeadKind, DeadLetter, RecordError, StoredRecord};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::forward::frame::Signal;

/// Records: sequence key → [`record::encode_record`] value.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Retry state: sequence key → [`record::encode_retry`] value.
const RETRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("retries");
/// Counters kept in step with the records in the same transactions.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_NEXT_KEY: &str = "next_key";
const META_BYTES: &str = "bytes";
const META_RECORDS: &str = "records";
const META_NEXT_DEAD: &str = "next_dead";
const META_DEAD_BYTES: &str = "dead_bytes";
/// Dead letters: id → [`record::encode_dead`] value. Records that can never be delivered and
/// the bytes of rejected requests, kept for inspection, bounded by `dead_letter_max_bytes`.
const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");

/// Longest a delete waits for a group commit to ride in before it is committed on its own.
pub const LAZY_FLUSH: Duration = Duration::from_millis(100);
/// Requests with the same tag in one group are merged into records of at most this size.
pub const MERGE_LIMIT: usize = 1 << 20;

/// Why the spool could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool directory {path}: {reason}")]
    CreateDir { path: PathBuf, reason: String },
    #[error("cannot open spool {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("spool {path} is open in another process (a running ackgate?): stop it first, or use its metrics endpoint")]
    InUse { path: PathBuf },
    #[error("spool commit failed: {0}")]
    Commit(String),
    #[error("spool read failed: {0}")]
    Read(String),
    #[error("spool record {key} is damaged: {source}")]
    Damaged { key: u64, source: RecordError },
    #[error("spool is shutting down")]
    Closed,
}

fn err<E: std::fmt::Display>(make: fn(String) -> SpoolError) -> impl Fn(E) -> SpoolError {
    move |e| make(e.to_string())
}

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
}

enum Command {
    Append(Append),
    Maintenance(Maintenance),
    Shutdown(oneshot::Sender<()>),
}

struct Append {
    signal: Signal,
    tag: Bytes,
    entries: Bytes,
    events: u32,
    received_ms: u64,
    /// Bytes reserved in the budget for this request (released if the commit fails).
    reserved: u64,
    reply: oneshot::Sender<Result<u64, SpoolError>>,
}

/// The spool byte budget: reserve before handing a request over, release on delete.
struct Budget {
    used: AtomicU64,
    max: u64,
    freed: Notify,
    /// Set while the disk is full: nothing fits, whatever `used` says.
    blocked: std::sync::atomic::AtomicBool,
    /// Bytes handed to the writer and not yet committed (they sit in memory meanwhile).
    uncommitted: AtomicU64,
    /// Bound on `uncommitted`: with the writer behind, ingress stops reading, so memory stays
    /// flat however many connections pipeline requests.
    max_uncommitted: u64,
    /// Requests waiting in [`Spool::reserve`] for room.
    waiting: AtomicU64,
}

impl Budget {
    fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Release);
        if !blocked {
            self.freed.notify_waiters();
        }
    }

    fn is_blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }

    fn try_reserve(&self, bytes: u64) -> bool {
        if self.is_blocked() {
            return false;
        }
        let pending = self.uncommitted.load(Ordering::Acquire);
        if pending > 0 && pending + bytes > self.max_uncommitted {
            return false;
        }
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            // A request larger than the whole budget is let through when the spool is empty,
            // so a misconfiguration cannot wedge a connection forever.
            if used + bytes > self.max && used > 0 {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.uncommitted.fetch_add(bytes, Ordering::AcqRel);
                    return true;
                }
                Err(now) => used = now,
            }
        }
    }

    /// Requests of `bytes` left the writer's queue (committed or failed).
    fn settled(&self, bytes: u64) {
        let _ = self
            .uncommitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
        self.freed.notify_waiters();
    }

    fn release(&self, bytes: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(bytes))
            });
        self.freed.notify_waiters();
    }
}

struct Shared {
    /// `None` only while the writer reopens the file after a failed commit.
    db: RwLock<Option<Arc<Database>>>,
    budget: Budget,
    records: AtomicU64,
    dead_bytes: AtomicU64,
    commits: AtomicU64,
    /// Highest key committed so far (0 = none): the dispatcher waits on it for new records.
    committed: watch::Sender<u64>,
    path: PathBuf,
    cache_bytes: usize,
}

/// Handle to the spool: cheap to clone, usable from any task or thread.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    commands: mpsc::Sender<Command>,
}

/// Owns the writer thread; [`SpoolWriter::shutdown`] commits what is pending and joins it.
pub struct SpoolWriter {
    commands: mpsc::Sender<Command>,
    thread: Option<std::thread::JoinHandle<()>>,
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
}

fn open_database(path: &Path, cache_bytes: usize) -> Result<Database, SpoolError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| SpoolError::CreateDir {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    }
    let db = Database::builder()
        .set_cache_size(cache_bytes)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::InUse {
                path: path.to_path_buf(),
            },
            other => SpoolError::Open {
                path: path.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
    // Make sure the tables exist so readers never see "table does not exist".
    let open_err = |e: &dyn std::fmt::Display| SpoolError::Open {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let txn = db.begin_write().map_err(|e| open_err(&e))?;
    {
        txn.open_table(RECORDS).map_err(|e| open_err(&e))?;
        txn.open_table(RETRIES).map_err(|e| open_err(&e))?;
        txn.open_table(META).map_err(|e| open_err(&e))?;
        txn.open_table(DEAD).map_err(|e| open_err(&e))?;
    }
    txn.commit().map_err(|e| open_err(&e))?;
    Ok(db)
}

impl Spool {
    /// Open (or create) the spool and start its writer thread.
    pub fn open(config: &SpoolConfig) -> Result<(Spool, SpoolWriter), SpoolError> {
        let cache_bytes = usize::try_from(config.cache_bytes.0).unwrap_or(usize::MAX);
        let db = open_database(&config.path, cache_bytes)?;
        if !take_reserve(
            &config.path,
            reserve_size(&config.path, config.group_commit_bytes.0),
        ) {
            tracing::warn!(path = %config.path.display(),
                "cannot allocate the spool's disk reserve: a full disk may stall until space frees up");
        }
        let counters = read_counters(&db)?;
        let last_key = counters.next_key - 1;
        let (committed, _) = watch::channel(last_key);
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            budget: Budget {
                used: AtomicU64::new(counters.bytes),
                max: config.max_bytes.0,
                freed: Notify::new(),
                blocked: std::sync::atomic::AtomicBool::new(false),
                uncommitted: AtomicU64::new(0),
                max_uncommitted: config.group_commit_bytes.0.saturating_mul(4).max(1 << 20),
                waiting: AtomicU64::new(0),
            },
            records: AtomicU64::new(counters.records),
            dead_bytes: AtomicU64::new(counters.dead_bytes),
            commits: AtomicU64::new(0),
            committed,
            path: config.path.clone(),
            cache_bytes,
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            commands: rx,
            next_key: counters.next_key,
            next_dead: counters.next_dead,
            bytes: counters.bytes,
            records: counters.records,
            dead_bytes: counters.dead_bytes,
            dead_max_bytes: config.dead_letter_max_bytes.0,
            group_bytes: config.group_commit_bytes.0,
            pending: Vec::new(),
            oldest_pending: None,
            held: Vec::new(),
            pending_urgent: false,
            reserve_bytes: reserve_size(&config.path, config.group_commit_bytes.0),
            unflushed_since: None,
        };
        let thread = std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| SpoolError::Open {
                path: config.path.clone(),
                reason: format!("cannot start writer thread: {e}"),
            })?;
        Ok((
            Spool {
                shared,
                commands: tx.clone(),
            },
            SpoolWriter {
                commands: tx,
                thread: Some(thread),
            },
        ))
    }

    /// Bytes a request will take in the spool (what [`Spool::reserve`] must be given).
    pub fn cost(signal: Signal, tag: &[u8], entries: &[u8]) -> u64 {
        (record::header_len(signal) + tag.len() + entries.len()) as u64
    }

    /// Wait until `bytes` fit under `max_bytes`, then take them. While a connection waits
    /// here it does not read its socket: that is the backpressure of invariant 5.
    pub async fn reserve(&self, bytes: u64) {
        if self.shared.budget.try_reserve(bytes) {
            return;
        }
        // Counted while waiting: a waiting request is what "the spool is full" means to
        // /ready and to the UDP heartbeat (the byte count alone may sit just under the bound).
        let budget = &self.shared.budget;
        budget.waiting.fetch_add(1, Ordering::AcqRel);
        struct Done<'a>(&'a AtomicU64);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _done = Done(&budget.waiting);
        loop {
            let freed = budget.freed.notified();
            if budget.try_reserve(bytes) {
                return;
            }
            freed.await;
        }
    }

    /// Wait while the spool is full (requests wait for room, or the disk is full): the accept
    /// loop stops taking connections meanwhile, so new senders wait in the kernel's backlog
    /// instead of each holding a request in memory.
    pub async fn wait_for_room(&self) {
        loop {
            let freed = self.shared.budget.freed.notified();
            if !self.stats().full {
                return;
            }
            freed.await;
        }
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
        tag: Bytes,
        entries: Bytes,
        events: u32,
        reserved: u64,
    ) -> oneshot::Receiver<Result<u64, SpoolError>> {
        let (reply, rx) = oneshot::channel();
        let append = Append {
            signal,
            tag,
            entries,
            events,
            received_ms: now_ms(),
            reserved,
            reply,
        };
        if let Err(mpsc::SendError(Command::Append(append))) =
            self.commands.send(Command::Append(append))
        {
            self.shared.budget.release(append.reserved);
            self.shared.budget.settled(append.reserved);
            let _ = append.reply.send(Err(SpoolError::Closed));
        }
        rx
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
    /// node that refused it. It is never dropped silently: it stays until requeued or purged.
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
    /// received time), in one transaction. Resolves with the new keys.
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
        let _ = self.commands.send(Command::Maintenance(work));
    }

    /// Dead letters with ids ≥ `from`, oldest first. Blocking.
    pub fn dead_letters(&self, from: u64, max: usize) -> Result<Vec<DeadLetter>, SpoolError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(err(SpoolError::Read))?;
        let dead = read.open_table(DEAD).map_err(err(SpoolError::Read))?;
        let mut out = Vec::new();
        for item in dead.range(from..).map_err(err(SpoolError::Read))? {
            let (id, value) = item.map_err(err(SpoolError::Read))?;
            if let Some(letter) = record::decode_dead(id.value(), value.value()) {
                out.push(letter);
            }
            if out.len() >= max {
                break;
            }
        }
        Ok(out)
    }

    /// The highest committed key, to wait on for new records.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            records: self.shared.records.load(Ordering::Acquire),
            bytes: self.shared.budget.used.load(Ordering::Acquire),
            max_bytes: self.shared.budget.max,
            commits: self.shared.commits.load(Ordering::Acquire),
            dead_letter_bytes: self.shared.dead_bytes.load(Ordering::Acquire),
            disk_full: self.shared.budget.is_blocked(),
            full: self.shared.budget.is_blocked()
                || self.shared.budget.waiting.load(Ordering::Acquire) > 0
                || self.shared.budget.used.load(Ordering::Acquire) >= self.shared.budget.max,
        }
    }

    fn db(&self) -> Result<Arc<Database>, SpoolError> {
        self.shared
            .db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| SpoolError::Read("spool is being reopened".into()))
    }

    /// Read up to `max_records` records (and about `max_bytes`) with keys ≥ `from`, oldest
    /// first. Blocking: call from a blocking context.
    pub fn read_from(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, SpoolError> {
        let db = self.db()?;
        let read = db.begin_read().map_err(err(SpoolError::Read))?;
        let records = read.open_table(RECORDS).map_err(err(SpoolError::Read))?;
        let retries = read.open_table(RETRIES).map_err(err(SpoolError::Read))?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for item in records.range(from..).map_err(err(SpoolError::Read))? {
            let (key, value) = item.map_err(err(SpoolError::Read))?;
            let key = key.value();
            let mut record = record::decode_record(key, value.value())
                .map_err(|source| SpoolError::Damaged { key, source })?;
            if let Some(state) = retries.get(key).map_err(err(SpoolError::Read))? {
                if let Some((attempts, _, error)) = record::decode_retry(state.value()) {
                    record.attempts = attempts;
                    record.last_error = Some(error);
                }
            }
            bytes += record.entries.len();
            out.push(record);
            if out.len() >= max_records || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// When the oldest record still queued was received (ms since the epoch). Blocking.
    pub fn oldest_received_ms(&self) -> Option<u64> {
        let db = self.db().ok()?;
        let read = db.begin_read().ok()?;
        let records = read.open_table(RECORDS).ok()?;
        let (key, value) = records.first().ok()??;
        record::decode_record(key.value(), value.value())
            .ok()
            .map(|r| r.received_ms)
    }

    /// Read one record. Blocking.
    pub fn read(&self, key: u64) -> Result<Option<StoredRecord>, SpoolError> {
        Ok(self
            .read_from(key, 1, 0)?
            .into_iter()
            .next()
            .filter(|r| r.key == key))
    }
}

/// Work that rides in the next group commit (or a lazy flush): nothing waits on it but the
/// spool's own bookkeeping, and losing it in a crash costs a duplicate or a retry, never data.
enum Maintenance {
    Delete(u64),
    Failure {
        key: u64,
        attempts: u32,
        error: String,
    },
    DeadLetter {
        key: u64,
        reason: String,
        origin: String,
    },
    Reject {
        origin: String,
        reason: String,
        bytes: Bytes,
    },
    Split {
        key: u64,
        parts: Vec<(u32, Bytes)>,
        reply: oneshot::Sender<Result<Vec<u64>, SpoolError>>,
    },
    Requeue {
        id: u64,
        reply: oneshot::Sender<Result<Option<u64>, SpoolError>>,
    },
    Purge {
        reply: oneshot::Sender<Result<u64, SpoolError>>,
    },
}

/// The single writer: state that only the writer thread touches.
struct Writer {
    shared: Arc<Shared>,
    commands: mpsc::Receiver<Command>,
    next_key: u64,
    next_dead: u64,
    bytes: u64,
    records: u64,
    dead_bytes: u64,
    dead_max_bytes: u64,
    group_bytes: u64,
    pending: Vec<Maintenance>,
    oldest_pending: Option<Instant>,
    /// Requests whose commit failed because the disk was full: kept, unacked, and retried once
    /// deletes have freed space. While any are held, ingress gets no budget (backpressure).
    held: Vec<Append>,
    /// Pending maintenance that someone waits for (split, requeue, purge): committed durably.
    pending_urgent: bool,
    /// Size of the disk reserve file.
    reserve_bytes: u64,
    /// Since when deletes were committed without fsync (`Durability::None`): they become
    /// durable with the next group commit, or with an idle flush after [`IDLE_FLUSH`].
    unflushed_since: Option<Instant>,
}

/// Longest that non-durable delete commits wait for a group commit to make them durable.
const IDLE_FLUSH: Duration = Duration::from_secs(2);

/// How long a held group waits before its commit is tried again.
const DISK_FULL_RETRY: Duration = Duration::from_millis(500);

/// Disk space kept aside next to the spool (`<spool>.reserve`, allocated, not sparse). When the
/// disk fills up it is released, so that deletes, which need a few pages too, can still be
/// committed and free the space that lets held requests through; it is taken again once the
/// spool commits normally.
fn reserve_path(spool: &Path) -> PathBuf {
    let mut name = spool.as_os_str().to_owned();
    name.push(".reserve");
    PathBuf::from(name)
}

/// Size of the disk reserve: the group commit size, but at most 1/8 of the filesystem.
fn reserve_size(spool: &Path, group_bytes: u64) -> u64 {
    let dir = spool
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let total = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| {
            // SAFETY: statvfs writes into the zeroed struct we own; the path is a valid C string.
            let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::statvfs(c.as_ptr(), &mut stats) };
            (rc == 0).then(|| stats.f_blocks as u64 * stats.f_frsize as u64)
        })
        .unwrap_or(u64::MAX);
    group_bytes.min(total / 8).max(64 << 10)
}

/// Allocate the reserve file (best effort: without it, a full disk only recovers once other
/// space frees up).
fn take_reserve(spool: &Path, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    let path = reserve_path(spool);
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
    else {
        return false;
    };
    // SAFETY: the descriptor is valid for the lifetime of `file`.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
    if rc != 0 {
        let _ = std::fs::remove_file(&path);
        return false;
    }
    true
}

/// Whether a commit error means "no space left on device".
fn is_disk_full(reason: &str) -> bool {
    reason.contains("os error 28")
        || reason.contains("No space left")
        || reason.contains("StorageFull")
}

/// What one transaction changed, applied to the writer's counters once it is committed.
#[derive(Default)]
struct Applied {
    added_records: u64,
    removed_records: u64,
    added_bytes: u64,
    removed_bytes: u64,
    dead_bytes: i64,
    next_dead: u64,
    evicted: u64,
}

type TxResult<T> = Result<T, String>;

/// Replies to a maintenance request, sent once its transaction committed (`None`) or failed.
type Answer = Box<dyn FnOnce(Option<&str>)>;

fn txerr<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl Writer {
    fn run(mut self) {
        loop {
            let waiting_since = match (&self.oldest_pending, self.held.is_empty()) {
                (Some(since), true) => Some((*since, LAZY_FLUSH)),
                (Some(since), false) => Some((*since, DISK_FULL_RETRY.min(LAZY_FLUSH))),
                (None, false) => Some((Instant::now(), DISK_FULL_RETRY)),
                (None, true) => self.unflushed_since.map(|since| (since, IDLE_FLUSH)),
            };
            let first = match waiting_since {
                Some((since, patience)) => {
                    let wait = patience.saturating_sub(since.elapsed());
                    match self.commands.recv_timeout(wait) {
                        Ok(command) => Some(command),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            self.commit_group(Vec::new(), true);
                            return;
                        }
                    }
                }
                None => match self.commands.recv() {
                    Ok(command) => Some(command),
                    Err(_) => return,
                },
            };
            let mut appends = Vec::new();
            let mut group = 0u64;
            let mut shutdown = None;
            let mut next = first;
            while let Some(command) = next.take() {
                match command {
                    Command::Append(append) => {
                        group += append.entries.len() as u64;
                        appends.push(append);
                    }
                    Command::Maintenance(work) => {
                        let urgent = matches!(
                            work,
                            Maintenance::Split { .. }
                                | Maintenance::Requeue { .. }
                                | Maintenance::Purge { .. }
                        );
                        self.pending.push(work);
                        self.pending_urgent |= urgent;
                        let since = self.oldest_pending.get_or_insert_with(Instant::now);
                        if urgent {
                            // Someone waits for the answer: do not make it wait LAZY_FLUSH.
                            *since -= LAZY_FLUSH;
                        }
                    }
                    Command::Shutdown(reply) => {
                        shutdown = Some(reply);
                        break;
                    }
                }
                if group >= self.group_bytes {
                    break;
                }
                next = self.commands.try_recv().ok();
            }
            let due = self
                .oldest_pending
                .is_some_and(|since| since.elapsed() >= LAZY_FLUSH);
            if !self.held.is_empty() {
                // Disk full earlier: first commit the deletes alone, to free space, then try
                // the held requests (oldest first) with whatever came since.
                if !self.pending.is_empty() {
                    // Durable: only a durable commit lets redb reuse the freed pages.
                    self.commit_group(Vec::new(), true);
                }
                let mut retry = std::mem::take(&mut self.held);
                retry.append(&mut appends);
                appends = retry;
            }
            let idle_flush = self
                .unflushed_since
                .is_some_and(|since| since.elapsed() >= IDLE_FLUSH);
            if !appends.is_empty() || due || shutdown.is_some() || idle_flush {
                // Requests are acked on this commit: durable. Deletes and retry notes alone
                // are not worth an fsync of their own (a lost delete is a duplicate upstream,
                // never a loss): they ride in the next durable commit.
                let durable =
                    !appends.is_empty() || shutdown.is_some() || idle_flush || self.pending_urgent;
                self.commit_group(appends, durable);
            }
            if let Some(reply) = shutdown {
                // Still held (disk still full): those senders get no ack and will resend;
                // nothing they were told was stored is lost.
                for append in self.held.drain(..) {
                    self.shared.budget.settled(append.reserved);
                    let _ = append.reply.send(Err(SpoolError::Commit(
                        "shutting down with the spool disk full".into(),
                    )));
                }
                let _ = reply.send(());
                return;
            }
        }
    }

    /// One write transaction, then every waiter is answered. `durable`: with fsync
    /// (`Durability::Immediate`); otherwise persisted by the next durable commit.
    fn commit_group(&mut self, appends: Vec<Append>, durable: bool) {
        self.oldest_pending = None;
        self.pending_urgent = false;
        if appends.is_empty()
            && self.pending.is_empty()
            && !(durable && self.unflushed_since.is_some())
        {
            return;
        }
        // Appends are always acked on this commit, so they always get fsync (invariant 1).
        let durable = durable || !appends.is_empty();
        let current = |shared: &Shared| shared.db.read().unwrap_or_else(|p| p.into_inner()).clone();
        let db = match current(&self.shared) {
            Some(db) => db,
            None => {
                self.reopen();
                match current(&self.shared) {
                    Some(db) => db,
                    None => {
                        let reason = "spool file cannot be opened";
                        for append in appends {
                            self.shared.budget.release(append.reserved);
                            self.shared.budget.settled(append.reserved);
                            let _ = append.reply.send(Err(SpoolError::Commit(reason.into())));
                        }
                        return;
                    }
                }
            }
        };
        let received = now_ms();
        // Merge same-tag log requests of this group, keeping arrival order within a tag.
        // Metrics and traces payloads are never merged: fluent-bit decodes one context per
        // request, so a concatenation would lose all but the first at the aggregator.
        let mut merged: Vec<(Bytes, Signal, Vec<usize>, usize)> = Vec::new();
        for (i, append) in appends.iter().enumerate() {
            let slot = match append.signal {
                Signal::Logs => merged.iter_mut().rev().find(|(tag, signal, _, len)| {
                    *signal == Signal::Logs
                        && *tag == append.tag
                        && *len + append.entries.len() <= MERGE_LIMIT
                }),
                Signal::Metrics | Signal::Traces => None,
            };
            match slot {
                Some((_, _, members, len)) => {
                    members.push(i);
                    *len += append.entries.len();
                }
                None => merged.push((
                    append.tag.clone(),
                    append.signal,
                    vec![i],
                    append.entries.len(),
                )),
            }
        }
        let pending = std::mem::take(&mut self.pending);
        // Kept aside: if the commit fails, these deletes must still happen (they free space).
        let deletes: Vec<u64> = pending
            .iter()
            .filter_map(|w| match w {
                Maintenance::Delete(key) => Some(*key),
                _ => None,
            })
            .collect();
        let mut next_key = self.next_key;
        let mut keys = vec![0u64; appends.len()];
        let mut answers: Vec<Answer> = Vec::new();
        let started = Instant::now();
        let result = (|| -> TxResult<Applied> {
            let mut txn = db.begin_write().map_err(txerr)?;
            // Explicit though it is the default: senders are acked on this commit (invariant 1).
            // Non-durable commits carry only deletes and retry notes.
            txn.set_durability(if durable {
                Durability::Immediate
            } else {
                Durability::None
            })
            .map_err(txerr)?;
            let mut applied = Applied {
                next_dead: self.next_dead,
                ..Applied::default()
            };
            {
                let mut records = txn.open_table(RECORDS).map_err(txerr)?;
                let mut retries = txn.open_table(RETRIES).map_err(txerr)?;
                let mut dead = txn.open_table(DEAD).map_err(txerr)?;
                for (tag, signal, members, _) in &merged {
                    let events: u32 = members
                        .iter()
                        .map(|&i| appends[i].events)
                        .fold(0u32, |a, b| a.saturating_add(b));
                    let parts: Vec<&[u8]> =
                        members.iter().map(|&i| &appends[i].entries[..]).collect();
                    let received_ms = members
                        .iter()
                        .map(|&i| appends[i].received_ms)
                        .min()
                        .unwrap_or(received);
                    let chunk_id = *uuid::Uuid::new_v4().as_bytes();
                    let value =
                        record::encode_record(&chunk_id, received_ms, events, *signal, tag, &parts);
                    applied.added_bytes += value.len() as u64;
                    applied.added_records += 1;
                    records.insert(next_key, value.as_slice()).map_err(txerr)?;
                    for &i in members {
                        keys[i] = next_key;
                    }
                    next_key += 1;
                }
                let now = now_ms();
                for work in pending {
                    match work {
                        Maintenance::Delete(key) => {
                            if let Some(old) = records.remove(key).map_err(txerr)? {
                                applied.removed_bytes += old.value().len() as u64;
                                applied.removed_records += 1;
                            }
                            retries.remove(key).map_err(txerr)?;
                        }
                        Maintenance::Failure {
                            key,
                            attempts,
                            error,
                        } => {
                            // Only for records that still exist (an ack may have raced it).
                            if records.get(key).map_err(txerr)?.is_some() {
                                let value = record::encode_retry(attempts, now, &error);
                                retries.insert(key, value.as_slice()).map_err(txerr)?;
                            }
                        }
                        Maintenance::DeadLetter {
                            key,
                            reason,
                            origin,
                        } => {
                            let old = match records.remove(key).map_err(txerr)? {
                                Some(guard) => guard.value().to_vec(),
                                None => continue,
                            };
                            retries.remove(key).map_err(txerr)?;
                            applied.removed_bytes += old.len() as u64;
                            applied.removed_records += 1;
                            let value = record::encode_dead(
                                record::DeadKind::Record,
                                now,
                                &reason,
                                &origin,
                                &old,
                            );
                            applied.dead_bytes += value.len() as i64;
                            dead.insert(applied.next_dead, value.as_slice())
                                .map_err(txerr)?;
                            applied.next_dead += 1;
                        }
                        Maintenance::Reject {
                            origin,
                            reason,
                            bytes,
                        } => {
                            let value = record::encode_dead(
                                record::DeadKind::Rejected,
                                now,
                                &reason,
                                &origin,
                                &bytes,
                            );
                            applied.dead_bytes += value.len() as i64;
                            dead.insert(applied.next_dead, value.as_slice())
                                .map_err(txerr)?;
                            applied.next_dead += 1;
                        }
                        Maintenance::Split { key, parts, reply } => {
                            let removed = match records.remove(key).map_err(txerr)? {
                                Some(guard) => {
                                    Some(record::decode_record(key, guard.value()).map_err(txerr)?)
                                }
                                None => None,
                            };
                            let Some(old) = removed else {
                                answers.push(Box::new(move |_| {
                                    let _ = reply.send(Ok(Vec::new()));
                                }));
                                continue;
                            };
                            retries.remove(key).map_err(txerr)?;
                            applied.removed_bytes += old.stored_len();
                            applied.removed_records += 1;
                            let mut new_keys = Vec::with_capacity(parts.len());
                            for (events, entries) in &parts {
                                let chunk_id = *uuid::Uuid::new_v4().as_bytes();
                                let value = record::encode_record(
                                    &chunk_id,
                                    old.received_ms,
                                    *events,
                                    old.signal,
                                    &old.tag,
                                    &[entries],
                                );
                                applied.added_bytes += value.len() as u64;
                                applied.added_records += 1;
                                records.insert(next_key, value.as_slice()).map_err(txerr)?;
                                new_keys.push(next_key);
                                next_key += 1;
                            }
                            answers.push(Box::new(move |failed| {
                                let _ = reply.send(match failed {
                                    None => Ok(new_keys),
                                    Some(reason) => Err(SpoolError::Commit(reason.to_string())),
                                });
                            }));
                        }
                        Maintenance::Requeue { id, reply } => {
                            let found = dead.remove(id).map_err(txerr)?.map(|v| v.value().to_vec());
                            let requeued =
                                match found.as_deref().and_then(|v| record::decode_dead(id, v)) {
                                    Some(letter) if letter.kind == record::DeadKind::Record => {
                                        applied.dead_bytes -=
                                            found.as_ref().map_or(0, |v| v.len() as i64);
                                        // The original record value, chunk id included (invariant 3).
                                        records
                                            .insert(next_key, &letter.payload[..])
                                            .map_err(txerr)?;
                                        applied.added_bytes += letter.payload.len() as u64;
                                        applied.added_records += 1;
                                        next_key += 1;
                                        Some(next_key - 1)
                                    }
                                    Some(_) => {
                                        // Rejected input cannot be sent: put it back untouched.
                                        if let Some(v) = &found {
                                            dead.insert(id, v.as_slice()).map_err(txerr)?;
                                        }
                                        None
                                    }
                                    None => None,
                                };
                            answers.push(Box::new(move |failed| {
                                let _ = reply.send(match failed {
                                    None => Ok(requeued),
                                    Some(reason) => Err(SpoolError::Commit(reason.to_string())),
                                });
                            }));
                        }
                        Maintenance::Purge { reply } => {
                            let mut purged = 0u64;
                            while let Some((_, value)) = dead.pop_first().map_err(txerr)? {
                                applied.dead_bytes -= value.value().len() as i64;
                                purged += 1;
                            }
                            answers.push(Box::new(move |failed| {
                                let _ = reply.send(match failed {
                                    None => Ok(purged),
                                    Some(reason) => Err(SpoolError::Commit(reason.to_string())),
                                });
                            }));
                        }
                    }
                }
                // Dead letters are bounded: the oldest go first, loudly.
                let mut dead_total = (self.dead_bytes as i64 + applied.dead_bytes).max(0) as u64;
                while dead_total > self.dead_max_bytes {
                    let Some((id, value)) = dead.pop_first().map_err(txerr)? else {
                        break;
                    };
                    let len = value.value().len() as u64;
                    tracing::error!(
                        dead_letter = id.value(),
                        bytes = len,
                        "dead letters over spool.dead_letter_max_bytes: evicting the oldest one"
                    );
                    dead_total = dead_total.saturating_sub(len);
                    applied.dead_bytes -= len as i64;
                    applied.evicted += 1;
                }
                let mut meta = txn.open_table(META).map_err(txerr)?;
                let bytes =
                    (self.bytes + applied.added_bytes).saturating_sub(applied.removed_bytes);
                let count =
                    (self.records + applied.added_records).saturating_sub(applied.removed_records);
                meta.insert(META_NEXT_KEY, next_key).map_err(txerr)?;
                meta.insert(META_BYTES, bytes).map_err(txerr)?;
                meta.insert(META_RECORDS, count).map_err(txerr)?;
                meta.insert(META_NEXT_DEAD, applied.next_dead)
                    .map_err(txerr)?;
                meta.insert(META_DEAD_BYTES, dead_total).map_err(txerr)?;
            }
            txn.commit().map_err(txerr)?;
            Ok(applied)
        })();
        // The handle must be gone before a reopen: redb locks the file per handle.
        drop(db);
        match result {
            Ok(applied) => {
                if durable {
                    self.unflushed_since = None;
                } else {
                    self.unflushed_since.get_or_insert_with(Instant::now);
                }
                // Only once the held requests themselves are stored: a delete-only commit in
                // between does not mean there is room for them.
                if self.shared.budget.is_blocked() && self.held.is_empty() && !appends.is_empty() {
                    if !take_reserve(&self.shared.path, self.reserve_bytes) {
                        tracing::warn!(path = %self.shared.path.display(), "spool disk reserve not taken again yet");
                    }
                    tracing::warn!(path = %self.shared.path.display(), "spool disk has room again: ingress resumes");
                    self.shared.budget.set_blocked(false);
                }
                let m = crate::metrics::metrics();
                m.commit_seconds.observe(started.elapsed().as_secs_f64());
                if !appends.is_empty() {
                    m.commit_requests.observe(appends.len() as f64);
                }
                self.next_key = next_key;
                self.next_dead = applied.next_dead;
                self.bytes =
                    (self.bytes + applied.added_bytes).saturating_sub(applied.removed_bytes);
                self.records =
                    (self.records + applied.added_records).saturating_sub(applied.removed_records);
                self.dead_bytes = (self.dead_bytes as i64 + applied.dead_bytes).max(0) as u64;
                self.shared.records.store(self.records, Ordering::Release);
                self.shared
                    .dead_bytes
                    .store(self.dead_bytes, Ordering::Release);
                self.shared.commits.fetch_add(1, Ordering::AcqRel);
                // The budget follows the file: reservations were per-request estimates, and
                // deletes were released when they were requested.
                let reserved: u64 = appends.iter().map(|a| a.reserved).sum();
                let appended: u64 = applied.added_bytes;
                if appended > reserved {
                    self.shared
                        .budget
                        .used
                        .fetch_add(appended - reserved, Ordering::AcqRel);
                } else if reserved > appended {
                    self.shared.budget.release(reserved - appended);
                }
                if next_key > 1 {
                    self.shared.committed.send_replace(next_key - 1);
                }
                let settled: u64 = appends.iter().map(|a| a.reserved).sum();
                for (append, key) in appends.into_iter().zip(keys) {
                    let _ = append.reply.send(Ok(key));
                }
                self.shared.budget.settled(settled);
                for answer in answers {
                    answer(None);
                }
            }
            Err(reason) if is_disk_full(&reason) && !appends.is_empty() => {
                let released = std::fs::remove_file(reserve_path(&self.shared.path)).is_ok();
                if released {
                    tracing::warn!(path = %self.shared.path.display(),
                        "spool disk full: released the disk reserve so deletes can still be committed");
                }
                if !self.shared.budget.is_blocked() {
                    tracing::error!(%reason, requests = appends.len(), path = %self.shared.path.display(),
                        "spool disk is full: holding these requests unacked and pausing ingress until upstream acks free space");
                }
                self.shared.budget.set_blocked(true);
                for answer in answers {
                    answer(Some(&reason));
                }
                self.pending
                    .extend(deletes.into_iter().map(Maintenance::Delete));
                self.held = appends;
                self.reopen();
            }
            Err(reason) => {
                if is_disk_full(&reason)
                    && std::fs::remove_file(reserve_path(&self.shared.path)).is_ok()
                {
                    tracing::warn!(path = %self.shared.path.display(),
                        "spool disk full: released the disk reserve so deletes can still be committed");
                }
                tracing::error!(%reason, requests = appends.len(), path = %self.shared.path.display(),
                    "spool commit failed: no request of this group is acked; reopening the spool");
                self.pending
                    .extend(deletes.into_iter().map(Maintenance::Delete));
                for append in appends {
                    self.shared.budget.release(append.reserved);
                    self.shared.budget.settled(append.reserved);
                    let _ = append.reply.send(Err(SpoolError::Commit(reason.clone())));
                }
                for answer in answers {
                    answer(Some(&reason));
                }
                // redb: a failed commit is final, its changes may or may not be durable, and
                // the handle refuses further writes until reopened.
                self.reopen();
            }
        }
    }

    /// After a failed commit: drop the handle (redb locks the file per handle, and a failed
    /// handle refuses writes), open the file again, and reload the counters from it, since the
    /// failed commit may or may not have reached the disk. Retries until it succeeds.
    fn reopen(&mut self) {
        let mut delay = Duration::from_millis(50);
        // Bounded, so the writer keeps answering (shutdown included); an unopened spool is
        // tried again at the next group.
        for _ in 0..8 {
            *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = None;
            let reopened = open_database(&self.shared.path, self.shared.cache_bytes)
                .and_then(|db| read_counters(&db).map(|counters| (db, counters)));
            match reopened {
                Ok((db, counters)) => {
                    self.next_key = counters.next_key;
                    self.bytes = counters.bytes;
                    self.records = counters.records;
                    self.next_dead = counters.next_dead;
                    self.dead_bytes = counters.dead_bytes;
                    self.shared
                        .records
                        .store(counters.records, Ordering::Release);
                    self.shared
                        .dead_bytes
                        .store(counters.dead_bytes, Ordering::Release);
                    // Requests still held keep their reservations.
                    let held: u64 = self.held.iter().map(|a| a.reserved).sum();
                    self.shared
                        .budget
                        .used
                        .store(counters.bytes + held, Ordering::Release);
                    self.shared.budget.freed.notify_waiters();
                    *self.shared.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
                    tracing::warn!(path = %self.shared.path.display(), "spool reopened after a failed commit");
                    return;
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?delay, "spool reopen failed");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Counters as last committed.
struct Counters {
    next_key: u64,
    bytes: u64,
    records: u64,
    next_dead: u64,
    dead_bytes: u64,
}

fn read_counters(db: &Database) -> Result<Counters, SpoolError> {
    let read = db.begin_read().map_err(err(SpoolError::Read))?;
    let meta = read.open_table(META).map_err(err(SpoolError::Read))?;
    let get = |name: &str| -> Result<u64, SpoolError> {
        Ok(meta
            .get(name)
            .map_err(err(SpoolError::Read))?
            .map(|g| g.value())
            .unwrap_or(0))
    };
    Ok(Counters {
        next_key: get(META_NEXT_KEY)?.max(1),
        bytes: get(META_BYTES)?,
        records: get(META_RECORDS)?,
        next_dead: get(META_NEXT_DEAD)?.max(1),
        dead_bytes: get(META_DEAD_BYTES)?,
    })
}
