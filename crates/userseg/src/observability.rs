//! Logging, metrics and the process lifecycle shared by every command.

pub mod catalog;
mod process;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Result};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;
use userseg_usecase::{Estimation, Mode};

pub use catalog::Role;

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
/// process shares it; histograms with buckets, never summaries), with a thread that keeps its
/// histograms trimmed and samples the process metrics. Registers every metric family of
/// `role`, so each shows from the first scrape.
pub fn metrics(role: Role) -> Result<PrometheusHandle> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let handle = HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets(catalog::SECONDS_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("userseg_processor_batch_pairs".into()),
                        catalog::BATCH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("userseg_wal_group_requests".into()),
                        catalog::GROUP_BUCKETS,
                    )
                })
                .map_err(|e| format!("metrics: {e}"))?
                .install_recorder()
                .map_err(|e| format!("metrics: {e}"))?;
            process::describe();
            process::record();
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(SAMPLE_INTERVAL);
                    upkeep.run_upkeep();
                    process::record();
                })
                .map_err(|e| format!("metrics: {e}"))?;
            Ok(handle)
        })
        .clone()
        .map_err(|e| anyhow::anyhow!(e))?;
    catalog::register(role);
    Ok(handle)
}

/// How often process, DATA_DIR and log gauges are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// How often `userseg_segment_users` is refreshed.
const SEGMENT_SAMPLE_INTERVAL: Duration = Duration::from_secs(15);

/// Keeps `userseg_segment_users{segment}` current: one gauge per segment, set to 0 when a
/// segment empties (a gauge cannot be removed; segments number in the hundreds).
pub(crate) fn spawn_segment_gauges(
    estimation: Estimation,
    mode: Mode,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SEGMENT_SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shown: BTreeSet<String> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let list = match estimation.list(mode).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "segment gauges: counting failed; next time");
                    continue;
                }
            };
            let mut now_shown = BTreeSet::new();
            for s in list.segments {
                metrics::gauge!("userseg_segment_users", "segment" => s.segment.clone())
                    .set(s.users as f64);
                now_shown.insert(s.segment);
            }
            for gone in shown.difference(&now_shown) {
                metrics::gauge!("userseg_segment_users", "segment" => gone.clone()).set(0.0);
            }
            shown.extend(now_shown);
        }
    })
}

/// Keeps `userseg_data_dir_bytes` and `userseg_wal_unapplied_bytes` current (standalone).
pub(crate) fn spawn_data_dir_gauges(
    data_dir: PathBuf,
    unapplied: impl Fn() -> u64 + Send + 'static,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            metrics::gauge!("userseg_wal_unapplied_bytes").set(unapplied() as f64);
            let dir = data_dir.clone();
            if let Ok(bytes) = tokio::task::spawn_blocking(move || dir_bytes(&dir)).await {
                metrics::gauge!("userseg_data_dir_bytes").set(bytes as f64);
            }
        }
    })
}

/// Bytes of the regular files under `dir` (not following symlinks); unreadable entries count 0.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(e.path()),
                Ok(t) if t.is_file() => total += e.metadata().map_or(0, |m| m.len()),
                _ => {}
            }
        }
    }
    total
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_bytes_sums_nested_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("wal")).unwrap();
        std::fs::write(dir.path().join("wal").join("b"), vec![0u8; 234]).unwrap();
        assert_eq!(dir_bytes(dir.path()), 1234);
        assert_eq!(dir_bytes(&dir.path().join("missing")), 0);
    }
}
