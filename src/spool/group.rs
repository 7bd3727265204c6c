//! One group commit's transaction: the records a group of requests becomes, the maintenance
//! that rides with it (deletes, retry notes, dead letters, splits), and the counters, written
//! in one redb write transaction. Only the writer thread calls [`write`].
//!
//! Requests with the same tag (and original destination) are merged into one record, in arrival
//! order, up to
//! [`MERGE_LIMIT`]; metrics and traces payloads never are (fluent-bit decodes one context
//! stream per request, so a concatenation would lose data). Every record gets its chunk id
//! here, once (invariant 3).

use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, Table};

use super::error::SpoolError;
use super::queued::{Deltas, Queued};
use super::record::{self, DeadKind, RecordError, StoredRecord};
use super::store::{
    Counters, DEAD, META, META_BYTES, META_DEAD_BYTES, META_NEXT_DEAD, META_NEXT_KEY, META_RECORDS,
    RECORDS, RETRIES, STAGED,
};
use super::writer::{Append, Maintenance};
use crate::forward::frame::Signal;

/// Requests with the same tag in one group are merged into records of at most this size.
pub const MERGE_LIMIT: usize = 1 << 20;

/// Requests of one group that become one record.
struct Merged {
    tag: Bytes,
    signal: Signal,
    destination: Option<std::net::SocketAddr>,
    /// Indexes into the group's appends, in arrival order.
    members: Vec<usize>,
    len: usize,
}

fn merge(appends: &[Append]) -> Vec<Merged> {
    let mut merged: Vec<Merged> = Vec::new();
    for (i, append) in appends.iter().enumerate() {
        let slot = match append.signal {
            Signal::Logs => merged.iter_mut().rev().find(|m| {
                m.signal == Signal::Logs
                    && m.tag == append.tag
                    && m.destination == append.destination
                    && m.len + append.entries.len() <= MERGE_LIMIT
            }),
            Signal::Metrics | Signal::Traces => None,
        };
        match slot {
            Some(m) => {
                m.members.push(i);
                m.len += append.entries.len();
            }
            None => merged.push(Merged {
                tag: append.tag.clone(),
                signal: append.signal,
                destination: append.destination,
                members: vec![i],
                len: append.entries.len(),
            }),
        }
    }
    merged
}

/// What a maintenance request that someone waits for came to.
#[derive(Debug)]
pub(super) enum Outcome {
    /// Nothing to report (fire-and-forget work).
    Done,
    /// The keys of the parts, empty if the record was gone; or why it could not be split.
    Split(Result<Vec<u64>, RecordError>),
    /// The new key of a requeued dead letter, `None` if there was none to requeue.
    Requeued(Option<u64>),
    Purged(u64),
}

/// What one transaction changed, applied to the writer's counters once it is committed.
#[derive(Debug, Default)]
pub(super) struct Applied {
    pub counters: Option<Counters>,
    /// The record key each append went into.
    pub keys: Vec<u64>,
    /// The records built from appends, as stored: the dispatcher may send them from memory.
    pub fresh: Vec<StoredRecord>,
    /// Stored bytes of the records built from appends.
    pub append_bytes: u64,
    /// Bytes added by maintenance (split parts, requeued dead letters).
    pub maintenance_added: u64,
    /// Bytes removed by maintenance that the budget had not released yet (split records).
    pub unreleased_removed: u64,
    /// One per maintenance request, in order.
    pub outcomes: Vec<Outcome>,
    pub evicted: u64,
    /// What each destination whose records changed holds now.
    pub queued: Vec<(std::net::SocketAddr, Queued)>,
}

/// Where a failed transaction stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stage {
    /// There was no open handle.
    NotOpen,
    /// `begin_write` failed: nothing of this group was written.
    Begin,
    /// Writing or committing failed: per redb, the commit is final and may or may not be
    /// durable.
    Write,
}

#[derive(Debug)]
pub(super) struct Failed {
    pub stage: Stage,
    pub error: SpoolError,
}

/// Everything one transaction needs.
pub(super) struct Group<'a> {
    pub appends: &'a [Append],
    pub pending: &'a [Maintenance],
    pub counters: Counters,
    pub dead_max_bytes: u64,
    pub now_ms: u64,
    /// The `queued_by_destination` table has rows (as last committed).
    pub destinations_queued: bool,
}

/// The tables of one write transaction, and what was done to them so far.
struct Tables<'t> {
    records: Table<'t, u64, &'static [u8]>,
    retries: Table<'t, u64, &'static [u8]>,
    dead: Table<'t, u64, &'static [u8]>,
    staged: Table<'t, (u128, u64), &'static [u8]>,
    counters: Counters,
    applied: Applied,
    /// Records and bytes added and removed per original destination.
    queued: Deltas,
    now_ms: u64,
}

type TxResult<T> = Result<T, redb::Error>;

/// Write one group in one transaction and commit it.
pub(super) fn write(db: &Database, group: &Group) -> Result<Applied, Failed> {
    let mut txn = db.begin_write().map_err(|e| Failed {
        stage: Stage::Begin,
        error: SpoolError::commit(e),
    })?;
    let written = (|| -> TxResult<Applied> {
        // Explicit though it is the default: senders are acked on this commit (invariant 1),
        // and deletes ride in it, so a crash repeats at most one group's deliveries.
        txn.set_durability(Durability::Immediate)?;
        let (mut applied, queued) = {
            let mut tables = Tables {
                records: txn.open_table(RECORDS)?,
                retries: txn.open_table(RETRIES)?,
                dead: txn.open_table(DEAD)?,
                staged: txn.open_table(STAGED)?,
                counters: group.counters,
                applied: Applied::default(),
                queued: Deltas::default(),
                now_ms: group.now_ms,
            };
            tables.add_appends(group.appends)?;
            for work in group.pending {
                let outcome = tables.apply(work)?;
                tables.applied.outcomes.push(outcome);
            }
            tables.evict_dead_letters(group.dead_max_bytes)?;
            tables.applied.counters = Some(tables.counters);
            (tables.applied, tables.queued)
        };
        // Once no record is left, nothing is queued for any destination: the table is
        // cleared, which also heals a count a damaged value's removal could not take back.
        let spool_empty = applied.counters.is_some_and(|c| c.records == 0);
        applied.queued = if spool_empty && group.destinations_queued {
            Deltas::clear(&txn)?
        } else {
            queued.write(&txn)?
        };
        if let Some(counters) = applied.counters {
            let mut meta = txn.open_table(META)?;
            meta.insert(META_NEXT_KEY, counters.next_key)?;
            meta.insert(META_BYTES, counters.bytes)?;
            meta.insert(META_RECORDS, counters.records)?;
            meta.insert(META_NEXT_DEAD, counters.next_dead)?;
            meta.insert(META_DEAD_BYTES, counters.dead_bytes)?;
        }
        Ok(applied)
    })();
    let applied = written.map_err(|e| Failed {
        stage: Stage::Write,
        error: SpoolError::commit(e),
    })?;
    txn.commit().map_err(|e| Failed {
        stage: Stage::Write,
        error: SpoolError::commit(e),
    })?;
    Ok(applied)
}

impl Tables<'_> {
    fn insert_record(&mut self, value: &[u8]) -> TxResult<u64> {
        let key = self.counters.next_key;
        self.records.insert(key, value)?;
        self.queued.count_value(value, true);
        self.counters.next_key += 1;
        self.counters.records += 1;
        self.counters.bytes += value.len() as u64;
        Ok(key)
    }

    /// Remove a record and its retry state; returns its value if it was there.
    fn remove_record(&mut self, key: u64) -> TxResult<Option<Vec<u8>>> {
        let old = match self.records.remove(key)? {
            Some(guard) => guard.value().to_vec(),
            None => return Ok(None),
        };
        self.queued.count_value(&old, false);
        self.forget_record(key, old.len() as u64)?;
        Ok(Some(old))
    }

    /// Delete a record after its ack: only its length is needed, not a copy of its bytes.
    fn delete_record(&mut self, key: u64) -> TxResult<()> {
        let len = match self.records.remove(key)? {
            Some(guard) => {
                // Header bytes only: the destination sits right after the version and signal.
                self.queued.count_value(guard.value(), false);
                guard.value().len() as u64
            }
            None => return Ok(()),
        };
        self.forget_record(key, len)
    }

    fn forget_record(&mut self, key: u64, len: u64) -> TxResult<()> {
        self.retries.remove(key)?;
        self.counters.records = self.counters.records.saturating_sub(1);
        self.counters.bytes = self.counters.bytes.saturating_sub(len);
        Ok(())
    }

    fn insert_dead(&mut self, value: &[u8]) -> TxResult<()> {
        self.dead.insert(self.counters.next_dead, value)?;
        self.counters.next_dead += 1;
        self.counters.dead_bytes += value.len() as u64;
        Ok(())
    }

    /// Each group of same-tag requests becomes one record, written straight into redb's page
    /// (no copy built first) and kept, as the requests' own bytes, for sending from memory.
    fn add_appends(&mut self, appends: &[Append]) -> TxResult<()> {
        self.applied.keys = vec![0; appends.len()];
        for done in appends.iter().filter_map(|a| a.unstage) {
            self.unstage(done.conn)?;
            if let Some(stream_end) = done.stream_end {
                let mark = super::staged::encode(stream_end, &[]);
                self.staged.insert((done.conn, 0), &mark[..])?;
            }
        }
        for merged in merge(appends) {
            let members = || merged.members.iter().map(|&i| &appends[i]);
            let events = members().map(|a| a.events).fold(0u32, u32::saturating_add);
            let parts: Vec<Bytes> = members().map(|a| a.entries.clone()).collect();
            let received_ms = members()
                .map(|a| a.received_ms)
                .min()
                .unwrap_or(self.now_ms);
            let record = StoredRecord {
                key: self.counters.next_key,
                chunk_id: *uuid::Uuid::new_v4().as_bytes(),
                received_ms,
                events,
                signal: merged.signal,
                destination: merged.destination,
                tag: merged.tag.clone(),
                entries: record::Entries::new(parts),
                attempts: 0,
                last_error: None,
            };
            let key = self.insert_in_place(&record)?;
            self.applied.append_bytes += record.stored_len();
            for &i in &merged.members {
                self.applied.keys[i] = key;
            }
            self.applied.fresh.push(record);
        }
        Ok(())
    }

    /// Insert `record` at the next key, writing its value in place.
    fn insert_in_place(&mut self, record: &StoredRecord) -> TxResult<u64> {
        let key = self.counters.next_key;
        let len = record.stored_len() as usize;
        let parts: Vec<&[u8]> = record.entries.parts().iter().map(|p| &p[..]).collect();
        let mut slot = self.records.insert_reserve(key, len)?;
        record::write_record(slot.as_mut(), &record.head(), &parts);
        drop(slot);
        if let Some(destination) = record.destination {
            self.queued.count(destination, len as u64, true);
        }
        self.counters.next_key += 1;
        self.counters.records += 1;
        self.counters.bytes += len as u64;
        Ok(key)
    }

    fn apply(&mut self, work: &Maintenance) -> TxResult<Outcome> {
        match work {
            Maintenance::Delete(key) => {
                self.delete_record(*key)?;
                Ok(Outcome::Done)
            }
            Maintenance::Failure {
                key,
                attempts,
                error,
            } => {
                // Only for records that still exist (an ack may have raced it).
                if self.records.get(*key)?.is_some() {
                    let value = record::encode_retry(*attempts, self.now_ms, error);
                    self.retries.insert(*key, value.as_slice())?;
                }
                Ok(Outcome::Done)
            }
            Maintenance::DeadLetter {
                key,
                reason,
                origin,
            } => {
                if let Some(old) = self.remove_record(*key)? {
                    let value =
                        record::encode_dead(DeadKind::Record, self.now_ms, reason, origin, &old);
                    self.insert_dead(&value)?;
                }
                Ok(Outcome::Done)
            }
            Maintenance::Reject {
                origin,
                reason,
                bytes,
            } => {
                let value =
                    record::encode_dead(DeadKind::Rejected, self.now_ms, reason, origin, bytes);
                self.insert_dead(&value)?;
                Ok(Outcome::Done)
            }
            Maintenance::Split { key, parts, .. } => self.split(*key, parts),
            Maintenance::Requeue { id, .. } => self.requeue(*id),
            Maintenance::Purge { .. } => self.purge(),
            Maintenance::Flush { .. } => Ok(Outcome::Done),
            Maintenance::Stage {
                conn,
                offset,
                stream_end,
                bytes,
                ..
            } => {
                let value = super::staged::encode(*stream_end, bytes);
                self.staged.insert((*conn, *offset), &value[..])?;
                Ok(Outcome::Done)
            }
            Maintenance::Unstage(conn) => {
                self.unstage(*conn)?;
                Ok(Outcome::Done)
            }
        }
    }

    /// Remove every staged part of `conn`'s request, and its mark.
    fn unstage(&mut self, conn: u128) -> TxResult<()> {
        self.staged
            .retain_in((conn, 0)..=(conn, u64::MAX), |_, _| false)?;
        Ok(())
    }

    /// Replace a record by its parts: new keys and chunk ids, same tag, signal and received
    /// time.
    fn split(&mut self, key: u64, parts: &[(u32, Bytes)]) -> TxResult<Outcome> {
        let old = match self.records.get(key)? {
            Some(guard) => record::decode_record(key, guard.value()),
            None => return Ok(Outcome::Split(Ok(Vec::new()))),
        };
        let old = match old {
            Ok(old) => old,
            // Left as it is: the dispatcher dead-letters what it cannot decode.
            Err(e) => return Ok(Outcome::Split(Err(e))),
        };
        self.remove_record(key)?;
        self.applied.unreleased_removed += old.stored_len();
        let mut keys = Vec::with_capacity(parts.len());
        for (events, entries) in parts {
            let chunk_id = *uuid::Uuid::new_v4().as_bytes();
            let head = record::RecordHead {
                chunk_id: &chunk_id,
                events: *events,
                ..old.head()
            };
            let value = record::encode_record(&head, &[entries]);
            keys.push(self.insert_record(&value)?);
            self.applied.maintenance_added += value.len() as u64;
        }
        Ok(Outcome::Split(Ok(keys)))
    }

    /// Put a dead-lettered record back in the queue, with its original chunk id (invariant 3).
    fn requeue(&mut self, id: u64) -> TxResult<Outcome> {
        let Some(found) = self.dead.remove(id)?.map(|v| v.value().to_vec()) else {
            return Ok(Outcome::Requeued(None));
        };
        match record::decode_dead(id, &found) {
            Some(letter) if letter.kind == DeadKind::Record => {
                self.counters.dead_bytes =
                    self.counters.dead_bytes.saturating_sub(found.len() as u64);
                // Same chunk id and bytes; its age starts again, or `spool.max_age` would send
                // it straight back to the dead letters.
                let value = match record::decode_record(0, &letter.payload) {
                    Ok(r) => record::encode_record(
                        &record::RecordHead {
                            received_ms: self.now_ms,
                            ..r.head()
                        },
                        &[&r.entries.to_bytes()],
                    ),
                    Err(_) => letter.payload.to_vec(),
                };
                let key = self.insert_record(&value)?;
                self.applied.maintenance_added += value.len() as u64;
                Ok(Outcome::Requeued(Some(key)))
            }
            _ => {
                // Rejected input cannot be sent: put it back untouched.
                self.dead.insert(id, found.as_slice())?;
                Ok(Outcome::Requeued(None))
            }
        }
    }

    fn purge(&mut self) -> TxResult<Outcome> {
        let mut purged = 0u64;
        while let Some((_, value)) = self.dead.pop_first()? {
            self.counters.dead_bytes = self
                .counters
                .dead_bytes
                .saturating_sub(value.value().len() as u64);
            purged += 1;
        }
        Ok(Outcome::Purged(purged))
    }

    /// Dead letters are bounded: the oldest go first, loudly.
    fn evict_dead_letters(&mut self, max_bytes: u64) -> TxResult<()> {
        while self.counters.dead_bytes > max_bytes {
            let Some((id, value)) = self.dead.pop_first()? else {
                break;
            };
            let len = value.value().len() as u64;
            tracing::error!(
                dead_letter = id.value(),
                bytes = len,
                "dead letters over spool.dead_letter_max_bytes: evicting the oldest one"
            );
            self.counters.dead_bytes = self.counters.dead_bytes.saturating_sub(len);
            self.applied.evicted += 1;
        }
        Ok(())
    }
}
