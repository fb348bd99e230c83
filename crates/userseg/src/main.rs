//! The userseg binary: one command per role, wiring config → adapters → use cases → API.

mod config;
mod distributed;
mod keys;
mod observability;
mod reload;
mod server;
mod standalone;

use anyhow::Result;

/// mimalloc: ingest allocates two small strings per pair on one thread and frees them on
/// another (the batch processor), a pattern where glibc malloc contends.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "userseg",
    version,
    about = "Counts users per segment over a sliding window (standalone, or USS → Kafka → ES → ClickHouse)."
)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything in one process on the embedded durable store (no external service).
    Standalone(config::StandaloneArgs),
    /// Stateless ingest service: validates pairs and publishes them to Kafka.
    Uss(distributed::UssArgs),
    /// Estimation service: consumes Kafka in batches into ClickHouse and serves estimates.
    Es(Box<distributed::EsArgs>),
    /// Apply the ClickHouse schema migrations.
    Migrate(distributed::MigrateArgs),
    /// Push a synthetic workload to a running server and report throughput (and verify counts).
    Load(Box<userseg_loadgen::LoadArgs>),
    /// API keys: `userseg keys new --name NAME --roles ingest,read`.
    Keys(keys::KeysArgs),
    /// Print the version.
    Version,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Version = cli.command {
        println!("userseg {}", env!("CARGO_PKG_VERSION"));
        return Ok(());
    }
    if let Command::Keys(args) = cli.command {
        return keys::run(args);
    }
    observability::init_logging(&cli.log_format)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Standalone(args) => standalone::run(args.validate()?).await,
            Command::Uss(args) => distributed::run_uss(args).await,
            Command::Es(args) => distributed::run_es(*args).await,
            Command::Migrate(args) => distributed::run_migrate(args).await,
            Command::Load(args) => userseg_loadgen::run(*args)
                .await
                .map(|_| ())
                .map_err(Into::into),
            Command::Version | Command::Keys(_) => Ok(()),
        }
    });
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "userseg stopped with an error");
    }
    result
}
