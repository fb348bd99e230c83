//! Load generator for userseg: pushes a synthetic, skewed workload of (user, segment, ts) pairs
//! over gRPC (`PushStream` or `Push`) or HTTP (`POST /v1/pairs`), reports throughput, latency and
//! errors, and optionally verifies the server's exact counts against what it sent.
//!
//! The `userseg` binary wires it as a subcommand:
//!
//! ```ignore
//! #[derive(Subcommand)]
//! enum Command {
//!     /// Push a synthetic workload to a server and report throughput.
//!     Load(userseg_loadgen::LoadArgs),
//! }
//! // ...
//! Command::Load(args) => { userseg_loadgen::run(args).await?; }
//! ```
//!
//! See docs/LOADGEN.md for the workload model, flags and the verification rules.

mod args;
mod client;
mod encode;
mod model;
mod pace;
mod run;
mod summary;
mod workload;

pub use args::{HttpBody, LoadArgs, Protocol};
pub use encode::Names;
pub use model::{bucket_secs, Comparison, Expected, Mismatch, Model, Tolerance};
pub use summary::{FillReport, Latency, Summary, VerifyReport};
pub use workload::{skew_for, Filler, GenPair, Generator, Workload, RESEND_RING};

/// Why a run failed. Errors raised after sending carry the [`Summary`] (already printed).
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A flag is invalid; the message names its variable.
    #[error("{0}")]
    Config(String),
    /// The server could not be reached before sending.
    #[error("cannot reach the server at {target}: {message}")]
    Connect { target: String, message: String },
    /// The server rejected a request for good (invalid, unauthenticated...), or stayed
    /// overloaded for a minute: the run stopped early.
    #[error("the run stopped: {message}")]
    Stopped {
        message: String,
        summary: Box<Summary>,
    },
    /// `--verify` found counts different from the expected ones (or could not read them).
    #[error("verification failed: {detail}")]
    Verify {
        detail: String,
        summary: Box<Summary>,
    },
}

impl LoadError {
    /// The summary of the run, when it got as far as sending.
    pub fn summary(&self) -> Option<&Summary> {
        match self {
            LoadError::Stopped { summary, .. } | LoadError::Verify { summary, .. } => Some(summary),
            _ => None,
        }
    }
}

/// Runs the load described by `args`, prints the summary (human, or one JSON object with
/// `--json`) on stdout, and returns it. A progress bar goes to stderr when it is a terminal.
///
/// Fails when the server cannot be reached, rejects a request for good, or (with `--verify`)
/// reports exact counts that differ from the expected ones.
pub async fn run(args: LoadArgs) -> Result<Summary, LoadError> {
    run::run(args).await
}
