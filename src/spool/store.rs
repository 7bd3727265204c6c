//! The redb database handle, shared by the writer thread and every reader, and replaced when it
//! fails (invariant 9).
//!
//! redb latches an I/O error: after one failed read or write every later operation on that
//! handle returns `PreviousIo` until the database is closed and opened again, and a failed
//! commit is final. So a failure anywhere leads to the same bounded reopen, done by the writer
//! (the one owner of writes), while readers wait for it instead of failing: each successful
//! open bumps a generation, a reader that failed on generation `g` asks for a reopen of `g`
//! and waits for a newer one. Only this file opens the database.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use redb::{Database, ReadableDatabase, TableDefinition};

use super::error::SpoolError;

/// Records: sequence key → [`super::record::encode_record`] value.
pub(super) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");
/// Retry state: sequence key → [`super::record::encode_retry`] value.
pub(super) const RETRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("retries");
/// Counters kept in step with the records in the same transactions.
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Dead letters: id → [`super::record::encode_dead`] value. Records that can never be
/// delivered and the bytes of rejected requests, kept for inspection, bounded by
/// `dead_letter_max_bytes`.
pub(super) const DEAD: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Prefixes of requests too large to wait unread in their socket (invariant 10): (connection
/// id, offset in the request) → [`super::staged`] value: where the part ends in the
/// connection's stream, then its bytes. Durable before they leave the socket; replaced, in the
/// transaction that stores the whole request, by a mark with no bytes saying where that
/// request ends; removed when the connection ends.
pub(super) const STAGED: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("staged");
pub(super) const META_NEXT_KEY: &str = "next_key";
pub(super) const META_BYTES: &str = "bytes";
pub(super) const META_RECORDS: &str = "records";
pub(super) const META_NEXT_DEAD: &str = "next_dead";
pub(super) const META_DEAD_BYTES: &str = "dead_bytes";

/// How a database file is opened: a plain file, or (in unit tests) through a backend that
/// injects OS errors.
#[derive(Clone)]
pub(super) enum Opener {
    File,
    #[cfg(test)]
    Faulty(Arc<super::fault::Faults>),
}

/// The current handle and its generation.
struct Handle {
    /// `None` while the writer reopens the file, or after a reopen gave up.
    db: Option<Arc<Database>>,
    /// Bumped by every successful open.
    generation: u64,
    /// Bumped when a reopen gave up, so that waiting readers stop waiting.
    gave_up: u64,
}

pub(super) struct Store {
    path: PathBuf,
    cache_bytes: usize,
    opener: Opener,
    handle: Mutex<Handle>,
    changed: Condvar,
}

impl Store {
    /// Open the database file (creating it and its directory if needed).
    pub(super) fn open(
        path: &Path,
        cache_bytes: usize,
        opener: Opener,
    ) -> Result<Store, SpoolError> {
        let store = Store {
            path: path.to_path_buf(),
            cache_bytes,
            opener,
            handle: Mutex::new(Handle {
                db: None,
                generation: 0,
                gave_up: 0,
            }),
            changed: Condvar::new(),
        };
        let db = store.open_database()?;
        store.install(db);
        Ok(store)
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> MutexGuard<'_, Handle> {
        self.handle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The handle in use and its generation, unless a reopen is under way.
    pub(super) fn current(&self) -> Option<(Arc<Database>, u64)> {
        let handle = self.lock();
        handle.db.clone().map(|db| (db, handle.generation))
    }

    pub(super) fn is_open(&self) -> bool {
        self.lock().db.is_some()
    }

    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Take the handle out (the writer, before a reopen). It is closed once the last reader
    /// holding a clone lets go.
    pub(super) fn close(&self) -> Option<Arc<Database>> {
        self.lock().db.take()
    }

    /// Put a freshly opened handle in place and wake the readers waiting for it.
    pub(super) fn install(&self, db: Database) {
        let mut handle = self.lock();
        handle.db = Some(Arc::new(db));
        handle.generation += 1;
        self.changed.notify_all();
    }

    /// A reopen gave up: waiting readers return instead of waiting out their deadline.
    pub(super) fn gave_up(&self) {
        self.lock().gave_up += 1;
        self.changed.notify_all();
    }

    /// Wait until a handle newer than `generation` is in place (true) or a reopen gave up or
    /// `deadline` passed (false).
    pub(super) fn wait_for_newer(&self, generation: u64, deadline: Instant) -> bool {
        let mut handle = self.lock();
        let gave_up = handle.gave_up;
        loop {
            if handle.db.is_some() && handle.generation > generation {
                return true;
            }
            if handle.gave_up != gave_up {
                return false;
            }
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            handle = self
                .changed
                .wait_timeout(handle, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Open the file and make sure every table exists, so readers never see "table does not
    /// exist".
    pub(super) fn open_database(&self) -> Result<Database, SpoolError> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| SpoolError::CreateDir {
                path: dir.to_path_buf(),
                source: Arc::new(e),
            })?;
        }
        let open_err = |e: redb::Error| match e {
            redb::Error::DatabaseAlreadyOpen => SpoolError::InUse {
                path: self.path.clone(),
            },
            other => SpoolError::Open {
                path: self.path.clone(),
                source: Arc::new(other),
            },
        };
        let mut builder = Database::builder();
        builder.set_cache_size(self.cache_bytes);
        let db = match &self.opener {
            Opener::File => builder.create(&self.path),
            #[cfg(test)]
            Opener::Faulty(faults) => faults.open(&builder, &self.path),
        }
        .map_err(|e| open_err(e.into()))?;
        let txn = db.begin_write().map_err(|e| open_err(e.into()))?;
        {
            txn.open_table(RECORDS).map_err(|e| open_err(e.into()))?;
            txn.open_table(RETRIES).map_err(|e| open_err(e.into()))?;
            txn.open_table(META).map_err(|e| open_err(e.into()))?;
            txn.open_table(DEAD).map_err(|e| open_err(e.into()))?;
            txn.open_table(super::queued::QUEUED)
                .map_err(|e| open_err(e.into()))?;
            txn.open_table(STAGED).map_err(|e| open_err(e.into()))?;
        }
        txn.commit().map_err(|e| open_err(e.into()))?;
        Ok(db)
    }
}

/// Counters as last committed, kept in the META table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counters {
    pub next_key: u64,
    pub bytes: u64,
    pub records: u64,
    pub next_dead: u64,
    pub dead_bytes: u64,
}

impl Counters {
    pub(super) fn read(db: &impl ReadableDatabase) -> Result<Counters, SpoolError> {
        let read = db.begin_read().map_err(SpoolError::read)?;
        Counters::in_txn(&read)
    }

    pub(super) fn in_txn(read: &redb::ReadTransaction) -> Result<Counters, SpoolError> {
        let meta = read.open_table(META).map_err(SpoolError::read)?;
        let get = |name: &str| -> Result<u64, SpoolError> {
            Ok(meta
                .get(name)
                .map_err(SpoolError::read)?
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
}

/// How long a reader waits for a reopen before it reports the spool unavailable: longer than
/// the writer's whole reopen schedule, so a reopen that works is always waited for.
pub(super) const READ_WAITS_FOR_REOPEN: Duration = Duration::from_secs(6);
