//! A small tmpfs mounted on a new temp dir (root only), unmounted on drop: a disk that fills up.

use std::path::PathBuf;

use super::process::{is_root, run_command};

/// A tmpfs of `size` mounted on a new temp dir; unmounted on drop.
pub struct Tmpfs {
    dir: Option<tempfile::TempDir>,
    pub path: PathBuf,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Result<Tmpfs, String> {
        if !is_root() {
            return Err("needs root to mount a tmpfs".into());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().to_path_buf();
        let options = format!("size={size}");
        run_command(&[
            "mount",
            "-t",
            "tmpfs",
            "-o",
            &options,
            "tmpfs",
            &path.to_string_lossy(),
        ])?;
        Ok(Tmpfs {
            dir: Some(dir),
            path,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let path = self.path.to_string_lossy().into_owned();
        if run_command(&["umount", &path]).is_err() {
            // Still busy (a child not yet reaped): detach it lazily rather than leak it.
            let _ = run_command(&["umount", "-l", &path]);
        }
        drop(self.dir.take());
    }
}
