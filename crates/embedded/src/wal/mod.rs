//! The embedded log: a write-ahead log with group commit.
//!
//! Ingest hands a batch to [`WalLog::publish`]; one writer thread appends every batch waiting at
//! that moment with a single `write` and a single `fdatasync`, then acknowledges them all and
//! hands them to the batch processor through [`WalSource`]. A pair acknowledged to a client is
//! therefore on disk. Log positions are byte offsets, global across the segment files
//! `wal/<base offset>.log`; after a snapshot covers an offset, files wholly before it are
//! removed.

pub mod codec;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use userseg_domain::{Pair, Record, UserDeletion};
use userseg_usecase::{Content, Message, PairPublisher, PairSource, PortError};

use codec::{Frame, FRAME_HEADER};

#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Directory of the segment files.
    pub dir: PathBuf,
    /// Roll to a new segment file past this size.
    pub segment_bytes: u64,
    /// Pairs accepted but not yet applied to the store, at most. Bounds memory.
    pub max_inflight_pairs: usize,
    /// How long `publish` waits for room before answering overloaded.
    pub enqueue_timeout: Duration,
    /// Most bytes written by one group commit.
    pub max_group_bytes: usize,
}

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_inflight_pairs: 1_000_000,
            enqueue_timeout: Duration::from_secs(5),
            max_group_bytes: 8 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("write-ahead log i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("write-ahead log {path} is corrupt at byte {at} (not at its tail, so it is not a torn write); refusing to start rather than lose acknowledged pairs")]
    Corrupt { path: PathBuf, at: u64 },
}

fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                let name = e.file_name();
                if let Some(base) = name
                    .to_str()
                    .and_then(|n| n.strip_suffix(".log"))
                    .and_then(|n| n.parse::<u64>().ok())
                {
                    out.push((base, e.path()));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

/// Replays every record at or after `from` in log order, calling `apply` with it, and returns the
/// offset where new records go. A torn record at the very tail (a crash mid-write, never
/// acknowledged) is cut off; corruption anywhere else is an error.
pub fn replay(
    dir: &Path,
    from: u64,
    mut apply: impl FnMut(Record),
) -> Result<ReplayStats, WalError> {
    let io_err = |path: &Path, source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let files = list_files(dir).map_err(|e| io_err(dir, e))?;
    let mut stats = ReplayStats {
        end: from,
        records: 0,
        pairs: 0,
        deletions: 0,
        truncated_bytes: 0,
    };
    for (i, (base, path)) in files.iter().enumerate() {
        let last = i + 1 == files.len();
        if let Some((next, _)) = files.get(i + 1) {
            if *next <= from {
                continue; // wholly covered by the snapshot
            }
        }
        let data = fs::read(path).map_err(|e| io_err(path, e))?;
        let mut pos = 0usize;
        while pos < data.len() {
            match codec::read_frame(&data[pos..]) {
                Frame::Ok(payload, n) => {
                    let start = base + pos as u64;
                    if start >= from {
                        let record = codec::decode(payload).ok_or_else(|| WalError::Corrupt {
                            path: path.clone(),
                            at: pos as u64,
                        })?;
                        stats.records += 1;
                        match &record {
                            Record::Pairs(p) => stats.pairs += p.len() as u64,
                            Record::DeleteUsers(_) => stats.deletions += 1,
                        }
                        apply(record);
                    }
                    pos += n;
                }
                Frame::Incomplete | Frame::Corrupt if last => {
                    stats.truncated_bytes = (data.len() - pos) as u64;
                    tracing::warn!(
                        path = %path.display(),
                        at = pos,
                        bytes = stats.truncated_bytes,
                        "cutting a torn record off the tail of the log"
                    );
                    let f = OpenOptions::new()
                        .write(true)
                        .open(path)
                        .map_err(|e| io_err(path, e))?;
                    f.set_len(pos as u64).map_err(|e| io_err(path, e))?;
                    f.sync_all().map_err(|e| io_err(path, e))?;
                    break;
                }
                _ => {
                    return Err(WalError::Corrupt {
                        path: path.clone(),
                        at: pos as u64,
                    })
                }
            }
        }
        stats.end = stats.end.max(base + pos as u64);
    }
    Ok(stats)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayStats {
    /// Offset after the last valid record (where appends continue).
    pub end: u64,
    pub records: u64,
    pub pairs: u64,
    /// Deletion records replayed.
    pub deletions: u64,
    pub truncated_bytes: u64,
}

struct Request {
    frame: Vec<u8>,
    record: Record,
    permit: OwnedSemaphorePermit,
    done: oneshot::Sender<Result<(), PortError>>,
}

/// A record the processor has to apply; its position is the offset after it.
pub struct WalPosition {
    pub end: u64,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for WalPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WalPosition({})", self.end)
    }
}

struct Shared {
    dir: PathBuf,
    committed: AtomicU64,
    written: AtomicU64,
    broken: Mutex<Option<String>>,
    files: Mutex<Vec<u64>>,
    closed: AtomicBool,
}

/// Publishing side (ingest): implements [`PairPublisher`].
#[derive(Clone)]
pub struct WalLog {
    tx: mpsc::Sender<Request>,
    permits: Arc<Semaphore>,
    max_inflight: usize,
    enqueue_timeout: Duration,
    shared: Arc<Shared>,
}

/// A committed record handed to the processor: its end offset, its pairs, its share of the
/// in-flight bound, and when it became durable.
type Committed = (u64, Record, OwnedSemaphorePermit, std::time::SystemTime);

/// Consuming side (batch processor): implements [`PairSource`].
pub struct WalSource {
    rx: mpsc::Receiver<Committed>,
    shared: Arc<Shared>,
}

/// Control side (checkpointer, shutdown).
#[derive(Clone)]
pub struct WalHandle {
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// Starts the writer thread appending at `end` (from [`replay`]).
pub fn start(config: WalConfig, end: u64) -> Result<(WalLog, WalSource, WalHandle), WalError> {
    let io_err = |source| WalError::Io {
        path: config.dir.clone(),
        source,
    };
    fs::create_dir_all(&config.dir).map_err(io_err)?;
    let mut bases: Vec<u64> = list_files(&config.dir)
        .map_err(io_err)?
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    let (base, file) = match bases.last() {
        Some(&b) if b <= end => {
            let path = config.dir.join(file_name(b));
            let f = OpenOptions::new()
                .append(true)
                .open(&path)
                .map_err(|source| WalError::Io { path, source })?;
            (b, f)
        }
        _ => {
            let path = config.dir.join(file_name(end));
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| WalError::Io { path, source })?;
            snapshot_sync_dir(&config.dir).map_err(io_err)?;
            bases.push(end);
            (end, f)
        }
    };
    let shared = Arc::new(Shared {
        dir: config.dir.clone(),
        committed: AtomicU64::new(end),
        written: AtomicU64::new(end),
        broken: Mutex::new(None),
        files: Mutex::new(bases),
        closed: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel::<Request>(4096);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let writer = Writer {
        config: config.clone(),
        shared: shared.clone(),
        file,
        file_base: base,
        offset: end,
    };
    let thread = std::thread::Builder::new()
        .name("userseg-wal".into())
        .spawn(move || writer.run(rx, out_tx))
        .map_err(io_err)?;
    let permits = Arc::new(Semaphore::new(config.max_inflight_pairs));
    Ok((
        WalLog {
            tx,
            permits,
            max_inflight: config.max_inflight_pairs,
            enqueue_timeout: config.enqueue_timeout,
            shared: shared.clone(),
        },
        WalSource {
            rx: out_rx,
            shared: shared.clone(),
        },
        WalHandle {
            shared,
            thread: Arc::new(Mutex::new(Some(thread))),
        },
    ))
}

fn snapshot_sync_dir(dir: &Path) -> io::Result<()> {
    crate::store::snapshot::sync_dir(dir)
}

struct Writer {
    config: WalConfig,
    shared: Arc<Shared>,
    file: File,
    file_base: u64,
    offset: u64,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>, out: mpsc::Sender<Committed>) {
        let mut buf: Vec<u8> = Vec::with_capacity(self.config.max_group_bytes);
        let mut group: Vec<Request> = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            buf.clear();
            buf.extend_from_slice(&first.frame);
            group.push(first);
            while buf.len() < self.config.max_group_bytes {
                match rx.try_recv() {
                    Ok(r) => {
                        buf.extend_from_slice(&r.frame);
                        group.push(r);
                    }
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            let result = self.append(&buf);
            metrics::histogram!("userseg_wal_commit_seconds").record(started.elapsed());
            metrics::histogram!("userseg_wal_group_requests").record(group.len() as f64);
            match result {
                Ok(()) => {
                    let mut end = self.offset;
                    let logged_at = std::time::SystemTime::now();
                    self.offset += buf.len() as u64;
                    self.shared.written.store(self.offset, Ordering::Release);
                    metrics::counter!("userseg_wal_bytes_total").increment(buf.len() as u64);
                    let mut deleted = false;
                    for r in group.drain(..) {
                        end += r.frame.len() as u64;
                        let _ = r.done.send(Ok(()));
                        deleted |= matches!(r.record, Record::DeleteUsers(_));
                        if out
                            .blocking_send((end, r.record, r.permit, logged_at))
                            .is_err()
                        {
                            // The processor is gone (shutting down): the record is durable and
                            // will be replayed at the next start.
                        }
                    }
                    // A file holding a deletion is closed at once, so that the checkpoint after
                    // the deletion removes it with the erased users' earlier pairs.
                    if let Err(e) = self.maybe_roll(deleted) {
                        self.fail(&format!("rolling the log failed: {e}"));
                    }
                }
                Err(e) => {
                    let msg = format!("write-ahead log write failed: {e}");
                    self.fail(&msg);
                    for r in group.drain(..) {
                        let _ = r.done.send(Err(PortError::Transient(msg.clone())));
                    }
                }
            }
        }
        let _ = self.file.sync_data();
        tracing::debug!("write-ahead log writer stopped");
    }

    fn fail(&self, msg: &str) {
        tracing::error!(error = msg, "write-ahead log is broken; refusing writes");
        *self.shared.broken.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg.to_owned());
    }

    fn append(&mut self, buf: &[u8]) -> io::Result<()> {
        if let Some(b) = self
            .shared
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            return Err(io::Error::other(b.clone()));
        }
        self.file.write_all(buf)?;
        self.file.sync_data()
    }

    fn maybe_roll(&mut self, force: bool) -> io::Result<()> {
        if self.offset - self.file_base < self.config.segment_bytes && !force {
            return Ok(());
        }
        let path = self.config.dir.join(file_name(self.offset));
        let f = OpenOptions::new().create(true).append(true).open(&path)?;
        snapshot_sync_dir(&self.config.dir)?;
        self.file = f;
        self.file_base = self.offset;
        self.shared
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.offset);
        Ok(())
    }
}

impl WalLog {
    fn check_broken(&self) -> Result<(), PortError> {
        match self
            .shared
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(b) => Err(PortError::Transient(b)),
            None => Ok(()),
        }
    }

    /// Room for `n` pairs (or users) in flight, waiting up to the enqueue timeout.
    async fn permit(&self, n: usize) -> Result<OwnedSemaphorePermit, PortError> {
        match tokio::time::timeout(
            self.enqueue_timeout,
            self.permits.clone().acquire_many_owned(n as u32),
        )
        .await
        {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(PortError::Transient("the log is shut down".into())),
            Err(_) => {
                metrics::counter!("userseg_wal_overloaded_total").increment(1);
                Err(PortError::Overloaded(format!(
                    "{} pairs are waiting to be applied; try again shortly",
                    self.max_inflight
                )))
            }
        }
    }

    /// Hands a framed record to the writer; resolves once it is fsynced.
    async fn append(
        &self,
        frame: Vec<u8>,
        record: Record,
        permit: OwnedSemaphorePermit,
    ) -> Result<(), PortError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request {
                frame,
                record,
                permit,
                done,
            })
            .await
            .map_err(|_| PortError::Transient("the log is shut down".into()))?;
        wait.await
            .map_err(|_| PortError::Transient("the log writer stopped".into()))?
    }
}

#[async_trait]
impl PairPublisher for WalLog {
    async fn publish(&self, pairs: Vec<Pair>) -> Result<(), PortError> {
        self.check_broken()?;
        let n = pairs.len();
        if n > self.max_inflight {
            return Err(PortError::Overloaded(format!(
                "a request of {n} pairs exceeds MAX_INFLIGHT_PAIRS ({})",
                self.max_inflight
            )));
        }
        let permit = self.permit(n).await?;
        let mut frame = Vec::with_capacity(n * 32 + 16);
        codec::encode_record(&pairs, &mut frame);
        self.append(frame, Record::Pairs(pairs), permit).await
    }

    async fn publish_deletion(&self, deletion: UserDeletion) -> Result<(), PortError> {
        self.check_broken()?;
        // One permit per user bounds what deletions hold in memory, like pairs.
        let n = deletion.len().min(self.max_inflight);
        let permit = self.permit(n).await?;
        let mut frame = Vec::with_capacity(n * 32 + 16);
        codec::encode_deletion(&deletion, &mut frame);
        self.append(frame, Record::DeleteUsers(deletion), permit)
            .await
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        match self
            .shared
            .broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(b) => Err(PortError::Transient(b)),
            None if self.shared.closed.load(Ordering::Relaxed) => {
                Err(PortError::Transient("shutting down".into()))
            }
            None => Ok(()),
        }
    }
}

impl PairSource for WalSource {
    type Position = WalPosition;

    async fn next(&mut self) -> Result<Option<Message<WalPosition>>, PortError> {
        Ok(self
            .rx
            .recv()
            .await
            .map(|(end, record, permit, logged_at)| Message {
                position: WalPosition {
                    end,
                    _permit: permit,
                },
                content: match record {
                    Record::Pairs(p) => Content::Pairs(p),
                    Record::DeleteUsers(d) => Content::Delete(d),
                },
                logged_at: Some(logged_at),
            }))
    }

    fn is_drained(&self) -> bool {
        self.rx.is_empty()
    }

    async fn commit(&mut self, positions: Vec<WalPosition>) -> Result<(), PortError> {
        if let Some(max) = positions.iter().map(|p| p.end).max() {
            self.shared.committed.fetch_max(max, Ordering::AcqRel);
        }
        Ok(())
    }
}

impl WalHandle {
    /// Every record before this offset has been applied to the store.
    pub fn committed(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    /// Offset after the last durable record.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Removes segment files that hold only records before `offset` (never the active one).
    pub fn remove_before(&self, offset: u64) -> io::Result<usize> {
        let mut files = self.shared.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        while files.len() > 1 && files[1] <= offset {
            let base = files.remove(0);
            fs::remove_file(self.shared.dir.join(file_name(base)))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Waits for the writer thread to finish (after every [`WalLog`] clone is dropped).
    pub fn join(&self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

/// Frame header size, for tests that compute offsets.
pub const RECORD_OVERHEAD: usize = FRAME_HEADER;

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(n: usize, tag: &str) -> Vec<Pair> {
        (0..n)
            .map(|i| Pair {
                user_id: format!("{tag}-{i}"),
                segment: "s".into(),
                ts: 1_800_000_000,
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acknowledged_records_replay_in_order_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.segment_bytes = 300; // roll often
        let (log, mut source, handle) = start(cfg.clone(), 0).unwrap();
        for i in 0..20 {
            log.publish(pairs(5, &format!("b{i}"))).await.unwrap();
        }
        let mut ends = Vec::new();
        for _ in 0..20 {
            let m = source.next().await.unwrap().unwrap();
            ends.push(m.position.end);
        }
        assert!(ends.windows(2).all(|w| w[0] < w[1]));
        drop(log);
        drop(source);
        handle.join();
        assert!(list_files(dir.path()).unwrap().len() > 2);
        let mut seen = Vec::new();
        let stats = replay(dir.path(), 0, |r| match r {
            Record::Pairs(p) => seen.push(p[0].user_id.clone()),
            Record::DeleteUsers(d) => panic!("no deletion was logged: {d:?}"),
        })
        .unwrap();
        assert_eq!(stats.records, 20);
        assert_eq!(stats.pairs, 100);
        assert_eq!(stats.end, *ends.last().unwrap());
        assert_eq!(seen[0], "b0-0");
        assert_eq!(seen[19], "b19-0");
        // Replaying from a committed offset skips what is before it.
        let mut n = 0;
        replay(dir.path(), ends[9], |_| n += 1).unwrap();
        assert_eq!(n, 10);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn torn_tail_is_cut_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = WalConfig::new(dir.path());
        let (log, source, handle) = start(cfg.clone(), 0).unwrap();
        log.publish(pairs(3, "a")).await.unwrap();
        drop((log, source));
        handle.join();
        let (_, path) = list_files(dir.path()).unwrap().pop().unwrap();
        let good = fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[42, 0, 0, 0, 1, 2]).unwrap(); // half a frame
        drop(f);
        let stats = replay(dir.path(), 0, |_| {}).unwrap();
        assert_eq!(stats.end, good);
        assert_eq!(stats.truncated_bytes, 6);
        assert_eq!(fs::metadata(&path).unwrap().len(), good);
        let (log, _source, handle) = start(cfg, stats.end).unwrap();
        log.publish(pairs(2, "b")).await.unwrap();
        drop(log);
        handle.join();
        let mut total = 0;
        replay(dir.path(), 0, |r| {
            if let Record::Pairs(p) = r {
                total += p.len()
            }
        })
        .unwrap();
        assert_eq!(total, 5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corruption_before_the_tail_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.segment_bytes = 100;
        let (log, source, handle) = start(cfg, 0).unwrap();
        for _ in 0..5 {
            log.publish(pairs(3, "x")).await.unwrap();
        }
        drop((log, source));
        handle.join();
        let (_, first) = list_files(dir.path()).unwrap().remove(0);
        let mut bytes = fs::read(&first).unwrap();
        bytes[10] ^= 0xff;
        fs::write(&first, bytes).unwrap();
        assert!(matches!(
            replay(dir.path(), 0, |_| {}),
            Err(WalError::Corrupt { .. })
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_inflight_budget_answers_overloaded() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = WalConfig::new(dir.path());
        cfg.max_inflight_pairs = 10;
        cfg.enqueue_timeout = Duration::from_millis(50);
        let (log, mut source, handle) = start(cfg, 0).unwrap();
        log.publish(pairs(10, "a")).await.unwrap();
        // Nothing applied yet: the budget is used up.
        let err = log.publish(pairs(1, "b")).await.unwrap_err();
        assert!(matches!(err, PortError::Overloaded(_)), "{err:?}");
        assert!(matches!(
            log.publish(pairs(11, "c")).await,
            Err(PortError::Overloaded(_))
        ));
        // Committing releases the budget.
        let m = source.next().await.unwrap().unwrap();
        source.commit(vec![m.position]).await.unwrap();
        log.publish(pairs(1, "d")).await.unwrap();
        assert!(handle.committed() > 0);
        drop((log, source));
        handle.join();
    }
}
