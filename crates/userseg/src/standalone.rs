//! Standalone mode: the same use cases as the distributed mode, wired to the embedded adapters
//! (write-ahead log instead of Kafka, in-memory store with snapshots instead of ClickHouse).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use userseg_api::ApiState;
use userseg_embedded::{
    open_standalone, CheckpointConfig, Checkpointer, EmbeddedStore, FileDeadLetters, FileHistory,
    WalConfig,
};
use userseg_usecase::{
    Analytics, BatchProcessor, Clock, Estimation, History, HistorySampler, Ingest, SystemClock,
};

use crate::config::StandaloneConfig;
use crate::{observability, server};

pub async fn run(cfg: StandaloneConfig) -> Result<()> {
    let metrics = observability::init_metrics()?;
    let shutdown = observability::shutdown_on_signals()?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let window = cfg.service.window;

    let mut wal_config = WalConfig::new(cfg.data_dir.join("wal"));
    wal_config.max_inflight_pairs = cfg.max_inflight_pairs;
    let opened = open_standalone(&cfg.data_dir, window, wal_config)
        .with_context(|| format!("DATA_DIR: cannot open {}", cfg.data_dir.display()))?;
    let recovery = opened.recovery;
    let store = EmbeddedStore(opened.store.clone());

    let processor = BatchProcessor::new(
        Arc::new(store.clone()),
        Arc::new(FileDeadLetters::new(
            cfg.data_dir.join("dead-letters.ndjson"),
        )),
        cfg.batch.clone(),
    );
    let health = processor.health();
    let processor_stop = tokio_util::sync::CancellationToken::new();
    let processor_task = {
        let stop = processor_stop.clone();
        let source = opened.source;
        tokio::spawn(async move { processor.run(source, stop).await })
    };

    let checkpointer = Arc::new(Checkpointer::new(
        &cfg.data_dir,
        opened.store.clone(),
        opened.wal.clone(),
        CheckpointConfig {
            interval: cfg.checkpoint_interval,
            wal_bytes: cfg.checkpoint_log_bytes,
            ..CheckpointConfig::default()
        },
        clock.clone(),
        recovery.snapshot_offset,
    ));
    let checkpoint_stop = tokio_util::sync::CancellationToken::new();
    let checkpoint_task = tokio::spawn(checkpointer.clone().run(checkpoint_stop.clone()));

    let log = opened.log;
    let history_dir = cfg.data_dir.join("history");
    let history_store = Arc::new(
        FileHistory::open(&history_dir)
            .with_context(|| format!("DATA_DIR: cannot open {}", history_dir.display()))?,
    );
    let sampler = HistorySampler::new(
        Arc::new(store.clone()),
        history_store.clone(),
        clock.clone(),
        cfg.history,
    );
    let sampler_stop = tokio_util::sync::CancellationToken::new();
    let sampler_task = tokio::spawn(sampler.run(sampler_stop.clone()));
    let analytics = Analytics::new(
        Arc::new(store.clone()),
        Arc::new(log.clone()),
        clock.clone(),
        window,
    );
    let history = History::new(history_store, clock.clone(), cfg.history);
    let ingest = Ingest::new(
        Arc::new(log.clone()),
        clock.clone(),
        window,
        cfg.service.limits,
    );
    let estimation = Estimation::new(Arc::new(store), clock, window, Duration::ZERO);
    let mut state = ApiState::new(Some(ingest), Some(estimation));
    state.analytics = Some(analytics);
    state.history = Some(history);
    state.metrics = Some(metrics);
    state.auth_token = cfg.service.api_token.as_deref().map(Arc::from);
    state
        .ready_checks
        .push(("processor".into(), server::processor_check(health)));
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        recovered_pairs = opened.store.memory().live_pairs,
        recovery_ms = recovery.elapsed.as_millis() as u64,
        "recovered standalone state"
    );
    let server = server::serve(state, &cfg.service, "standalone", shutdown.clone()).await?;

    shutdown.cancelled().await;
    // 1. Stop accepting; let in-flight requests finish (bounded).
    server::stop(server).await;
    sampler_stop.cancel();
    let _ = sampler_task.await;
    // 2. Close the log: the writer drains, then the processor sees the end and flushes.
    drop(log);
    let wal = opened.wal.clone();
    let joined = tokio::task::spawn_blocking(move || wal.join());
    let _ = tokio::time::timeout(Duration::from_secs(10), joined).await;
    let mut processor_task = processor_task;
    if tokio::time::timeout(Duration::from_secs(20), &mut processor_task)
        .await
        .is_err()
    {
        processor_stop.cancel();
        let _ = processor_task.await;
    }
    // 3. Final snapshot, so the next start replays nothing.
    checkpoint_stop.cancel();
    let _ = checkpoint_task.await;
    let cp = checkpointer.clone();
    match tokio::task::spawn_blocking(move || cp.checkpoint()).await {
        Ok(Ok(Some(offset))) => tracing::info!(offset, "final snapshot written"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "final snapshot failed; the log still has everything")
        }
        Err(e) => tracing::error!(error = %e, "final snapshot task failed"),
    }
    tracing::info!("userseg standalone stopped");
    Ok(())
}
