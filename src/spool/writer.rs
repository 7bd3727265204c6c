//! The spool writer thread: the one owner of redb writes.
//!
//! Each wake-up takes every command waiting (up to `group_commit_bytes` of requests), writes
//! them in one transaction ([`super::group`]), commits once, and only then answers the waiting
//! connections, which only then ack their senders (invariant 1). Maintenance (deletes after
//! acks, retry notes, dead letters) rides in the next group commit, so it costs no fsync of its
//! own under load; with no ingest it is committed on its own within [`LAZY_FLUSH`]. Every
//! commit is durable: a delete lost in a crash is a duplicate upstream, and bounding that
//! window to [`LAZY_FLUSH`] of deliveries (not seconds) costs at most ten fsyncs a second.
//!
//! Failure paths, each recovered from without a restart (invariant 9):
//! - **disk full** (ENOSPC/EDQUOT on a group with requests): the requests are held unacked,
//!   ingress gets no budget (backpressure), the disk reserve is released so deletes can still
//!   commit, and the held requests are retried after every commit of deletes until they fit;
//! - **any other failed commit**: redb's commit is final and its handle refuses further work,
//!   so the group's requests are answered with the error (no ack; the sender resends), the
//!   handle is reopened and the counters reloaded from the file;
//! - **a handle poisoned before the group touched it** (a reader's I/O error): nothing of the
//!   group was written, so it is written again once on the reopened handle;
//! - **a reader asks for a reopen** ([`Command::Reopen`]): done unless someone reopened since.
//!
//! Maintenance that nobody waits for (a delete, a dead letter) is never dropped by a failed
//! commit: it stays pending and goes with the next one (invariant 8).

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redb::{Database, ReadableDatabase};
use tokio::sync::oneshot;

use super::error::SpoolError;
use super::group::{self, Applied, Failed, Group, Outcome, Stage};
use super::reserve::DiskReserve;
use super::store::{Counters, RECORDS};
use super::Shared;
use crate::clock::now_ms;
use crate::forward::frame::Signal;

/// Longest a delete waits for a group commit to ride in before it is committed on its own.
pub const LAZY_FLUSH: Duration = Duration::from_millis(100);
/// How long a held group waits before its commit is tried again.
const DISK_FULL_RETRY: Duration = Duration::from_millis(500);
/// Compaction rewrites the whole file: while the disk stays full, at most this often.
const COMPACT_AT_MOST_EVERY: Duration = Duration::from_secs(10);
/// Attempts of one reopen, and the delays between them (doubling): ~4.5 s in all, so the
/// writer keeps answering (shutdown included); a spool that did not open is tried again at the
/// next group or read.
const REOPEN_TRIES: u32 = 8;
const REOPEN_FIRST_DELAY: Duration = Duration::from_millis(50);
const REOPEN_MAX_DELAY: Duration = Duration::from_secs(1);

pub(super) enum Command {
    Append(Append),
    Maintenance(Maintenance),
    /// A reader found the handle of this generation poisoned.
    Reopen {
        generation: u64,
    },
    Shutdown(oneshot::Sender<()>),
    /// Unit tests: make the writer thread die as a bug would.
    #[cfg(test)]
    Panic,
}

/// A request handed over by a connection, answered with its record key once committed.
pub(super) struct Append {
    pub signal: Signal,
    /// Transparent mode: where the sender's connection was going.
    pub destination: Option<std::net::SocketAddr>,
    pub tag: Bytes,
    pub entries: Bytes,
    pub events: u32,
    pub received_ms: u64,
    /// When it was handed to the writer.
    pub queued_at: Instant,
    /// Bytes reserved in the budget for this request (given back if it fails).
    pub reserved: u64,
    /// The request's prefix was staged: its parts are replaced by a mark of where the request
    /// ends in the same transaction.
    pub unstage: Option<super::Unstage>,
    pub reply: oneshot::Sender<Result<u64, SpoolError>>,
}

/// Work that rides in the next group commit (or a lazy flush). The first four are
/// fire-and-forget: losing them in a crash costs a duplicate or a retry, never data. The
/// others are answered once committed.
pub(super) enum Maintenance {
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
    /// Commit whatever is pending, durably.
    Flush {
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// Keep part of a request that is still arriving, durably, so that it may leave its socket.
    Stage {
        conn: u128,
        offset: u64,
        /// Where the part ends in the connection's stream ([`super::staged`]).
        stream_end: u64,
        bytes: Bytes,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    /// A connection ended without completing its staged request: its prefix goes.
    Unstage(u128),
}

impl Maintenance {
    /// Someone waits for the answer: commit it now, not after [`LAZY_FLUSH`].
    fn is_urgent(&self) -> bool {
        matches!(
            self,
            Maintenance::Split { .. }
                | Maintenance::Requeue { .. }
                | Maintenance::Purge { .. }
                | Maintenance::Flush { .. }
                | Maintenance::Stage { .. }
        )
    }

    /// The record this removes whose bytes the budget already gave back.
    fn released_key(&self) -> Option<u64> {
        match self {
            Maintenance::Delete(key) | Maintenance::DeadLetter { key, .. } => Some(*key),
            _ => None,
        }
    }

    fn answer(self, outcome: Outcome) {
        match (self, outcome) {
            (Maintenance::Split { key, reply, .. }, Outcome::Split(result)) => {
                let _ = reply.send(result.map_err(|source| SpoolError::Damaged { key, source }));
            }
            (Maintenance::Requeue { reply, .. }, Outcome::Requeued(key)) => {
                let _ = reply.send(Ok(key));
            }
            (Maintenance::Purge { reply }, Outcome::Purged(count)) => {
                let _ = reply.send(Ok(count));
            }
            (Maintenance::Flush { reply }, _) | (Maintenance::Stage { reply, .. }, _) => {
                let _ = reply.send(Ok(()));
            }
            _ => {}
        }
    }

    /// The commit carrying this failed: answer it with the error, or keep it for the next one.
    fn fail(self, error: &SpoolError) -> Option<Maintenance> {
        match self {
            Maintenance::Split { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
                None
            }
            Maintenance::Requeue { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
                None
            }
            Maintenance::Purge { reply } => {
                let _ = reply.send(Err(error.clone()));
                None
            }
            Maintenance::Flush { reply } | Maintenance::Stage { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
                None
            }
            kept => Some(kept),
        }
    }
}

impl Append {
    fn fail(self, shared: &Shared, error: SpoolError) {
        shared.budget.refund(self.reserved);
        let _ = self.reply.send(Err(error));
    }
}

/// How the writer thread ended when nobody made it panic.
pub(super) enum Stopped {
    /// [`Command::Shutdown`]: everything pending was committed (or answered).
    Shutdown,
    /// Every handle was dropped.
    Disconnected,
}

/// What one wake-up collected.
struct Batch {
    appends: Vec<Append>,
    shutdown: Option<oneshot::Sender<()>>,
    reopen: Option<u64>,
}

/// The single writer: state that only the writer thread touches.
pub(super) struct Writer {
    pub shared: Arc<Shared>,
    pub commands: mpsc::Receiver<Command>,
    pub counters: Counters,
    pub reserve: DiskReserve,
    pub pending: Vec<Maintenance>,
    /// Since when the oldest pending maintenance waits.
    pub oldest_pending: Option<Instant>,
    /// Requests whose commit failed because the disk was full: kept, unacked, and retried once
    /// deletes have freed space. While any are held, ingress gets no budget (backpressure).
    pub held: Vec<Append>,
    /// When the file was last compacted to make room for the disk reserve.
    pub last_compaction: Option<Instant>,
    /// Record bytes deleted since requests were held for a full disk.
    pub freed_while_held: u64,
}

impl Writer {
    pub(super) fn run(mut self) -> Stopped {
        loop {
            let first = match self.next_command() {
                Ok(first) => first,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    self.commit_group(Vec::new());
                    return Stopped::Disconnected;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => None,
            };
            let batch = self.collect(first);
            if let Some(generation) = batch.reopen {
                if self.shared.store.generation() == generation {
                    self.reopen("a read found the spool handle failed");
                }
            }
            self.try_resume();
            let appends = self.with_held(batch.appends);
            let shutting_down = batch.shutdown.is_some();
            let due = self
                .oldest_pending
                .is_some_and(|since| since.elapsed() >= LAZY_FLUSH);
            if !appends.is_empty() || due || shutting_down {
                self.commit_group(appends);
            }
            if let Some(reply) = batch.shutdown {
                self.finish(reply);
                return Stopped::Shutdown;
            }
        }
    }

    /// Wait for the next command, or until pending work is due.
    fn next_command(&mut self) -> Result<Option<Command>, mpsc::RecvTimeoutError> {
        // Held requests, or a paused ingress waiting for room for the reserve: look again soon.
        let disk_full = !self.held.is_empty() || self.shared.budget.is_blocked();
        let patience = match (&self.oldest_pending, disk_full) {
            (Some(since), false) => Some((*since, LAZY_FLUSH)),
            (Some(since), true) => Some((*since, DISK_FULL_RETRY.min(LAZY_FLUSH))),
            (None, true) => Some((Instant::now(), DISK_FULL_RETRY)),
            (None, false) => None,
        };
        match patience {
            Some((since, patience)) => {
                let wait = patience.saturating_sub(since.elapsed());
                self.commands.recv_timeout(wait).map(Some)
            }
            None => self
                .commands
                .recv()
                .map(Some)
                .map_err(|_| mpsc::RecvTimeoutError::Disconnected),
        }
    }

    /// Take `first` and whatever else is waiting, up to `group_bytes` of requests.
    fn collect(&mut self, first: Option<Command>) -> Batch {
        let mut batch = Batch {
            appends: Vec::new(),
            shutdown: None,
            reopen: None,
        };
        let mut group = 0u64;
        let group_bytes = self.shared.group_bytes.load(Ordering::Acquire);
        let mut next = first;
        while let Some(command) = next.take() {
            match command {
                Command::Append(append) => {
                    group += append.entries.len() as u64;
                    batch.appends.push(append);
                }
                Command::Maintenance(work) => self.queue(work),
                Command::Reopen { generation } => batch.reopen = Some(generation),
                Command::Shutdown(reply) => {
                    batch.shutdown = Some(reply);
                    break;
                }
                #[cfg(test)]
                Command::Panic => panic!("writer thread told to panic by a unit test"),
            }
            if group >= group_bytes {
                break;
            }
            next = self.commands.try_recv().ok();
        }
        batch
    }

    fn queue(&mut self, work: Maintenance) {
        let urgent = work.is_urgent();
        self.pending.push(work);
        let since = self.oldest_pending.get_or_insert_with(Instant::now);
        if urgent {
            // Someone waits for the answer: do not make it wait LAZY_FLUSH.
            *since = Instant::now().checked_sub(LAZY_FLUSH).unwrap_or(*since);
        }
    }

    /// Disk full earlier: first commit the deletes alone, to free space, then try the held
    /// requests (oldest first) with whatever came since, but only once deletes have freed
    /// about twice what they need (copy-on-write) or the spool is empty. A retry that cannot
    /// fit still writes pages before it fails, and those would eat the space the released
    /// reserve left for deletes: then no delete could ever commit again.
    fn with_held(&mut self, appends: Vec<Append>) -> Vec<Append> {
        if self.held.is_empty() {
            return appends;
        }
        if !self.pending.is_empty() {
            // Durable, as every commit: only a durable commit lets redb reuse the freed pages.
            let before = self.counters.bytes;
            self.commit_group(Vec::new());
            self.freed_while_held += before.saturating_sub(self.counters.bytes);
        }
        let held_bytes: u64 = self.held.iter().map(|a| a.entries.len() as u64).sum();
        let empty = self.counters.records == 0;
        if self.freed_while_held < 2 * held_bytes && !empty {
            self.held.extend(appends);
            return Vec::new();
        }
        if empty && self.compaction_due() {
            // Nothing left to delete: whatever the file holds beyond its live data is free
            // inside it, and compaction hands it back to the filesystem.
            self.reopen_with(
                "compacting the empty spool to make room for held requests",
                true,
            );
        }
        self.freed_while_held = 0;
        let mut retry = std::mem::take(&mut self.held);
        retry.extend(appends);
        retry
    }

    /// One durable write transaction (fsync), then every waiter is answered.
    fn commit_group(&mut self, appends: Vec<Append>) {
        self.oldest_pending = None;
        if appends.is_empty() && self.pending.is_empty() {
            return;
        }
        let started = Instant::now();
        let queue = &crate::metrics::metrics().commit_queue_seconds;
        for append in &appends {
            queue.observe(started.duration_since(append.queued_at).as_secs_f64());
        }
        let mut result = self.try_write(&appends);
        if let Err(Failed {
            stage: Stage::Begin,
            error,
        }) = &result
        {
            if error.needs_reopen() {
                // Poisoned before this group touched it: nothing was written, so writing the
                // group again on a fresh handle can neither lose nor duplicate it.
                self.reopen("the spool handle failed before this group was written");
                result = self.try_write(&appends);
            }
        }
        match result {
            Ok(applied) => self.committed(applied, appends, started),
            Err(failed) if failed.error.is_disk_full() && !appends.is_empty() => {
                self.hold(appends, failed.error)
            }
            Err(failed) => self.failed(appends, failed.error),
        }
    }

    fn try_write(&mut self, appends: &[Append]) -> Result<Applied, Failed> {
        let Some(db) = self.database() else {
            return Err(Failed {
                stage: Stage::NotOpen,
                error: SpoolError::Unavailable,
            });
        };
        let result = group::write(
            &db,
            &Group {
                appends,
                pending: &self.pending,
                counters: self.counters,
                dead_max_bytes: self.shared.dead_max_bytes.load(Ordering::Acquire),
                now_ms: now_ms(),
                destinations_queued: !self.shared.queued.is_empty(),
            },
        );
        // The handle must be gone before a reopen: redb locks the file per handle.
        drop(db);
        result
    }

    /// The open handle, reopening the file first if it is not open.
    fn database(&mut self) -> Option<Arc<Database>> {
        if let Some((db, _)) = self.shared.store.current() {
            return Some(db);
        }
        self.reopen("the spool was not open");
        self.shared.store.current().map(|(db, _)| db)
    }

    fn committed(&mut self, applied: Applied, appends: Vec<Append>, started: Instant) {
        let pending = std::mem::take(&mut self.pending);
        self.try_resume();
        let shared = &self.shared;
        let took = started.elapsed();
        shared.last_commit_ms.store(now_ms(), Ordering::Release);
        shared
            .last_commit_micros
            .store(took.as_micros() as u64, Ordering::Release);
        let m = crate::metrics::metrics();
        m.commit_seconds.observe(took.as_secs_f64());
        if !appends.is_empty() {
            m.commit_requests.observe(appends.len() as f64);
        }
        if let Some(counters) = applied.counters {
            self.counters = counters;
        }
        shared
            .records
            .store(self.counters.records, Ordering::Release);
        shared
            .dead_bytes
            .store(self.counters.dead_bytes, Ordering::Release);
        shared.commits.fetch_add(1, Ordering::AcqRel);
        shared
            .budget
            .add(applied.maintenance_added, applied.unreleased_removed);
        // The budget follows the file before anyone hears of the commit.
        let reserved: u64 = appends.iter().map(|a| a.reserved).sum();
        shared.budget.committed(reserved, applied.append_bytes);
        // Before the dispatcher hears of the commit: it takes these instead of reading redb.
        shared.fresh.publish(applied.fresh);
        shared.queued.update(applied.queued);
        if self.counters.next_key > 1 {
            shared.committed.send_replace(self.counters.next_key - 1);
        }
        for (append, key) in appends.into_iter().zip(applied.keys) {
            let _ = append.reply.send(Ok(key));
        }
        for (work, outcome) in pending.into_iter().zip(applied.outcomes) {
            work.answer(outcome);
        }
    }

    /// After a full disk: ingress resumes only once every held request is stored *and* the
    /// disk reserve could be taken again. Resuming without the reserve would let ingress fill
    /// the disk once more with nothing left to release, and then no delete could ever commit
    /// again (the wedge FAULTS.md's 4c showed): so while there is no room for it, ingress stays
    /// paused, deletes go on, and this is tried again after each commit and every
    /// [`DISK_FULL_RETRY`].
    fn try_resume(&mut self) {
        if !self.shared.budget.is_blocked() || !self.held.is_empty() {
            return;
        }
        let path = self.shared.store.path().display().to_string();
        let mut taken = self.reserve.take();
        if matches!(&taken, Err(e) if super::error::io_is_disk_full(e)) && self.compaction_due() {
            // redb keeps the pages that deletes freed inside its file: give them back to the
            // filesystem so that the reserve fits again.
            self.reopen_with(
                "compacting the spool to make room for its disk reserve",
                true,
            );
            taken = self.reserve.take();
        }
        match taken {
            Ok(()) => {}
            Err(e) if super::error::io_is_disk_full(&e) => return,
            Err(error) => {
                tracing::warn!(%path, %error, "cannot take the spool disk reserve again; resuming without it");
            }
        }
        tracing::warn!(%path, "spool disk has room again: ingress resumes");
        self.shared.budget.set_blocked(false);
    }

    /// The disk is full: hold the requests unacked, pause ingress, free the reserve.
    fn hold(&mut self, appends: Vec<Append>, error: SpoolError) {
        let path = self.shared.store.path().display().to_string();
        if self.reserve.release() {
            tracing::warn!(%path, "spool disk full: released the disk reserve so deletes can still be committed");
        }
        if !self.shared.budget.is_blocked() {
            tracing::error!(%error, requests = appends.len(), %path,
                "spool disk is full: holding these requests unacked and pausing ingress until upstream acks free space");
        }
        self.shared.budget.set_blocked(true);
        self.keep_pending(&error);
        self.held = appends;
        self.freed_while_held = 0;
        // redb: a failed commit is final and the handle refuses further writes.
        self.reopen("a commit failed with the disk full");
    }

    /// Any other failed commit: no request of the group is acked (senders resend).
    fn failed(&mut self, appends: Vec<Append>, error: SpoolError) {
        if error.is_disk_full() && self.reserve.release() {
            tracing::warn!(path = %self.shared.store.path().display(),
                "spool disk full: released the disk reserve so deletes can still be committed");
        }
        tracing::error!(%error, requests = appends.len(), path = %self.shared.store.path().display(),
            "spool commit failed: no request of this group is acked; reopening the spool");
        self.keep_pending(&error);
        for append in appends {
            append.fail(&self.shared, error.clone());
        }
        self.reopen("a commit failed");
    }

    /// Answer the maintenance someone waits for with `error`; keep the rest for the next
    /// commit.
    fn keep_pending(&mut self, error: &SpoolError) {
        let pending = std::mem::take(&mut self.pending);
        self.pending = pending.into_iter().filter_map(|w| w.fail(error)).collect();
        if !self.pending.is_empty() {
            self.oldest_pending.get_or_insert_with(Instant::now);
        }
    }

    /// Still held at shutdown (disk still full): those senders get no ack and will resend;
    /// nothing they were told was stored is lost.
    fn finish(&mut self, reply: oneshot::Sender<()>) {
        for append in std::mem::take(&mut self.held) {
            append.fail(&self.shared, SpoolError::DiskFullAtShutdown);
        }
        // Release the file now: handles outliving the writer must not keep it locked.
        drop(self.shared.store.close());
        let _ = reply.send(());
    }

    /// Close the handle (redb locks the file per handle, and a failed handle refuses work),
    /// open the file again, and reload the counters from it, since a failed commit may or may
    /// not have reached the disk. Bounded; readers waiting for it are woken either way.
    fn reopen(&mut self, why: &str) {
        self.reopen_with(why, false)
    }

    /// Whether enough time passed since the last compaction (it rewrites the whole file).
    fn compaction_due(&mut self) -> bool {
        let due = self
            .last_compaction
            .is_none_or(|at| at.elapsed() >= COMPACT_AT_MOST_EVERY);
        if due {
            self.last_compaction = Some(Instant::now());
        }
        due
    }

    /// [`Writer::reopen`], compacting the file first if `compact` (the fresh handle is the
    /// only one then, as compaction needs).
    fn reopen_with(&mut self, why: &str, compact: bool) {
        crate::metrics::metrics().spool_reopens.inc();
        drop(self.shared.store.close());
        let mut delay = REOPEN_FIRST_DELAY;
        for attempt in 1..=REOPEN_TRIES {
            let opened = self.shared.store.open_database().and_then(|db| {
                let counters = Counters::read(&db)?;
                let queued = super::queued::load(&db, counters.records)?;
                Ok((db, counters, queued))
            });
            match opened {
                Ok((mut db, counters, queued)) => {
                    if compact {
                        self.compact(&mut db);
                    }
                    self.shared.queued.replace(queued);
                    self.adopt(db, counters);
                    tracing::warn!(path = %self.shared.store.path().display(), why, attempt, "spool reopened");
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, why, attempt, retry_in = ?delay, "spool reopen failed");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(REOPEN_MAX_DELAY);
                }
            }
        }
        self.shared.store.gave_up();
    }

    fn compact(&self, db: &mut Database) {
        let path = self.shared.store.path();
        let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let before = size();
        match db.compact() {
            Ok(_) => tracing::warn!(path = %path.display(), before, after = size(),
                "spool file compacted to give the space deletes freed back to the filesystem"),
            Err(error) => tracing::warn!(path = %path.display(), %error, "spool compaction failed"),
        }
    }

    fn adopt(&mut self, db: Database, counters: Counters) {
        self.counters = counters;
        let shared = &self.shared;
        shared.records.store(counters.records, Ordering::Release);
        shared
            .dead_bytes
            .store(counters.dead_bytes, Ordering::Release);
        let released = self.released_bytes(&db);
        shared.budget.reset(counters.bytes, released);
        // A failed commit may have reached the disk after all: its records are in the file
        // now, and the dispatcher must see them (a duplicate of what the senders resend,
        // never a record that no queue knows).
        if counters.next_key > 1 {
            shared.committed.send_if_modified(|last| {
                let newer = counters.next_key - 1 > *last;
                if newer {
                    *last = counters.next_key - 1;
                }
                newer
            });
        }
        shared.store.install(db);
    }

    /// Bytes of records still in the file whose deletes are pending: the budget already gave
    /// them back.
    fn released_bytes(&self, db: &Database) -> u64 {
        let keys: Vec<u64> = self
            .pending
            .iter()
            .filter_map(Maintenance::released_key)
            .collect();
        if keys.is_empty() {
            return 0;
        }
        let read = || -> Result<u64, redb::Error> {
            let txn = db.begin_read()?;
            let records = txn.open_table(RECORDS)?;
            let mut bytes = 0;
            for key in keys {
                if let Some(value) = records.get(key)? {
                    bytes += value.value().len() as u64;
                }
            }
            Ok(bytes)
        };
        read().unwrap_or(0)
    }
}
