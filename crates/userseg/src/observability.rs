//! Logging, metrics and the process lifecycle shared by every command.

use std::sync::OnceLock;

use anyhow::{bail, Result};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

pub fn init_logging(format: &str) -> Result<()> {
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        "text" => builder.init(),
        "json" => builder.json().flatten_event(true).init(),
        other => bail!("LOG_FORMAT: {other:?} must be text or json"),
    }
    Ok(())
}

/// The process's Prometheus recorder, installed on first use (every role started in this
/// process shares it), with a thread that keeps its histograms trimmed.
pub fn metrics() -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .install_recorder()
                .map_err(|e| format!("metrics: {e}"))?;
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                })
                .map_err(|e| format!("metrics: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))
}

/// Cancels the returned token on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
        t.cancel();
    });
    Ok(token)
}
