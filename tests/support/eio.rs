//! The Rust side of `eio_shim.c`: build the LD_PRELOAD library once per test binary run, give
//! `ackgate run` the environment that loads it, and switch faults on and off through its
//! control file while ackgate runs. Also `old_kernel_shim.c`, built the same way: a kernel
//! without TCP `SO_PEEK_OFF`.
//!
//! The control file (`CTL_SIZE` bytes, host byte order) is shared with the shim, which maps it
//! `MAP_SHARED`; the test uses plain `pwrite`/`pread` on it (Linux keeps a shared mapping
//! coherent with read/write on the same file). Layout, as documented in `eio_shim.c`:
//!
//! | offset | type | field |
//! |---|---|---|
//! | 0 | u32 | magic `CTL_MAGIC` (the shim ignores a file without it) |
//! | 4 | u32 | mode: bit 0 fail reads, bit 1 fail writes, bit 2 fail fdatasync/fsync, bit 3 SIGKILL after the next commit's fdatasync/fsync (once) |
//! | 8 | u64 | read failures injected |
//! | 16 | u64 | write failures injected |
//! | 24 | u64 | sync failures injected |
//! | 32 | u64 | processes that attached (their constructor mapped the file) |

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

const CTL_MAGIC: u32 = 0x4946_4741;
const CTL_SIZE: usize = 4096;
const OFF_MODE: u64 = 4;
const OFF_READ_FAILURES: u64 = 8;
const OFF_WRITE_FAILURES: u64 = 16;
const OFF_SYNC_FAILURES: u64 = 24;
const OFF_ATTACHED: u64 = 32;

/// What the shim does to calls on the targeted file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EioMode {
    /// Every call passes through.
    Off,
    /// `pread`, `pread64`, `preadv` fail with EIO.
    FailReads,
    /// `pwrite`, `pwrite64`, `pwritev`, `fdatasync` and `fsync` fail with EIO.
    FailWrites,
    /// The next `fdatasync` or `fsync` that succeeds after a write at offset 0 (redb's header:
    /// the commit is durable) SIGKILLs its process; the mode is then off again.
    KillAfterSync,
}

impl EioMode {
    fn bits(self) -> u32 {
        match self {
            EioMode::Off => 0,
            EioMode::FailReads => 1,
            EioMode::FailWrites => 2 | 4,
            EioMode::KillAfterSync => 8,
        }
    }
}

/// Calls the shim failed, per kind, across every process attached to the control file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Failures {
    pub reads: u64,
    pub writes: u64,
    pub syncs: u64,
}

impl Failures {
    pub fn total(&self) -> u64 {
        self.reads + self.writes + self.syncs
    }
}

/// One control file, and the environment that makes a child use it.
pub struct EioShim {
    lib: PathBuf,
    suffix: String,
    ctl_path: PathBuf,
    ctl: File,
    _dir: tempfile::TempDir,
}

impl EioShim {
    /// Why the shim cannot be used here (no C compiler), if it cannot. Nothing of it needs
    /// root: LD_PRELOAD works for any user's own processes.
    pub fn unavailable() -> Option<String> {
        let cc = Command::new("cc")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match cc {
            Ok(status) if status.success() => None,
            _ => Some("no C compiler `cc` to build the LD_PRELOAD shim".into()),
        }
    }

    /// Compile `eio_shim.c` into `target/tmp/eio_shim/libeio_shim.so`, once per test binary
    /// run (the first caller compiles, the others get its result).
    pub fn build() -> Result<PathBuf, String> {
        static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        LIB.get_or_init(|| compile_shim("eio_shim")).clone()
    }

    /// [`EioShim::new`] for `test`, or `None` where it cannot be built (printed; under CI a
    /// failure: [`runnable`](super::runnable)). With a C compiler, a shim that does not
    /// compile is a failure, not a skip.
    pub fn for_test(test: &str, suffix: &str) -> Option<EioShim> {
        if !super::runnable(test, EioShim::unavailable()) {
            return None;
        }
        Some(EioShim::new(suffix).unwrap_or_else(|e| panic!("{e}")))
    }

    /// A fresh control file (mode off) for descriptors whose path ends with `suffix`.
    pub fn new(suffix: &str) -> Result<EioShim, String> {
        let lib = EioShim::build()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let ctl_path = dir.path().join("eio.ctl");
        let mut page = vec![0u8; CTL_SIZE];
        page[..4].copy_from_slice(&CTL_MAGIC.to_ne_bytes());
        std::fs::write(&ctl_path, &page).map_err(|e| format!("write control file: {e}"))?;
        let ctl = File::options()
            .read(true)
            .write(true)
            .open(&ctl_path)
            .map_err(|e| format!("open control file: {e}"))?;
        Ok(EioShim {
            lib,
            suffix: suffix.to_string(),
            ctl_path,
            ctl,
            _dir: dir,
        })
    }

    /// Environment for the child: preload the shim and point it at this control file.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), self.lib.to_string_lossy().into_owned()),
            (
                "ACKGATE_FAULT_CTL".into(),
                self.ctl_path.to_string_lossy().into_owned(),
            ),
            ("ACKGATE_FAULT_PATH".into(), self.suffix.clone()),
        ]
    }

    /// Switch the fault mode; attached processes see it on their next call.
    pub fn set(&self, mode: EioMode) {
        self.ctl
            .write_all_at(&mode.bits().to_ne_bytes(), OFF_MODE)
            .expect("write the fault mode");
    }

    /// Calls failed so far, per kind.
    pub fn failures_by_kind(&self) -> Failures {
        Failures {
            reads: self.read_u64(OFF_READ_FAILURES),
            writes: self.read_u64(OFF_WRITE_FAILURES),
            syncs: self.read_u64(OFF_SYNC_FAILURES),
        }
    }

    /// Calls failed so far, all kinds.
    pub fn failures(&self) -> u64 {
        self.failures_by_kind().total()
    }

    /// Processes whose shim mapped this control file (one per ackgate start).
    pub fn attached(&self) -> u64 {
        self.read_u64(OFF_ATTACHED)
    }

    /// [`EioMode::KillAfterSync`] is still set: no process was killed yet (the shim switches
    /// it off when it kills).
    pub fn kill_pending(&self) -> bool {
        let mut b = [0u8; 4];
        self.ctl
            .read_exact_at(&mut b, OFF_MODE)
            .expect("read the fault mode");
        u32::from_ne_bytes(b) & EioMode::KillAfterSync.bits() != 0
    }

    fn read_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.ctl
            .read_exact_at(&mut b, offset)
            .expect("read the control file");
        u64::from_ne_bytes(b)
    }
}

impl Drop for EioShim {
    fn drop(&mut self) {
        // A child that outlives the test (it should not) must not keep failing calls.
        let _ = self.ctl.write_all_at(&0u32.to_ne_bytes(), OFF_MODE);
    }
}

/// The LD_PRELOAD shim that makes this kernel look like one without TCP `SO_PEEK_OFF`
/// (before Linux 6.10: `old_kernel_shim.c`), built once per test binary run.
pub fn old_kernel_shim() -> Result<PathBuf, String> {
    static LIB: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    LIB.get_or_init(|| compile_shim("old_kernel_shim")).clone()
}

/// Compile `tests/support/NAME.c` into `target/tmp/NAME/libNAME.so`.
fn compile_shim(name: &str) -> Result<PathBuf, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/support/{name}.c"));
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lib = dir.join(format!("lib{name}.so"));
    // Compiled under a private name, then renamed: a concurrent run, or an ackgate still
    // mapping the previous library, never sees a half-written file.
    let partial = dir.join(format!("lib{name}.so.{}.tmp", std::process::id()));
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O2", "-Wall", "-o"])
        .arg(&partial)
        .arg(&source)
        .arg("-ldl")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("run cc: {e}"))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "cc failed to build {}: {}",
            source.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    std::fs::rename(&partial, &lib).map_err(|e| format!("rename to {}: {e}", lib.display()))?;
    Ok(lib)
}
