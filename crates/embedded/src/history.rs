//! Segment count history in `DATA_DIR/history`: one append-only file per UTC day of ticks.
//!
//! Records are framed like the write-ahead log (len u32 LE, crc32 u32 LE, payload). Payloads:
//! - names (tag 1): varint n, then n × (varint id, varint len, name): ids local to the file,
//!   written before the first sample that uses them;
//! - sample (tag 2): zigzag varint tick, varint n, then n × (varint name id, varint users), the
//!   segments with users at that tick (absent = 0).
//!
//! A sample costs its 8-byte frame, ~8 bytes of tick and count, and per segment a varint id
//! (1–2 bytes) and a varint count (1 byte below 128 users, 4 bytes up to 268M): about 4–6 bytes
//! per segment, so 500 segments sampled every minute take ~3.5 MB a day (~120 MB for the
//! default 35 days). Each append is fsynced; a torn tail is cut at open. Memory: 16 bytes per
//! tick for the index (50,400 ticks = 0.8 MB at the defaults).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use userseg_domain::UnixSeconds;
use userseg_usecase::{HistoryPoint, HistoryStore, PortError, SegmentCount};

use crate::wal::codec::{read_frame, Frame, FRAME_HEADER};

const DAY: i64 = 86_400;
const TAG_NAMES: u8 = 1;
const TAG_SAMPLE: u8 = 2;

use crate::wal::codec::{get_varint, put_varint};

fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

struct DayFile {
    path: PathBuf,
    file: File,
    len: u64,
    names: HashMap<String, u32>,
    /// (tick, offset of the sample's payload, payload length), ticks increasing.
    ticks: Vec<(UnixSeconds, u64, u32)>,
}

impl DayFile {
    /// The users of name id `id` in the sample at `offset`.
    fn users_at(&self, offset: u64, len: u32, id: u32) -> io::Result<u64> {
        let mut buf = vec![0u8; len as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "bad history sample");
        let mut pos = 1;
        get_varint(&buf, &mut pos).ok_or_else(bad)?;
        let n = get_varint(&buf, &mut pos).ok_or_else(bad)?;
        for _ in 0..n {
            let k = get_varint(&buf, &mut pos).ok_or_else(bad)?;
            let users = get_varint(&buf, &mut pos).ok_or_else(bad)?;
            if k == u64::from(id) {
                return Ok(users);
            }
        }
        Ok(0)
    }
}

struct Inner {
    dir: PathBuf,
    days: BTreeMap<i64, DayFile>,
    /// Ticks before this are pruned (hidden until their file goes).
    min_tick: UnixSeconds,
    /// Bytes appended since open (for the bytes-per-sample figure).
    appended: u64,
}

/// The embedded [`HistoryStore`].
#[derive(Clone)]
pub struct FileHistory(Arc<Mutex<Inner>>);

fn day_name(day: i64) -> String {
    format!("{day:08}.hist")
}

/// Reads one day file: its names and ticks. A bad or torn record ends the file there (it is
/// cut off, with a warning: samples are never acknowledged to anyone).
fn load_day(path: &Path) -> io::Result<DayFile> {
    let data = fs::read(path)?;
    let mut names = HashMap::new();
    let mut ticks = Vec::new();
    let mut pos = 0usize;
    while pos < data.len() {
        let Frame::Ok(payload, n) = read_frame(&data[pos..]) else {
            break;
        };
        let ok = (|| {
            let mut p = 1;
            match *payload.first()? {
                TAG_NAMES => {
                    let k = get_varint(payload, &mut p)?;
                    for _ in 0..k {
                        let id = get_varint(payload, &mut p)? as u32;
                        let len = get_varint(payload, &mut p)? as usize;
                        let name = payload.get(p..p.checked_add(len)?)?;
                        p += len;
                        names.insert(String::from_utf8(name.to_vec()).ok()?, id);
                    }
                }
                TAG_SAMPLE => {
                    let z = get_varint(payload, &mut p)?;
                    let tick = ((z >> 1) as i64) ^ -((z & 1) as i64);
                    if ticks.last().is_some_and(|&(t, _, _)| t >= tick) {
                        return None;
                    }
                    ticks.push(((tick), (pos + FRAME_HEADER) as u64, payload.len() as u32));
                }
                _ => return None,
            }
            Some(())
        })();
        if ok.is_none() {
            break;
        }
        pos += n;
    }
    let file = OpenOptions::new().read(true).append(true).open(path)?;
    if pos < data.len() {
        tracing::warn!(path = %path.display(), at = pos, "cutting a bad or torn record off a history file");
        file.set_len(pos as u64)?;
        file.sync_all()?;
    }
    Ok(DayFile {
        path: path.to_owned(),
        file,
        len: pos as u64,
        names,
        ticks,
    })
}

fn io_port(what: &str, e: io::Error) -> PortError {
    PortError::Transient(format!("history {what}: {e}"))
}

impl FileHistory {
    /// Opens (creating) the history directory and indexes its files.
    pub fn open(dir: &Path) -> io::Result<FileHistory> {
        fs::create_dir_all(dir)?;
        let mut days = BTreeMap::new();
        for e in fs::read_dir(dir)? {
            let e = e?;
            let Some(day) = e
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".hist"))
                .and_then(|n| n.parse::<i64>().ok())
            else {
                continue;
            };
            days.insert(day, load_day(&e.path())?);
        }
        Ok(FileHistory(Arc::new(Mutex::new(Inner {
            dir: dir.to_owned(),
            days,
            min_tick: UnixSeconds::MIN,
            appended: 0,
        }))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes appended since open.
    pub fn appended_bytes(&self) -> u64 {
        self.lock().appended
    }

    fn last(inner: &Inner) -> Option<UnixSeconds> {
        inner
            .days
            .values()
            .rev()
            .find_map(|d| d.ticks.last().map(|t| t.0))
    }

    fn record_blocking(&self, at: UnixSeconds, counts: &[SegmentCount]) -> io::Result<()> {
        let mut inner = self.lock();
        if Self::last(&inner).is_some_and(|t| t >= at) {
            // This tick (or a later one) is recorded: one sample per tick.
            return Ok(());
        }
        let day = at.div_euclid(DAY);
        if !inner.days.contains_key(&day) {
            let path = inner.dir.join(day_name(day));
            let file = OpenOptions::new()
                .create(true)
                .read(true)
                .append(true)
                .open(&path)?;
            crate::store::snapshot::sync_dir(&inner.dir)?;
            inner.days.insert(
                day,
                DayFile {
                    path,
                    file,
                    len: 0,
                    names: HashMap::new(),
                    ticks: Vec::new(),
                },
            );
        }
        let Some(d) = inner.days.get_mut(&day) else {
            return Ok(());
        };
        let mut buf = Vec::new();
        let new: Vec<&str> = counts
            .iter()
            .map(|c| c.segment.as_str())
            .filter(|s| !d.names.contains_key(*s))
            .collect();
        let mut new_ids = Vec::with_capacity(new.len());
        if !new.is_empty() {
            let mut p = vec![TAG_NAMES];
            put_varint(&mut p, new.len() as u64);
            for (i, name) in new.iter().enumerate() {
                let id = (d.names.len() + i) as u32;
                put_varint(&mut p, u64::from(id));
                put_varint(&mut p, name.len() as u64);
                p.extend_from_slice(name.as_bytes());
                new_ids.push((name.to_string(), id));
            }
            frame(&p, &mut buf);
        }
        let id_of = |s: &str| {
            d.names
                .get(s)
                .copied()
                .or_else(|| new_ids.iter().find(|(n, _)| n == s).map(|(_, id)| *id))
        };
        let mut p = vec![TAG_SAMPLE];
        put_varint(&mut p, ((at << 1) ^ (at >> 63)) as u64);
        let present: Vec<(u32, u64)> = counts
            .iter()
            .filter(|c| c.users > 0)
            .filter_map(|c| id_of(&c.segment).map(|id| (id, c.users)))
            .collect();
        put_varint(&mut p, present.len() as u64);
        for (id, users) in present {
            put_varint(&mut p, u64::from(id));
            put_varint(&mut p, users);
        }
        let sample_at = d.len + buf.len() as u64 + FRAME_HEADER as u64;
        let sample_len = p.len() as u32;
        frame(&p, &mut buf);
        if let Err(e) = d.file.write_all(&buf) {
            // A full disk: cut the partial frame back, so the next sample lands where `len`
            // says (the file is opened in append mode).
            let _ = d.file.set_len(d.len);
            return Err(e);
        }
        d.file.sync_data()?;
        d.len += buf.len() as u64;
        d.names.extend(new_ids);
        d.ticks.push((at, sample_at, sample_len));
        inner.appended += buf.len() as u64;
        metrics::counter!("userseg_history_bytes_total").increment(buf.len() as u64);
        Ok(())
    }

    fn read_blocking(
        &self,
        segment: &str,
        from: UnixSeconds,
        to: UnixSeconds,
        step: u64,
    ) -> io::Result<Vec<HistoryPoint>> {
        let inner = self.lock();
        let step = step.max(1) as i128;
        let lo = from.max(inner.min_tick);
        if lo > to {
            // Wholly before what retention keeps (and an empty day range for the map below).
            return Ok(Vec::new());
        }
        let mut out: Vec<HistoryPoint> = Vec::new();
        let mut last_k: Option<i128> = None;
        let first_day = lo.div_euclid(DAY);
        for (_, d) in inner.days.range(first_day..=to.div_euclid(DAY)) {
            let id = d.names.get(segment).copied();
            let start = d.ticks.partition_point(|t| t.0 < lo);
            for &(tick, off, len) in &d.ticks[start..] {
                if tick > to {
                    break;
                }
                let k = (i128::from(tick) - i128::from(from)) / step;
                let users = match id {
                    Some(id) => d.users_at(off, len, id)?,
                    None => 0,
                };
                let p = HistoryPoint { ts: tick, users };
                if last_k == Some(k) {
                    // A later tick of the same step replaces the earlier one.
                    if let Some(x) = out.last_mut() {
                        *x = p;
                    }
                } else {
                    out.push(p);
                    last_k = Some(k);
                }
            }
        }
        Ok(out)
    }

    fn prune_blocking(&self, before: UnixSeconds) -> io::Result<()> {
        let mut inner = self.lock();
        inner.min_tick = inner.min_tick.max(before);
        let gone: Vec<i64> = inner
            .days
            .iter()
            .filter(|(_, d)| d.ticks.last().is_none_or(|t| t.0 < before))
            .map(|(day, _)| *day)
            .filter(|day| (day + 1) * DAY <= before)
            .collect();
        for day in gone {
            if let Some(d) = inner.days.remove(&day) {
                fs::remove_file(&d.path)?;
            }
        }
        Ok(())
    }
}

impl FileHistory {
    async fn blocking<R: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(&FileHistory) -> io::Result<R> + Send + 'static,
    ) -> Result<R, PortError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| PortError::Transient(format!("history task failed: {e}")))?
            .map_err(|e| io_port(what, e))
    }
}

#[async_trait]
impl HistoryStore for FileHistory {
    async fn record(&self, at: UnixSeconds, counts: &[SegmentCount]) -> Result<(), PortError> {
        let counts = counts.to_vec();
        self.blocking("write", move |h| h.record_blocking(at, &counts))
            .await
    }

    async fn read(
        &self,
        segment: &str,
        from: UnixSeconds,
        to: UnixSeconds,
        step: u64,
    ) -> Result<Vec<HistoryPoint>, PortError> {
        let segment = segment.to_owned();
        self.blocking("read", move |h| h.read_blocking(&segment, from, to, step))
            .await
    }

    async fn prune(&self, before: UnixSeconds) -> Result<(), PortError> {
        self.blocking("prune", move |h| h.prune_blocking(before))
            .await
    }

    async fn last_tick(&self) -> Result<Option<UnixSeconds>, PortError> {
        let inner = self.lock();
        Ok(Self::last(&inner).filter(|&t| t >= inner.min_tick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn make() -> Arc<dyn HistoryStore> {
        // Leaked on purpose: the directory must outlive the store within the test.
        let dir = Box::leak(Box::new(tempfile::tempdir().unwrap()));
        Arc::new(FileHistory::open(dir.path()).unwrap())
    }

    userseg_usecase::history_test_suite!(make);

    fn counts(n: usize, users: u64) -> Vec<SegmentCount> {
        (0..n)
            .map(|i| SegmentCount {
                segment: format!("segment-{i:03}"),
                users: users + i as u64,
            })
            .collect()
    }

    #[tokio::test]
    async fn samples_survive_reopen_and_torn_tails() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = 1_800_000_000 / 60 * 60;
        {
            let h = FileHistory::open(dir.path()).unwrap();
            for k in 0..3 {
                h.record(t0 + k * 60, &counts(3, 10 * k as u64))
                    .await
                    .unwrap();
            }
        }
        // A torn append at the tail (a crash mid-write).
        let file = fs::read_dir(dir.path())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&[9, 0, 0, 0, 1, 2]).unwrap();
        drop(f);
        let h = FileHistory::open(dir.path()).unwrap();
        assert_eq!(h.last_tick().await.unwrap(), Some(t0 + 120));
        let pts = h.read("segment-002", t0, t0 + 120, 60).await.unwrap();
        assert_eq!(
            pts,
            vec![
                HistoryPoint { ts: t0, users: 2 },
                HistoryPoint {
                    ts: t0 + 60,
                    users: 12
                },
                HistoryPoint {
                    ts: t0 + 120,
                    users: 22
                }
            ]
        );
        // Appends go on after the cut.
        h.record(t0 + 180, &counts(1, 5)).await.unwrap();
        let h = FileHistory::open(dir.path()).unwrap();
        assert_eq!(
            h.read("segment-000", t0 + 180, t0 + 180, 60).await.unwrap(),
            vec![HistoryPoint {
                ts: t0 + 180,
                users: 5
            }]
        );
    }

    #[tokio::test]
    async fn bytes_per_sample_of_500_segments() {
        let dir = tempfile::tempdir().unwrap();
        let h = FileHistory::open(dir.path()).unwrap();
        let t0 = 1_800_000_000 / 86_400 * 86_400;
        // Zipf-like counts of 500 segments at 10M users.
        let c: Vec<SegmentCount> = (1..=500u64)
            .map(|k| SegmentCount {
                segment: format!("segment-{k:03}"),
                users: 7_300_000 / k,
            })
            .collect();
        h.record(t0, &c).await.unwrap();
        let first = h.appended_bytes();
        for k in 1..=100 {
            h.record(t0 + k * 60, &c).await.unwrap();
        }
        let per_sample = (h.appended_bytes() - first) as f64 / 100.0 / 500.0;
        println!("history: {per_sample:.2} bytes per segment per sample (first tick with names: {first} bytes)");
        assert!(per_sample < 6.0, "{per_sample}");
    }
}
