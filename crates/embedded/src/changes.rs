//! The change log: the durable change feed of standalone mode, in `DATA_DIR/changes`.
//!
//! Files `<base offset>-<created unix s>.changes` hold frames of the write-ahead log's format
//! (length, CRC-32, payload; [`crate::wal::codec`]) and are read back with the same scanner
//! (a torn frame at the tail is cut at open). A frame is an event, or a marker the recovery
//! reads: `covered` (every record of the write-ahead log up to that offset has its events
//! before the marker) and `tick` (exits are emitted up to that bucket). A cursor is the global
//! byte offset after an event, in decimal.
//!
//! Events are written (not fsynced) by the apply path, in the order they happen; the
//! checkpointer fsyncs the log as part of a snapshot's fsync (after the copy, before the
//! rename), so a snapshot never holds a record whose events could be lost with the machine: after any crash, the records after the
//! last `covered` marker are replayed from the write-ahead log with change detection on, which
//! regenerates their events once (see `crate::store::feed`).
//!
//! Retention: a file is removed once the next file was created at least the retention ago (so
//! every event in it is older than that); a cursor in a removed file is expired. Files roll at
//! [`ChangeLogConfig::segment_bytes`] or [`ChangeLogConfig::roll_after`].

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use userseg_domain::{ChangeEvent, ChangeReason};
use userseg_usecase::{ChangeBatch, ChangeLog, ChangeReadError, ChangeRecord, Clock, PortError};

use crate::wal::codec::{self, Frame, FRAME_HEADER};
use crate::wal::{scan_file, WalError};

const EVENTS: u8 = 4;
const COVERED: u8 = 2;
const TICK: u8 = 3;

/// Bytes read from a file per step of a read (one client's buffer).
const READ_CHUNK: usize = 64 << 10;

#[derive(Clone, Debug)]
pub struct ChangeLogConfig {
    pub dir: PathBuf,
    /// Events are kept at least this long (`CHANGES_RETENTION`).
    pub retention: Duration,
    /// Roll to a new file past this size.
    pub segment_bytes: u64,
    /// Roll to a new file once the current one is this old (so retention can drop old files
    /// of a quiet log).
    pub roll_after: Duration,
}

impl ChangeLogConfig {
    pub fn new(dir: impl Into<PathBuf>, retention: Duration) -> ChangeLogConfig {
        ChangeLogConfig {
            dir: dir.into(),
            retention,
            segment_bytes: 64 << 20,
            roll_after: (retention / 8).clamp(Duration::from_secs(1), Duration::from_secs(3600)),
        }
    }
}

/// What the log says about where detection stopped before a restart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The last `covered` marker: every write-ahead-log record ending at or before it has its
    /// events in the log. `None` for a new log.
    pub covered: Option<u64>,
    /// The last `tick` marker: exits were emitted for every membership whose bucket is at or
    /// below it.
    pub exit_lo: Option<i64>,
}

#[derive(Clone, Copy, Debug)]
struct FileInfo {
    base: u64,
    created: i64,
}

struct Writer {
    file: File,
    base: u64,
    created: i64,
    /// Offset after the last frame written.
    offset: u64,
    covered: Option<u64>,
    exit_lo: Option<i64>,
    /// Frames a failed write left unwritten: written first by the next append.
    pending: Vec<u8>,
    /// Written since the last fsync.
    dirty: bool,
    /// Files rolled away from since the last fsync: [`FileChangeLog::sync`] syncs them too
    /// (a roll does not wait for the disk).
    unsynced: Vec<File>,
}

/// The file change log; implements [`ChangeLog`].
pub struct FileChangeLog {
    config: ChangeLogConfig,
    clock: Arc<dyn Clock>,
    writer: Mutex<Writer>,
    files: RwLock<Vec<FileInfo>>,
    written: watch::Sender<u64>,
}

/// Where the store's change detection writes: the file log (standalone), or an
/// [`EventSink`] (the ES index, which publishes to a topic).
pub(crate) trait FeedSink: Send + Sync + 'static {
    /// [`FileChangeLog::append_bufs`]: appends the frames in `frames`, in order (then the
    /// markers given), and leaves each buffer empty, its capacity kept for the next batch.
    fn append_frames(
        &self,
        frames: &mut [Vec<u8>],
        covered: Option<u64>,
        exit_lo: Option<i64>,
    ) -> Result<(), PortError>;

    /// The offset erasure bookkeeping records a deletion at; `None` when the sink keeps no
    /// user ids to erase later.
    fn erasure_offset(&self) -> Option<u64>;
}

impl FeedSink for FileChangeLog {
    fn append_frames(
        &self,
        frames: &mut [Vec<u8>],
        covered: Option<u64>,
        exit_lo: Option<i64>,
    ) -> Result<(), PortError> {
        FileChangeLog::append_bufs(self, frames, covered, exit_lo)
    }

    fn erasure_offset(&self) -> Option<u64> {
        Some(self.end_offset())
    }
}

/// A change detection sink that hands each batch of detected events, in the order they
/// happened, to a function (it must not block: it runs in the store's apply path, under the
/// feed's lock). Keeps nothing itself.
pub struct EventSink {
    deliver: Box<dyn Fn(Vec<ChangeEvent>) + Send + Sync>,
}

impl EventSink {
    pub fn new(deliver: impl Fn(Vec<ChangeEvent>) + Send + Sync + 'static) -> EventSink {
        EventSink {
            deliver: Box::new(deliver),
        }
    }
}

impl FeedSink for EventSink {
    fn append_frames(
        &self,
        frames: &mut [Vec<u8>],
        _covered: Option<u64>,
        _exit_lo: Option<i64>,
    ) -> Result<(), PortError> {
        let mut events = Vec::new();
        for buf in frames.iter_mut() {
            let mut rest = buf.as_slice();
            while !rest.is_empty() {
                match codec::read_frame(rest) {
                    Frame::Ok(payload, len) => {
                        if let Some(Entry::Events(e)) = decode(payload) {
                            events.extend(e);
                        }
                        rest = &rest[len..];
                    }
                    _ => {
                        return Err(PortError::Permanent(
                            "change detection produced an unreadable frame".into(),
                        ))
                    }
                }
            }
            buf.clear();
        }
        if !events.is_empty() {
            (self.deliver)(events);
        }
        Ok(())
    }

    fn erasure_offset(&self) -> Option<u64> {
        None
    }
}

fn file_name(f: FileInfo) -> String {
    format!("{:020}-{}.changes", f.base, f.created.max(0))
}

fn list(dir: &Path) -> io::Result<Vec<FileInfo>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".changes")) else {
            continue;
        };
        let Some((base, created)) = stem.split_once('-') else {
            continue;
        };
        if let (Ok(base), Ok(created)) = (base.parse(), created.parse()) {
            out.push(FileInfo { base, created });
        }
    }
    out.sort_by_key(|f| f.base);
    Ok(out)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Most events in one frame: a frame is read whole, so this bounds a reader's buffer.
const FRAME_EVENTS: u32 = 1024;

/// Builds frames of events: one checksum and header per up to [`FRAME_EVENTS`] events, so the
/// apply path pays per event only for copying its fields. Frame payload: `EVENTS`, count u32
/// LE, then per event: reason u8, zigzag varint ts, zigzag varint key, varint len + user id,
/// varint len + segment. The id is derived from the fields when read.
#[derive(Default)]
pub(crate) struct EventFrames {
    pub(crate) buf: Vec<u8>,
    /// Where the open frame starts, and its events so far (0: no frame open).
    start: usize,
    count: u32,
    /// Events pushed in all.
    pub(crate) events: u64,
}

impl EventFrames {
    /// Frames built in `buf` (emptied first), keeping its capacity.
    pub(crate) fn with_buf(mut buf: Vec<u8>) -> EventFrames {
        buf.clear();
        EventFrames {
            buf,
            ..EventFrames::default()
        }
    }

    #[inline]
    pub(crate) fn push(
        &mut self,
        user: &str,
        segment: &str,
        reason: ChangeReason,
        ts: i64,
        key: i64,
    ) {
        self.push_prefixed(&EventPrefix::new(reason, ts, key), user, segment);
    }

    /// [`EventFrames::push`] of an event whose reason, ts and key are encoded in `prefix`
    /// (the apply path encodes them once for all the pairs of a timestamp).
    #[inline]
    pub(crate) fn push_prefixed(&mut self, prefix: &EventPrefix, user: &str, segment: &str) {
        let out = &mut self.buf;
        if self.count == 0 {
            self.start = out.len();
            out.extend_from_slice(&[0; FRAME_HEADER]);
            out.push(EVENTS);
            out.extend_from_slice(&[0; 4]);
        }
        out.reserve(prefix.len as usize + user.len() + segment.len() + 20);
        out.extend_from_slice(&prefix.bytes[..prefix.len as usize]);
        codec::put_varint(out, user.len() as u64);
        out.extend_from_slice(user.as_bytes());
        codec::put_varint(out, segment.len() as u64);
        out.extend_from_slice(segment.as_bytes());
        self.count += 1;
        self.events += 1;
        if self.count == FRAME_EVENTS {
            self.close();
        }
    }

    pub(crate) fn push_event(&mut self, e: &ChangeEvent) {
        self.push(&e.user_id, &e.segment, e.reason, e.ts, e.key);
    }

    /// Closes the open frame (count and checksum).
    fn close(&mut self) {
        if self.count == 0 {
            return;
        }
        let at = self.start + FRAME_HEADER + 1;
        self.buf[at..at + 4].copy_from_slice(&self.count.to_le_bytes());
        codec::finish_frame(&mut self.buf, self.start);
        self.count = 0;
    }

    /// The framed bytes, every frame closed.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.close();
        self.buf
    }
}

/// An event's reason, ts and key, encoded as in a frame.
pub(crate) struct EventPrefix {
    bytes: [u8; 21],
    len: u8,
}

impl EventPrefix {
    pub(crate) fn new(reason: ChangeReason, ts: i64, key: i64) -> EventPrefix {
        let mut v = Vec::with_capacity(21);
        v.push(reason.code());
        codec::put_varint(&mut v, zigzag(ts));
        codec::put_varint(&mut v, zigzag(key));
        let mut bytes = [0; 21];
        bytes[..v.len()].copy_from_slice(&v);
        EventPrefix {
            bytes,
            len: v.len() as u8,
        }
    }
}

fn encode_marker(kind: u8, value: u64, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER]);
    out.push(kind);
    codec::put_varint(out, value);
    codec::finish_frame(out, start);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(z: u64) -> i64 {
    ((z >> 1) as i64) ^ -((z & 1) as i64)
}

enum Entry {
    Events(Vec<ChangeEvent>),
    Covered(u64),
    Tick(i64),
}

fn decode_event(rest: &[u8], pos: &mut usize) -> Option<ChangeEvent> {
    let reason = ChangeReason::from_code(*rest.get(*pos)?)?;
    *pos += 1;
    let ts = unzigzag(codec::get_varint(rest, pos)?);
    let key = unzigzag(codec::get_varint(rest, pos)?);
    let user_id = codec::get_str(rest, pos)?;
    let segment = codec::get_str(rest, pos)?;
    let id = userseg_domain::event_id(&user_id, &segment, reason, key);
    Some(ChangeEvent {
        user_id,
        segment,
        reason,
        ts,
        key,
        id,
    })
}

/// The payload of an `EVENTS` frame with the user id of every event naming one of `ids`
/// replaced by as many `*` (same length: offsets and cursors stay valid); `None` when no event
/// names one of them (or the payload is not an events frame).
fn redact_payload(payload: &[u8], ids: &HashMap<String, u64>, at: u64) -> Option<Vec<u8>> {
    let (&EVENTS, rest) = payload.split_first()? else {
        return None;
    };
    let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
    let mut pos = 4;
    let mut out: Option<Vec<u8>> = None;
    for _ in 0..count {
        pos += 1;
        codec::get_varint(rest, &mut pos)?;
        codec::get_varint(rest, &mut pos)?;
        let len = codec::get_varint(rest, &mut pos)? as usize;
        let user = rest.get(pos..pos.checked_add(len)?)?;
        let before = |u: &str| ids.get(u).is_some_and(|&limit| at < limit);
        if std::str::from_utf8(user).is_ok_and(before) {
            let o = out.get_or_insert_with(|| payload.to_vec());
            // +1: `rest` starts after the kind byte.
            o[1 + pos..1 + pos + len].fill(b'*');
        }
        pos += len;
        let seg = codec::get_varint(rest, &mut pos)? as usize;
        pos += seg;
    }
    out
}

fn decode(payload: &[u8]) -> Option<Entry> {
    let (&kind, rest) = payload.split_first()?;
    let mut pos = 0;
    let entry = match kind {
        EVENTS => {
            let count = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?);
            pos = 4;
            let mut events = Vec::with_capacity((count as usize).min(rest.len() / 4));
            for _ in 0..count {
                events.push(decode_event(rest, &mut pos)?);
            }
            Entry::Events(events)
        }
        COVERED => Entry::Covered(codec::get_varint(rest, &mut pos)?),
        TICK => Entry::Tick(unzigzag(codec::get_varint(rest, &mut pos)?)),
        _ => return None,
    };
    (pos == rest.len()).then_some(entry)
}

/// A position in the log: the frame at `offset`, after its first `skip` events (cursors of
/// events inside a frame), written `offset` or `offset.skip`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Cursor {
    pub(crate) offset: u64,
    pub(crate) skip: u32,
}

impl std::fmt::Display for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.skip {
            0 => write!(f, "{}", self.offset),
            k => write!(f, "{}.{k}", self.offset),
        }
    }
}

pub(crate) fn parse_cursor(c: &str) -> Result<Cursor, ChangeReadError> {
    let bad = || ChangeReadError::Malformed(format!("{c:?} is not a cursor of this feed"));
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let (offset, skip) = match c.split_once('.') {
        Some((o, k)) if digits(o) && digits(k) => (o, Some(k)),
        None if digits(c) => (c, None),
        _ => return Err(bad()),
    };
    let offset = offset.parse().map_err(|_| bad())?;
    let skip = match skip {
        Some(k) => match k.parse::<u32>() {
            Ok(k) if k > 0 => k,
            _ => return Err(bad()),
        },
        None => 0,
    };
    Ok(Cursor { offset, skip })
}

impl FileChangeLog {
    /// Opens (or creates) the log; says where detection stopped.
    pub fn open(
        config: ChangeLogConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(FileChangeLog, Recovered), WalError> {
        let dir = config.dir.clone();
        let io_err = |source| WalError::Io {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io_err)?;
        let mut files = list(&dir).map_err(io_err)?;
        let mut recovered = Recovered::default();
        let mut end = 0;
        // Markers open every file, so the last file (or, after a crash between creating a file
        // and writing its first frames, the one before) has the latest ones.
        for (i, f) in files.iter().enumerate().rev() {
            let last = i + 1 == files.len();
            let (valid, _) = scan_file(&dir.join(file_name(*f)), last, |_, _, payload| {
                match decode(payload) {
                    Some(Entry::Covered(c)) => recovered.covered = Some(c),
                    Some(Entry::Tick(t)) => recovered.exit_lo = Some(t),
                    Some(Entry::Events(_)) => {}
                    None => {
                        return Err(WalError::Corrupt {
                            path: dir.join(file_name(*f)),
                            at: 0,
                        })
                    }
                }
                Ok(())
            })?;
            if last {
                end = f.base + valid;
            }
            if recovered.covered.is_some() || recovered.exit_lo.is_some() {
                break;
            }
        }
        let now = clock.now();
        let current = match files.last() {
            Some(f) => *f,
            None => {
                let f = FileInfo {
                    base: 0,
                    created: now,
                };
                files.push(f);
                f
            }
        };
        let path = dir.join(file_name(current));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| WalError::Io { path, source })?;
        crate::store::snapshot::sync_dir(&dir).map_err(io_err)?;
        let (written, _) = watch::channel(end);
        let log = FileChangeLog {
            clock,
            writer: Mutex::new(Writer {
                file,
                base: current.base,
                created: current.created,
                offset: end,
                covered: recovered.covered,
                exit_lo: recovered.exit_lo,
                pending: Vec::new(),
                dirty: false,
                unsynced: Vec::new(),
            }),
            files: RwLock::new(files),
            written,
            config,
        };
        Ok((log, recovered))
    }

    /// Appends framed events (from [`EventFrames`]), then the markers given, in one write.
    /// On failure nothing of it is in the log yet: the frames are kept and written first by
    /// the next append (the store has applied their changes already, so they cannot be
    /// detected again).
    pub(crate) fn append_frames(
        &self,
        frames: Vec<u8>,
        covered: Option<u64>,
        exit_lo: Option<i64>,
    ) -> Result<(), PortError> {
        self.append_bufs(&mut [frames], covered, exit_lo)
    }

    /// [`FileChangeLog::append_frames`] of the frames in `bufs`, in order, which it leaves
    /// empty with their capacity kept (the apply path reuses its buffers, so that encoding a
    /// batch's events does not fault in fresh pages each time).
    pub(crate) fn append_bufs(
        &self,
        bufs: &mut [Vec<u8>],
        covered: Option<u64>,
        exit_lo: Option<i64>,
    ) -> Result<(), PortError> {
        let mut markers = Vec::new();
        if let Some(c) = covered {
            encode_marker(COVERED, c, &mut markers);
        }
        if let Some(t) = exit_lo {
            encode_marker(TICK, zigzag(t), &mut markers);
        }
        let mut w = lock(&self.writer);
        let pending = std::mem::take(&mut w.pending);
        let parts = || {
            std::iter::once(&pending)
                .chain(bufs.iter())
                .chain(std::iter::once(&markers))
                .filter(|p| !p.is_empty())
        };
        let len: u64 = parts().map(|p| p.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        if let Err(e) = parts().try_for_each(|p| w.file.write_all(p)) {
            let durable = w.offset - w.base;
            let cut = w.file.set_len(durable);
            w.pending = parts().flatten().copied().collect();
            for b in bufs.iter_mut() {
                b.clear();
            }
            metrics::counter!("userseg_changes_write_failures_total").increment(1);
            return Err(PortError::Transient(format!(
                "change log write failed ({e}){}",
                match cut {
                    Ok(()) => String::new(),
                    Err(c) => format!("; cutting it back failed ({c})"),
                }
            )));
        }
        for b in bufs.iter_mut() {
            b.clear();
        }
        w.offset += len;
        w.dirty = true;
        if covered.is_some() {
            w.covered = covered;
        }
        if exit_lo.is_some() {
            w.exit_lo = exit_lo;
        }
        metrics::counter!("userseg_changes_bytes_total").increment(len);
        self.written.send_replace(w.offset);
        self.maybe_roll(&mut w);
        Ok(())
    }

    /// Starts a new file when the current one is large or old enough; it opens with the
    /// current markers.
    fn maybe_roll(&self, w: &mut Writer) {
        let now = self.clock.now();
        let due = w.offset - w.base >= self.config.segment_bytes
            || now.saturating_sub(w.created) >= self.config.roll_after.as_secs() as i64;
        if !due || w.offset == w.base {
            return;
        }
        let next = FileInfo {
            base: w.offset,
            created: now,
        };
        let path = self.config.dir.join(file_name(next));
        let opened = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| {
                let mut markers = Vec::new();
                if let Some(c) = w.covered {
                    encode_marker(COVERED, c, &mut markers);
                }
                if let Some(t) = w.exit_lo {
                    encode_marker(TICK, zigzag(t), &mut markers);
                }
                f.write_all(&markers)?;
                crate::store::snapshot::sync_dir(&self.config.dir)?;
                Ok((f, markers.len() as u64))
            });
        match opened {
            Ok((f, n)) => {
                let old = std::mem::replace(&mut w.file, f);
                if w.dirty {
                    w.unsynced.push(old);
                }
                w.base = next.base;
                w.created = next.created;
                w.offset += n;
                w.dirty = true;
                self.files
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(next);
                self.written.send_replace(w.offset);
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                tracing::warn!(path = %path.display(), error = %e, "could not start a new change log file; will retry");
            }
        }
    }

    /// fsyncs what was written: the checkpointer calls it before a snapshot.
    /// The fsyncs run outside the writer's lock, so appends (the apply path) go on meanwhile.
    pub fn sync(&self) -> io::Result<()> {
        let (files, current) = {
            let mut w = lock(&self.writer);
            let current = if w.dirty {
                Some(w.file.try_clone()?)
            } else {
                None
            };
            w.dirty = false;
            (std::mem::take(&mut w.unsynced), current)
        };
        let synced = files
            .iter()
            .chain(current.iter())
            .try_for_each(|f| f.sync_data());
        if let Err(e) = synced {
            // Try again next time: nothing is known to be durable.
            let mut w = lock(&self.writer);
            w.unsynced.extend(files);
            w.unsynced.extend(current);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the files every event of which is older than the retention; returns how many.
    pub fn prune(&self) -> io::Result<usize> {
        let cutoff = self
            .clock
            .now()
            .saturating_sub(self.config.retention.as_secs() as i64);
        let mut files = self.files.write().unwrap_or_else(|e| e.into_inner());
        let mut removed = 0;
        while files.len() > 1 && files[1].created <= cutoff {
            let f = files.remove(0);
            fs::remove_file(self.config.dir.join(file_name(f)))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Erasure: in every event of the log naming one of `ids` (the `deleted` events too) in a
    /// frame before that id's offset (where the log ended once its deletion was applied:
    /// later events are of pairs sent after the deletion), replaces the user id by as many
    /// `*` in place, frame checksums updated, and syncs. The ids of those events change with
    /// it. Reads every file once; returns how many frames were rewritten. A reader reading a
    /// frame while it is rewritten gets an error and resumes by cursor.
    pub fn redact(&self, ids: &HashMap<String, u64>) -> io::Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        let files: Vec<FileInfo> = self.files.read().unwrap_or_else(|e| e.into_inner()).clone();
        let end = self.end_offset();
        let mut rewritten = 0;
        for (i, f) in files.iter().enumerate() {
            let limit = files.get(i + 1).map_or(end, |n| n.base) - f.base;
            let path = self.config.dir.join(file_name(*f));
            let data = match fs::read(&path) {
                Ok(d) => d,
                // Removed by the retention meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let data = &data[..(limit as usize).min(data.len())];
            let file = OpenOptions::new().write(true).open(&path)?;
            let mut pos = 0;
            let mut dirty = false;
            while let Frame::Ok(payload, n) = codec::read_frame(&data[pos..]) {
                if let Some(clean) = redact_payload(payload, ids, f.base + pos as u64) {
                    let mut frame = vec![0; FRAME_HEADER];
                    frame.extend_from_slice(&clean);
                    codec::finish_frame(&mut frame, 0);
                    file.write_all_at(&frame, pos as u64)?;
                    dirty = true;
                    rewritten += 1;
                }
                pos += n;
            }
            if dirty {
                file.sync_data()?;
            }
        }
        metrics::counter!("userseg_changes_redacted_frames_total").increment(rewritten);
        Ok(rewritten)
    }

    /// Offset after the last frame written.
    pub fn end_offset(&self) -> u64 {
        *self.written.borrow()
    }

    /// Up to `max` events after `cursor`, reading at most a few chunks.
    pub(crate) fn read_at(
        &self,
        cursor: Cursor,
        max: usize,
    ) -> Result<ChangeBatch, ChangeReadError> {
        let Cursor { offset, mut skip } = cursor;
        let end = self.end_offset();
        let files: Vec<FileInfo> = self.files.read().unwrap_or_else(|e| e.into_inner()).clone();
        if offset > end || (offset == end && skip > 0) {
            return Err(ChangeReadError::Malformed(format!(
                "{cursor} is beyond the end of the change log"
            )));
        }
        let first = files.first().map_or(0, |f| f.base);
        if offset < first {
            return Err(ChangeReadError::Expired(format!(
                "the oldest cursor kept is {first}"
            )));
        }
        let mut i = files
            .partition_point(|f| f.base <= offset)
            .saturating_sub(1);
        let mut pos = offset;
        let mut records = Vec::new();
        let mut buf = Vec::new();
        while records.len() < max && pos < end {
            let f = files[i];
            let file_end = files.get(i + 1).map_or(end, |n| n.base);
            if pos >= file_end {
                i += 1;
                continue;
            }
            let path = self.config.dir.join(file_name(f));
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return Err(ChangeReadError::Expired(
                        "its file was removed by the retention".into(),
                    ))
                }
                Err(e) => return Err(PortError::Transient(format!("change log: {e}")).into()),
            };
            let want = (file_end - pos).min(READ_CHUNK as u64) as usize;
            buf.resize(want, 0);
            file.read_exact_at(&mut buf, pos - f.base)
                .map_err(|e| PortError::Transient(format!("change log read: {e}")))?;
            let mut at = 0;
            while at < buf.len() && records.len() < max {
                let frame_at = pos + at as u64;
                match codec::read_frame(&buf[at..]) {
                    Frame::Ok(payload, n) => {
                        let entry = decode(payload).ok_or_else(|| bad_frame(offset, frame_at))?;
                        let events = match entry {
                            Entry::Events(events) => events,
                            _ if skip > 0 => return Err(bad_frame(offset, frame_at)),
                            _ => Vec::new(),
                        };
                        let total = events.len() as u32;
                        if skip > 0 && skip >= total {
                            return Err(bad_frame(offset, frame_at));
                        }
                        for (k, event) in events.into_iter().enumerate().skip(skip as usize) {
                            if records.len() == max {
                                // Stop inside the frame: resume at its event k.
                                let next = Cursor {
                                    offset: frame_at,
                                    skip: k as u32,
                                };
                                return Ok(ChangeBatch {
                                    records,
                                    next: next.to_string(),
                                });
                            }
                            let after = k as u32 + 1;
                            let cursor = if after == total {
                                Cursor {
                                    offset: frame_at + n as u64,
                                    skip: 0,
                                }
                            } else {
                                Cursor {
                                    offset: frame_at,
                                    skip: after,
                                }
                            };
                            records.push(ChangeRecord {
                                cursor: cursor.to_string(),
                                event,
                            });
                        }
                        skip = 0;
                        at += n;
                    }
                    Frame::Incomplete if at > 0 => break,
                    Frame::Incomplete if buf.len() >= FRAME_HEADER => {
                        // One frame larger than the chunk: read it whole.
                        let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as u64;
                        let whole = FRAME_HEADER as u64 + len;
                        if pos + whole > file_end {
                            return Err(bad_frame(offset, pos));
                        }
                        buf.resize(whole as usize, 0);
                        file.read_exact_at(&mut buf, pos - f.base)
                            .map_err(|e| PortError::Transient(format!("change log read: {e}")))?;
                    }
                    _ => return Err(bad_frame(offset, frame_at)),
                }
            }
            pos += at as u64;
        }
        Ok(ChangeBatch {
            records,
            next: Cursor {
                offset: pos,
                skip: 0,
            }
            .to_string(),
        })
    }
}

/// A frame that does not decode: at the cursor, the cursor is not one of ours.
fn bad_frame(cursor: u64, at: u64) -> ChangeReadError {
    if at == cursor {
        ChangeReadError::Malformed(format!("{cursor} does not point at an event"))
    } else {
        ChangeReadError::Port(PortError::Permanent(format!(
            "the change log is corrupt at byte {at}"
        )))
    }
}

#[async_trait]
impl ChangeLog for FileChangeLog {
    async fn append(&self, events: Vec<ChangeEvent>) -> Result<(), PortError> {
        let mut frames = EventFrames::default();
        for e in &events {
            frames.push_event(e);
        }
        self.append_frames(frames.finish(), None, None)
    }

    async fn end(&self) -> Result<String, PortError> {
        Ok(self.end_offset().to_string())
    }

    async fn start(&self) -> Result<String, PortError> {
        let files = self.files.read().unwrap_or_else(|e| e.into_inner());
        Ok(files.first().map_or(0, |f| f.base).to_string())
    }

    async fn read(
        &self,
        after: &str,
        max: usize,
        wait: Duration,
    ) -> Result<ChangeBatch, ChangeReadError> {
        let mut cursor = parse_cursor(after)?;
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.written.subscribe();
        loop {
            changed.borrow_and_update();
            let batch = self.read_at(cursor, max.max(1))?;
            if !batch.records.is_empty() || wait.is_zero() {
                return Ok(batch);
            }
            cursor = parse_cursor(&batch.next)?;
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => {}
                _ => return Ok(batch),
            }
        }
    }
}

/// How many events a log holds from its start (without decoding them: for benchmarks, whose
/// measurements a few million decoded events would disturb).
pub fn count_all(dir: &Path) -> Result<u64, WalError> {
    let files = list(dir).map_err(|source| WalError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut n = 0;
    for (i, f) in files.iter().enumerate() {
        let path = dir.join(file_name(*f));
        scan_file(&path, i + 1 == files.len(), |at, _, payload| {
            match payload.split_first() {
                Some((&EVENTS, rest)) if rest.len() >= 4 => {
                    n += u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]));
                }
                Some((&COVERED | &TICK, _)) => {}
                _ => {
                    return Err(WalError::Corrupt {
                        path: path.clone(),
                        at: at as u64,
                    })
                }
            }
            Ok(())
        })?;
    }
    Ok(n)
}

/// The events of a log from its start, for tests and tools.
pub fn read_all(dir: &Path) -> Result<Vec<ChangeEvent>, WalError> {
    let files = list(dir).map_err(|source| WalError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let path = dir.join(file_name(*f));
        scan_file(&path, i + 1 == files.len(), |at, _, payload| {
            match decode(payload) {
                Some(Entry::Events(e)) => out.extend(e),
                Some(_) => {}
                None => {
                    return Err(WalError::Corrupt {
                        path: path.clone(),
                        at: at as u64,
                    })
                }
            }
            Ok(())
        })?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use userseg_usecase::ManualClock;

    async fn make_log() -> Arc<dyn ChangeLog> {
        let dir = tempfile::tempdir().unwrap().keep();
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        let mut cfg = ChangeLogConfig::new(&dir, Duration::from_secs(7 * 86_400));
        cfg.segment_bytes = 700; // several files
        let (log, rec) = FileChangeLog::open(cfg, clock).unwrap();
        assert_eq!(rec, Recovered::default());
        Arc::new(log)
    }

    userseg_usecase::change_log_test_suite!(make_log, seeds = 20);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn markers_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        let cfg = ChangeLogConfig::new(dir.path(), Duration::from_secs(3600));
        let (log, _) = FileChangeLog::open(cfg.clone(), clock.clone()).unwrap();
        let mut frames = EventFrames::default();
        frames.push_event(&userseg_usecase::change_log_suite::event(1));
        log.append_frames(frames.finish(), Some(77), Some(-5))
            .unwrap();
        log.append_frames(Vec::new(), Some(99), None).unwrap();
        let end = log.end_offset();
        drop(log);
        // Half a frame at the tail, as a crash mid-write leaves it.
        let f = list(dir.path()).unwrap()[0];
        let mut file = OpenOptions::new()
            .append(true)
            .open(dir.path().join(file_name(f)))
            .unwrap();
        file.write_all(&[40, 0, 0, 0, 1]).unwrap();
        let (log, rec) = FileChangeLog::open(cfg, clock).unwrap();
        assert_eq!(
            rec,
            Recovered {
                covered: Some(99),
                exit_lo: Some(-5)
            }
        );
        assert_eq!(log.end_offset(), end);
        assert_eq!(read_all(dir.path()).unwrap().len(), 1);
        assert_eq!(count_all(dir.path()).unwrap(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_drops_old_files_and_their_cursors_expire() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_800_000_000));
        let cfg = ChangeLogConfig::new(dir.path(), Duration::from_secs(800));
        assert_eq!(cfg.roll_after, Duration::from_secs(100));
        let (log, _) = FileChangeLog::open(cfg.clone(), clock.clone()).unwrap();
        let start = log.start().await.unwrap();
        let mut cursors = Vec::new();
        for i in 0..20 {
            log.append(vec![userseg_usecase::change_log_suite::event(i)])
                .await
                .unwrap();
            cursors.push(log.end().await.unwrap());
            clock.advance(60);
        }
        assert!(list(dir.path()).unwrap().len() > 5, "rolled by age");
        clock.advance(2000);
        log.append(vec![userseg_usecase::change_log_suite::event(99)])
            .await
            .unwrap();
        assert!(log.prune().unwrap() > 0);
        match log.read(&start, 10, Duration::ZERO).await {
            Err(ChangeReadError::Expired(_)) => {}
            other => panic!("expected expired, got {other:?}"),
        }
        // The newest event is kept.
        let last = &cursors[18];
        let b = log.read(last, 10, Duration::ZERO).await.unwrap();
        assert_eq!(b.records.len(), 2);
        assert_eq!(
            b.records[1].event,
            userseg_usecase::change_log_suite::event(99)
        );
    }
}
