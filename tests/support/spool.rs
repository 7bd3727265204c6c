//! A spool file as ackgate's own spool code reads it, from a copy (the original stays exactly
//! as a crash left it, for the restart): its records, the chunk id of every harness event in
//! them, its dead letters, and whether it opens cleanly at all.

use std::collections::HashMap;
use std::path::Path;

use super::ledger::ids_of_entries;

/// What a spool file held.
#[derive(Debug, Default)]
pub struct SpoolSnapshot {
    pub records: usize,
    /// Harness event → chunk id of the record holding it.
    pub chunk_of_event: HashMap<u64, String>,
    pub foreign: u64,
    pub dead_letters: Vec<ackgate::spool::DeadLetter>,
    /// Size of the file in bytes.
    pub file_bytes: u64,
}

/// Copy the spool file and read every record and dead letter from the copy with ackgate's own
/// spool code. An error means the spool does not open (or read) cleanly.
pub fn snapshot_spool(path: &Path) -> Result<SpoolSnapshot, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let copy = dir.path().join("copy.redb");
    let file_bytes =
        std::fs::copy(path, &copy).map_err(|e| format!("copy {}: {e}", path.display()))?;
    let mut table = toml::Table::new();
    table.insert("path".into(), copy.to_string_lossy().into_owned().into());
    let config: ackgate::config::SpoolConfig = toml::Value::Table(table)
        .try_into()
        .map_err(|e| format!("spool config: {e}"))?;
    let (spool, writer) = ackgate::spool::Spool::open(&config).map_err(|e| format!("open: {e}"))?;
    let read = read_snapshot(&spool, file_bytes);
    drop(spool);
    writer.shutdown();
    read
}

fn read_snapshot(spool: &ackgate::spool::Spool, file_bytes: u64) -> Result<SpoolSnapshot, String> {
    let batch = spool
        .read_from(1, usize::MAX, usize::MAX)
        .map_err(|e| format!("read records: {e}"))?;
    if let Some(damaged) = batch.damaged.first() {
        return Err(format!(
            "record {} does not decode: {}",
            damaged.key, damaged.error
        ));
    }
    let dead = spool
        .dead_letters(1, usize::MAX)
        .map_err(|e| format!("read dead letters: {e}"))?;
    let mut snap = SpoolSnapshot {
        records: batch.records.len(),
        dead_letters: dead,
        file_bytes,
        ..SpoolSnapshot::default()
    };
    for r in &batch.records {
        let chunk = ackgate::forward::packed::chunk_id_base64(&r.chunk_id);
        let (ids, foreign) = ids_of_entries(&r.entries.to_bytes());
        snap.foreign += foreign;
        for id in ids {
            snap.chunk_of_event.insert(id, chunk.clone());
        }
    }
    Ok(snap)
}
