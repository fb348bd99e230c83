//! The embedded log: a write-ahead log with group commit.
//!
//! Ingest hands a batch to [`WalLog::publish`]; one writer thread appends every batch waiting at
//! that moment with a single `write` and a single `fdatasync`, then acknowledges them all and
//! hands them to the batch processor through [`WalSource`]. A pair acknowledged to a client is
//! therefore on disk. Log positions are byte offsets, global across the segment files
//! `wal/<base offset>.log`; after a snapshot covers an offset, files wholly before it are
//! removed.
//!
//! Faults: a write that fails for lack of space (ENOSPC, EDQUOT) is cut back to the last
//! durable offset (nothing of it was acknowledged), the requests of that group commit and every
//! request after them are refused with [`LogFault::DiskFull`], and the writer probes for room
//! every [`WalConfig::probe_interval`]; once a probe (or a retried request) succeeds, writes
//! resume without a restart. A failed `fsync`, or a failed write that cannot be cut back, is
//! fail-stop ([`LogFault::Stopped`]): after a failed fsync the page cache can no longer be
//! trusted to match the disk, so writes are refused until a restart recovers from the log.

pub mod codec;
pub(crate) mod fs;

use std::fs::{self as stdfs, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use userseg_domain::{Pair, Record, UserDeletion};
use userseg_usecase::{Content, Message, PairPublisher, PairSource, PortError};

use codec::{Frame, FRAME_HEADER};
use fs::{is_disk_full, LogFile, LogFs, RealFs};

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
    /// While the disk is full, how often the writer checks whether there is room again.
    pub probe_interval: Duration,
}

/// Room a probe asks for before writes resume after the disk was full: a margin, so that the
/// log does not flap between accepting and refusing on the last free pages.
pub const PROBE_BYTES: usize = 1 << 20;

impl WalConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        WalConfig {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            max_inflight_pairs: 1_000_000,
            enqueue_timeout: Duration::from_secs(5),
            max_group_bytes: 8 << 20,
            probe_interval: Duration::from_millis(250),
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

/// Why the log refuses writes. Both reach clients as [`PortError::Transient`] (HTTP 503
/// `unavailable`, gRPC UNAVAILABLE) and `/readyz` as the `log` check.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LogFault {
    /// A write found no space: it was cut back, nothing of the refused requests is stored, and
    /// writes resume by themselves once a probe finds room.
    #[error("disk full: no space left for the write-ahead log in DATA_DIR ({0}); writes are refused (nothing of a refused request is stored) and resume by themselves once space is freed")]
    DiskFull(String),
    /// An fsync failed (or a failed write could not be cut back): refused until restart.
    #[error("the write-ahead log stopped: {0}; writes are refused until a restart recovers from the log")]
    Stopped(String),
}

impl From<LogFault> for PortError {
    fn from(f: LogFault) -> Self {
        PortError::Transient(f.to_string())
    }
}

fn file_name(base: u64) -> String {
    format!("{base:020}.log")
}

fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    match stdfs::read_dir(dir) {
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

/// Calls `f(position, length, payload)` for every checksummed frame of the file at `path`, in
/// order; returns the bytes of whole frames and the bytes cut off. A torn frame at the tail of
/// the `last` file (a crash mid-write, never acknowledged) is cut off; a bad frame anywhere else
/// is corruption. Shared by the write-ahead log and the change log.
pub(crate) fn scan_file(
    path: &Path,
    last: bool,
    mut f: impl FnMut(usize, usize, &[u8]) -> Result<(), WalError>,
) -> Result<(u64, u64), WalError> {
    let io_err = |source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    let data = stdfs::read(path).map_err(io_err)?;
    let mut pos = 0usize;
    while pos < data.len() {
        match codec::read_frame(&data[pos..]) {
            Frame::Ok(payload, n) => {
                f(pos, n, payload)?;
                pos += n;
            }
            Frame::Incomplete | Frame::Corrupt if last => {
                let cut = (data.len() - pos) as u64;
                tracing::warn!(
                    path = %path.display(),
                    at = pos,
                    bytes = cut,
                    "cutting a torn record off the tail of the log"
                );
                let file = OpenOptions::new().write(true).open(path).map_err(io_err)?;
                file.set_len(pos as u64).map_err(io_err)?;
                file.sync_all().map_err(io_err)?;
                return Ok((pos as u64, cut));
            }
            _ => {
                return Err(WalError::Corrupt {
                    path: path.to_owned(),
                    at: pos as u64,
                })
            }
        }
    }
    Ok((pos as u64, 0))
}

/// Replays every record at or after `from` in log order, calling `apply` with it, and returns the
/// offset where new records go. A torn record at the very tail (a crash mid-write, never
/// acknowledged) is cut off; corruption anywhere else is an error.
pub fn replay(
    dir: &Path,
    from: u64,
    mut apply: impl FnMut(Record),
) -> Result<ReplayStats, WalError> {
    replay_at(dir, from, |_, record| apply(record))
}

/// Bytes of log after offset `from` (about what a replay from `from` reads).
pub fn bytes_after(dir: &Path, from: u64) -> u64 {
    let files = list_files(dir).unwrap_or_default();
    let end = files.last().map_or(0, |(base, path)| {
        base + stdfs::metadata(path).map_or(0, |m| m.len())
    });
    end.saturating_sub(from)
}

/// [`replay`], also handing each record's end offset (its [`WalPosition`]) to `apply`.
pub fn replay_at(
    dir: &Path,
    from: u64,
    mut apply: impl FnMut(u64, Record),
) -> Result<ReplayStats, WalError> {
    let io_err = |path: &Path, source| WalError::Io {
        path: path.to_owned(),
        source,
    };
    stdfs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
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
        let (valid, truncated) = scan_file(path, last, |pos, n, payload| {
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
                apply(start + n as u64, record);
            }
            Ok(())
        })?;
        stats.truncated_bytes += truncated;
        stats.end = stats.end.max(base + valid);
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
    fault: Mutex<Option<LogFault>>,
    files: Mutex<Vec<u64>>,
    closed: AtomicBool,
}

impl Shared {
    fn fault(&self) -> Option<LogFault> {
        self.fault.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
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
    start_with(config, end, Arc::new(RealFs))
}

/// [`start`] over the given file operations (fault injection in tests).
pub(crate) fn start_with(
    config: WalConfig,
    end: u64,
    fs: Arc<dyn LogFs>,
) -> Result<(WalLog, WalSource, WalHandle), WalError> {
    let io_err = |source| WalError::Io {
        path: config.dir.clone(),
        source,
    };
    stdfs::create_dir_all(&config.dir).map_err(io_err)?;
    let mut bases: Vec<u64> = list_files(&config.dir)
        .map_err(io_err)?
        .into_iter()
        .map(|(b, _)| b)
        .collect();
    let (base, file) = match bases.last() {
        Some(&b) if b <= end => {
            let path = config.dir.join(file_name(b));
            let f = fs
                .open_append(&path, false)
                .map_err(|source| WalError::Io { path, source })?;
            (b, f)
        }
        _ => {
            let path = config.dir.join(file_name(end));
            let f = fs
                .open_append(&path, true)
                .map_err(|source| WalError::Io { path, source })?;
            fs.sync_dir(&config.dir).map_err(io_err)?;
            bases.push(end);
            (end, f)
        }
    };
    let shared = Arc::new(Shared {
        dir: config.dir.clone(),
        committed: AtomicU64::new(end),
        written: AtomicU64::new(end),
        fault: Mutex::new(None),
        files: Mutex::new(bases),
        closed: AtomicBool::new(false),
    });
    let (tx, rx) = mpsc::channel::<Request>(4096);
    let (out_tx, out_rx) = mpsc::channel(4096);
    let writer = Writer {
        config: config.clone(),
        shared: shared.clone(),
        fs,
        file,
        file_base: base,
        offset: end,
        roll_pending: false,
        full_since: None,
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

struct Writer {
    config: WalConfig,
    shared: Arc<Shared>,
    fs: Arc<dyn LogFs>,
    file: Box<dyn LogFile>,
    file_base: u64,
    /// Offset after the last durable record (the current file holds `offset - file_base`
    /// durable bytes).
    offset: u64,
    /// A roll to a new file failed and is due again.
    roll_pending: bool,
    /// Since when the disk is full (while it is).
    full_since: Option<Instant>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Request>, out: mpsc::Sender<Committed>) {
        let mut buf: Vec<u8> = Vec::with_capacity(self.config.max_group_bytes);
        let mut group: Vec<Request> = Vec::new();
        while let Some(first) = self.next_request(&mut rx) {
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
                    let _ = self.maybe_roll(deleted);
                }
                Err(fault) => {
                    if matches!(fault, LogFault::DiskFull(_)) {
                        metrics::counter!("userseg_wal_disk_full_refusals_total")
                            .increment(group.len() as u64);
                    }
                    for r in group.drain(..) {
                        let _ = r.done.send(Err(fault.clone().into()));
                    }
                }
            }
        }
        let _ = self.file.sync_data();
        tracing::debug!("write-ahead log writer stopped");
    }

    /// The next request; while the disk is full, probes for room between requests.
    fn next_request(&mut self, rx: &mut mpsc::Receiver<Request>) -> Option<Request> {
        loop {
            if self.full_since.is_none() {
                return rx.blocking_recv();
            }
            match rx.try_recv() {
                Ok(r) => return Some(r),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {
                    std::thread::sleep(self.config.probe_interval);
                    self.probe();
                }
            }
        }
    }

    fn fault(&self) -> Option<LogFault> {
        self.shared
            .fault
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_fault(&mut self, fault: Option<LogFault>) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
    }

    /// Fail-stop: refuse every write until restart.
    fn stop(&mut self, why: String) -> LogFault {
        tracing::error!(
            dir = %self.config.dir.display(),
            error = %why,
            "write-ahead log stopped; refusing writes until restart"
        );
        self.full_since = None;
        let fault = LogFault::Stopped(why);
        self.set_fault(Some(fault.clone()));
        fault
    }

    /// Out of space: refuse writes until a probe (or a retried request) finds room.
    fn disk_full(&mut self, e: &io::Error) -> LogFault {
        if self.full_since.is_none() {
            tracing::error!(
                dir = %self.config.dir.display(),
                error = %e,
                "disk full: refusing writes until space is freed"
            );
            self.full_since = Some(Instant::now());
        }
        let fault = LogFault::DiskFull(e.to_string());
        self.set_fault(Some(fault.clone()));
        fault
    }

    fn resumed(&mut self, how: &str) {
        if let Some(since) = self.full_since.take() {
            tracing::warn!(
                dir = %self.config.dir.display(),
                refused_for_ms = since.elapsed().as_millis() as u64,
                "{how}: the disk has room again; accepting writes"
            );
            self.set_fault(None);
        }
    }

    fn probe(&mut self) {
        match self.fs.probe(&self.config.dir, PROBE_BYTES) {
            Ok(()) => {
                // A roll that found no room comes first: it may still find none.
                if self.maybe_roll(false) {
                    self.resumed("probe");
                }
            }
            Err(e) if is_disk_full(&e) => {}
            Err(e) => tracing::warn!(error = %e, "probing the log directory for room failed"),
        }
    }

    /// Writes and fsyncs one group commit. On failure nothing of it is acknowledged: a failed
    /// write is cut back to the last durable offset; a failed fsync stops the log.
    fn append(&mut self, buf: &[u8]) -> Result<(), LogFault> {
        if let Some(fault @ LogFault::Stopped(_)) = self.fault() {
            return Err(fault);
        }
        if let Err(e) = self.file.append(buf) {
            let durable = self.offset - self.file_base;
            if let Err(t) = self.file.truncate(durable) {
                return Err(self.stop(format!(
                    "a failed write ({e}) could not be cut back to byte {durable} of the log file ({t})"
                )));
            }
            if is_disk_full(&e) {
                return Err(self.disk_full(&e));
            }
            return Err(self.stop(format!("a write to the log failed ({e})")));
        }
        if let Err(e) = self.file.sync_data() {
            // The written bytes may or may not reach the disk, and the kernel may have dropped
            // the dirty pages it could not write: the file cannot be trusted until it is read
            // back at the next start.
            return Err(self.stop(format!(
                "fsync of the log failed ({e}); the page cache can no longer be trusted"
            )));
        }
        self.resumed("retry");
        Ok(())
    }

    /// Starts a new log file when the current one is large enough, holds a deletion (`force`)
    /// or an earlier roll failed. False when there was no room for the new file.
    fn maybe_roll(&mut self, force: bool) -> bool {
        let due =
            force || self.roll_pending || self.offset - self.file_base >= self.config.segment_bytes;
        if !due || self.offset == self.file_base {
            return true;
        }
        let path = self.config.dir.join(file_name(self.offset));
        let f = match self.fs.open_append(&path, true) {
            Ok(f) => f,
            Err(e) => {
                // The records are durable in the current file; roll again later.
                self.roll_pending = true;
                if is_disk_full(&e) {
                    self.disk_full(&e);
                    return false;
                }
                tracing::warn!(path = %path.display(), error = %e, "could not start a new log file; will retry");
                return true;
            }
        };
        if let Err(e) = self.fs.sync_dir(&self.config.dir) {
            self.stop(format!("fsync of the log directory failed ({e})"));
            return true;
        }
        self.file = f;
        self.file_base = self.offset;
        self.roll_pending = false;
        self.shared
            .files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.offset);
        true
    }
}

impl WalLog {
    /// Refuses at once while the log is faulted (the writer clears a disk-full fault once there
    /// is room again).
    fn check_fault(&self) -> Result<(), PortError> {
        match self.shared.fault() {
            Some(f) => {
                if matches!(f, LogFault::DiskFull(_)) {
                    metrics::counter!("userseg_wal_disk_full_refusals_total").increment(1);
                }
                Err(f.into())
            }
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
        self.check_fault()?;
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
        self.check_fault()?;
        // One permit per user bounds what deletions hold in memory, like pairs.
        let n = deletion.len().min(self.max_inflight);
        let permit = self.permit(n).await?;
        let mut frame = Vec::with_capacity(n * 32 + 16);
        codec::encode_deletion(&deletion, &mut frame);
        self.append(frame, Record::DeleteUsers(deletion), permit)
            .await
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        match self.shared.fault() {
            Some(f) => Err(f.into()),
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

    fn log_offset(position: &WalPosition) -> Option<u64> {
        Some(position.end)
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

    /// Why the log refuses writes right now, if it does.
    pub fn fault(&self) -> Option<LogFault> {
        self.shared.fault()
    }

    /// Removes segment files that hold only records before `offset` (never the active one).
    pub fn remove_before(&self, offset: u64) -> io::Result<usize> {
        let mut files = self.shared.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        while files.len() > 1 && files[1] <= offset {
            let base = files.remove(0);
            stdfs::remove_file(self.shared.dir.join(file_name(base)))?;
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
    use std::io::Write;

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
        // The bytes a replay reads, across files.
        assert_eq!(bytes_after(dir.path(), 0), stats.end);
        assert_eq!(bytes_after(dir.path(), ends[9]), stats.end - ends[9]);
        assert_eq!(bytes_after(dir.path(), stats.end + 5), 0);
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
        let good = stdfs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[42, 0, 0, 0, 1, 2]).unwrap(); // half a frame
        drop(f);
        let stats = replay(dir.path(), 0, |_| {}).unwrap();
        assert_eq!(stats.end, good);
        assert_eq!(stats.truncated_bytes, 6);
        assert_eq!(stdfs::metadata(&path).unwrap().len(), good);
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
        let mut bytes = stdfs::read(&first).unwrap();
        bytes[10] ^= 0xff;
        stdfs::write(&first, bytes).unwrap();
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

    // --- faults: disk full, failed fsync (through the fault-injecting file seam) ---

    use fs::faulty::FaultyFs;
    use io::ErrorKind::{Other, StorageFull};

    fn start_faulty(
        dir: &Path,
        fs: &FaultyFs,
        segment_bytes: u64,
    ) -> (WalLog, WalSource, WalHandle) {
        let mut cfg = WalConfig::new(dir);
        cfg.segment_bytes = segment_bytes;
        cfg.probe_interval = Duration::from_millis(5);
        start_with(cfg, 0, Arc::new(fs.clone())).unwrap()
    }

    /// Waits (up to 10 s) for `cond`.
    async fn wait_for(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn log_bytes(dir: &Path) -> u64 {
        list_files(dir)
            .unwrap()
            .iter()
            .map(|(_, p)| stdfs::metadata(p).unwrap().len())
            .sum()
    }

    /// The first user id of every pair record in the log, in order.
    fn logged(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        replay(dir, 0, |r| match r {
            Record::Pairs(p) => out.push(p[0].user_id.clone()),
            Record::DeleteUsers(d) => out.push(format!("delete {}", d.user_ids()[0])),
        })
        .unwrap();
        out
    }

    fn message(e: PortError) -> String {
        match e {
            PortError::Transient(m) => m,
            other => panic!("expected a transient (unavailable) error, got {other:?}"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_finds_no_space_is_cut_back_and_writes_resume_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::default();
        let (log, mut source, handle) = start_faulty(dir.path(), &fs, 64 << 20);
        log.publish(pairs(3, "a")).await.unwrap();
        let durable = handle.written();
        // The next write gets 7 bytes in, then ENOSPC; probes find no room either.
        fs.set(|f| {
            f.append = Some((7, StorageFull));
            f.probe = Some(StorageFull);
        });
        let m = message(log.publish(pairs(3, "b")).await.unwrap_err());
        assert!(m.starts_with("disk full"), "{m}");
        assert!(m.contains("resume by themselves"), "{m}");
        assert_eq!(fs.get(|f| f.truncates.clone()), vec![durable]);
        assert_eq!(
            log_bytes(dir.path()),
            durable,
            "the partial write is cut back"
        );
        assert_eq!(handle.written(), durable);
        assert!(matches!(handle.fault(), Some(LogFault::DiskFull(_))));
        let ready = message(log.check_ready().await.unwrap_err());
        assert!(ready.starts_with("disk full"), "{ready}");
        // Refused at once while full: pairs and deletions alike, without touching the file.
        let deletion = UserDeletion::new(vec!["a-0".into()]).unwrap();
        assert!(message(log.publish_deletion(deletion).await.unwrap_err()).starts_with("disk full"));
        assert!(message(log.publish(pairs(1, "c")).await.unwrap_err()).starts_with("disk full"));
        assert_eq!(fs.get(|f| f.truncates.len()), 1);
        // The writer keeps probing; nothing changes while there is no room.
        let probes = fs.get(|f| f.probes);
        wait_for("more probes", || fs.get(|f| f.probes) >= probes + 3).await;
        assert!(handle.fault().is_some());

        // Room again: the next probe clears the fault, no restart.
        fs.set(|f| {
            f.append = None;
            f.probe = None;
        });
        wait_for("the fault to clear", || handle.fault().is_none()).await;
        log.check_ready().await.unwrap();
        log.publish(pairs(2, "d")).await.unwrap();
        for want in ["a-0", "d-0"] {
            match source.next().await.unwrap().unwrap().content {
                Content::Pairs(p) => assert_eq!(p[0].user_id, want),
                _ => panic!("expected pairs"),
            }
        }
        drop((log, source));
        handle.join();
        assert_eq!(
            logged(dir.path()),
            vec!["a-0", "d-0"],
            "refused writes are not in the log"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fsync_stops_the_log_until_a_restart_recovers_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::default();
        let (log, source, handle) = start_faulty(dir.path(), &fs, 64 << 20);
        log.publish(pairs(3, "a")).await.unwrap();
        fs.set(|f| f.sync = Some(Other));
        let m = message(log.publish(pairs(3, "b")).await.unwrap_err());
        assert!(m.contains("fsync") && m.contains("until a restart"), "{m}");
        assert!(matches!(handle.fault(), Some(LogFault::Stopped(_))));
        // Fail-stop: the disk works again, the log still refuses (no probing, no retry).
        fs.set(|f| f.sync = None);
        let probes = fs.get(|f| f.probes);
        for _ in 0..3 {
            assert!(message(log.publish(pairs(1, "c")).await.unwrap_err()).contains("stopped"));
            assert!(log.check_ready().await.is_err());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fs.get(|f| f.probes), probes, "a stopped log does not probe");
        drop((log, source));
        handle.join();

        // The restart reads the log back: the acknowledged record is there; the one whose
        // fsync failed may be too (it was refused, and pairs are idempotent). Writes work.
        let seen = logged(dir.path());
        assert_eq!(seen[0], "a-0");
        assert!(!seen.contains(&"c-0".to_string()), "{seen:?}");
        let stats = replay(dir.path(), 0, |_| {}).unwrap();
        let (log, _source, handle) = start(WalConfig::new(dir.path()), stats.end).unwrap();
        log.publish(pairs(1, "e")).await.unwrap();
        drop(log);
        handle.join();
        assert_eq!(logged(dir.path()).last().map(String::as_str), Some("e-0"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_that_cannot_be_cut_back_stops_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::default();
        let (log, source, handle) = start_faulty(dir.path(), &fs, 64 << 20);
        log.publish(pairs(1, "a")).await.unwrap();
        fs.set(|f| {
            f.append = Some((5, StorageFull));
            f.truncate = Some(Other);
        });
        let m = message(log.publish(pairs(1, "b")).await.unwrap_err());
        assert!(m.contains("could not be cut back"), "{m}");
        assert!(matches!(handle.fault(), Some(LogFault::Stopped(_))));
        fs.set(|f| {
            f.append = None;
            f.truncate = None;
        });
        assert!(log.publish(pairs(1, "c")).await.is_err());
        drop((log, source));
        handle.join();
        // The torn bytes are cut at the next start, like a crash mid-write.
        let stats = replay(dir.path(), 0, |_| {}).unwrap();
        assert_eq!(stats.truncated_bytes, 5);
        assert_eq!(logged(dir.path()), vec!["a-0"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_log_file_that_cannot_be_created_is_retried_once_there_is_room() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FaultyFs::default();
        let (log, source, handle) = start_faulty(dir.path(), &fs, 100);
        fs.set(|f| {
            f.open = Some(StorageFull);
            f.probe = Some(StorageFull);
        });
        // Durable in the current file, so acknowledged; the roll after it finds no room.
        log.publish(pairs(10, "a")).await.unwrap();
        wait_for("the disk-full fault", || handle.fault().is_some()).await;
        assert!(message(log.publish(pairs(1, "b")).await.unwrap_err()).starts_with("disk full"));
        assert_eq!(list_files(dir.path()).unwrap().len(), 1);
        fs.set(|f| {
            f.open = None;
            f.probe = None;
        });
        wait_for("the fault to clear", || handle.fault().is_none()).await;
        assert_eq!(
            list_files(dir.path()).unwrap().len(),
            2,
            "the roll happened"
        );
        log.publish(pairs(1, "c")).await.unwrap();
        drop((log, source));
        handle.join();
        assert_eq!(logged(dir.path()), vec!["a-0", "c-0"]);
    }
}
