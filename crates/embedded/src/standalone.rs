//! Opening a standalone data directory: lock it, load the newest snapshot, replay the log after
//! it, start the log writer.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userseg_domain::{Record, Window};

use crate::store::snapshot::{self, SnapshotError};
use crate::store::MemStore;
use crate::wal::{self, ReplayStats, WalConfig, WalError, WalHandle, WalLog, WalSource};

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
    /// The exclusive lock on the directory: hold it as long as the directory is in use.
    pub lock: DataDirLock,
}

/// An exclusive lock on a data directory (its `LOCK` file), released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
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
        lock: DataDirLock { _file: lock },
    })
}
