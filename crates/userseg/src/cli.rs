//! The command line: one subcommand per role. Every flag is also an environment variable.

use clap::{Parser, Subcommand};

use crate::config::{EsArgs, MigrateArgs, StandaloneArgs, UssArgs};

#[derive(Parser)]
#[command(
    name = "userseg",
    version,
    about = "Counts users per segment over a sliding window (standalone, or USS → Kafka → ES → ClickHouse)."
)]
pub struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", global = true)]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Everything in one process on the embedded durable store (no external service).
    Standalone(Box<StandaloneArgs>),
    /// Stateless ingest service: validates pairs and publishes them to Kafka.
    Uss(Box<UssArgs>),
    /// Estimation service: consumes Kafka in batches into ClickHouse and serves estimates.
    Es(Box<EsArgs>),
    /// Apply the ClickHouse schema migrations.
    Migrate(MigrateArgs),
    /// Push a synthetic workload to a running server and report throughput (and verify counts).
    Load(Box<userseg_loadgen::LoadArgs>),
    /// API keys: `userseg keys new --name NAME --roles ingest,read`.
    Keys(crate::keys::KeysArgs),
    /// Print the version.
    Version,
}
