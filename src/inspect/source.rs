//! Where `ackgate spool` gets its data: the file read-only, the file for writing, or the
//! running ackgate's admin API. Each answer is a row of [`crate::view`], whatever the source.

use std::sync::Arc;

use serde::Deserialize;

use super::{DeadLetterCommand, InspectError, SpoolArgs, SpoolCommand};
use crate::admin::client::{AdminClient, Reply};
use crate::admin::routes::MAX_RECORDS_PAGE;
use crate::config::Config;
use crate::spool::{DeadKind, Spool, SpoolError, SpoolReader, SpoolWriter};
use crate::view::{dead_letter_export, record_events, DeadLetterRow, RecordRow, SpoolSummary};

pub enum Source {
    /// A stopped spool, read-only.
    Reader(Arc<SpoolReader>, u64),
    /// A stopped spool, for the commands that change it.
    Writable(Spool, SpoolWriter),
    /// A spool a running ackgate holds.
    Remote(AdminClient),
}

/// Run `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, InspectError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SpoolError::Task(e.to_string()))?
        .map_err(InspectError::from)
}

fn writes(command: &SpoolCommand) -> bool {
    matches!(
        command,
        SpoolCommand::Retry
            | SpoolCommand::DeadLetters(DeadLetterCommand::Requeue { .. })
            | SpoolCommand::DeadLetters(DeadLetterCommand::Purge { .. })
    )
}

fn json<T: for<'de> Deserialize<'de>>(reply: &Reply) -> Result<T, InspectError> {
    serde_json::from_slice(&reply.body).map_err(|e| InspectError::BadReply(e.to_string()))
}

fn lines(reply: &Reply) -> Vec<String> {
    reply.text().lines().map(str::to_string).collect()
}

impl Source {
    pub async fn open(args: &SpoolArgs, config: &Config) -> Result<Source, InspectError> {
        let spool = config.spool.clone();
        let local = if writes(&args.command) {
            blocking(move || Spool::open(&spool))
                .await
                .map(|(spool, writer)| Source::Writable(spool, writer))
        } else {
            let cache = usize::try_from(spool.cache_bytes.0).unwrap_or(usize::MAX);
            let max_bytes = spool.max_bytes.0;
            blocking(move || SpoolReader::open(&spool.path, cache))
                .await
                .map(|reader| Source::Reader(Arc::new(reader), max_bytes))
        };
        match local {
            Err(InspectError::Spool(SpoolError::InUse { .. })) => Ok(Source::Remote(
                AdminClient::from_config(config, &args.config)?,
            )),
            other => other,
        }
    }

    pub async fn close(self) {
        if let Source::Writable(spool, writer) = self {
            drop(spool);
            let _ = tokio::task::spawn_blocking(move || writer.shutdown()).await;
        }
    }

    pub async fn summary(&self) -> Result<SpoolSummary, InspectError> {
        match self {
            Source::Reader(reader, max_bytes) => {
                let (reader, max_bytes) = (reader.clone(), *max_bytes);
                blocking(move || {
                    let (records, bytes, dead_letter_bytes) = reader.counters()?;
                    Ok(SpoolSummary {
                        records,
                        bytes,
                        max_bytes,
                        oldest_received_ms: reader.oldest_received_ms()?,
                        dead_letters: reader.dead_letter_count()?,
                        dead_letter_bytes,
                    })
                })
                .await
            }
            Source::Writable(spool, _) => {
                let spool = spool.clone();
                blocking(move || {
                    let stats = spool.stats();
                    Ok(SpoolSummary {
                        records: stats.records,
                        bytes: stats.bytes,
                        max_bytes: stats.max_bytes,
                        oldest_received_ms: spool.oldest_received_ms(),
                        dead_letters: spool.dead_letter_count()?,
                        dead_letter_bytes: stats.dead_letter_bytes,
                    })
                })
                .await
            }
            Source::Remote(client) => {
                let s = client.status().await?.spool;
                Ok(SpoolSummary {
                    records: s.records,
                    bytes: s.bytes,
                    max_bytes: s.max_bytes,
                    oldest_received_ms: s.oldest_record_ms,
                    dead_letters: s.dead_letters,
                    dead_letter_bytes: s.dead_letter_bytes,
                })
            }
        }
    }

    /// The first `limit` records, oldest first.
    pub async fn records(&self, limit: usize) -> Result<Vec<RecordRow>, InspectError> {
        match self {
            Source::Reader(reader, _) => {
                let reader = reader.clone();
                let batch = blocking(move || reader.read_from(1, limit)).await?;
                let mut rows: Vec<RecordRow> = batch.records.iter().map(RecordRow::of).collect();
                rows.extend(batch.damaged.iter().map(RecordRow::damaged));
                rows.sort_by_key(|r| r.key);
                Ok(rows)
            }
            Source::Writable(..) => Ok(Vec::new()),
            Source::Remote(client) => remote_records(client, limit).await,
        }
    }

    /// The events of record `key`, one JSON line each.
    pub async fn events(&self, key: u64) -> Result<Vec<String>, InspectError> {
        match self {
            Source::Reader(reader, _) => {
                let reader = reader.clone();
                let batch = blocking(move || reader.read_from(key, 1)).await?;
                if let Some(record) = batch.records.iter().find(|r| r.key == key) {
                    return Ok(record_events(record)
                        .iter()
                        .map(|e| e.to_string())
                        .collect());
                }
                match batch.damaged.iter().find(|d| d.key == key) {
                    Some(d) => Err(InspectError::Damaged {
                        key,
                        reason: d.error.to_string(),
                    }),
                    None => Err(InspectError::NoRecord(key)),
                }
            }
            Source::Writable(..) => Err(InspectError::NoRecord(key)),
            Source::Remote(client) => {
                let reply = client.get(&format!("/api/records/{key}")).await?;
                match reply.status {
                    200 => Ok(lines(&reply)),
                    404 => Err(InspectError::NoRecord(key)),
                    409 => Err(InspectError::Damaged {
                        key,
                        reason: reply.error_message(),
                    }),
                    _ => Err(InspectError::BadReply(reply.error_message())),
                }
            }
        }
    }

    pub async fn dead_letters(&self) -> Result<Vec<DeadLetterRow>, InspectError> {
        match self {
            Source::Remote(client) => {
                #[derive(Deserialize)]
                struct Page {
                    dead_letters: Vec<DeadLetterRow>,
                }
                let page: Page = json(&client.get_ok("/api/dead-letters").await?)?;
                Ok(page.dead_letters)
            }
            local => Ok(local
                .local_dead_letters()
                .await?
                .iter()
                .map(DeadLetterRow::of)
                .collect()),
        }
    }

    /// Every dead letter as a JSON line.
    pub async fn export(&self) -> Result<Vec<String>, InspectError> {
        match self {
            Source::Remote(client) => Ok(lines(&client.get_ok("/api/dead-letters/export").await?)),
            local => Ok(local
                .local_dead_letters()
                .await?
                .iter()
                .map(|d| dead_letter_export(d).to_string())
                .collect()),
        }
    }

    async fn local_dead_letters(&self) -> Result<Vec<crate::spool::DeadLetter>, InspectError> {
        match self {
            Source::Reader(reader, _) => {
                let reader = reader.clone();
                blocking(move || reader.dead_letters()).await
            }
            Source::Writable(spool, _) => {
                let spool = spool.clone();
                blocking(move || spool.dead_letters(0, usize::MAX)).await
            }
            Source::Remote(_) => Ok(Vec::new()),
        }
    }

    /// Requeue one dead letter (or every record one): (id, new key) of each.
    pub async fn requeue(&self, id: Option<u64>) -> Result<Vec<(u64, u64)>, InspectError> {
        match self {
            Source::Writable(spool, _) => {
                let ids: Vec<u64> = match id {
                    Some(id) => vec![id],
                    None => self
                        .local_dead_letters()
                        .await?
                        .iter()
                        .filter(|d| d.kind == DeadKind::Record)
                        .map(|d| d.id)
                        .collect(),
                };
                let mut done = Vec::new();
                for id in ids {
                    let key = spool
                        .requeue_dead(id)
                        .await
                        .map_err(|_| SpoolError::Closed)??;
                    done.push((id, key.ok_or(InspectError::NoDeadLetter(id))?));
                }
                Ok(done)
            }
            Source::Remote(client) => {
                let query = match id {
                    Some(id) => format!("id={id}"),
                    None => "all=true".into(),
                };
                let reply = client
                    .post(&format!("/api/dead-letters/requeue?{query}"))
                    .await?;
                if reply.status == 404 {
                    return Err(InspectError::NoDeadLetter(id.unwrap_or_default()));
                }
                #[derive(Deserialize)]
                struct Requeued {
                    id: u64,
                    key: u64,
                }
                #[derive(Deserialize)]
                struct Answer {
                    requeued: Vec<Requeued>,
                }
                let reply = client_ok(client, reply)?;
                let answer: Answer = json(&reply)?;
                Ok(answer.requeued.into_iter().map(|r| (r.id, r.key)).collect())
            }
            Source::Reader(..) => Ok(Vec::new()),
        }
    }

    pub async fn purge(&self) -> Result<u64, InspectError> {
        match self {
            Source::Writable(spool, _) => {
                Ok(spool.purge_dead().await.map_err(|_| SpoolError::Closed)??)
            }
            Source::Remote(client) => {
                #[derive(Deserialize)]
                struct Answer {
                    purged: u64,
                }
                let answer: Answer = json(
                    &client
                        .post_ok("/api/dead-letters/purge?confirm=yes")
                        .await?,
                )?;
                Ok(answer.purged)
            }
            Source::Reader(..) => Ok(0),
        }
    }

    /// `retry`: what to tell the operator.
    pub async fn retry(&self) -> Result<String, InspectError> {
        match self {
            Source::Writable(spool, _) => {
                // Stopped spool: forget the attempt counts; the next start sends everything.
                let reader = spool.clone();
                let batch = blocking(move || reader.read_from(0, usize::MAX, usize::MAX)).await?;
                let mut cleared = 0u64;
                for r in batch.records.iter().filter(|r| r.attempts > 0) {
                    spool.note_failure(
                        r.key,
                        0,
                        "attempts cleared by `ackgate spool retry`".into(),
                    );
                    cleared += 1;
                }
                Ok(format!(
                    "spool not in use: cleared the attempt counts of {cleared} record(s); every record is sent as soon as ackgate starts"
                ))
            }
            Source::Remote(client) => {
                let reply = client.post_ok("/retry").await?;
                Ok(format!(
                    "spool in use by a running ackgate: {}",
                    reply.text().trim()
                ))
            }
            Source::Reader(..) => Ok(String::new()),
        }
    }
}

fn client_ok(client: &AdminClient, reply: Reply) -> Result<Reply, InspectError> {
    if reply.status == 200 {
        return Ok(reply);
    }
    Err(InspectError::Remote(
        crate::admin::client::ClientError::Refused {
            address: client.address(),
            status: reply.status,
            body: reply.error_message(),
        },
    ))
}

/// Page through `/api/records` until `limit` rows.
async fn remote_records(
    client: &AdminClient,
    limit: usize,
) -> Result<Vec<RecordRow>, InspectError> {
    #[derive(Deserialize)]
    struct Page {
        records: Vec<RecordRow>,
        next_from: Option<u64>,
    }
    let mut rows = Vec::new();
    let mut from = 1u64;
    while rows.len() < limit {
        let page_size = (limit - rows.len()).min(MAX_RECORDS_PAGE);
        let reply = client
            .get_ok(&format!("/api/records?from={from}&limit={page_size}"))
            .await?;
        let page: Page = json(&reply)?;
        rows.extend(page.records);
        match page.next_from {
            Some(next) => from = next,
            None => break,
        }
    }
    rows.truncate(limit);
    Ok(rows)
}
