//! Keeping a standalone data directory compact: periodic snapshots, log truncation, expiry
//! sweeps.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use userseg_usecase::Clock;

use crate::store::snapshot::{self, SnapshotError};
use crate::store::MemStore;
use crate::wal::WalHandle;

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

/// Snapshots the store when enough new log has accumulated, truncates the log behind the
/// snapshot, and sweeps expired memberships out of memory.
pub struct Checkpointer {
    store: Arc<MemStore>,
    wal: WalHandle,
    dir: PathBuf,
    config: CheckpointConfig,
    clock: Arc<dyn Clock>,
    last: Mutex<(u64, Instant)>,
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
        }
    }

    /// Snapshots now if anything was applied since the last snapshot; returns its offset.
    pub fn checkpoint(&self) -> Result<Option<u64>, SnapshotError> {
        let offset = self.wal.committed();
        if offset <= self.last.lock().unwrap_or_else(|e| e.into_inner()).0 {
            return Ok(None);
        }
        let started = Instant::now();
        snapshot::write(&self.store, &self.dir, offset)?;
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
        behind >= self.config.wal_bytes || (behind > 0 && at.elapsed() >= self.config.interval)
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
