//! Opening a standalone data directory: lock it, load the newest snapshot, replay the log after
//! it, start the log writer.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use userseg_domain::{Record, Window};
use userseg_usecase::Clock;

use crate::changes::{ChangeLogConfig, FileChangeLog};
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
    #[error("change log: {0}")]
    Changes(String),
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
    /// The change log, when the feed is on (the store detects changes into it).
    pub changes: Option<Arc<FileChangeLog>>,
    /// The exclusive lock on the directory: hold it as long as the directory is in use.
    pub lock: DataDirLock,
}

/// The change feed of a standalone data directory: its log in `DATA_DIR/changes` and the
/// clock that drives exits.
pub struct ChangesSetup {
    pub retention: Duration,
    pub clock: Arc<dyn Clock>,
}

/// An exclusive lock on a data directory (its `LOCK` file), released when dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

/// About the fewest bytes a pair takes in the log (a short user id and segment name, in a
/// batch): the log's size over it bounds the pairs a replay brings.
const LOG_BYTES_PER_PAIR: u64 = 20;

/// Opens (or creates) a data directory: loads the newest snapshot, replays the log after it,
/// and starts the log writer. Holds an exclusive lock on the directory while open.
pub fn open_standalone(
    data_dir: &Path,
    window: Window,
    wal_config: WalConfig,
) -> Result<Standalone, OpenError> {
    open_standalone_with(data_dir, window, wal_config, None)
}

/// [`open_standalone`] with the change feed on when `changes` is given.
///
/// Recovery of the feed: the change log's last `covered` marker says up to which log offset
/// the events are in it; the records after it are replayed with change detection on (as of
/// the log's last `tick` marker), which appends their events once, and the records before it
/// without. The checkpointer syncs the change log before each snapshot, so the snapshot's
/// offset is never past what the change log durably covers.
pub fn open_standalone_with(
    data_dir: &Path,
    window: Window,
    mut wal_config: WalConfig,
    changes: Option<ChangesSetup>,
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
    let wal_dir = data_dir.join("wal");
    // Room in the loaded tables for what the log replays (an estimate from its size).
    let replay_pairs = |offset| wal::bytes_after(&wal_dir, offset) / LOG_BYTES_PER_PAIR;
    let (store, offset) = match snapshot::load_latest_before(&snap_dir, window, replay_pairs)? {
        Some((store, offset)) => (store, offset),
        None => (MemStore::new(window), 0),
    };
    let snapshot_pairs = store.memory().live_pairs;
    let (changes, covered) = match changes {
        Some(setup) => {
            let (log, covered) = open_changes(data_dir, &store, offset, setup)?;
            (Some(log), covered)
        }
        None => {
            // The feed is off: a change log left from when it was on would keep ids of users
            // deleted from now on (erasure), and no one reads it any more.
            let dir = data_dir.join("changes");
            if dir.exists() {
                fs::remove_dir_all(&dir).map_err(|source| OpenError::Io {
                    path: dir.clone(),
                    source,
                })?;
                tracing::warn!(dir = %dir.display(), "the change feed is off: removed its log");
            }
            (None, u64::MAX)
        }
    };
    wal_config.dir = data_dir.join("wal");
    // In log order: a deletion removes what came before it, not what comes after.
    let mut failed = None;
    let replay = wal::replay_at(&wal_config.dir, offset, |end, record| {
        let through = (end > covered).then_some(end);
        let applied = match (record, through) {
            // The in-memory store never refuses valid pairs.
            (Record::Pairs(pairs), None) => store.apply(&pairs),
            (Record::Pairs(pairs), through) => store.apply_through(&pairs, through),
            (Record::DeleteUsers(d), None) => {
                store.delete_users(d.user_ids());
                store.note_erased(d.user_ids());
                Ok(())
            }
            (Record::DeleteUsers(d), through) => store
                .delete_users_through(d.user_ids(), through)
                .map(|_| ()),
        };
        if let Err(e) = applied {
            failed.get_or_insert(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(OpenError::Changes(e.to_string()));
    }
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
        changes,
        lock: DataDirLock { _file: lock },
    })
}

/// Opens the change log and attaches it to `store`; returns it and the log offset its events
/// cover.
fn open_changes(
    data_dir: &Path,
    store: &MemStore,
    snapshot_offset: u64,
    setup: ChangesSetup,
) -> Result<(Arc<FileChangeLog>, u64), OpenError> {
    let config = ChangeLogConfig::new(data_dir.join("changes"), setup.retention);
    let (log, recovered) = FileChangeLog::open(config, setup.clock.clone())?;
    let log = Arc::new(log);
    let exit_lo = recovered
        .exit_lo
        .unwrap_or_else(|| store.initial_exit_lo(setup.clock.now()));
    let covered = match recovered.covered {
        Some(c) if c >= snapshot_offset => c,
        found => {
            if let Some(c) = found {
                // Only when the feed was off for a while (or the change log was removed).
                tracing::warn!(
                    covered = c,
                    snapshot_offset,
                    "the change log ends before the snapshot: changes in between are not in the feed"
                );
            }
            // A new log starts at the snapshot: what it holds and the log after it are the
            // state the feed starts from, before any event.
            log.append_frames(Vec::new(), Some(snapshot_offset), Some(exit_lo))
                .map_err(|e| OpenError::Changes(e.to_string()))?;
            log.sync().map_err(|source| OpenError::Io {
                path: data_dir.join("changes"),
                source,
            })?;
            u64::MAX
        }
    };
    store.attach_feed(log.clone(), setup.clock, exit_lo);
    tracing::info!(covered, exit_lo, "opened the change log");
    Ok((log, covered))
}

#[cfg(test)]
mod tests {
    use super::*;
    use userseg_domain::{ChangeReason, Pair, UserDeletion};
    use userseg_usecase::{Content, ManualClock, PairPublisher, PairSource, SegmentWriter};

    use crate::changes::read_all;
    use crate::{CheckpointConfig, Checkpointer, EmbeddedStore};

    const NOW: i64 = 1_800_000_000;

    fn open(dir: &Path, clock: &Arc<ManualClock>) -> Standalone {
        open_standalone_with(
            dir,
            Window::from_secs(600).unwrap(),
            WalConfig::new(""),
            Some(ChangesSetup {
                retention: Duration::from_secs(86_400),
                clock: clock.clone(),
            }),
        )
        .unwrap()
    }

    fn pairs(users: std::ops::Range<u32>, ts: i64) -> Vec<Pair> {
        users
            .map(|u| Pair {
                user_id: format!("u{u}"),
                segment: "s".into(),
                ts,
            })
            .collect()
    }

    /// Applies the next `n` records as the batch processor does (with their log offsets).
    async fn apply_next(sa: &mut Standalone, n: usize) {
        let store = EmbeddedStore(sa.store.clone());
        for _ in 0..n {
            let m = sa.source.next().await.unwrap().unwrap();
            let through = WalSource::log_offset(&m.position);
            match m.content {
                Content::Pairs(p) => store.write_through(p.into(), through).await.unwrap(),
                Content::Delete(d) => store.delete_users_through(d, through).await.unwrap(),
                Content::Invalid { reason, .. } => panic!("{reason}"),
            }
            sa.source.commit(vec![m.position]).await.unwrap();
        }
    }

    fn crash(sa: Standalone) {
        let Standalone {
            log,
            wal,
            store,
            source,
            lock,
            changes,
            ..
        } = sa;
        drop((log, store, source, changes));
        wal.join();
        drop((wal, lock));
    }

    fn users_of(dir: &Path) -> Vec<(String, ChangeReason)> {
        read_all(&dir.join("changes"))
            .unwrap()
            .into_iter()
            .map(|e| (e.user_id, e.reason))
            .collect()
    }

    fn entered(users: std::ops::Range<u32>) -> Vec<(String, ChangeReason)> {
        users
            .map(|u| (format!("u{u}"), ChangeReason::Pair))
            .collect()
    }

    /// Erasure: after a deletion and the snapshot that follows, no change-log file holds the
    /// deleted user's id (its events, the `deleted` ones too, name `*`s instead); pairs sent
    /// after the deletion keep their events; every cursor still reads.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_user_leaves_the_change_log_with_the_next_snapshot() {
        const VICTIM: &str = "erase-me@example.com";
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(NOW));
        let mut sa = open(dir.path(), &clock);
        let victim = |seg: &str| Pair {
            user_id: VICTIM.into(),
            segment: seg.into(),
            ts: NOW,
        };
        sa.log
            .publish(vec![victim("a"), victim("b")])
            .await
            .unwrap();
        sa.log.publish(pairs(0..2, NOW)).await.unwrap();
        sa.log
            .publish_deletion(UserDeletion::new(vec![VICTIM.into()]).unwrap())
            .await
            .unwrap();
        sa.log.publish(vec![victim("c")]).await.unwrap();
        apply_next(&mut sa, 4).await;
        let holds = |dir: &Path| {
            std::fs::read_dir(dir.join("changes")).unwrap().any(|f| {
                let data = std::fs::read(f.unwrap().path()).unwrap();
                data.windows(VICTIM.len())
                    .filter(|w| *w == VICTIM.as_bytes())
                    .count()
                    > 1
            })
        };
        assert!(
            holds(dir.path()),
            "before the snapshot the events name the user"
        );
        let cp = Checkpointer::new(
            dir.path(),
            sa.store.clone(),
            sa.wal.clone(),
            CheckpointConfig::default(),
            clock.clone(),
            sa.recovery.snapshot_offset,
        )
        .with_changes(sa.changes.clone().unwrap());
        cp.checkpoint().unwrap().unwrap();
        let events = read_all(&dir.path().join("changes")).unwrap();
        let mut got: Vec<(String, ChangeReason, String)> = events
            .iter()
            .map(|e| (e.user_id.clone(), e.reason, e.segment.clone()))
            .collect();
        // The two `deleted` events come in any order of segments.
        got[4..6].sort_by(|a, b| a.2.cmp(&b.2));
        let stars = "*".repeat(VICTIM.len());
        assert_eq!(
            got,
            vec![
                (stars.clone(), ChangeReason::Pair, "a".into()),
                (stars.clone(), ChangeReason::Pair, "b".into()),
                ("u0".into(), ChangeReason::Pair, "s".into()),
                ("u1".into(), ChangeReason::Pair, "s".into()),
                (stars.clone(), ChangeReason::Deleted, "a".into()),
                (stars.clone(), ChangeReason::Deleted, "b".into()),
                (VICTIM.into(), ChangeReason::Pair, "c".into()),
            ]
        );
        // Only the pair after the deletion names the user now.
        let count = std::fs::read_dir(dir.path().join("changes"))
            .unwrap()
            .map(|f| {
                let data = std::fs::read(f.unwrap().path()).unwrap();
                data.windows(VICTIM.len())
                    .filter(|w| *w == VICTIM.as_bytes())
                    .count()
            })
            .sum::<usize>();
        assert_eq!(count, 1);
        // Cursors still read: everything from the start, through the log's port.
        let log = sa.changes.clone().unwrap();
        let b = userseg_usecase::ChangeLog::read(log.as_ref(), "0", 100, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(b.records.len(), 7);
    }

    /// Acknowledged pairs whose events were not written (the process died after the WAL's
    /// fsync, before or during the apply) get their events at the restart, once; events
    /// already logged are not repeated, across snapshots too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_of_acknowledged_pairs_survive_a_crash_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(NOW));
        let mut sa = open(dir.path(), &clock);
        sa.log.publish(pairs(0..3, NOW)).await.unwrap();
        apply_next(&mut sa, 1).await;
        // Acknowledged, never applied: the crash comes before the processor.
        sa.log.publish(pairs(3..5, NOW)).await.unwrap();
        crash(sa);
        assert_eq!(users_of(dir.path()), entered(0..3));

        let mut sa = open(dir.path(), &clock);
        assert_eq!(
            users_of(dir.path()),
            entered(0..5),
            "regenerated once at replay"
        );
        // More, a snapshot (which syncs the change log first), more again, a deletion.
        sa.log.publish(pairs(5..6, NOW)).await.unwrap();
        apply_next(&mut sa, 1).await;
        let cp = Checkpointer::new(
            dir.path(),
            sa.store.clone(),
            sa.wal.clone(),
            CheckpointConfig::default(),
            clock.clone(),
            sa.recovery.snapshot_offset,
        )
        .with_changes(sa.changes.clone().unwrap());
        cp.checkpoint().unwrap().unwrap();
        sa.log.publish(pairs(6..7, NOW)).await.unwrap();
        sa.log
            .publish_deletion(UserDeletion::new(vec!["u0".into()]).unwrap())
            .await
            .unwrap();
        apply_next(&mut sa, 2).await;
        let before = users_of(dir.path());
        assert_eq!(before.len(), 8);
        assert_eq!(before[7], ("u0".to_string(), ChangeReason::Deleted));
        crash(sa);

        // The machine lost the change log's unsynced tail (the events after the snapshot):
        // cut the file back to the last sync, as an OS crash would.
        let files = std::fs::read_dir(dir.path().join("changes")).unwrap();
        let file = files.map(|f| f.unwrap().path()).max().unwrap();
        let synced = {
            // The events up to u5 and the marker after them were synced by the checkpoint:
            // cut after that marker.
            let data = std::fs::read(&file).unwrap();
            let at = data.windows(2).rposition(|w| w == b"u5").unwrap();
            let mut pos = 0;
            let mut past = 0;
            loop {
                let len = u32::from_le_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
                pos += 8 + len;
                if pos > at {
                    past += 1;
                    if past == 2 {
                        break pos;
                    }
                }
            }
        };
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(synced as u64)
            .unwrap();
        let sa = open(dir.path(), &clock);
        assert_eq!(
            users_of(dir.path()),
            before,
            "the lost tail is regenerated, the rest kept"
        );
        // A restart with nothing lost adds nothing.
        crash(sa);
        let sa = open(dir.path(), &clock);
        assert_eq!(users_of(dir.path()), before);
        crash(sa);
        // Turned off: the change log goes (it would keep ids of users deleted from now on).
        let sa = open_standalone(
            dir.path(),
            Window::from_secs(600).unwrap(),
            WalConfig::new(""),
        )
        .unwrap();
        assert!(!dir.path().join("changes").exists());
        drop(sa);
    }
}
