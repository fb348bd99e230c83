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
//! dictionary.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::{MemStore, Members, Segment, UserDict};
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
    WindowMismatch { path: PathBuf, found: u64, want: u64 },
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

/// Writes a snapshot of `store` covering every log record before `offset`, atomically
/// (temporary file, fsync, rename, fsync of the directory), then removes older snapshots.
pub fn write(store: &MemStore, dir: &Path, offset: u64) -> Result<PathBuf, SnapshotError> {
    let path = dir.join(snapshot_name(offset));
    let tmp = dir.join(format!("{}.tmp", snapshot_name(offset)));
    let io_err = |source| SnapshotError::Io {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(dir).map_err(io_err)?;
    let file = File::create(&tmp).map_err(io_err)?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        written: 0,
    };
    let b = store.bucketing();
    w.write_all(MAGIC).map_err(io_err)?;
    w.write_all(&(b.bucket_secs() as u64).to_le_bytes())
        .map_err(io_err)?;
    w.write_all(&store.window().secs().to_le_bytes())
        .map_err(io_err)?;
    w.write_all(&offset.to_le_bytes()).map_err(io_err)?;

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
            entries.extend(seg.members.iter().map(|(u, b)| (*u, *b)));
            seg.ring.top()
        };
        if entries.is_empty() {
            continue;
        }
        w.write_all(&[1]).map_err(io_err)?;
        w.write_all(&(name.len() as u16).to_le_bytes())
            .map_err(io_err)?;
        w.write_all(name.as_bytes()).map_err(io_err)?;
        w.write_all(&top.to_le_bytes()).map_err(io_err)?;
        w.write_all(&(entries.len() as u64).to_le_bytes())
            .map_err(io_err)?;
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
            w.write_all(&buf).map_err(io_err)?;
        }
    }
    w.write_all(&[0]).map_err(io_err)?;
    let seg_crc = std::mem::take(&mut w.crc).finalize();
    let dict_offset = w.written;
    {
        let users = store.users.lock().unwrap_or_else(|e| e.into_inner());
        let count: u64 = referenced.iter().map(|w| u64::from(w.count_ones())).sum();
        w.write_all(&count.to_le_bytes()).map_err(io_err)?;
        for (word_idx, word) in referenced.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let bit = bits.trailing_zeros();
                bits &= bits - 1;
                let idx = (word_idx * 64) as u32 + bit;
                let id = users.get(idx);
                w.write_all(&idx.to_le_bytes()).map_err(io_err)?;
                w.write_all(&(id.len() as u16).to_le_bytes())
                    .map_err(io_err)?;
                w.write_all(id).map_err(io_err)?;
            }
        }
    }
    let dict_crc = std::mem::take(&mut w.crc).finalize();
    w.write_all(&dict_offset.to_le_bytes()).map_err(io_err)?;
    w.write_all(&seg_crc.to_le_bytes()).map_err(io_err)?;
    w.write_all(&dict_crc.to_le_bytes()).map_err(io_err)?;
    w.write_all(END_MAGIC).map_err(io_err)?;
    let file = w
        .inner
        .into_inner()
        .map_err(|e| io_err(e.into_error()))?;
    file.sync_all().map_err(io_err)?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io_err)?;
    sync_dir(dir).map_err(io_err)?;
    for (old, p) in list(dir).map_err(io_err)? {
        if old < offset {
            let _ = fs::remove_file(p);
        }
    }
    Ok(path)
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
pub fn load_latest(dir: &Path, window: Window) -> Result<Option<(MemStore, u64)>, SnapshotError> {
    let io_err = |source| SnapshotError::Io {
        path: dir.to_owned(),
        source,
    };
    let Some((_, path)) = list(dir).map_err(io_err)?.pop() else {
        return Ok(None);
    };
    load(&path, window).map(Some)
}

pub fn load(path: &Path, window: Window) -> Result<(MemStore, u64), SnapshotError> {
    let corrupt = |reason: String| SnapshotError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let io_err = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len < 32 + FOOTER_LEN {
        return Err(corrupt(format!("only {len} bytes")));
    }
    file.seek(SeekFrom::Start(len - FOOTER_LEN))
        .map_err(io_err)?;
    let mut footer = [0u8; FOOTER_LEN as usize];
    read_exact(&mut file, &mut footer, path)?;
    let dict_offset = u64::from_le_bytes(footer[0..8].try_into().unwrap_or_default());
    let seg_crc = u32::from_le_bytes(footer[8..12].try_into().unwrap_or_default());
    let dict_crc = u32::from_le_bytes(footer[12..16].try_into().unwrap_or_default());
    if &footer[16..24] != END_MAGIC {
        return Err(corrupt("missing end marker".into()));
    }
    if dict_offset < 32 || dict_offset > len - FOOTER_LEN {
        return Err(corrupt(format!("bad dictionary offset {dict_offset}")));
    }

    // Dictionary first: it gives the new, compacted index of every referenced user.
    file.seek(SeekFrom::Start(dict_offset)).map_err(io_err)?;
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, (&mut file).take(len - FOOTER_LEN - dict_offset)),
        crc: crc32fast::Hasher::new(),
    };
    let count = u64_at(&mut r, path)?;
    let mut dict = UserDict::with_capacity(count as usize, 0);
    let mut remap: Vec<u32> = Vec::new();
    let mut id = Vec::with_capacity(256);
    for _ in 0..count {
        let mut head = [0u8; 6];
        read_exact(&mut r, &mut head, path)?;
        let old = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let n = u16::from_le_bytes([head[4], head[5]]) as usize;
        id.resize(n, 0);
        read_exact(&mut r, &mut id, path)?;
        if std::str::from_utf8(&id).is_err() {
            return Err(corrupt(format!("user {old} is not UTF-8")));
        }
        let new = dict
            .intern(&id)
            .ok_or_else(|| corrupt("too many users".into()))?;
        if old >= remap.len() {
            remap.resize(old + 1, u32::MAX);
        }
        remap[old] = new;
    }
    if r.crc.finalize() != dict_crc {
        return Err(corrupt("dictionary checksum mismatch".into()));
    }

    file.seek(SeekFrom::Start(0)).map_err(io_err)?;
    let mut r = CrcReader {
        inner: BufReader::with_capacity(1 << 20, (&mut file).take(dict_offset)),
        crc: crc32fast::Hasher::new(),
    };
    let mut magic = [0u8; 8];
    read_exact(&mut r, &mut magic, path)?;
    if &magic != MAGIC {
        return Err(corrupt("not a userseg snapshot".into()));
    }
    let _bucket_secs = u64_at(&mut r, path)?;
    let window_secs = u64_at(&mut r, path)?;
    if window_secs != window.secs() {
        return Err(SnapshotError::WindowMismatch {
            path: path.to_owned(),
            found: window_secs,
            want: window.secs(),
        });
    }
    let offset = u64_at(&mut r, path)?;
    let store = MemStore::new(window);
    let mut buf = vec![0u8; 8 << 16];
    loop {
        let mut tag = [0u8; 1];
        read_exact(&mut r, &mut tag, path)?;
        match tag[0] {
            0 => break,
            1 => {}
            t => return Err(corrupt(format!("unknown record tag {t}"))),
        }
        let mut nl = [0u8; 2];
        read_exact(&mut r, &mut nl, path)?;
        let mut name = vec![0u8; u16::from_le_bytes(nl) as usize];
        read_exact(&mut r, &mut name, path)?;
        let name = String::from_utf8(name).map_err(|_| corrupt("segment name not UTF-8".into()))?;
        let top = u64_at(&mut r, path)? as i64;
        let n = u64_at(&mut r, path)? as usize;
        let mut seg = Segment::new(store.ring_len);
        seg.members = Members::with_capacity_and_hasher(n, Default::default());
        seg.ring.advance(top);
        let mut left = n;
        while left > 0 {
            let take = left.min(1 << 16);
            let bytes = &mut buf[..take * 8];
            read_exact(&mut r, bytes, path)?;
            for e in bytes.chunks_exact(8) {
                let old = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize;
                let bucket = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
                let user = *remap
                    .get(old)
                    .filter(|u| **u != u32::MAX)
                    .ok_or_else(|| corrupt(format!("membership of unknown user {old}")))?;
                seg.observe(user, i64::from(bucket));
            }
            left -= take;
        }
        super::write(&store.segments).insert(name.into(), Arc::new(RwLock::new(seg)));
    }
    if r.crc.finalize() != seg_crc {
        return Err(corrupt("segment checksum mismatch".into()));
    }
    *store.users.lock().unwrap_or_else(|e| e.into_inner()) = dict;
    Ok((store, offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use userseg_domain::Pair;

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
