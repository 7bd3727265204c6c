//! What can go wrong in the spool, with redb's own error kept as the source.
//!
//! Two questions decide what the spool does after a failure, and both are answered from the
//! error's type and OS error number, never from its text: is the disk full (ENOSPC, EDQUOT:
//! hold the requests, release the disk reserve), and is the database handle poisoned (an I/O
//! error or redb's `PreviousIo`: close and reopen it, invariant 9).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use super::record::RecordError;

/// Why the spool could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: Arc<io::Error>,
    },
    #[error("cannot open spool {path}: {source}")]
    Open {
        path: PathBuf,
        source: Arc<redb::Error>,
    },
    #[error("cannot start the spool writer thread: {0}")]
    Thread(Arc<io::Error>),
    #[error("spool {path} is open in another process (a running ackgate?): stop it first, or use its admin listener")]
    InUse { path: PathBuf },
    #[error("no spool at {path}: ackgate never ran with this config, or spool.path is wrong")]
    NotFound { path: PathBuf },
    #[error("spool commit failed: {0}")]
    Commit(Arc<redb::Error>),
    #[error("spool read failed: {0}")]
    Read(Arc<redb::Error>),
    /// The database is being reopened after an I/O error and did not come back in time.
    #[error("spool is unavailable: reopening it after an I/O error")]
    Unavailable,
    #[error("spool record {key} is damaged: {source}")]
    Damaged { key: u64, source: RecordError },
    /// A kept part of an unfinished request is shorter than its own header.
    #[error("a kept part of an unfinished request is damaged ({len} bytes)")]
    DamagedStaged { len: usize },
    /// The disk stayed full until shutdown, so these requests were never stored.
    #[error("shutting down with the spool disk full")]
    DiskFullAtShutdown,
    #[error("spool is shutting down")]
    Closed,
    /// A blocking spool task did not finish (it panicked or the runtime is going away).
    #[error("spool task failed: {0}")]
    Task(String),
}

impl SpoolError {
    pub(super) fn commit(e: impl Into<redb::Error>) -> SpoolError {
        SpoolError::Commit(Arc::new(e.into()))
    }

    pub(super) fn read(e: impl Into<redb::Error>) -> SpoolError {
        SpoolError::Read(Arc::new(e.into()))
    }

    /// The redb error behind this one, if any.
    fn storage(&self) -> Option<&redb::Error> {
        match self {
            SpoolError::Commit(e) | SpoolError::Read(e) => Some(e),
            SpoolError::Open { source, .. } => Some(source),
            _ => None,
        }
    }

    /// No space left on the spool's filesystem (or the user's quota is used up).
    pub fn is_disk_full(&self) -> bool {
        self.storage().is_some_and(is_disk_full)
    }

    /// The handle can no longer be used: it must be closed and the file opened again.
    pub fn needs_reopen(&self) -> bool {
        matches!(self, SpoolError::Unavailable) || self.storage().is_some_and(needs_reopen)
    }
}

/// ENOSPC or EDQUOT, from the OS error number (or the kind std derived from it).
pub fn is_disk_full(error: &redb::Error) -> bool {
    match error {
        redb::Error::Io(e) => io_is_disk_full(e),
        _ => false,
    }
}

pub(super) fn io_is_disk_full(e: &io::Error) -> bool {
    match e.raw_os_error() {
        Some(code) => code == libc::ENOSPC || code == libc::EDQUOT,
        None => matches!(
            e.kind(),
            io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
        ),
    }
}

/// An I/O error, or redb refusing work after one: redb latches every I/O failure until the
/// database is reopened ("Previous I/O error occurred. Please close and re-open the database").
pub fn needs_reopen(error: &redb::Error) -> bool {
    matches!(
        error,
        redb::Error::Io(_) | redb::Error::PreviousIo | redb::Error::DatabaseClosed
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_full_is_read_from_the_os_error_number() {
        let enospc = SpoolError::commit(io::Error::from_raw_os_error(libc::ENOSPC));
        let edquot = SpoolError::commit(io::Error::from_raw_os_error(libc::EDQUOT));
        let eio = SpoolError::commit(io::Error::from_raw_os_error(libc::EIO));
        assert!(enospc.is_disk_full() && edquot.is_disk_full());
        assert!(!eio.is_disk_full());
        // A message that merely says so is not a full disk.
        let text = SpoolError::commit(io::Error::other("No space left on device (os error 28)"));
        assert!(!text.is_disk_full());
    }

    #[test]
    fn io_errors_and_previous_io_need_a_reopen() {
        assert!(SpoolError::read(io::Error::from_raw_os_error(libc::EIO)).needs_reopen());
        assert!(SpoolError::read(redb::Error::PreviousIo).needs_reopen());
        assert!(SpoolError::Unavailable.needs_reopen());
        assert!(!SpoolError::read(redb::Error::Corrupted("x".into())).needs_reopen());
        assert!(!SpoolError::Closed.needs_reopen());
    }
}
