//! What `ackgate spool` prints, from rows, whichever [`Source`] they came from.

use std::io::Write;

use super::source::Source;
use super::{DeadLetterCommand, InspectError, SpoolCommand};
use crate::clock::now_ms;
use crate::view::{DeadLetterRow, RecordRow, SpoolSummary};

fn age(ms: u64) -> String {
    let secs = now_ms().saturating_sub(ms) / 1000;
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        7200..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

pub async fn command(
    command: &SpoolCommand,
    source: &Source,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    match command {
        SpoolCommand::Stats => stats(&source.summary().await?, out)?,
        SpoolCommand::List { limit } => list(&source.records(*limit).await?, out)?,
        SpoolCommand::Show { key } => {
            for line in source.events(*key).await? {
                writeln!(out, "{line}")?;
            }
        }
        SpoolCommand::Retry => writeln!(out, "{}", source.retry().await?)?,
        SpoolCommand::DeadLetters(action) => dead_letters(action, source, out).await?,
    }
    Ok(())
}

fn stats(s: &SpoolSummary, out: &mut dyn Write) -> Result<(), InspectError> {
    writeln!(out, "records           {}", s.records)?;
    writeln!(out, "bytes             {}", s.bytes)?;
    writeln!(out, "max_bytes         {}", s.max_bytes)?;
    writeln!(
        out,
        "oldest            {}",
        s.oldest_received_ms.map(age).unwrap_or_else(|| "-".into())
    )?;
    writeln!(out, "dead_letters      {}", s.dead_letters)?;
    writeln!(out, "dead_letter_bytes {}", s.dead_letter_bytes)?;
    Ok(())
}

fn list(rows: &[RecordRow], out: &mut dyn Write) -> Result<(), InspectError> {
    writeln!(
        out,
        "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  last error",
        "key", "tag", "signal", "events", "attempts", "age"
    )?;
    for r in rows {
        match &r.damaged {
            None => writeln!(
                out,
                "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  {}",
                r.key,
                r.tag,
                r.signal,
                r.events,
                r.attempts,
                age(r.received_ms),
                r.last_error.as_deref().unwrap_or("-")
            )?,
            Some(reason) => writeln!(
                out,
                "{:>8}  {:<24}  {:<7}  {:>7}  {:>8}  {:>6}  damaged: {reason}",
                r.key, "-", "-", "-", "-", "-"
            )?,
        }
    }
    Ok(())
}

fn dead_letter_rows(rows: &[DeadLetterRow], out: &mut dyn Write) -> Result<(), InspectError> {
    writeln!(
        out,
        "{:>6}  {:<8}  {:>6}  {:>8}  {:<22}  reason",
        "id", "kind", "age", "bytes", "origin"
    )?;
    for d in rows {
        writeln!(
            out,
            "{:>6}  {:<8}  {:>6}  {:>8}  {:<22}  {}",
            d.id,
            d.kind,
            age(d.dead_at_ms),
            d.bytes,
            if d.origin.is_empty() { "-" } else { &d.origin },
            d.reason
        )?;
    }
    Ok(())
}

async fn dead_letters(
    action: &DeadLetterCommand,
    source: &Source,
    out: &mut dyn Write,
) -> Result<(), InspectError> {
    match action {
        DeadLetterCommand::List => dead_letter_rows(&source.dead_letters().await?, out)?,
        DeadLetterCommand::Export { output } => {
            let lines = source.export().await?;
            let mut file;
            let sink: &mut dyn Write = match output {
                Some(path) => {
                    file = std::io::BufWriter::new(std::fs::File::create(path)?);
                    &mut file
                }
                None => out,
            };
            for line in lines {
                writeln!(sink, "{line}")?;
            }
            sink.flush()?;
        }
        DeadLetterCommand::Requeue { id, all } => {
            if id.is_none() && !all {
                writeln!(out, "nothing to do: give an id or --all")?;
                return Ok(());
            }
            for (id, key) in source.requeue(*id).await? {
                writeln!(out, "dead letter {id} requeued as record {key}")?;
            }
        }
        DeadLetterCommand::Purge { yes } => {
            if !yes {
                return Err(InspectError::NeedsConfirmation);
            }
            writeln!(out, "purged {} dead letter(s)", source.purge().await?)?;
        }
    }
    Ok(())
}
