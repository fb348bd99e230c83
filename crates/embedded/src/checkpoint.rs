//! Opening a standalone data directory (snapshot + log replay) and keeping it compact
//! (periodic snapshots, log truncation, expiry sweeps).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use userseg_domain::{Record, Window};
use userseg_usecase::Clock;

use crate::store::snapshot::{self, SnapshotError};
use crate::store::MemStore;
use crate::wal::{self, ReplayStats, WalConfig, WalError, WalHandle, WalLog, WalSource};

#[derive(Clone, Debug)]
pub struct CheckpointConfig {
    /// Snapshot at least this often while there is new data.
    pub interval: Duration,
    /// Snapshot as soon as this many log bytes are not covered by a snapshot.
    pub wal_bytes: u64,
    /// How often expired memberships are swept out of memory.
    pub expire_interval: Duration,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval: Duration::from_secs(300),
            wal_bytes: 256 << 20,
            expire_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("data directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data directory {0} is in use by another userseg process")]
    Locked(PathBuf),
}

/// What recovery did at start-up.
#[derive(Clone, Copy, Debug, Default)]
pub struct Recovery {
    pub snapshot_offset: u64,
    pub snapshot_pairs: u64,
    pub replay: ReplayStats,
    pub elapsed: Duration,
}

/// Everything standalone mode runs on, recovered from `DATA_DIR`.
pub struct Standalone {
    pub store: Arc<MemStore>,
    pub log: WalLog,
    pub source: WalSource,
    pub wal: WalHandle,
    pub recovery: Recovery,
    _lock: File,
}

/// Opens (or creates) a data directory: loads the newest snapshot, replays the log after it,
/// and starts the log writer. Holds an exclusive lock on the directory while open.
pub fn open_standalone(
    data_dir: &Path,
    window: Window,
    mut wal_config: WalConfig,
) -> Result<Standalone, OpenError> {
    let started = Instant::now();
    let io_err = |source| OpenError::Io {
        path: data_dir.to_owned(),
        source,
    };
    fs::create_dir_all(data_dir).map_err(io_err)?;
    let lock = File::create(data_dir.join("LOCK")).map_err(io_err)?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(data_dir.to_owned())),
        Err(fs::TryLockError::Error(e)) => return Err(io_err(e)),
    }
    let snap_dir = data_dir.join("snapshots");
    let (store, offset) = match snapshot::load_latest(&snap_dir, window)? {
        Some((store, offset)) => (store, offset),
        None => (MemStore::new(window), 0),
    };
    let snapshot_pairs = store.memory().live_pairs;
    wal_config.dir = data_dir.join("wal");
    // In log order: a deletion removes what came before it, not what comes after.
    let replay = wal::replay(&wal_config.dir, offset, |record| match record {
        Record::Pairs(pairs) => {
            // The in-memory store never refuses valid pairs.
            let _ = store.apply(&pairs);
        }
        Record::DeleteUsers(d) => {
            store.delete_users(d.user_ids());
        }
    })?;
    let (log, source, handle) = wal::start(wal_config, replay.end)?;
    let recovery = Recovery {
        snapshot_offset: offset,
        snapshot_pairs,
        replay,
        elapsed: started.elapsed(),
    };
    tracing::info!(
        snapshot_offset = offset,
        snapshot_pairs,
        replayed_records = replay.records,
        replayed_pairs = replay.pairs,
        elapsed_ms = recovery.elapsed.as_millis() as u64,
        "recovered the data directory"
    );
    Ok(Standalone {
        store: Arc::new(store),
        log,
        source,
        wal: handle,
        recovery,
        _lock: lock,
    })
}

/// Snapshots the store when enough new log has accumulated, truncates the log behind the
/// snapshot, and sweeps expired memberships out of memory.
pub struct Checkpointer {
    store: Arc<MemStore>,
    wal: WalHandle,
    dir: PathBuf,
    config: CheckpointConfig,
    clock: Arc<dyn Clock>,
    last: Mutex<(u64, Instant)>,
    /// [`MemStore::erasures`] covered by the last snapshot.
    erasures_done: std::sync::atomic::AtomicU64,
}

impl Checkpointer {
    pub fn new(
        data_dir: &Path,
        store: Arc<MemStore>,
        wal: WalHandle,
        config: CheckpointConfig,
        clock: Arc<dyn Clock>,
        recovered_offset: u64,
    ) -> Self {
        Checkpointer {
            store,
            wal,
            dir: data_dir.join("snapshots"),
            config,
            clock,
            last: Mutex::new((recovered_offset, Instant::now())),
            erasures_done: Default::default(),
        }
    }

    /// Snapshots now if anything was applied since the last snapshot; returns its offset.
    pub fn checkpoint(&self) -> Result<Option<u64>, SnapshotError> {
        let offset = self.wal.committed();
        if offset <= self.last.lock().unwrap_or_else(|e| e.into_inner()).0 {
            return Ok(None);
        }
        let started = Instant::now();
        let erasures = self.store.erasures();
        snapshot::write(&self.store, &self.dir, offset)?;
        self.erasures_done
            .fetch_max(erasures, std::sync::atomic::Ordering::AcqRel);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = (offset, Instant::now());
        match self.wal.remove_before(offset) {
            Ok(n) if n > 0 => {
                tracing::debug!(files = n, "removed log files covered by the snapshot")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not remove old log files"),
        }
        metrics::histogram!("userseg_snapshot_seconds").record(started.elapsed());
        tracing::info!(
            offset,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "wrote a snapshot"
        );
        Ok(Some(offset))
    }

    fn due(&self) -> bool {
        let (offset, at) = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let behind = self.wal.committed().saturating_sub(offset);
        // After a deletion, at once: the erased users must leave the snapshot and the log.
        let erased = self.store.erasures()
            > self
                .erasures_done
                .load(std::sync::atomic::Ordering::Acquire);
        behind >= self.config.wal_bytes
            || (behind > 0 && (erased || at.elapsed() >= self.config.interval))
    }

    /// Runs until cancelled. The final snapshot on shutdown is the caller's (after the
    /// processor has flushed).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut last_expire = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if last_expire.elapsed() >= self.config.expire_interval {
                last_expire = Instant::now();
                let store = self.store.clone();
                let now = self.clock.now();
                let _ = tokio::task::spawn_blocking(move || store.expire(now)).await;
                let m = self.store.memory();
                metrics::gauge!("userseg_embedded_live_pairs").set(m.live_pairs as f64);
                metrics::gauge!("userseg_embedded_users").set(m.users as f64);
                metrics::gauge!("userseg_embedded_memory_bytes")
                    .set((m.member_bytes + m.dict_bytes) as f64);
            }
            if self.due() {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.checkpoint()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "snapshot failed; the log keeps everything, will retry")
                    }
                    Err(e) => tracing::error!(error = %e, "snapshot task failed"),
                }
            }
        }
    }
}
