//! Keeping a standalone data directory compact: periodic snapshots, log truncation, expiry
//! sweeps.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use userseg_usecase::Clock;

use crate::changes::FileChangeLog;
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
    /// [`MemStore::erasures`] covered by the last snapshot.
    erasures_done: std::sync::atomic::AtomicU64,
    /// The change log: synced before each snapshot; its exits ticked and its retention applied
    /// by [`Checkpointer::run`].
    changes: Option<Arc<FileChangeLog>>,
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
            changes: None,
        }
    }

    /// Keeps the change log in step: synced before each snapshot (so a snapshot never covers
    /// a record whose events are not durable), exits emitted as the clock passes bucket edges,
    /// files beyond the retention removed.
    pub fn with_changes(mut self, log: Arc<FileChangeLog>) -> Self {
        self.changes = Some(log);
        self
    }

    /// Emits the exits due now and applies the change log's retention.
    fn tick_changes(&self) {
        let Some(log) = &self.changes else {
            return;
        };
        if let Err(e) = self.store.tick_changes(self.clock.now()) {
            tracing::warn!(error = %e, "could not write exits to the change log; will retry");
        }
        match log.prune() {
            Ok(0) => {}
            Ok(n) => tracing::info!(files = n, "removed change log files past the retention"),
            Err(e) => tracing::warn!(error = %e, "could not remove old change log files"),
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
        // Erasure: the ids of users deleted since the last snapshot leave the change log
        // before the snapshot (which removes the log files holding the deletion): a crash
        // before the snapshot replays the deletion, which asks for the redaction again.
        if let Some(log) = &self.changes {
            let erased = self.store.take_erased();
            if !erased.is_empty() {
                if let Err(source) = log.redact(&erased) {
                    self.store.return_erased(erased);
                    return Err(SnapshotError::Io {
                        path: self.dir.clone(),
                        source,
                    });
                }
            }
        }
        // With a change feed, the snapshot's fsync syncs the change log too, after the copy
        // and before the rename: the events of every record the snapshot holds (those up to
        // `offset`, and later ones a fuzzy copy may hold) are durable before it is.
        let written = match &self.changes {
            None => snapshot::write(&self.store, &self.dir, offset),
            Some(log) => snapshot::write_with(&self.store, &self.dir, offset, |p| {
                Ok(WithChanges {
                    file: std::fs::File::create(p)?,
                    log: log.clone(),
                })
            }),
        };
        if let Err(e) = written {
            // The temporary file is gone, the previous snapshot and the log are untouched.
            let reason = if e.is_disk_full() {
                "disk_full"
            } else {
                "error"
            };
            metrics::counter!("userseg_snapshot_failures_total", "reason" => reason).increment(1);
            return Err(e);
        }
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
        // After a failed snapshot (a full disk), wait before the next attempt: 1 s, doubling
        // up to 30 s.
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let expire_due = last_expire.elapsed() >= self.config.expire_interval;
            if self.changes.is_some() {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.tick_changes()).await;
            }
            if expire_due {
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
            if self.due() && retry_at.is_none_or(|t| Instant::now() >= t) {
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.checkpoint()).await {
                    Ok(Ok(_)) => {
                        failures = 0;
                        retry_at = None;
                    }
                    Ok(Err(e)) => {
                        failures = failures.saturating_add(1);
                        let wait = Duration::from_secs(1 << (failures - 1).min(5))
                            .min(Duration::from_secs(30));
                        retry_at = Some(Instant::now() + wait);
                        tracing::error!(
                            error = %e,
                            retry_in_s = wait.as_secs(),
                            "snapshot failed; the previous snapshot and the log keep everything, will retry"
                        )
                    }
                    Err(e) => tracing::error!(error = %e, "snapshot task failed"),
                }
            }
        }
    }
}

/// A snapshot file whose fsync also syncs the change log.
struct WithChanges {
    file: std::fs::File,
    log: Arc<FileChangeLog>,
}

impl std::io::Write for WithChanges {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl snapshot::SnapshotFile for WithChanges {
    fn sync_all(&mut self) -> std::io::Result<()> {
        self.file.sync_all()?;
        self.log.sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use userseg_domain::{Pair, UserDeletion, Window};
    use userseg_usecase::{Content, ManualClock, PairPublisher, PairSource, SegmentWriter};

    use crate::wal::WalConfig;
    use crate::{open_standalone, EmbeddedStore, Standalone};

    const VICTIM: &str = "erase-me@example.com";
    const NOW: i64 = 1_800_000_000;

    fn pairs(user: &str, n: usize) -> Vec<Pair> {
        (0..n)
            .map(|i| Pair {
                user_id: user.into(),
                segment: format!("seg-{i}"),
                ts: NOW - i as i64 * 60,
            })
            .collect()
    }

    /// Applies the next `n` log records to the store, as the batch processor does.
    async fn apply_next(sa: &mut Standalone, n: usize) {
        let store = EmbeddedStore(sa.store.clone());
        for _ in 0..n {
            let m = sa.source.next().await.unwrap().unwrap();
            match m.content {
                Content::Pairs(p) => store.write(p.into()).await.unwrap(),
                Content::Delete(d) => store.delete_users(d).await.unwrap(),
                Content::Invalid { reason, .. } => panic!("{reason}"),
            }
            sa.source.commit(vec![m.position]).await.unwrap();
        }
    }

    /// Every byte under `dir`, file by file.
    fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(files(&p));
            } else {
                out.push((p.clone(), fs::read(&p).unwrap()));
            }
        }
        out
    }

    fn holds(data: &[u8], id: &str) -> bool {
        data.windows(id.len()).any(|w| w == id.as_bytes())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_user_leaves_snapshots_and_log_and_stays_deleted_after_restart() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::DEFAULT;
        let mut sa = open_standalone(dir.path(), w, WalConfig::new("")).unwrap();
        sa.log.publish(pairs(VICTIM, 3)).await.unwrap();
        sa.log.publish(pairs("keeper", 2)).await.unwrap();
        apply_next(&mut sa, 2).await;
        let clock = Arc::new(ManualClock::new(NOW));
        let cp = Checkpointer::new(
            dir.path(),
            sa.store.clone(),
            sa.wal.clone(),
            CheckpointConfig::default(),
            clock,
            0,
        );
        // A snapshot with the victim in it, and the log too.
        cp.checkpoint().unwrap();
        assert!(files(dir.path()).iter().any(|(_, d)| holds(d, VICTIM)));
        assert!(!cp.due(), "nothing new since the snapshot");

        sa.log
            .publish_deletion(UserDeletion::new(vec![VICTIM.into()]).unwrap())
            .await
            .unwrap();
        // A pair of another user after the deletion, and a later pair of the victim that must
        // count again.
        sa.log.publish(pairs("keeper2", 1)).await.unwrap();
        apply_next(&mut sa, 2).await;
        assert_eq!(sa.store.count("seg-0", NOW), 2);
        assert!(sa.store.user_segments(VICTIM, NOW).is_empty());
        assert!(cp.due(), "a deletion makes a snapshot due at once");
        cp.checkpoint().unwrap();
        for (path, data) in files(dir.path()) {
            assert!(
                !holds(&data, VICTIM),
                "{} still holds the deleted user",
                path.display()
            );
        }

        // Re-added later; then a crash (no final snapshot) and a restart replaying the log.
        sa.log.publish(pairs(VICTIM, 1)).await.unwrap();
        apply_next(&mut sa, 1).await;
        let Standalone {
            log,
            wal,
            store,
            source,
            lock,
            ..
        } = sa;
        drop((log, store, source));
        wal.join();
        drop((wal, lock));
        let sa = open_standalone(dir.path(), w, WalConfig::new("")).unwrap();
        let got: Vec<String> = sa
            .store
            .user_segments(VICTIM, NOW)
            .into_iter()
            .map(|m| m.segment)
            .collect();
        assert_eq!(got, vec!["seg-0".to_string()]);
        assert_eq!(sa.store.count("seg-0", NOW), 3);
        assert_eq!(sa.store.count("seg-2", NOW), 0);
    }

    /// A snapshot file with `room` bytes of space left, whose fsync may fail.
    struct FailingFile {
        file: fs::File,
        room: usize,
        fail_sync: bool,
    }

    impl std::io::Write for FailingFile {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::StorageFull.into());
            }
            let n = self.file.write(&buf[..buf.len().min(self.room)])?;
            self.room -= n;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.file.flush()
        }
    }

    impl snapshot::SnapshotFile for FailingFile {
        fn sync_all(&mut self) -> std::io::Result<()> {
            if self.fail_sync {
                return Err(std::io::Error::other("injected fsync failure"));
            }
            self.file.sync_all()
        }
    }

    fn failing(room: usize, fail_sync: bool) -> impl FnOnce(&Path) -> std::io::Result<FailingFile> {
        move |p| {
            Ok(FailingFile {
                file: fs::File::create(p)?,
                room,
                fail_sync,
            })
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_snapshot_that_cannot_be_written_leaves_the_previous_snapshot_and_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::DEFAULT;
        let mut sa = open_standalone(dir.path(), w, WalConfig::new("")).unwrap();
        sa.log.publish(pairs("first", 3)).await.unwrap();
        apply_next(&mut sa, 1).await;
        let cp = Checkpointer::new(
            dir.path(),
            sa.store.clone(),
            sa.wal.clone(),
            CheckpointConfig::default(),
            Arc::new(ManualClock::new(NOW)),
            0,
        );
        let first = cp.checkpoint().unwrap().unwrap();
        let snaps = dir.path().join("snapshots");
        let before = names(&snaps);
        let before_bytes = fs::read(snaps.join(&before[0])).unwrap();
        sa.log.publish(pairs("second", 2)).await.unwrap();
        apply_next(&mut sa, 1).await;
        let logs = names(&dir.path().join("wal"));
        let offset = sa.wal.committed();

        // No space half-way, and a failed fsync: an error each time, no temporary file left,
        // the previous snapshot byte for byte.
        for (room, fail_sync, disk_full) in [
            (0, false, true),
            (100, false, true),
            (usize::MAX, true, false),
        ] {
            let e = snapshot::write_with(&sa.store, &snaps, offset, failing(room, fail_sync))
                .unwrap_err();
            assert_eq!(e.is_disk_full(), disk_full, "{e}");
            assert_eq!(names(&snaps), before);
            assert_eq!(fs::read(snaps.join(&before[0])).unwrap(), before_bytes);
        }
        // The log after the previous snapshot is intact: replaying it from there gives the rest.
        assert_eq!(names(&dir.path().join("wal")), logs);
        let mut replayed = Vec::new();
        crate::wal::replay(&dir.path().join("wal"), first, |r| {
            if let userseg_domain::Record::Pairs(p) = r {
                replayed.extend(p.into_iter().map(|p| p.user_id));
            }
        })
        .unwrap();
        assert_eq!(replayed, vec!["second", "second"]);
        let (loaded, at) = snapshot::load_latest(&snaps, w).unwrap().unwrap();
        assert_eq!(at, first);
        assert_eq!(loaded.count("seg-0", NOW), 1);

        // A temporary file left by a process killed mid-write is removed by the next snapshot.
        fs::write(
            snaps.join("snapshot-00000000000000000099.snap.tmp"),
            b"torn",
        )
        .unwrap();
        let next = cp.checkpoint().unwrap().unwrap();
        assert_eq!(next, offset);
        let after = names(&snaps);
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(after[0].ends_with(".snap"), "{after:?}");
    }
}
