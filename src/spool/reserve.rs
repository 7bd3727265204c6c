//! The disk reserve: space kept aside next to the spool file so that a full disk can still be
//! recovered from without a restart (invariant 9).
//!
//! `<spool>.reserve` is an allocated (not sparse) file. When a commit fails for lack of space
//! it is deleted, so that deletes, which need a few pages too (redb is copy-on-write), can
//! still be committed and free the space that lets held requests through; it is taken again
//! once the held requests themselves are stored.

use std::path::{Path, PathBuf};

use rustix::fs::FallocateFlags;

/// Smallest reserve worth having: a few redb pages and a delete transaction's metadata.
const MIN_RESERVE: u64 = 64 << 10;
/// Largest share of the filesystem the reserve may take.
const MAX_SHARE_OF_DISK: u64 = 8;

/// The reserve file of one spool.
#[derive(Debug, Clone)]
pub(super) struct DiskReserve {
    path: PathBuf,
    bytes: u64,
}

impl DiskReserve {
    /// The group commit size, but at most 1/8 of the filesystem the spool lives on.
    pub(super) fn for_spool(spool: &Path, group_bytes: u64) -> DiskReserve {
        let mut name = spool.as_os_str().to_owned();
        name.push(".reserve");
        let dir = spool
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let disk = rustix::fs::statvfs(dir)
            .map(|s| s.f_blocks.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        DiskReserve {
            path: PathBuf::from(name),
            bytes: group_bytes.min(disk / MAX_SHARE_OF_DISK).max(MIN_RESERVE),
        }
    }

    #[cfg(test)]
    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Allocate the reserve. An error with ENOSPC/EDQUOT means the disk has no room for it yet;
    /// any other (a filesystem without fallocate, say) means there will be no reserve, and a
    /// full disk then only recovers once other space frees up.
    pub(super) fn take(&self) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.path)?;
        if let Err(e) = rustix::fs::fallocate(&file, FallocateFlags::empty(), 0, self.bytes) {
            drop(file);
            let _ = std::fs::remove_file(&self.path);
            return Err(e.into());
        }
        Ok(())
    }

    /// Give the space back to the filesystem. Returns whether there was a reserve to release.
    pub(super) fn release(&self) -> bool {
        std::fs::remove_file(&self.path).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_allocated_and_released() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool.redb");
        let reserve = DiskReserve::for_spool(&spool, 1 << 20);
        assert_eq!(reserve.bytes(), 1 << 20);
        reserve.take().unwrap();
        let path = dir.path().join("spool.redb.reserve");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 1 << 20, "allocated, not sparse");
        assert!(reserve.release());
        assert!(!path.exists());
        assert!(!reserve.release(), "nothing left to release");
    }

    #[test]
    fn the_reserve_is_never_below_its_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = DiskReserve::for_spool(&dir.path().join("s.redb"), 1);
        assert_eq!(reserve.bytes(), MIN_RESERVE);
    }
}
