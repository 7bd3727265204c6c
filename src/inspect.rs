//! `ackgate spool`: look into a spool, and act on it, from the command line.
//!
//! Works on a stopped spool. redb allows one process to hold a database file, so on a spool
//! that a running ackgate holds every command is refused with a clear message, except `retry`,
//! which asks the running process over its metrics endpoint (`POST /retry`) when one is
//! configured. Nothing here changes event bytes; `dead-letters requeue` puts a record back with
//! its original chunk id (invariant 3).

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use serde_json::json;

use crate::clock::now_ms;
use crate::config::Config;
use crate::forward::entries::entry_len;
use crate::forward::msgpack::value_len;
use crate::forward::packed::chunk_id_base64;
use crate::forward::value::{bytes_to_json, entry_to_json};
use crate::forward::Signal;
use crate::spool::{record, DeadKind, Spool, SpoolError, StoredRecord};

/// Why a spool command failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no record {0} in the spool")]
    NoRecord(u64),
    #[error("no dead letter {0}")]
    NoDeadLetter(u64),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("running ackgate did not accept the retry request: {0}")]
    Remote(String),
    #[error("refusing to purge without --yes")]
    NeedsConfirmation,
}

#[derive(clap::Args, Debug)]
pub struct SpoolArgs {
    /// ackgate configuration file (its [spool] path is the spool inspected).
    #[arg(long, short)]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: SpoolCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum SpoolCommand {
    /// Records, bytes, oldest age, dead letters.
    Stats,
    /// Queued records, oldest first: key, tag, events, attempts, age, last error.
    List {
        /// Show at most this many records.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The events of one record, as JSON lines.
    Show { key: u64 },
    /// Send every record waiting for a retry now (asks the running ackgate; on a stopped spool
    /// it clears the attempt counts, and every record is sent at the next start anyway).
    Retry,
    /// Records that could not be delivered and rejected requests.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[derive(clap::Subcommand, Debug)]
pub enum DeadLetterCommand {
    /// id, kind, age, origin, reason, size.
    List,
    /// Every dead letter as a JSON line (events decoded, raw bytes in base64).
    Export {
        /// Write here instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Put dead-lettered records back in the queue, with their original chunk ids.
    Requeue {
        /// One dead letter; all with --all.
        id: Option<u64>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
    /// Delete every dead letter.
    Purge {
        #[arg(long)]
        yes: bool,
    },
}

fn age(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Run one `ackgate spool` command, writing its output to `out`.
pub async fn run(args: SpoolArgs, config: Config, out: &mut dyn Write) -> Result<(), InspectError> {
    let spool_config = config.spool.clone();
    let opened = tokio::task::spawn_blocking(move || Spool::open(&spool_config))
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?;
    let (spool, writer) = match (opened, &args.command) {
        (Ok(pair), _) => pair,
        (Err(SpoolError::InUse { .. }), SpoolCommand::Retry) if config.metrics.is_some() => {
            let address = config.metrics.as_ref().map(|m| m.listen);
            return retry_remote(address, out).await;
        }
        (Err(e), _) => return Err(e.into()),
    };
    let result = command(&args.command, &spool, out).await;
    tokio::task::spawn_blocking(move || writer.shutdown())
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?;
    result
}

async fn command(
    command: &SpoolCommand,
    spool: &Spool,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    match command {
        SpoolCommand::Stats => {
            let stats = spool.stats();
            let oldest = blocking(spool, |s| Ok(s.oldest_received_ms())).await?;
            writeln!(out, "records           {}", stats.records)?;
            writeln!(out, "bytes             {}", stats.bytes)?;
            writeln!(out, "max_bytes         {}", stats.max_bytes)?;
            writeln!(
                out,
                "oldest            {}",
                oldest.map(age).unwrap_or_else(|| "-".into())
            )?;
            let dead = blocking(spool, |s| s.dead_letters(0, usize::MAX)).await?;
            writeln!(out, "dead_letters      {}", dead.len())?;
            writeln!(out, "dead_letter_bytes {}", stats.dead_letter_bytes)?;
        }
        SpoolCommand::List { limit } => {
            let limit = *limit;
            let records = blocking(spool, move |s| s.read_from(0, limit, usize::MAX)).await?;
            writeln!(
                out,
                "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  last error",
                "key", "tag", "signal", "events", "attempts", "age"
            )?;
            let mut rows: Vec<(u64, String)> = records
                .records
                .iter()
                .map(|r| {
                    let row = format!(
                        "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  {}",
                        r.key,
                        String::from_utf8_lossy(&r.tag),
                        r.signal.name(),
                        r.events,
                        r.attempts,
                        age(r.received_ms),
                        r.last_error.as_deref().unwrap_or("-")
                    );
                    (r.key, row)
                })
                .collect();
            rows.extend(records.damaged.iter().map(|d| {
                let row = format!(
                    "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  damaged: {}",
                    d.key, "-", "-", "-", "-", "-", d.error
                );
                (d.key, row)
            }));
            rows.sort_by_key(|(key, _)| *key);
            for (_, row) in rows {
                writeln!(out, "{row}")?;
            }
        }
        SpoolCommand::Show { key } => {
            let key = *key;
            let record = blocking(spool, move |s| s.read(key))
                .await?
                .ok_or(InspectError::NoRecord(key))?
                .map_err(|d| SpoolError::Damaged {
                    key,
                    source: d.error,
                })?;
            write_events(&record, out)?;
        }
        SpoolCommand::Retry => {
            // Stopped spool: forget the attempt counts; the next start sends everything at once.
            let records = blocking(spool, |s| s.read_from(0, usize::MAX, usize::MAX)).await?;
            let mut cleared = 0u64;
            for r in records.records.iter().filter(|r| r.attempts > 0) {
                spool.note_failure(r.key, 0, "attempts cleared by `ackgate spool retry`".into());
                cleared += 1;
            }
            writeln!(
                out,
                "spool not in use: cleared the attempt counts of {cleared} record(s); every record is sent as soon as ackgate starts"
            )?;
        }
        SpoolCommand::DeadLetters(action) => dead_letters(action, spool, out).await?,
    }
    Ok(())
}

async fn dead_letters(
    action: &DeadLetterCommand,
    spool: &Spool,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    let all = blocking(spool, |s| s.dead_letters(0, usize::MAX)).await?;
    match action {
        DeadLetterCommand::List => {
            writeln!(
                out,
                "{:>6}  {:<8}  {:>6}  {:>8}  {:<22}  reason",
                "id", "kind", "age", "bytes", "origin"
            )?;
            for d in &all {
                writeln!(
                    out,
                    "{:>6}  {:<8}  {:>6}  {:>8}  {:<22}  {}",
                    d.id,
                    match d.kind {
                        DeadKind::Record => "record",
                        DeadKind::Rejected => "rejected",
                    },
                    age(d.dead_at_ms),
                    d.payload.len(),
                    if d.origin.is_empty() { "-" } else { &d.origin },
                    d.reason
                )?;
            }
        }
        DeadLetterCommand::Export { output } => {
            let mut file;
            let sink: &mut dyn Write = match output {
                Some(path) => {
                    file = std::io::BufWriter::new(std::fs::File::create(path)?);
                    &mut file
                }
                None => out,
            };
            for d in &all {
                let mut line = json!({
                    "id": d.id,
                    "kind": match d.kind { DeadKind::Record => "record", DeadKind::Rejected => "rejected" },
                    "dead_at_ms": d.dead_at_ms,
                    "reason": d.reason,
                    "origin": d.origin,
                    "payload_base64": base64::engine::general_purpose::STANDARD.encode(&d.payload),
                });
                if d.kind == DeadKind::Record {
                    if let Ok(r) = record::decode_record(0, &d.payload) {
                        line["tag"] = bytes_to_json(&r.tag);
                        line["chunk"] = json!(chunk_id_base64(&r.chunk_id));
                        line["signal"] = json!(r.signal.name());
                        line["events"] = json!(events_json(&r));
                    }
                }
                writeln!(sink, "{line}")?;
            }
            sink.flush()?;
        }
        DeadLetterCommand::Requeue { id, all: every } => {
            let ids: Vec<u64> = match (id, every) {
                (Some(id), _) => vec![*id],
                (None, true) => all
                    .iter()
                    .filter(|d| d.kind == DeadKind::Record)
                    .map(|d| d.id)
                    .collect(),
                (None, false) => {
                    writeln!(out, "nothing to do: give an id or --all")?;
                    return Ok(());
                }
            };
            for id in ids {
                let key = spool
                    .requeue_dead(id)
                    .await
                    .map_err(|_| SpoolError::Closed)??;
                match key {
                    Some(key) => writeln!(out, "dead letter {id} requeued as record {key}")?,
                    None => return Err(InspectError::NoDeadLetter(id)),
                }
            }
        }
        DeadLetterCommand::Purge { yes } => {
            if !yes {
                return Err(InspectError::NeedsConfirmation);
            }
            let purged = spool.purge_dead().await.map_err(|_| SpoolError::Closed)??;
            writeln!(out, "purged {purged} dead letter(s)")?;
        }
    }
    Ok(())
}

/// Log records: one JSON value per event. Metrics and traces: one value per context, with the
/// context's msgpack bytes in base64 (ackgate relays them without decoding cmetrics/ctraces).
fn events_json(record: &StoredRecord) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    let mut pos = 0usize;
    let mut index = 0u32;
    if record.signal != Signal::Logs {
        while let Ok(Some(len)) = value_len(&record.entries[pos..], crate::forward::MAX_DEPTH) {
            let context = &record.entries[pos..pos + len];
            events.push(json!({
                "signal": record.signal.name(),
                "context_base64": base64::engine::general_purpose::STANDARD.encode(context),
            }));
            pos += len;
            if pos >= record.entries.len() {
                break;
            }
        }
        return events;
    }
    while pos < record.entries.len() {
        let Ok(len) = entry_len(&record.entries[pos..], index, crate::forward::MAX_DEPTH) else {
            break;
        };
        let entry = &record.entries[pos..pos + len];
        events.push(entry_to_json(entry).unwrap_or_else(|e| json!({ "error": e.to_string() })));
        pos += len;
        index += 1;
    }
    events
}

fn write_events(record: &StoredRecord, out: &mut dyn Write) -> Result<(), InspectError> {
    let tag = bytes_to_json(&record.tag);
    for mut event in events_json(record) {
        if let Some(map) = event.as_object_mut() {
            map.insert("tag".into(), tag.clone());
        }
        writeln!(out, "{event}")?;
    }
    Ok(())
}

async fn blocking<T, F>(spool: &Spool, f: F) -> Result<T, InspectError>
where
    T: Send + 'static,
    F: FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
{
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || f(&spool))
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
        .map_err(InspectError::from)
}

/// `POST /retry` to a running ackgate's metrics listener.
async fn retry_remote(
    address: Option<std::net::SocketAddr>,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(address) = address else {
        return Err(InspectError::Remote(
            "no [metrics] listen configured".into(),
        ));
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(address).await?;
        stream
            .write_all(b"POST /retry HTTP/1.1\r\nHost: ackgate\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        Ok::<String, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| InspectError::Remote(format!("{address} did not answer in 5s")))?
        .map_err(|e| InspectError::Remote(format!("{address}: {e}")))?;
    let status = response.lines().next().unwrap_or("").to_string();
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    if status.contains(" 200 ") {
        writeln!(out, "spool in use by a running ackgate: {body}")?;
        Ok(())
    } else {
        Err(InspectError::Remote(format!("{status} {body}")))
    }
}
