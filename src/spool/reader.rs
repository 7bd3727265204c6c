//! A stopped spool, opened read-only for `ackgate spool stats|list|show|dead-letters`.
//!
//! Read-only means read-only: no directory is created, no disk reserve taken, no writer thread
//! started, and the file is opened without write access (redb's read-only mode). A file that
//! was not closed cleanly (after a crash) needs a recovery redb's read-only mode does not do:
//! then a copy is recovered in the temp directory and read instead, and the spool itself is
//! left as it is, for `ackgate run` to recover. A spool a running ackgate holds is refused
//! ([`SpoolError::InUse`]): ask that ackgate instead, through its admin API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadOnlyDatabase, ReadableDatabase};

use super::error::SpoolError;
use super::record::DeadLetter;
use super::store::Counters;
use super::{read, ReadBatch};

pub struct SpoolReader {
    db: Handle,
    path: PathBuf,
}

enum Handle {
    ReadOnly(ReadOnlyDatabase),
    /// A recovered copy, removed when the reader is dropped.
    Copy(redb::Database, PathBuf),
}

impl Drop for SpoolReader {
    fn drop(&mut self) {
        if let Handle::Copy(_, copy) = &self.db {
            let _ = std::fs::remove_file(copy);
        }
    }
}

/// Recover a copy of `path` in the temp directory and open it.
fn recovered_copy(path: &Path, cache_bytes: usize) -> Result<Handle, SpoolError> {
    let copy = std::env::temp_dir().join(format!(
        "ackgate-spool-copy-{}-{}.redb",
        std::process::id(),
        crate::clock::now_ms()
    ));
    let failed = |e: std::io::Error| SpoolError::Open {
        path: path.to_path_buf(),
        source: Arc::new(e.into()),
    };
    std::fs::copy(path, &copy).map_err(failed)?;
    let mut builder = redb::Builder::new();
    builder.set_cache_size(cache_bytes);
    match builder.create(&copy) {
        Ok(db) => Ok(Handle::Copy(db, copy)),
        Err(e) => {
            let _ = std::fs::remove_file(&copy);
            Err(SpoolError::Open {
                path: path.to_path_buf(),
                source: Arc::new(e.into()),
            })
        }
    }
}

impl SpoolReader {
    pub fn open(path: &Path, cache_bytes: usize) -> Result<SpoolReader, SpoolError> {
        if !path.exists() {
            return Err(SpoolError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let mut builder = redb::Builder::new();
        builder.set_cache_size(cache_bytes);
        let db = match builder.open_read_only(path) {
            Ok(db) => Handle::ReadOnly(db),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(SpoolError::InUse {
                    path: path.to_path_buf(),
                })
            }
            Err(redb::DatabaseError::RepairAborted) => {
                tracing::warn!(path = %path.display(),
                    "the spool was not closed cleanly: reading a recovered copy; the spool itself is recovered when ackgate next runs on it");
                recovered_copy(path, cache_bytes)?
            }
            Err(other) => {
                return Err(SpoolError::Open {
                    path: path.to_path_buf(),
                    source: Arc::new(other.into()),
                })
            }
        };
        Ok(SpoolReader {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn txn(&self) -> Result<redb::ReadTransaction, SpoolError> {
        match &self.db {
            Handle::ReadOnly(db) => db.begin_read(),
            Handle::Copy(db, _) => db.begin_read(),
        }
        .map_err(SpoolError::read)
    }

    /// Records, bytes and dead-letter bytes, as last committed.
    pub fn counters(&self) -> Result<(u64, u64, u64), SpoolError> {
        let counters = Counters::in_txn(&self.txn()?)?;
        Ok((counters.records, counters.bytes, counters.dead_bytes))
    }

    pub fn read_from(&self, from: u64, max_records: usize) -> Result<ReadBatch, SpoolError> {
        read::batch(&self.txn()?, from, max_records, usize::MAX)
    }

    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, SpoolError> {
        read::dead_letters(&self.txn()?, 0, usize::MAX)
    }

    pub fn dead_letter_count(&self) -> Result<u64, SpoolError> {
        read::dead_letter_count(&self.txn()?)
    }

    pub fn oldest_received_ms(&self) -> Result<Option<u64>, SpoolError> {
        read::oldest_received_ms(&self.txn()?)
    }
}
