//! Standalone mode: the same use cases as the distributed mode, wired to the embedded adapters
//! (write-ahead log instead of Kafka, in-memory store with snapshots instead of ClickHouse).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userseg_api::ApiState;
use userseg_embedded::{
    open_standalone_with, ChangesSetup, CheckpointConfig, Checkpointer, EmbeddedStore,
    FileDeadLetters, FileHistory, WalConfig, WalHandle, WalLog, WalSource,
};
use userseg_usecase::{
    Analytics, BatchProcessor, Changes, Clock, Estimation, History, HistorySampler, Ingest, Mode,
    ProcessorHealth, SegmentWriter, SystemClock,
};

use crate::config::StandaloneConfig;
use crate::observability;
use crate::server::{self, Server};

/// Opens (and recovers) the data directory, starts the batch processor, the checkpointer and
/// the API, and returns once the API listens. When `shutdown` fires, the role stops accepting,
/// finishes in-flight requests, applies everything acknowledged and writes a final snapshot;
/// [`Server::wait`] returns after that.
pub async fn start(cfg: StandaloneConfig, shutdown: CancellationToken) -> Result<Server> {
    start_with(cfg, shutdown, Seams::default()).await
}

/// What a test may vary in [`start_with`]; the default wires exactly what [`start`] does.
#[derive(Default)]
pub struct Seams {
    /// Stands between the batch processor and the store (e.g. to hold writes back).
    pub writer: Option<WrapWriter>,
}

/// Wraps the store the batch processor writes to.
pub type WrapWriter = Box<dyn FnOnce(Arc<dyn SegmentWriter>) -> Arc<dyn SegmentWriter> + Send>;

/// [`start`], with `seams` in place.
pub async fn start_with(
    cfg: StandaloneConfig,
    shutdown: CancellationToken,
    seams: Seams,
) -> Result<Server> {
    let metrics = observability::metrics(observability::Role::Standalone)?;
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let window = cfg.service.window;
    let listener = server::bind(&cfg.service).await?;

    let mut wal_config = WalConfig::new(cfg.data_dir.join("wal"));
    wal_config.max_inflight_pairs = cfg.max_inflight_pairs;
    let changes_setup = cfg.changes_retention.map(|retention| ChangesSetup {
        retention,
        clock: clock.clone(),
    });
    let opened = open_standalone_with(&cfg.data_dir, window, wal_config, changes_setup)
        .with_context(|| format!("DATA_DIR: cannot open {}", cfg.data_dir.display()))?;
    let recovery = opened.recovery;
    let store = EmbeddedStore(opened.store.clone());

    let (processor, health) = spawn_processor(&cfg, &store, opened.source, seams);
    let mut checkpointer = Checkpointer::new(
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
    );
    if let Some(log) = &opened.changes {
        checkpointer = checkpointer.with_changes(log.clone());
    }
    let checkpointer = Arc::new(checkpointer);
    let checkpoints = Background::spawn(|stop| checkpointer.clone().run(stop));
    let (history, sampler) = history(&cfg, &store, &clock)?;
    let sampling = Background::spawn(|stop| sampler.run(stop));

    let log = opened.log;
    let analytics = Analytics::new(
        Arc::new(store.clone()),
        Arc::new(log.clone()),
        clock.clone(),
        window,
    );
    let ingest = Ingest::new(
        Arc::new(log.clone()),
        clock.clone(),
        window,
        cfg.service.limits,
    );
    let estimation = Estimation::new(Arc::new(store), clock, window, Duration::ZERO);
    let gauges = spawn_gauges(&cfg, &estimation, &opened.wal);
    let mut state = ApiState::new(Some(ingest), Some(estimation));
    state.analytics = Some(analytics);
    state.history = Some(history);
    state.changes = opened
        .changes
        .clone()
        .map(|log| Changes::new(log, Duration::from_secs(15)));
    state.metrics = Some(metrics);
    state.auth = cfg.service.auth.clone();
    state
        .ready_checks
        .push(("processor".into(), server::processor_check(health)));
    tracing::info!(
        data_dir = %cfg.data_dir.display(),
        recovered_pairs = opened.store.memory().live_pairs,
        recovery_ms = recovery.elapsed.as_millis() as u64,
        "recovered standalone state"
    );
    // The API holds the only other handles on the log (through `ingest`); once it has stopped,
    // dropping `log` closes the log.
    let lock = opened.lock;
    let teardown = async move {
        for g in gauges {
            g.stop().await;
        }
        sampling.stop().await;
        drain(log, opened.wal, processor).await;
        checkpoints.stop().await;
        final_snapshot(checkpointer).await;
        drop(lock);
        Ok(())
    };
    server::run(
        listener,
        state,
        &cfg.service,
        "standalone",
        shutdown,
        teardown,
    )
}

/// A background task that runs until its token is cancelled.
struct Background<T> {
    stop: CancellationToken,
    task: JoinHandle<T>,
}

impl<T: Send + 'static> Background<T> {
    fn spawn<F>(run: impl FnOnce(CancellationToken) -> F) -> Background<T>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        Background { stop, task }
    }

    /// Cancels the task and waits for it to end.
    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The batch processor from the log to the store (through `seams.writer`, if any), running.
fn spawn_processor(
    cfg: &StandaloneConfig,
    store: &EmbeddedStore,
    source: WalSource,
    seams: Seams,
) -> (Background<WalSource>, ProcessorHealth) {
    let writer: Arc<dyn SegmentWriter> = Arc::new(store.clone());
    let writer = match seams.writer {
        Some(wrap) => wrap(writer),
        None => writer,
    };
    let processor = BatchProcessor::new(
        writer,
        Arc::new(FileDeadLetters::new(
            cfg.data_dir.join("dead-letters.ndjson"),
        )),
        cfg.batch.clone(),
    );
    let health = processor.health();
    let task = Background::spawn(|stop| async move { processor.run(source, stop).await });
    (task, health)
}

/// The history files in DATA_DIR/history: the use case reading them and the sampler writing
/// them.
fn history(
    cfg: &StandaloneConfig,
    store: &EmbeddedStore,
    clock: &Arc<dyn Clock>,
) -> Result<(History, HistorySampler)> {
    let dir = cfg.data_dir.join("history");
    let files = Arc::new(
        FileHistory::open(&dir)
            .with_context(|| format!("DATA_DIR: cannot open {}", dir.display()))?,
    );
    let sampler = HistorySampler::new(
        Arc::new(store.clone()),
        files.clone(),
        clock.clone(),
        cfg.history,
    );
    Ok((History::new(files, clock.clone(), cfg.history), sampler))
}

/// The per-segment gauges and the data directory's.
fn spawn_gauges(
    cfg: &StandaloneConfig,
    estimation: &Estimation,
    wal: &WalHandle,
) -> [Background<()>; 2] {
    let stop = CancellationToken::new();
    let segments =
        observability::spawn_segment_gauges(estimation.clone(), Mode::Exact, stop.clone());
    let wal = wal.clone();
    let data_dir = observability::spawn_data_dir_gauges(
        cfg.data_dir.clone(),
        move || wal.written().saturating_sub(wal.committed()),
        stop.clone(),
    );
    [
        Background {
            stop: stop.clone(),
            task: segments,
        },
        Background {
            stop,
            task: data_dir,
        },
    ]
}

/// Closes the log: the writer drains, then the processor reads the end of the log, applies
/// the rest and stops (cancelled after 20 s).
async fn drain(log: WalLog, wal: WalHandle, mut processor: Background<WalSource>) {
    drop(log);
    let joined = tokio::task::spawn_blocking(move || wal.join());
    let _ = tokio::time::timeout(Duration::from_secs(10), joined).await;
    if tokio::time::timeout(Duration::from_secs(20), &mut processor.task)
        .await
        .is_err()
    {
        processor.stop().await;
    }
}

/// A snapshot of everything applied, so the next start replays nothing.
async fn final_snapshot(checkpointer: Arc<Checkpointer>) {
    match tokio::task::spawn_blocking(move || checkpointer.checkpoint()).await {
        Ok(Ok(Some(offset))) => tracing::info!(offset, "final snapshot written"),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "final snapshot failed; the log still has everything")
        }
        Err(e) => tracing::error!(error = %e, "final snapshot task failed"),
    }
}
