//! Unit tests only: a redb storage backend over the real spool file that fails chosen calls
//! with a real OS error number (EIO, ENOSPC), as a failing disk would. The end-to-end tests
//! inject the same errors into the real process with an LD_PRELOAD shim (tests/faults_io.rs).

use std::fs::OpenOptions;
use std::io;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;

use redb::backends::FileBackend;
use redb::{BackendError, Database, StorageBackend};

/// Which calls fail, and with which errno (0: none). Shared by every handle opened through it,
/// so a fault outlives a reopen, like a disk's.
#[derive(Debug, Default)]
pub struct Faults {
    reads: AtomicI32,
    writes: AtomicI32,
    /// Calls failed so far.
    pub failed: AtomicU64,
}

impl Faults {
    pub fn new() -> Arc<Faults> {
        Arc::new(Faults::default())
    }

    /// Fail reads with `errno` (0: stop).
    pub fn fail_reads(&self, errno: i32) {
        self.reads.store(errno, Ordering::Release);
    }

    /// Fail writes, length changes and syncs with `errno` (0: stop).
    pub fn fail_writes(&self, errno: i32) {
        self.writes.store(errno, Ordering::Release);
    }

    pub fn failures(&self) -> u64 {
        self.failed.load(Ordering::Acquire)
    }

    fn check(&self, which: &AtomicI32) -> io::Result<()> {
        match which.load(Ordering::Acquire) {
            0 => Ok(()),
            errno => {
                self.failed.fetch_add(1, Ordering::AcqRel);
                Err(io::Error::from_raw_os_error(errno))
            }
        }
    }

    pub(super) fn open(
        self: &Arc<Self>,
        builder: &redb::Builder,
        path: &Path,
    ) -> Result<Database, redb::DatabaseError> {
        self.check(&self.reads)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        builder.create_with_backend(FaultyFile {
            inner: FileBackend::new(file)?,
            faults: self.clone(),
        })
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: FileBackend,
    faults: Arc<Faults>,
}

impl StorageBackend for FaultyFile {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.faults.check(&self.faults.reads)?;
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.faults.check(&self.faults.writes)?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.faults.check(&self.faults.writes)?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.faults.check(&self.faults.writes)?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
