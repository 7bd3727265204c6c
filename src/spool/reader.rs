//! A stopped spool, opened read-only for `ackgate spool stats|list|show|dead-letters`.
//!
//! Read-only means read-only: no directory is created, no disk reserve taken, no writer thread
//! started, and the file is opened without write access (redb's read-only mode, which also
//! refuses a file that needs recovery rather than repair it). A spool a running ackgate holds
//! is refused ([`SpoolError::InUse`]): ask that ackgate instead, through its admin API.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{ReadOnlyDatabase, ReadableDatabase};

use super::error::SpoolError;
use super::record::DeadLetter;
use super::store::Counters;
use super::{read, ReadBatch};

pub struct SpoolReader {
    db: ReadOnlyDatabase,
    path: PathBuf,
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
        let db = builder.open_read_only(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => SpoolError::InUse {
                path: path.to_path_buf(),
            },
            redb::DatabaseError::RepairAborted => SpoolError::NeedsRecovery {
                path: path.to_path_buf(),
            },
            other => SpoolError::Open {
                path: path.to_path_buf(),
                source: Arc::new(other.into()),
            },
        })?;
        Ok(SpoolReader {
            db,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn txn(&self) -> Result<redb::ReadTransaction, SpoolError> {
        self.db.begin_read().map_err(SpoolError::read)
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
