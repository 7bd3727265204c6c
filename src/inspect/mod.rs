//! `ackgate spool`: look into a spool, and act on it, from the command line.
//!
//! On a stopped spool the reading commands (`stats`, `list`, `show`, `dead-letters
//! list|export`) open the file read-only ([`SpoolReader`]: no directory created, no reserve
//! file, no writer thread); the others (`retry`, `dead-letters requeue|purge`) open it for
//! writing. On a spool a running ackgate holds, every command goes through that ackgate's
//! admin API, and prints exactly what it prints on a stopped spool: both build the same rows
//! ([`crate::view`]) and print them with [`print`]. Nothing here changes event bytes;
//! `dead-letters requeue` puts a record back with its original chunk id (invariant 3).

mod print;
mod source;

use std::io::Write;
use std::path::PathBuf;

use crate::admin::client::ClientError;
use crate::config::Config;
use crate::spool::SpoolError;
use source::Source;

/// Why a spool command failed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("no record {0} in the spool")]
    NoRecord(u64),
    #[error("record {key} does not decode: {reason}")]
    Damaged { key: u64, reason: String },
    #[error("no dead letter {0}")]
    NoDeadLetter(u64),
    #[error("cannot write output: {0}")]
    Output(#[from] std::io::Error),
    #[error("the spool is in use by a running ackgate: {0}")]
    Remote(#[from] ClientError),
    #[error("the running ackgate answered something unexpected: {0}")]
    BadReply(String),
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

/// Run one `ackgate spool` command, writing its output to `out`.
pub async fn run(args: SpoolArgs, config: Config, out: &mut dyn Write) -> Result<(), InspectError> {
    let source = Source::open(&args, &config).await?;
    let result = print::command(&args.command, &source, out).await;
    source.close().await;
    result
}
