//! What an operator sees of the spool: summary, record rows, events as JSON, dead letters.
//!
//! One model for both places that show it, so that they print exactly the same: `ackgate
//! spool …` on a stopped spool builds it from the file, and on a running relay it comes from
//! the admin API (`/api/records`, `/api/dead-letters`), which builds it here too. Nothing here
//! changes event bytes (invariant 6): events are decoded to JSON for reading only.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::forward::entries::entry_len;
use crate::forward::msgpack::value_len;
use crate::forward::packed::chunk_id_base64;
use crate::forward::value::{bytes_to_json, entry_to_json};
use crate::forward::{Signal, MAX_DEPTH};
use crate::spool::{record, DamagedRecord, DeadKind, DeadLetter, StoredRecord};

/// `ackgate spool stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolSummary {
    pub records: u64,
    pub bytes: u64,
    pub max_bytes: u64,
    /// When the oldest queued record was received (ms since the epoch).
    pub oldest_received_ms: Option<u64>,
    pub dead_letters: u64,
    pub dead_letter_bytes: u64,
}

/// One line of `ackgate spool list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordRow {
    pub key: u64,
    /// The tag, as text (invalid UTF-8 replaced).
    pub tag: String,
    pub signal: String,
    pub events: u32,
    pub attempts: u32,
    pub received_ms: u64,
    pub last_error: Option<String>,
    /// Set when the stored bytes do not decode: why.
    pub damaged: Option<String>,
}

impl RecordRow {
    pub fn of(record: &StoredRecord) -> RecordRow {
        RecordRow {
            key: record.key,
            tag: String::from_utf8_lossy(&record.tag).into_owned(),
            signal: record.signal.name().to_string(),
            events: record.events,
            attempts: record.attempts,
            received_ms: record.received_ms,
            last_error: record.last_error.clone(),
            damaged: None,
        }
    }

    pub fn damaged(record: &DamagedRecord) -> RecordRow {
        RecordRow {
            key: record.key,
            tag: String::new(),
            signal: String::new(),
            events: 0,
            attempts: 0,
            received_ms: 0,
            last_error: None,
            damaged: Some(record.error.to_string()),
        }
    }
}

/// One line of `ackgate spool dead-letters list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRow {
    pub id: u64,
    /// "record" or "rejected".
    pub kind: String,
    pub dead_at_ms: u64,
    pub bytes: u64,
    pub origin: String,
    pub reason: String,
}

impl DeadLetterRow {
    pub fn of(letter: &DeadLetter) -> DeadLetterRow {
        DeadLetterRow {
            id: letter.id,
            kind: kind_name(letter.kind).to_string(),
            dead_at_ms: letter.dead_at_ms,
            bytes: letter.payload.len() as u64,
            origin: letter.origin.clone(),
            reason: letter.reason.clone(),
        }
    }
}

fn kind_name(kind: DeadKind) -> &'static str {
    match kind {
        DeadKind::Record => "record",
        DeadKind::Rejected => "rejected",
    }
}

/// One line of `ackgate spool dead-letters export`: the dead letter with its raw bytes in
/// base64 and, for a record, its events decoded.
pub fn dead_letter_export(letter: &DeadLetter) -> Value {
    let mut line = json!({
        "id": letter.id,
        "kind": kind_name(letter.kind),
        "dead_at_ms": letter.dead_at_ms,
        "reason": letter.reason,
        "origin": letter.origin,
        "payload_base64": base64::engine::general_purpose::STANDARD.encode(&letter.payload),
    });
    if letter.kind == DeadKind::Record {
        if let Ok(r) = record::decode_record(0, &letter.payload) {
            line["tag"] = bytes_to_json(&r.tag);
            line["chunk"] = json!(chunk_id_base64(&r.chunk_id));
            line["signal"] = json!(r.signal.name());
            line["events"] = json!(events_json(&r));
        }
    }
    line
}

/// `ackgate spool show`: one JSON object per event, with the record's tag.
pub fn record_events(record: &StoredRecord) -> Vec<Value> {
    let tag = bytes_to_json(&record.tag);
    let mut events = events_json(record);
    for event in &mut events {
        if let Some(map) = event.as_object_mut() {
            map.insert("tag".into(), tag.clone());
        }
    }
    events
}

/// Log records: one JSON value per event. Metrics and traces: one value per context, with the
/// context's msgpack bytes in base64 (ackgate relays them without decoding cmetrics/ctraces).
fn events_json(record: &StoredRecord) -> Vec<Value> {
    let entries = record.entries.to_bytes();
    let mut events = Vec::new();
    let mut pos = 0usize;
    let mut index = 0u32;
    if record.signal != Signal::Logs {
        while let Ok(Some(len)) = value_len(&entries[pos..], MAX_DEPTH) {
            let context = &entries[pos..pos + len];
            events.push(json!({
                "signal": record.signal.name(),
                "context_base64": base64::engine::general_purpose::STANDARD.encode(context),
            }));
            pos += len;
            if pos >= entries.len() {
                break;
            }
        }
        return events;
    }
    while pos < entries.len() {
        let Ok(len) = entry_len(&entries[pos..], index, MAX_DEPTH) else {
            break;
        };
        let entry = &entries[pos..pos + len];
        events.push(entry_to_json(entry).unwrap_or_else(|e| json!({ "error": e.to_string() })));
        pos += len;
        index += 1;
    }
    events
}
