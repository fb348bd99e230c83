//! Snapshots of the embedded store.
//!
//! A snapshot is *fuzzy*: it records a log offset `O` taken before it started, then copies one
//! segment at a time while writes go on. Everything before `O` is in it, and some later writes
//! may be too. Recovery loads it and replays the log from `O`; because applying a pair is
//! idempotent and order-independent (latest ts wins), the result is exactly the state with
//! every logged pair applied.
//!
//! File layout (little endian): header `USEGSNP1`, bucket_secs u64, window_secs u64,
//! log offset u64; segment records (tag 1, name len u16, name, ring top i64, n u64,
//! n × (user u32, bucket u32)); tag 0; then the dictionary of the users the segments reference
//! (n u64, n × (old index u32, len u16, bytes)); footer: dictionary offset u64, crc32 of the
//! segment region u32, crc32 of the dictionary region u32, `USEGEND1`.
//! Only users referenced by some membership are written, so a restart also compacts the
//! dictionary, and a deleted (erased) user's id is in no snapshot begun after its deletion.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::members::Layout;
use super::{MemStore, Segment, Users};
use userseg_domain::Window;

const MAGIC: &[u8; 8] = b"USEGSNP1";
const END_MAGIC: &[u8; 8] = b"USEGEND1";
const FOOTER_LEN: u64 = 8 + 4 + 4 + 8;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot i/o on {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("snapshot {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("snapshot {path} was written with a window of {found} s but WINDOW is {want} s; move the data directory away or set WINDOW back")]
    WindowMismatch {
        path: PathBuf,
        found: u64,
        want: u64,
    },
}

impl SnapshotError {
    /// The file system had no space left (or the quota was reached).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SnapshotError::Io { source, .. } if crate::wal::fs::is_disk_full(source))
    }
}

struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    written: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

fn snapshot_name(offset: u64) -> String {
    format!("snapshot-{offset:020}.snap")
}

fn parse_snapshot_name(name: &str) -> Option<u64> {
    name.strip_prefix("snapshot-")?
        .strip_suffix(".snap")?
        .parse()
        .ok()
}

/// Snapshots in `dir`, newest (highest offset) last.
pub fn list(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries {
                let e = e?;
                if let Some(off) = e.file_name().to_str().and_then(parse_snapshot_name) {
                    out.push((off, e.path()));
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort();
    Ok(out)
}

pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The file a snapshot is written to: a real file, or a fault-injecting double in tests.
pub(crate) trait SnapshotFile: Write {
    fn sync_all(&mut self) -> io::Result<()>;
}

impl SnapshotFile for File {
    fn sync_all(&mut self) -> io::Result<()> {
        File::sync_all(self)
    }
}

const TMP_SUFFIX: &str = ".snap.tmp";

/// Writes a snapshot of `store` covering every log record before `offset`, atomically
/// (temporary file, fsync, rename, fsync of the directory), then removes older snapshots.
///
/// When it fails (a full disk, a failed fsync) the temporary file is removed and the previous
/// snapshot is untouched: the log still holds everything after it, and the next attempt starts
/// over. A failed fsync of a snapshot is not fail-stop: its pages are never read back.
pub fn write(store: &MemStore, dir: &Path, offset: u64) -> Result<PathBuf, SnapshotError> {
    write_with(store, dir, offset, |p| File::create(p))
}

/// [`write`] through `create` (fault injection in tests).
pub(crate) fn write_with<F: SnapshotFile>(
    store: &MemStore,
    dir: &Path,
    offset: u64,
    create: impl FnOnce(&Path) -> io::Result<F>,
) -> Result<PathBuf, SnapshotError> {
    let path = dir.join(snapshot_name(offset));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(offset)));
    let io_err = |source| SnapshotError::Io {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(io_err)?;
    remove_temporaries(dir);
    let written = create(&tmp)
        .and_then(|file| encode(store, offset, file))
        .and_then(|mut file| file.sync_all())
        .and_then(|()| fs::rename(&tmp, &path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(e));
    }
    sync_dir(dir).map_err(io_err)?;
    for (old, p) in list(dir).map_err(io_err)? {
        if old < offset {
            let _ = fs::remove_file(p);
        }
    }
    Ok(path)
}

/// Removes temporary files of attempts that never finished (a process killed mid-write).
fn remove_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name()
            .to_str()
            .is_some_and(|n| n.ends_with(TMP_SUFFIX))
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// The snapshot's bytes, into `file` (returned for the fsync).
fn encode<F: Write>(store: &MemStore, offset: u64, file: F) -> io::Result<F> {
    // Checksums over the buffered 1 MiB writes (fast), not the many small ones.
    let mut w = BufWriter::with_capacity(
        1 << 20,
        CrcWriter {
            inner: file,
            crc: crc32fast::Hasher::new(),
            written: 0,
        },
    );
    let b = store.bucketing();
    w.write_all(MAGIC)?;
    w.write_all(&(b.bucket_secs() as u64).to_le_bytes())?;
    w.write_all(&store.window().secs().to_le_bytes())?;
    w.write_all(&offset.to_le_bytes())?;

    let mut segments: Vec<(Box<str>, Arc<RwLock<Segment>>)> = super::read(&store.segments)
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    segments.sort_by(|a, b| a.0.cmp(&b.0));
    let mut referenced: Vec<u64> = Vec::new();
    let mut entries: Vec<(u32, u32)> = Vec::new();
    for (name, seg) in segments {
        let top = {
            // Copy under the read lock; write it out after releasing it.
            let seg = super::read(&seg);
            entries.clear();
            // Buckets are u32 by construction (see `bucket_u32`).
            seg.for_each(|u, b| entries.push((u, b as u32)));
            seg.ring.top()
        };
        if entries.is_empty() {
            continue;
        }
        w.write_all(&[1])?;
        w.write_all(&(name.len() as u16).to_le_bytes())?;
        w.write_all(name.as_bytes())?;
        w.write_all(&top.to_le_bytes())?;
        w.write_all(&(entries.len() as u64).to_le_bytes())?;
        let mut buf = Vec::with_capacity(entries.len().min(1 << 16) * 8);
        for chunk in entries.chunks(1 << 16) {
            buf.clear();
            for &(u, bucket) in chunk {
                let word = u as usize / 64;
                if word >= referenced.len() {
                    referenced.resize(word + 1, 0);
                }
                referenced[word] |= 1 << (u % 64);
                buf.extend_from_slice(&u.to_le_bytes());
                buf.extend_from_slice(&bucket.to_le_bytes());
            }
            w.write_all(&buf)?;
        }
    }
    w.write_all(&[0])?;
    w.flush()?;
    let seg_crc = std::mem::take(&mut w.get_mut().crc).finalize();
    let dict_offset = w.get_ref().written;
    {
        let count: u64 = referenced.iter().map(|w| u64::from(w.count_ones())).sum();
        w.write_all(&count.to_le_bytes())?;
        // The dictionary in index order, keeping the referenced users.
        let mut res = Ok(());
        store.users.for_each(|idx, id| {
            let word = referenced.get(idx as usize / 64).copied().unwrap_or(0);
            if res.is_err() || word & (1 << (idx % 64)) == 0 {
                return;
            }
            res = w
                .write_all(&idx.to_le_bytes())
                .and_then(|()| w.write_all(&(id.len() as u16).to_le_bytes()))
                .and_then(|()| w.write_all(id));
        });
        res?;
    }
    w.flush()?;
    let dict_crc = std::mem::take(&mut w.get_mut().crc).finalize();
    w.write_all(&dict_offset.to_le_bytes())?;
    w.write_all(&seg_crc.to_le_bytes())?;
    w.write_all(&dict_crc.to_le_bytes())?;
    w.write_all(END_MAGIC)?;
    Ok(w.into_inner().map_err(|e| e.into_error())?.inner)
}

fn read_exact<R: Read>(r: &mut R, buf: &mut [u8], path: &Path) -> Result<(), SnapshotError> {
    r.read_exact(buf).map_err(|e| SnapshotError::Corrupt {
        path: path.to_owned(),
        reason: format!("truncated: {e}"),
    })
}

fn u64_at<R: Read>(r: &mut R, path: &Path) -> Result<u64, SnapshotError> {
    let mut b = [0; 8];
    read_exact(r, &mut b, path)?;
    Ok(u64::from_le_bytes(b))
}

/// Loads the newest snapshot in `dir`, if any: the store and the log offset to replay from.
#[cfg(test)]
pub(crate) fn load_latest(
    dir: &Path,
    window: Window,
) -> Result<Option<(MemStore, u64)>, SnapshotError> {
    load_latest_before(dir, window, |_| 0)
}

/// [`load_latest`], with room in the member tables for the pairs about to be replayed:
/// `replay(offset)` estimates how many pairs the log holds after the snapshot's offset.
pub(crate) fn load_latest_before(
    dir: &Path,
    window: Window,
    replay: impl FnOnce(u64) -> u64,
) -> Result<Option<(MemStore, u64)>, SnapshotError> {
    let Some((offset, path)) = list(dir).map_err(io_error(dir))?.pop() else {
        return Ok(None);
    };
    load_with_room(&path, window, replay(offset)).map(Some)
}

/// At most this share of extra room is made for the pairs to replay after a snapshot.
const MAX_ROOM: f64 = 0.5;

/// Loads the snapshot at `path`: the store and the log offset to replay from. Every region is
/// checksummed; a snapshot written with another window is refused.
pub fn load(path: &Path, window: Window) -> Result<(MemStore, u64), SnapshotError> {
    load_with_room(path, window, 0)
}

/// [`load`], sizing the member tables (and dense arrays) for about `more` pairs beyond the
/// snapshot's, spread like its own: a table loaded exactly full would grow (rehashing every
/// entry, GBs at scale) at the first new member the log replay brings.
pub fn load_with_room(
    path: &Path,
    window: Window,
    more: u64,
) -> Result<(MemStore, u64), SnapshotError> {
    let io_err = io_error(path);
    let mut file = File::open(path).map_err(&io_err)?;
    let footer = read_footer(&mut file, path)?;
    // Dictionary first: it gives the new, compacted index of every referenced user.
    let (users, remap) = read_dictionary(&mut file, path, &footer)?;
    file.seek(SeekFrom::Start(0)).map_err(&io_err)?;
    let mut r = BufReader::with_capacity(1 << 16, &mut file);
    let (header, offset) = read_header(&mut r, path, window)?;
    let records = read_records(&mut r, path, footer.dict_offset)?;
    drop(r);

    let mut store = MemStore::new(window);
    let held: u64 = records.iter().map(|r| r.n as u64).sum();
    let room = if more == 0 || held == 0 {
        0.0
    } else {
        (more as f64 / held as f64).min(MAX_ROOM)
    };
    let ctx = LoadCtx {
        path,
        remap: &remap,
        // Global indices are below shards × the largest shard (a little above the user count).
        universe: users.universe(),
        room,
        ring_len: store.ring_len,
        window_buckets: store.bucketing.window_buckets(),
    };
    let segs = ctx.load_segments(&records)?;
    // The segment region's checksum: the header, each record's (combined in file order), the
    // end tag.
    let mut crc = crc32fast::Hasher::new();
    crc.update(&header);
    let mut segments = super::write(&store.segments);
    for (rec, (seg, c)) in records.into_iter().zip(segs) {
        crc.combine(&c);
        segments.insert(rec.name.into(), Arc::new(RwLock::new(seg)));
    }
    drop(segments);
    crc.update(&[0]);
    if crc.finalize() != footer.seg_crc {
        return Err(corrupt(path, "segment checksum mismatch"));
    }
    store.users = users;
    Ok((store, offset))
}

fn corrupt(path: &Path, reason: impl Into<String>) -> SnapshotError {
    SnapshotError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn io_error(path: &Path) -> impl Fn(io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The snapshot's footer, checked against the file's length.
struct Footer {
    /// Where the dictionary starts (the segment region ends one tag byte before).
    dict_offset: u64,
    /// The dictionary's length in bytes.
    dict_len: u64,
    seg_crc: u32,
    dict_crc: u32,
}

fn read_footer(file: &mut File, path: &Path) -> Result<Footer, SnapshotError> {
    let io_err = io_error(path);
    let len = file.metadata().map_err(&io_err)?.len();
    if len < 32 + FOOTER_LEN {
        return Err(corrupt(path, format!("only {len} bytes")));
    }
    file.seek(SeekFrom::Start(len - FOOTER_LEN))
        .map_err(&io_err)?;
    let mut footer = [0u8; FOOTER_LEN as usize];
    read_exact(file, &mut footer, path)?;
    let dict_offset = u64::from_le_bytes(footer[0..8].try_into().unwrap_or_default());
    let seg_crc = u32::from_le_bytes(footer[8..12].try_into().unwrap_or_default());
    let dict_crc = u32::from_le_bytes(footer[12..16].try_into().unwrap_or_default());
    if &footer[16..24] != END_MAGIC {
        return Err(corrupt(path, "missing end marker"));
    }
    if dict_offset < 32 || dict_offset > len - FOOTER_LEN {
        return Err(corrupt(
            path,
            format!("bad dictionary offset {dict_offset}"),
        ));
    }
    Ok(Footer {
        dict_offset,
        dict_len: len - FOOTER_LEN - dict_offset,
        seg_crc,
        dict_crc,
    })
}

/// Reads the dictionary into a fresh (compacted) one; returns it with the map from each user's
/// index in the snapshot to its new index. Its checksum is verified before anything is sized
/// from its contents.
fn read_dictionary(
    file: &mut File,
    path: &Path,
    footer: &Footer,
) -> Result<(Users, Remap), SnapshotError> {
    let io_err = io_error(path);
    file.seek(SeekFrom::Start(footer.dict_offset))
        .map_err(&io_err)?;
    let mut crc = crc32fast::Hasher::new();
    let mut r = (&mut *file).take(footer.dict_len);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(&io_err)?;
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
    }
    if crc.finalize() != footer.dict_crc {
        return Err(corrupt(path, "dictionary checksum mismatch"));
    }
    file.seek(SeekFrom::Start(footer.dict_offset))
        .map_err(&io_err)?;
    let mut r = BufReader::with_capacity(1 << 20, (&mut *file).take(footer.dict_len));
    let count = u64_at(&mut r, path)?;
    if count > footer.dict_len / 6 {
        return Err(corrupt(path, format!("dictionary claims {count} users")));
    }
    let mut dict = Users::with_capacity(super::SHARDS, count as usize);
    let mut remap = Remap::Dense(Vec::new());
    let mut last_old: Option<usize> = None;
    let mut id = Vec::with_capacity(256);
    for _ in 0..count {
        let mut head = [0u8; 6];
        read_exact(&mut r, &mut head, path)?;
        let old = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let n = u16::from_le_bytes([head[4], head[5]]) as usize;
        id.resize(n, 0);
        read_exact(&mut r, &mut id, path)?;
        if std::str::from_utf8(&id).is_err() {
            return Err(corrupt(path, format!("user {old} is not UTF-8")));
        }
        let new = dict
            .intern_mut(&id)
            .ok_or_else(|| corrupt(path, "too many users"))?;
        // Indices are written in strictly increasing order.
        if last_old.is_some_and(|l| old <= l) {
            return Err(corrupt(path, format!("user index {old} out of order")));
        }
        last_old = Some(old);
        remap.insert(old, new, count as usize);
    }
    Ok((dict, remap))
}

/// Reads the 32-byte header (at the reader's start); returns it (it opens the segment
/// region's checksum) with the log offset to replay from.
fn read_header<R: Read>(
    r: &mut R,
    path: &Path,
    window: Window,
) -> Result<([u8; 32], u64), SnapshotError> {
    let mut header = [0u8; 32];
    read_exact(r, &mut header, path)?;
    if &header[0..8] != MAGIC {
        return Err(corrupt(path, "not a userseg snapshot"));
    }
    let field = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().unwrap_or_default());
    let window_secs = field(16);
    if window_secs != window.secs() {
        return Err(SnapshotError::WindowMismatch {
            path: path.to_owned(),
            found: window_secs,
            want: window.secs(),
        });
    }
    Ok((header, field(24)))
}

/// Reads the segment records' heads (just after the header), skipping their bodies, up to the
/// end tag, which must stand just before the dictionary.
fn read_records<R: Read + Seek>(
    r: &mut R,
    path: &Path,
    dict_offset: u64,
) -> Result<Vec<Record>, SnapshotError> {
    let mut records = Vec::new();
    let mut pos = 32u64;
    loop {
        let mut tag = [0u8; 1];
        read_exact(r, &mut tag, path)?;
        match tag[0] {
            0 => break,
            1 => {}
            t => return Err(corrupt(path, format!("unknown record tag {t}"))),
        }
        let mut nl = [0u8; 2];
        read_exact(r, &mut nl, path)?;
        let mut name = vec![0u8; u16::from_le_bytes(nl) as usize];
        read_exact(r, &mut name, path)?;
        let name = String::from_utf8(name).map_err(|_| corrupt(path, "segment name not UTF-8"))?;
        let top = u64_at(r, path)?;
        if top > u64::from(u32::MAX) {
            return Err(corrupt(path, format!("segment {name} has ring top {top}")));
        }
        let n = u64_at(r, path)?;
        let head_len = 1 + 2 + name.len() as u64 + 8 + 8;
        let body_start = pos + head_len;
        let body_end = n
            .checked_mul(8)
            .and_then(|b| body_start.checked_add(b))
            .filter(|&e| e < dict_offset)
            .ok_or_else(|| corrupt(path, format!("segment {name} claims {n} members")))?;
        records.push(Record {
            name,
            top: top as i64,
            n: n as usize,
            start: pos,
            body_start,
            end: body_end,
        });
        r.seek(SeekFrom::Start(body_end)).map_err(io_error(path))?;
        pos = body_end;
    }
    if pos + 1 != dict_offset {
        return Err(corrupt(
            path,
            "segment region does not end at the dictionary",
        ));
    }
    Ok(records)
}

/// Splits the records among at most 8 workers: largest first, each to the least loaded one.
fn plan_workers(records: &[Record]) -> Vec<Vec<usize>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 8)
        .min(records.len().max(1));
    let mut order: Vec<usize> = (0..records.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(records[i].n));
    let mut work: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); threads];
    for i in order {
        if let Some(w) = work.iter_mut().min_by_key(|w| w.0) {
            w.0 += records[i].n;
            w.1.push(i);
        }
    }
    work.into_iter().map(|(_, mine)| mine).collect()
}

/// The old (written) index of each user to its new index. Dense while the old indices are
/// not much sparser than the users (the usual case: a lookup per membership), a sorted list
/// otherwise, so a dictionary whose indices are sparse (many users expired since the last
/// restart), or corrupt behind a valid checksum, never sizes a table from its largest index.
enum Remap {
    Dense(Vec<u32>),
    Sparse(Vec<(u32, u32)>),
}

impl Remap {
    /// Records `old -> new`; `old` increases from call to call. `count` is the number of users.
    fn insert(&mut self, old: usize, new: u32, count: usize) {
        match self {
            Remap::Dense(v) => {
                if old < v.len() {
                    v[old] = new;
                } else if old <= count.saturating_mul(16).saturating_add(1 << 20) {
                    v.resize((old + 1).max(v.len() * 9 / 8), u32::MAX);
                    v[old] = new;
                } else {
                    let mut sparse: Vec<(u32, u32)> = v
                        .iter()
                        .enumerate()
                        .filter(|(_, n)| **n != u32::MAX)
                        .map(|(o, n)| (o as u32, *n))
                        .collect();
                    sparse.push((old as u32, new));
                    *self = Remap::Sparse(sparse);
                }
            }
            Remap::Sparse(v) => v.push((old as u32, new)),
        }
    }

    /// Starts fetching what [`Remap::get`] of `old` reads (dense only).
    #[inline]
    fn prefetch(&self, old: usize) {
        if let Remap::Dense(v) = self {
            if let Some(n) = v.get(old) {
                super::hint::prefetch(n);
            }
        }
    }

    fn get(&self, old: usize) -> Option<u32> {
        match self {
            Remap::Dense(v) => v.get(old).copied().filter(|u| *u != u32::MAX),
            Remap::Sparse(v) => {
                let old = u32::try_from(old).ok()?;
                v.binary_search_by_key(&old, |e| e.0).ok().map(|i| v[i].1)
            }
        }
    }
}

/// A loaded segment: its record's index, the segment, the checksum of its record.
type Built = (usize, Segment, crc32fast::Hasher);

/// Where one segment record lies in the file.
struct Record {
    name: String,
    top: i64,
    n: usize,
    /// Offset of the tag byte.
    start: u64,
    body_start: u64,
    end: u64,
}

struct LoadCtx<'a> {
    path: &'a Path,
    remap: &'a Remap,
    universe: usize,
    /// Extra room per segment, as a share of its entries (see [`load_with_room`]).
    room: f64,
    ring_len: i64,
    window_buckets: i64,
}

impl LoadCtx<'_> {
    /// Builds every segment, in parallel (segments are independent, and each worker checksums
    /// its own records); returns them in record order, each with its record's checksum.
    fn load_segments(
        &self,
        records: &[Record],
    ) -> Result<Vec<(Segment, crc32fast::Hasher)>, SnapshotError> {
        let path = self.path;
        let built: Vec<Result<Vec<Built>, SnapshotError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = plan_workers(records)
                .into_iter()
                .map(|mine| {
                    scope.spawn(move || {
                        let mut file = File::open(path).map_err(io_error(path))?;
                        let mut buf = vec![0u8; 8 << 16];
                        mine.iter()
                            .map(|&i| {
                                let (seg, crc) =
                                    self.load_segment(&mut file, &records[i], &mut buf)?;
                                Ok((i, seg, crc))
                            })
                            .collect()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(corrupt(path, "a load worker panicked")))
                })
                .collect()
        });
        let mut segs: Vec<Option<(Segment, crc32fast::Hasher)>> =
            (0..records.len()).map(|_| None).collect();
        for part in built {
            for (i, seg, crc) in part? {
                segs[i] = Some((seg, crc));
            }
        }
        segs.into_iter()
            .map(|seg| seg.ok_or_else(|| corrupt(path, "segment not loaded")))
            .collect()
    }

    /// Builds one segment from its record; returns it with the checksum of the record's bytes.
    fn load_segment(
        &self,
        file: &mut File,
        rec: &Record,
        buf: &mut [u8],
    ) -> Result<(Segment, crc32fast::Hasher), SnapshotError> {
        let path = self.path;
        file.seek(SeekFrom::Start(rec.start))
            .map_err(io_error(path))?;
        // Checksums over the buffered reads (fast), not the small ones.
        let mut r = BufReader::with_capacity(
            1 << 16,
            CrcReader {
                inner: file.take(rec.end - rec.start),
                crc: crc32fast::Hasher::new(),
            },
        );
        let mut head = vec![0u8; (rec.body_start - rec.start) as usize];
        read_exact(&mut r, &mut head, path)?;
        let grown = |n: usize| n + (n as f64 * self.room) as usize;
        let mut seg = Segment::with_capacity(
            self.ring_len,
            self.window_buckets,
            grown(rec.n),
            grown(self.universe),
            Layout::Auto,
        );
        seg.advance(rec.top, None);
        let mut left = rec.n;
        let mut skipped = 0u64;
        // A block of entries at a time, in two passes, each prefetching AHEAD entries ahead
        // (both lookups are random accesses into large arrays): the new index of each user,
        // then the segment updates.
        let mut block: Vec<(u32, u32)> = Vec::with_capacity(buf.len() / 8);
        const AHEAD: usize = 8;
        while left > 0 {
            let take = left.min(buf.len() / 8);
            let bytes = &mut buf[..take * 8];
            read_exact(&mut r, bytes, path)?;
            block.clear();
            let old_of = |e: &[u8]| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize;
            for e in bytes.chunks_exact(8).take(AHEAD) {
                self.remap.prefetch(old_of(e));
            }
            for (k, e) in bytes.chunks_exact(8).enumerate() {
                if let Some(next) = bytes.get((k + AHEAD) * 8..(k + AHEAD + 1) * 8) {
                    self.remap.prefetch(old_of(next));
                }
                let bucket = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                // A user missing from the dictionary was erased (deleted) while the snapshot
                // was being written: the deletion is in the log after the snapshot's offset and
                // is replayed, so its membership is dropped here. (Checksums catch corruption.)
                match self.remap.get(old_of(e)) {
                    Some(user) => block.push((user, bucket)),
                    None => skipped += 1,
                }
            }
            for &(user, _) in block.iter().take(AHEAD) {
                seg.prefetch(user);
            }
            for (k, &(user, bucket)) in block.iter().enumerate() {
                if let Some(&(next, _)) = block.get(k + AHEAD) {
                    seg.prefetch(next);
                }
                seg.observe(user, i64::from(bucket));
            }
            left -= take;
        }
        if skipped > 0 {
            tracing::info!(segment = %rec.name, skipped, "skipped memberships of users erased while the snapshot was written");
        }
        Ok((seg, r.into_inner().crc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use userseg_domain::Pair;

    /// Loaded with room for the pairs the log will replay, the member tables take those new
    /// members without growing (no rehash of every entry right after a restart); loaded
    /// without, they grow at once. Counts are the same either way. (Sparse segments: hash
    /// tables; a packed layout grows by small steps without a rehash.)
    #[test]
    fn room_for_the_replay_is_made_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::from_secs(3600).unwrap();
        let now = 1_800_000_000;
        let pair = |i: u32| Pair {
            user_id: format!("user-{i}"),
            segment: format!("seg{}", i % 700),
            ts: now - i64::from(i % 3000),
        };
        let store = MemStore::new(w);
        let first: Vec<Pair> = (0..20_000).map(pair).collect();
        store.apply(&first).unwrap();
        let path = write(&store, dir.path(), 1).unwrap();
        // What the log brings after the snapshot: 10% more members, all new users.
        let replay: Vec<Pair> = (20_000..22_000).map(pair).collect();
        store.apply(&replay).unwrap();
        let want = store.count_all(now);
        let mut grew = Vec::new();
        for more in [0, 2_000] {
            let (loaded, _) = load_with_room(&path, w, more).unwrap();
            let before = loaded.memory().member_bytes;
            loaded.apply(&replay).unwrap();
            assert_eq!(loaded.count_all(now), want, "room {more}");
            grew.push(loaded.memory().member_bytes > before);
        }
        assert_eq!(grew, vec![true, false]);
    }

    #[test]
    fn round_trip_compacts_and_keeps_counts() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::from_secs(3600).unwrap();
        let store = MemStore::new(w);
        let now = 1_800_000_000;
        let mut pairs = Vec::new();
        for i in 0..5000u32 {
            pairs.push(Pair {
                user_id: format!("user-{i}-{}", "é".repeat((i % 5) as usize)),
                segment: format!("seg{}", i % 7),
                ts: now - 3000 + i64::from(i % 3000),
            });
        }
        store.apply(&pairs).unwrap();
        // Users only in expired memberships are dropped from the dictionary on reload.
        store
            .apply(&[Pair {
                user_id: "ghost".into(),
                segment: "seg0".into(),
                ts: now - 3000,
            }])
            .unwrap();
        store.expire(now + 700);
        let path = write(&store, dir.path(), 1234).unwrap();
        let (loaded, offset) = load(&path, w).unwrap();
        assert_eq!(offset, 1234);
        for at in [now, now + 100, now + 700, now + 2000] {
            assert_eq!(loaded.count_all(at), store.count_all(at), "at {at}");
        }
        assert_eq!(loaded.memory().live_pairs, store.memory().live_pairs);
        assert!(loaded.memory().users < store.memory().users);
    }

    #[test]
    fn detects_corruption_and_window_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::from_secs(3600).unwrap();
        let store = MemStore::new(w);
        store
            .apply(&[Pair {
                user_id: "u".into(),
                segment: "s".into(),
                ts: 1_800_000_000,
            }])
            .unwrap();
        let path = write(&store, dir.path(), 7).unwrap();
        assert!(matches!(
            load(&path, Window::from_secs(60).unwrap()),
            Err(SnapshotError::WindowMismatch { .. })
        ));
        let mut bytes = fs::read(&path).unwrap();
        bytes[40] ^= 0xff;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(load(&path, w), Err(SnapshotError::Corrupt { .. })));
    }

    #[test]
    fn round_trip_of_dense_packed_and_table_segments_in_parallel() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::DEFAULT;
        let store = MemStore::new(w);
        let now = 1_800_000_000;
        let pairs: Vec<Pair> = (0..30_000u32)
            .flat_map(|i| {
                let ts = now - i64::from(i % 5000) * 200;
                let mut v = vec![Pair {
                    user_id: format!("user-{i:012}"),
                    segment: "all".into(),
                    ts,
                }];
                if i % 13 == 0 {
                    v.push(Pair {
                        user_id: format!("user-{i:012}"),
                        segment: format!("few{}", i % 4),
                        ts: ts - 7,
                    });
                }
                if i % 5 == 0 {
                    v.push(Pair {
                        user_id: format!("user-{i:012}"),
                        segment: "fifth".into(),
                        ts: ts - 11,
                    });
                }
                v
            })
            .collect();
        store.apply(&pairs).unwrap();
        assert!(super::super::read(&super::super::read(&store.segments)["all"]).is_dense());
        let path = write(&store, dir.path(), 99).unwrap();
        let (loaded, offset) = load(&path, w).unwrap();
        assert_eq!(offset, 99);
        assert!(super::super::read(&super::super::read(&loaded.segments)["all"]).is_dense());
        for s in [&store, &loaded] {
            let segs = super::super::read(&s.segments);
            assert!(super::super::read(&segs["fifth"]).is_packed());
            assert!(!super::super::read(&segs["few0"]).is_packed());
        }
        for at in [now, now + 100_000, now + 1_000_000, now + 1_300_000] {
            assert_eq!(loaded.count_all(at), store.count_all(at), "at {at}");
        }
        assert_eq!(loaded.memory().live_pairs, store.memory().live_pairs);
        // Applying the same pairs again changes nothing; newer ones count as in the original.
        loaded.apply(&pairs).unwrap();
        assert_eq!(loaded.count_all(now), store.count_all(now));
    }

    #[test]
    fn every_flipped_byte_and_truncation_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::from_secs(3600).unwrap();
        let store = MemStore::new(w);
        let now = 1_800_000_000;
        let pairs: Vec<Pair> = (0..40u32)
            .map(|i| Pair {
                user_id: format!("u{i}"),
                segment: format!("s{}", i % 3),
                ts: now - i64::from(i),
            })
            .collect();
        store.apply(&pairs).unwrap();
        let path = write(&store, dir.path(), 3).unwrap();
        let good = fs::read(&path).unwrap();
        let bad = dir.path().join("bad.snap");
        for i in 0..good.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bytes = good.clone();
                bytes[i] ^= flip;
                fs::write(&bad, &bytes).unwrap();
                assert!(
                    matches!(
                        load(&bad, w),
                        Err(SnapshotError::Corrupt { .. } | SnapshotError::WindowMismatch { .. })
                    ),
                    "byte {i} ^ {flip:#x}"
                );
            }
        }
        for n in 0..good.len() {
            fs::write(&bad, &good[..n]).unwrap();
            assert!(
                matches!(load(&bad, w), Err(SnapshotError::Corrupt { .. })),
                "first {n} bytes"
            );
        }
    }

    #[test]
    fn newer_snapshot_replaces_older() {
        let dir = tempfile::tempdir().unwrap();
        let w = Window::from_secs(3600).unwrap();
        let store = MemStore::new(w);
        write(&store, dir.path(), 1).unwrap();
        write(&store, dir.path(), 5).unwrap();
        let snaps = list(dir.path()).unwrap();
        assert_eq!(snaps.len(), 1);
        assert_eq!(snaps[0].0, 5);
        assert_eq!(load_latest(dir.path(), w).unwrap().unwrap().1, 5);
    }
}
