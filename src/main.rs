//! The `ackgate` command: run the relay, check a config, and the small Forward tools.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use ackgate::config::{Config, LogFormat};
use ackgate::tools;

#[derive(Parser)]
#[command(
    name = "ackgate",
    version,
    about = "A durable Fluentd Forward relay: spool with fsync, ack after the commit, forward until the aggregator acks."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay: a supervisor that holds the sockets, and the worker that serves them
    /// (SIGHUP reloads the config, SIGUSR2 upgrades to the executable at the same path,
    /// SIGTERM/SIGINT stop).
    Run {
        /// Path of the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Make a running relay re-read its config file, as SIGHUP does: what can change in place
    /// does, without dropping a connection. Exit 0 applied, 1 refused (the running config
    /// stays; the key and why are printed), 2 the relay cannot be reached.
    Reload {
        /// The config the relay was started with (its `[admin]` says where to ask).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The process `ackgate run` starts to serve the sockets it holds (not run by hand).
    #[command(hide = true)]
    Worker {
        #[arg(long, short)]
        config: PathBuf,
        /// Started for an upgrade: prepare, then wait to be activated.
        #[arg(long)]
        standby: bool,
    },
    /// Validate a configuration and print the effective one (every default filled in).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// One screen on a running relay: what is queued, the oldest age, every node, dead
    /// letters, rates. Exit 0 healthy, 1 needs attention, 2 unreachable.
    Status {
        #[arg(long, short)]
        config: PathBuf,
        /// Print /api/status as JSON instead.
        #[arg(long)]
        json: bool,
    },
    /// Upgrade a running relay to the executable now at the path it was started from (as SIGUSR2
    /// to its main pid), and wait for the outcome. Exit 0 upgraded, 1 failed (the running
    /// version keeps serving, and the reason is printed), 2 unreachable.
    Upgrade {
        #[arg(long, short)]
        config: PathBuf,
        /// How long to wait for the new worker.
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait: std::time::Duration,
    },
    /// A live terminal view of a running relay, refreshed every second (q quits).
    Top {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect a spool, stopped (read-only) or in use by a running relay (through its admin
    /// listener): stats, list, show, retry, dead letters.
    Spool(ackgate::inspect::SpoolArgs),
    /// Send JSON lines or msgpack records as Forward events, optionally over TLS with a shared key (a fluent-cat replacement).
    Send(tools::SendArgs),
    /// Run an acking Forward aggregator that prints the events it receives as JSON lines.
    Receive(tools::ReceiveArgs),
    /// Load-test ackgate (as a child process) against its baselines: direct path, disk ceiling.
    Bench(ackgate::bench::BenchArgs),
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => match load_config(&config) {
            Ok(config) => {
                print!("{}", config.to_toml());
                for finding in ackgate::middlebox::check::findings(&config) {
                    eprintln!("warning: {finding}");
                }
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Run { config } => {
            init_logging("info", LogFormat::Text);
            ackgate::lifecycle::supervisor::run(vec!["--config".into(), config.into_os_string()])
        }
        Command::Worker { config, standby } => run_worker(&config, standby),
        Command::Reload { config: path } => {
            init_logging("warn", LogFormat::Text);
            match runtime() {
                Ok(rt) => rt.block_on(ackgate::console::reload::run(&path)),
                Err(e) => exit_with(Err(e)),
            }
        }
        Command::Status { config: path, json } => {
            init_logging("warn", LogFormat::Text);
            match runtime() {
                Ok(rt) => rt.block_on(ackgate::console::status::run(&path, json)),
                Err(e) => exit_with(Err(e)),
            }
        }
        Command::Upgrade { config: path, wait } => {
            let config = match load_config(&path) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_logging("warn", LogFormat::Text);
            match runtime() {
                Ok(rt) => rt.block_on(ackgate::console::upgrade::run(&config, &path, wait)),
                Err(e) => exit_with(Err(e)),
            }
        }
        Command::Top { config: path } => {
            let config = match load_config(&path) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_logging("warn", LogFormat::Text);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async { Ok(ackgate::console::top::run(&config, &path).await?) })
            }))
        }
        Command::Spool(args) => {
            let config = match load_config(&args.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            init_logging("warn", LogFormat::Text);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let mut stdout = std::io::stdout().lock();
                    ackgate::inspect::run(args, config, &mut stdout).await?;
                    Ok(())
                })
            }))
        }
        Command::Send(args) => {
            init_logging("warn", LogFormat::Text);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let report = tools::send(args).await?;
                    eprintln!(
                        "sent {} event(s) in {} request(s), {} acked",
                        report.events, report.requests, report.acked
                    );
                    Ok(())
                })
            }))
        }
        Command::Bench(args) => {
            init_logging("warn", LogFormat::Text);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let json = args.json;
                    let report = ackgate::bench::bench(args).await?;
                    print!("{report}");
                    if json {
                        println!("{}", report.to_json());
                    }
                    Ok(())
                })
            }))
        }
        Command::Receive(args) => {
            init_logging("info", LogFormat::Text);
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let stop = CancellationToken::new();
                    let signal_stop = stop.clone();
                    tokio::spawn(async move {
                        ackgate::relay::wait_for_signal().await;
                        signal_stop.cancel();
                    });
                    tools::receive(args, stop).await?;
                    Ok(())
                })
            }))
        }
    }
}

/// `ackgate worker`: take what the supervisor handed over (before any thread exists), read the
/// config, and relay. A config that does not load is also told to the supervisor (STATUS=), so
/// that a failed upgrade can say why.
fn run_worker(path: &std::path::Path, standby: bool) -> ExitCode {
    let mut inherited = match ackgate::lifecycle::worker::prepare_process() {
        Ok(inherited) => inherited,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            ackgate::lifecycle::notify::status(&format!("config error: {e}"));
            return ExitCode::FAILURE;
        }
    };
    init_logging(&config.log.level, config.log.format);
    let Some(control) = inherited.supervisor.take() else {
        return ExitCode::FAILURE;
    };
    exit_with(runtime().and_then(|rt| {
        rt.block_on(async move {
            let link = ackgate::lifecycle::link::start(control)?;
            let result =
                ackgate::relay::run(config, path.to_path_buf(), inherited, link, standby).await;
            if let Err(e) = &result {
                ackgate::lifecycle::notify::status(&format!("error: {e:#}"));
            }
            result
        })
    }))
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    ackgate::config::HumanDuration::parse(text)
}

/// Load and validate a config; on error say why (the key and the problem) and fail.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::FAILURE
    })
}

fn exit_with(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn init_logging(level: &str, format: LogFormat) {
    ackgate::logging::init(level, format);
}

/// One glibc malloc arena instead of one per thread that allocates (up to 8 × cores). Request
/// buffers are allocated on the tokio workers and freed on the spool writer and upstream
/// tasks; with an arena per thread the freed memory stays spread over arenas that cannot
/// reuse it, which cost ~8 MiB of RSS at steady load here (BENCHMARKS.md) and no throughput
/// to get back. `MALLOC_ARENA_MAX` in the environment still wins.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator tunable; it runs before any thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
