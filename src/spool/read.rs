//! Reads of a spool file inside one read transaction, shared by the running spool ([`Spool`],
//! which retries them across a reopen) and the read-only [`SpoolReader`] of `ackgate spool`.
//!
//! [`Spool`]: super::Spool
//! [`SpoolReader`]: super::SpoolReader

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};

use super::error::SpoolError;
use super::record::{self, DeadLetter};
use super::staged::Kept;
use super::store::{DEAD, RECORDS, RETRIES, STAGED};
use super::{DamagedRecord, ReadBatch};

/// What was staged for `conn`'s request, its parts concatenated in order, and where the last
/// part (or the mark of a request stored whole) ends in the connection's stream.
pub(super) fn staged(txn: &ReadTransaction, conn: u128) -> Result<Kept, SpoolError> {
    let table = txn.open_table(STAGED).map_err(SpoolError::read)?;
    let mut kept = Kept::default();
    for item in table
        .range((conn, 0)..=(conn, u64::MAX))
        .map_err(SpoolError::read)?
    {
        let (_, value) = item.map_err(SpoolError::read)?;
        let (stream_end, bytes) = super::staged::decode(value.value())?;
        kept.prefix.extend_from_slice(bytes);
        kept.stream_end = Some(stream_end);
    }
    Ok(kept)
}

/// The connections with staged parts.
pub(super) fn staged_connections(txn: &ReadTransaction) -> Result<Vec<u128>, SpoolError> {
    let table = txn.open_table(STAGED).map_err(SpoolError::read)?;
    let mut conns: Vec<u128> = Vec::new();
    for item in table.iter().map_err(SpoolError::read)? {
        let (key, _) = item.map_err(SpoolError::read)?;
        let (conn, _) = key.value();
        if conns.last() != Some(&conn) {
            conns.push(conn);
        }
    }
    Ok(conns)
}

/// Up to `max_records` records (and about `max_bytes` of entries) with keys ≥ `from`, oldest
/// first; records that do not decode are reported apart, never skipped silently.
pub(super) fn batch(
    txn: &ReadTransaction,
    from: u64,
    max_records: usize,
    max_bytes: usize,
) -> Result<ReadBatch, SpoolError> {
    let records = txn.open_table(RECORDS).map_err(SpoolError::read)?;
    let retries = txn.open_table(RETRIES).map_err(SpoolError::read)?;
    let mut batch = ReadBatch::default();
    let mut bytes = 0usize;
    for item in records.range(from..).map_err(SpoolError::read)? {
        let (key, value) = item.map_err(SpoolError::read)?;
        let key = key.value();
        match record::decode_record(key, value.value()) {
            Ok(mut record) => {
                if let Some(state) = retries.get(key).map_err(SpoolError::read)? {
                    if let Some((attempts, _, error)) = record::decode_retry(state.value()) {
                        record.attempts = attempts;
                        record.last_error = Some(error);
                    }
                }
                bytes += record.entries.len();
                batch.records.push(record);
            }
            Err(error) => batch.damaged.push(DamagedRecord {
                key,
                stored_len: value.value().len() as u64,
                error,
            }),
        }
        if batch.records.len() + batch.damaged.len() >= max_records || bytes >= max_bytes {
            break;
        }
    }
    Ok(batch)
}

/// Dead letters with ids ≥ `from`, oldest first.
pub(super) fn dead_letters(
    txn: &ReadTransaction,
    from: u64,
    max: usize,
) -> Result<Vec<DeadLetter>, SpoolError> {
    let dead = txn.open_table(DEAD).map_err(SpoolError::read)?;
    let mut out = Vec::new();
    for item in dead.range(from..).map_err(SpoolError::read)? {
        let (id, value) = item.map_err(SpoolError::read)?;
        if let Some(letter) = record::decode_dead(id.value(), value.value()) {
            out.push(letter);
        }
        if out.len() >= max {
            break;
        }
    }
    Ok(out)
}

pub(super) fn dead_letter_count(txn: &ReadTransaction) -> Result<u64, SpoolError> {
    let dead = txn.open_table(DEAD).map_err(SpoolError::read)?;
    dead.len().map_err(SpoolError::read)
}

/// When the oldest record still queued was received (ms since the epoch).
pub(super) fn oldest_received_ms(txn: &ReadTransaction) -> Result<Option<u64>, SpoolError> {
    let records = txn.open_table(RECORDS).map_err(SpoolError::read)?;
    let first = records.first().map_err(SpoolError::read)?;
    Ok(first.and_then(|(key, value)| {
        record::decode_record(key.value(), value.value())
            .ok()
            .map(|r| r.received_ms)
    }))
}

/// Every record key, in order.
pub(super) fn keys(txn: &ReadTransaction) -> Result<Vec<u64>, SpoolError> {
    let records = txn.open_table(RECORDS).map_err(SpoolError::read)?;
    let mut keys = Vec::new();
    for item in records.iter().map_err(SpoolError::read)? {
        keys.push(item.map_err(SpoolError::read)?.0.value());
    }
    Ok(keys)
}
