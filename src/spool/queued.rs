//! What is queued per original destination (transparent mode): records and stored bytes of
//! the records that carry each destination, kept in the `queued_by_destination` table in the
//! same transactions as the records themselves, so the counts are as exact as the spool's own
//! `records` and `bytes` counters and survive a restart without a scan. Route "original" starts
//! its pipelines from them, and status and metrics show them.
//!
//! Records without a destination (direct connections, layouts 1 and 2) are not counted here:
//! they are the spool's total minus the sum of these.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};

use super::error::SpoolError;
use super::record;

/// Destination (`ip:port`, IPv6 as `[ip]:port`) → (records, stored bytes).
pub(super) const QUEUED: TableDefinition<&str, (u64, u64)> =
    TableDefinition::new("queued_by_destination");

/// Records and stored bytes queued for one destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Queued {
    pub records: u64,
    pub bytes: u64,
}

/// The changes one transaction makes, by destination.
#[derive(Debug, Default)]
pub(super) struct Deltas(BTreeMap<SocketAddr, (i64, i64)>);

impl Deltas {
    /// Count a record value written (`added`) or removed; values without a destination are not
    /// counted.
    pub(super) fn count_value(&mut self, value: &[u8], added: bool) {
        if let Some(destination) = record::destination_of(value) {
            self.count(destination, value.len() as u64, added);
        }
    }

    pub(super) fn count(&mut self, destination: SocketAddr, len: u64, added: bool) {
        let sign = if added { 1 } else { -1 };
        let entry = self.0.entry(destination).or_default();
        entry.0 += sign;
        entry.1 += sign * i64::try_from(len).unwrap_or(i64::MAX);
    }

    /// Empty the table (the spool holds no record); every destination it had, now at zero.
    pub(super) fn clear(txn: &WriteTransaction) -> Result<Vec<(SocketAddr, Queued)>, redb::Error> {
        let mut table = txn.open_table(QUEUED)?;
        let mut cleared = Vec::new();
        while let Some((name, _)) = table.pop_first()? {
            if let Ok(destination) = name.value().parse::<SocketAddr>() {
                cleared.push((destination, Queued::default()));
            }
        }
        Ok(cleared)
    }

    /// Write the new counts into the table; what each changed destination holds now.
    pub(super) fn write(
        self,
        txn: &WriteTransaction,
    ) -> Result<Vec<(SocketAddr, Queued)>, redb::Error> {
        if self.0.is_empty() {
            return Ok(Vec::new());
        }
        let mut table = txn.open_table(QUEUED)?;
        let mut changed = Vec::with_capacity(self.0.len());
        for (destination, (records, bytes)) in self.0 {
            let name = destination.to_string();
            let (had_records, had_bytes) = table
                .get(name.as_str())?
                .map(|g| g.value())
                .unwrap_or((0, 0));
            let now = Queued {
                records: had_records.saturating_add_signed(records),
                bytes: had_bytes.saturating_add_signed(bytes),
            };
            if now.records == 0 {
                table.remove(name.as_str())?;
            } else {
                table.insert(name.as_str(), (now.records, now.bytes))?;
            }
            changed.push((destination, now));
        }
        Ok(changed)
    }
}

/// Read the whole table (a few rows: one per destination with records queued); nothing when
/// the spool holds no record.
pub(super) fn load(
    db: &impl ReadableDatabase,
    spool_records: u64,
) -> Result<BTreeMap<SocketAddr, Queued>, SpoolError> {
    if spool_records == 0 {
        return Ok(BTreeMap::new());
    }
    let read = db.begin_read().map_err(SpoolError::read)?;
    let table = read.open_table(QUEUED).map_err(SpoolError::read)?;
    let mut all = BTreeMap::new();
    for item in table.iter().map_err(SpoolError::read)? {
        let (name, counts) = item.map_err(SpoolError::read)?;
        let Ok(destination) = name.value().parse::<SocketAddr>() else {
            tracing::warn!(
                row = name.value(),
                "unreadable row in the spool's queued_by_destination table: ignored"
            );
            continue;
        };
        let (records, bytes) = counts.value();
        all.insert(destination, Queued { records, bytes });
    }
    Ok(all)
}

/// The counts as last committed, shared with every spool handle.
#[derive(Default)]
pub(super) struct QueuedByDestination(Mutex<BTreeMap<SocketAddr, Queued>>);

impl QueuedByDestination {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<SocketAddr, Queued>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn replace(&self, all: BTreeMap<SocketAddr, Queued>) {
        *self.lock() = all;
    }

    pub(super) fn update(&self, changed: Vec<(SocketAddr, Queued)>) {
        let mut all = self.lock();
        for (destination, now) in changed {
            if now.records == 0 {
                all.remove(&destination);
            } else {
                all.insert(destination, now);
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    pub(super) fn snapshot(&self) -> Vec<(SocketAddr, Queued)> {
        self.lock().iter().map(|(d, q)| (*d, *q)).collect()
    }
}
