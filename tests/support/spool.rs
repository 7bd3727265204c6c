//! A spool file as ackgate's own spool code reads it, from a copy (the original stays exactly
//! as a crash left it, for the restart): its records, the chunk id of every harness event in
//! them, its dead letters, and whether it opens cleanly at all.

use std::collections::{HashMap, HashSet};
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

/// How the middle record is damaged.
#[derive(Debug, Clone, Copy)]
pub enum Damage {
    /// Its first byte says a layout version no build knows yet (the rest is intact).
    FutureVersion,
    /// Replaced by 9 bytes of garbage: shorter than any record header.
    GarbageCutShort,
}

impl Damage {
    pub fn apply(self, original: &[u8]) -> Vec<u8> {
        match self {
            Damage::FutureVersion => {
                let mut value = original.to_vec();
                value[0] = 0x7f;
                value
            }
            Damage::GarbageCutShort => b"\x01\xde\xad\xbe\xef\x00\xff\x13\x37".to_vec(),
        }
    }
}

/// The record the test damaged.
pub struct Damaged {
    pub key: u64,
    pub records: usize,
    /// Harness events it held.
    pub events: HashSet<u64>,
    /// The bytes now stored under its key.
    pub value: Vec<u8>,
}

pub const RECORDS: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("records");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

/// Overwrite the value of the middle record of a stopped spool (layout: `src/spool.rs`,
/// `src/spool/record.rs`). The `bytes` counter is kept in step, so that the damaged value is
/// the only thing wrong with the file.
pub fn damage_middle_record(spool: &Path, damage: Damage) -> Damaged {
    use redb::ReadableTable;
    let db = redb::Database::open(spool).expect("open the stopped spool");
    let txn = db.begin_write().expect("write transaction");
    let damaged = {
        let mut records = txn.open_table(RECORDS).expect("records table");
        let keys: Vec<u64> = records
            .iter()
            .expect("iterate records")
            .map(|item| item.expect("record").0.value())
            .collect();
        let key = keys[keys.len() / 2];
        let original = records
            .get(key)
            .expect("get")
            .expect("middle record")
            .value()
            .to_vec();
        let stored = ackgate::spool::record::decode_record(key, &original).expect("decodes before");
        let value = damage.apply(&original);
        records.insert(key, value.as_slice()).expect("overwrite");
        let mut meta = txn.open_table(META).expect("meta table");
        let bytes = meta
            .get("bytes")
            .expect("get")
            .map(|g| g.value())
            .unwrap_or(0);
        let bytes = (bytes + value.len() as u64).saturating_sub(original.len() as u64);
        meta.insert("bytes", bytes).expect("update bytes");
        Damaged {
            key,
            records: keys.len(),
            events: ids_of_entries(&stored.entries.to_bytes())
                .0
                .into_iter()
                .collect(),
            value,
        }
    };
    txn.commit().expect("commit the damage");
    damaged
}
