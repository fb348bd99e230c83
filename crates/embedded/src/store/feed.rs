//! Change detection: the store emits `entered` and `exited` events into the change log as it
//! applies pairs, deletions and the passing of time.
//!
//! The feed keeps one watermark, `exit_lo`: exits have been emitted for every membership whose
//! bucket is at or below it. The invariant, per (user, segment): the feed says "in" (an
//! `entered` without a later `exited`) exactly when the store holds a membership whose bucket
//! is above `exit_lo`. So:
//!
//! - a pair that raises a membership from absent or at/below `exit_lo` to above it emits
//!   `entered` (a refresh of a live membership, or a backfilled pair at/below `exit_lo`, emits
//!   nothing);
//! - the exit tick ([`MemStore::tick_changes`]), run by the clock, raises `exit_lo` to the live
//!   range's low edge and emits `exited`/`expired` for the memberships in between (so an exit
//!   comes within one bucket of `last_seen + window`, plus the tick's period);
//! - a deletion emits `exited`/`deleted` for the user's memberships above `exit_lo`;
//! - sweeps never drop a membership above `exit_lo` without its exit.
//!
//! Detection and the append to the log happen under one lock, so the log holds the events in
//! the order they happened, with the markers recovery needs: after each batch the write-ahead
//! log offset it covers, after each tick the new `exit_lo`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use userseg_domain::{ChangeReason, Pair, UnixSeconds};
use userseg_usecase::{Clock, PortError};

use super::{read, write, MemStore, Segment};
use crate::changes::{EventFrames, EventPrefix, EventSink, FeedSink, FileChangeLog};

pub(crate) struct Feed {
    log: Arc<dyn FeedSink>,
    clock: Arc<dyn Clock>,
    /// Held across detection and the append.
    state: Mutex<State>,
    /// `State::exit_lo`, readable without the lock (expiry sweeps stay at or below it).
    exit_lo: AtomicI64,
}

struct State {
    exit_lo: i64,
    /// Deleted users whose ids the change log still holds, each with the log offset its
    /// deletion's events end at: the checkpointer redacts them ([`MemStore::take_erased`]).
    erased: HashMap<String, u64>,
    /// The buffers a batch's events are encoded in (two: see [`PARALLEL_ENCODE`]), kept
    /// between batches (see [`FileChangeLog::append_bufs`]).
    bufs: [Vec<u8>; 2],
}

/// Largest encoding buffer kept between batches.
const KEEP_BUF: usize = 16 << 20;

/// From this many `entered` events in a batch, the two halves are encoded on two threads.
const PARALLEL_ENCODE: usize = 16_384;

impl State {
    fn frames(&mut self, k: usize) -> EventFrames {
        EventFrames::with_buf(std::mem::take(&mut self.bufs[k]))
    }

    /// Appends `frames`, in order, and the markers to the log; keeps the buffers for the
    /// next batch.
    fn append(
        &mut self,
        log: &dyn FeedSink,
        frames: Vec<EventFrames>,
        covered: Option<u64>,
        exit_lo: Option<i64>,
    ) -> Result<(), PortError> {
        let mut bufs: Vec<Vec<u8>> = frames.into_iter().map(EventFrames::finish).collect();
        let appended = log.append_frames(&mut bufs, covered, exit_lo);
        for (k, buf) in bufs.into_iter().enumerate().take(2) {
            if buf.capacity() <= KEEP_BUF && buf.capacity() > self.bufs[k].capacity() {
                self.bufs[k] = buf;
            }
        }
        appended
    }
}

impl Feed {
    pub(crate) fn exit_lo(&self) -> i64 {
        self.exit_lo.load(Ordering::Acquire)
    }
}

/// The outcome of an append for the store's caller. A transient failure (the disk is full) is
/// not the store's: the store has applied the changes, and the log keeps the failed frames
/// pending and writes them first with the next append, which the exit tick makes at least once
/// a tick. Failing the batch instead would hold every acknowledged pair behind it out of the
/// counts until the disk had room again. A crash before the pending frames are written loses
/// nothing: recovery replays the write-ahead log after the last `covered` marker that reached
/// the log, with detection on.
fn tolerate(appended: Result<(), PortError>) -> Result<(), PortError> {
    match appended {
        Err(PortError::Transient(e)) => {
            tracing::warn!(error = %e, "change log append failed; its events stay pending and are written with the next append");
            Ok(())
        }
        other => other,
    }
}

/// Asks the CPU to fetch the cache line at `p` (a hint: nothing is read).
// The workspace denies unsafe code; a prefetch is a hint that cannot fault.
#[allow(unsafe_code)]
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of the x86_64 baseline, and a prefetch reads nothing (any address
    // is allowed).
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Sorts `positions` (distinct, each below `n`): a pass over a bitmap of the batch when they
/// are many (they are a few sorted runs, one per segment, which a comparison sort pays for
/// more than a bit per pair).
fn in_batch_order(positions: &mut [u32], n: usize) {
    if positions.len() < 256 || positions.len() < n / 64 {
        positions.sort_unstable();
        return;
    }
    let mut bits = vec![0u64; n.div_ceil(64)];
    for &p in positions.iter() {
        bits[p as usize / 64] |= 1 << (p % 64);
    }
    let mut k = 0;
    for (w, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            positions[k] = (w * 64) as u32 + word.trailing_zeros();
            k += 1;
            word &= word - 1;
        }
    }
    debug_assert_eq!(k, positions.len(), "positions are distinct");
}

/// A membership's exit found by a tick or a sweep: (segment, user index, bucket).
type Exit = (Box<str>, u32, i64);

impl MemStore {
    /// Turns change detection on, appending to `log`, with exits emitted up to `exit_lo`.
    /// Returns false if a feed was attached already.
    pub fn attach_feed(
        &self,
        log: Arc<FileChangeLog>,
        clock: Arc<dyn Clock>,
        exit_lo: i64,
    ) -> bool {
        self.attach_sink(log, clock, exit_lo)
    }

    /// Turns change detection on, handing the events to `sink` (the ES index: see
    /// [`EventSink`]), with exits emitted up to `exit_lo`. Returns false if a feed was attached
    /// already.
    pub fn attach_event_sink(&self, sink: EventSink, clock: Arc<dyn Clock>, exit_lo: i64) -> bool {
        self.attach_sink(Arc::new(sink), clock, exit_lo)
    }

    fn attach_sink(&self, log: Arc<dyn FeedSink>, clock: Arc<dyn Clock>, exit_lo: i64) -> bool {
        self.feed
            .set(Feed {
                log,
                clock,
                state: Mutex::new(State {
                    exit_lo,
                    erased: HashMap::new(),
                    bufs: [Vec::new(), Vec::new()],
                }),
                exit_lo: AtomicI64::new(exit_lo),
            })
            .is_ok()
    }

    pub fn has_feed(&self) -> bool {
        self.feed.get().is_some()
    }

    /// The exit watermark for a feed that starts now: memberships already expired at `now`
    /// are "out".
    pub fn initial_exit_lo(&self, now: UnixSeconds) -> i64 {
        self.bucketing.live_range(now).0
    }

    /// [`MemStore::apply`] of pairs read from the write-ahead log up to `through`; with a
    /// feed, their events are appended to the change log, then the `covered` marker.
    pub fn apply_through(&self, pairs: &[Pair], through: Option<u64>) -> Result<(), PortError> {
        let Some(feed) = self.feed.get() else {
            return self.apply(pairs);
        };
        let mut st = feed.state.lock().unwrap_or_else(|e| e.into_inner());
        let detected = self.apply_detect(pairs, Some(st.exit_lo))?;
        let exits = detected.swept.len();
        let swept = self.resolve_exits(detected.swept);
        let mut positions = detected.entered;
        in_batch_order(&mut positions, pairs.len());
        let mut frames = vec![st.frames(0)];
        if positions.len() >= PARALLEL_ENCODE && self.threads > 1 {
            // Two halves in batch order, each with the exits made before its first pair.
            let mid = positions.len() / 2;
            let split = swept.partition_point(|e| e.0 < positions[mid]);
            let mut second = st.frames(1);
            std::thread::scope(|scope| {
                let (positions, swept, second) = (&positions, &swept, &mut second);
                let other = scope.spawn(move || {
                    self.encode_entered(pairs, &positions[mid..], &swept[split..], second)
                });
                self.encode_entered(pairs, &positions[..mid], &swept[..split], &mut frames[0]);
                other
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
            });
            frames.push(second);
        } else {
            self.encode_entered(pairs, &positions, &swept, &mut frames[0]);
        }
        let events: u64 = frames.iter().map(|f| f.events).sum();
        let entered = events - exits as u64;
        metrics::counter!("userseg_changes_events_total", "reason" => "pair").increment(entered);
        if exits > 0 {
            metrics::counter!("userseg_changes_events_total", "reason" => "expired")
                .increment(exits as u64);
        }
        tolerate(st.append(feed.log.as_ref(), frames, through, None))
    }

    /// The `entered` events of the pairs at `positions`, encoded in batch order: the pairs
    /// and their ids lie in memory in that order, so the reads stream (a pair is looked at
    /// again long after its user was interned, when it is no longer in any cache).
    ///
    /// `swept` (exits a sweep made while the batch was applied, sorted by the position of the
    /// pair whose observation made the sweep) are merged in: an exit made at position `p` comes
    /// before the `entered` of position `p` and after those before it, which is the order the
    /// changes happened in for any one membership.
    fn encode_entered(
        &self,
        pairs: &[Pair],
        positions: &[u32],
        swept: &[(u32, String, Box<str>, i64)],
        frames: &mut EventFrames,
    ) {
        frames.buf.reserve(positions.len() * 40);
        let bs = self.bucketing.bucket_secs();
        let wb = self.bucketing.window_buckets();
        let mut swept = swept.iter().peekable();
        let mut exits_until = |frames: &mut EventFrames, p: u32| {
            while let Some((_, id, seg, b)) = swept.next_if(|e| e.0 <= p) {
                frames.push(id, seg, ChangeReason::Expired, (b + wb) * bs, *b);
            }
        };
        // The pairs and their strings are long out of the cache: fetch a later pair `2 *
        // AHEAD` ahead, and the strings of the one `AHEAD` ahead, while this one is encoded.
        const AHEAD: usize = 8;
        // The encoded reason, bucket time and key of the last pair's ts (most pairs of a batch
        // share a few).
        let mut prefix = (i64::MIN, EventPrefix::new(ChangeReason::Pair, 0, 0));
        for (k, &i) in positions.iter().enumerate() {
            exits_until(frames, i);
            if let Some(&j) = positions.get(k + 2 * AHEAD) {
                prefetch(&pairs[j as usize]);
            }
            if let Some(&j) = positions.get(k + AHEAD) {
                let p = &pairs[j as usize];
                prefetch(p.user_id.as_ptr());
                prefetch(p.segment.as_ptr());
            }
            let p = &pairs[i as usize];
            if p.ts != prefix.0 {
                let b = self.bucketing.bucket_of(p.ts);
                prefix = (p.ts, EventPrefix::new(ChangeReason::Pair, b * bs, b));
            }
            frames.push_prefixed(&prefix.1, &p.user_id, &p.segment);
        }
        exits_until(frames, u32::MAX);
    }

    /// Exits of sweeps with their user ids (one scan of the dictionary), sorted by the batch
    /// position that made them.
    fn resolve_exits(
        &self,
        swept: Vec<(Box<str>, u32, i64, u32)>,
    ) -> Vec<(u32, String, Box<str>, i64)> {
        if swept.is_empty() {
            return Vec::new();
        }
        let exits: Vec<Exit> = swept
            .iter()
            .map(|(s, u, b, _)| (s.clone(), *u, *b))
            .collect();
        let mut ids: Vec<Option<String>> = vec![None; exits.len()];
        self.lookup_ids(&exits, |k, id| ids[k] = Some(id.to_string()));
        let mut out: Vec<(u32, String, Box<str>, i64)> = swept
            .into_iter()
            .zip(ids)
            .filter_map(|((seg, _, b, at), id)| Some((at, id?, seg, b)))
            .collect();
        out.sort_by_key(|e| e.0);
        out
    }

    /// Calls `found(k, user id)` for each exit `k` whose user the dictionary holds.
    fn lookup_ids(&self, exits: &[Exit], mut found: impl FnMut(usize, &str)) {
        let mut by_user: HashMap<u32, Vec<usize>> = HashMap::with_capacity(exits.len());
        for (k, (_, u, _)) in exits.iter().enumerate() {
            by_user.entry(*u).or_default().push(k);
        }
        let mut left = by_user.len();
        let mut scratch = Vec::new();
        self.users.scan(&mut scratch, |idx, id| {
            if let Some(ks) = by_user.get(&idx) {
                let id = String::from_utf8_lossy(id);
                for &k in ks {
                    found(k, &id);
                }
                left -= 1;
            }
            left > 0
        });
    }

    /// `exited`/`expired` events of `exits`, user ids looked up in one scan of the dictionary.
    fn encode_exits(&self, exits: Vec<Exit>, frames: &mut EventFrames) {
        if exits.is_empty() {
            return;
        }
        let bs = self.bucketing.bucket_secs();
        let wb = self.bucketing.window_buckets();
        self.lookup_ids(&exits, |k, id| {
            let (seg, _, b) = &exits[k];
            frames.push(id, seg, ChangeReason::Expired, (b + wb) * bs, *b);
        });
    }

    /// Emits the exits due at `now`: raises `exit_lo` to the live range's low edge and drops
    /// (with an `exited`/`expired` event each) the memberships at or below it. Cheap when no
    /// bucket edge passed since the last tick, and for segments whose ring counts no member
    /// in the buckets passed. Returns how many exits were emitted.
    pub fn tick_changes(&self, now: UnixSeconds) -> Result<usize, PortError> {
        let Some(feed) = self.feed.get() else {
            return Ok(0);
        };
        let new_lo = self.bucketing.live_range(now).0;
        if new_lo <= feed.exit_lo() {
            return Ok(0);
        }
        let mut st = feed.state.lock().unwrap_or_else(|e| e.into_inner());
        let exit_lo = st.exit_lo;
        if new_lo <= exit_lo {
            return Ok(0);
        }
        let segments: Vec<(Box<str>, Arc<std::sync::RwLock<Segment>>)> = read(&self.segments)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut exits: Vec<Exit> = Vec::new();
        for (name, seg) in segments {
            {
                let s = read(&seg);
                // The ring counts every member above its low edge: when that edge is at or
                // below `exit_lo` and it counts none in `(exit_lo, new_lo]`, nothing exits.
                let ring = &s.ring;
                if exit_lo >= ring.top() - ring.len() && ring.count_range(exit_lo, new_lo) == 0 {
                    continue;
                }
            }
            write(&seg).expire_with(new_lo, |u, b| {
                if b > exit_lo {
                    exits.push((name.clone(), u, b));
                }
            });
        }
        let n = exits.len();
        let mut frames = st.frames(0);
        self.encode_exits(exits, &mut frames);
        let appended = st.append(feed.log.as_ref(), vec![frames], None, Some(new_lo));
        // Even if the append failed: the exits are in the pending frames, written first next
        // time, and the memberships are gone.
        st.exit_lo = new_lo;
        feed.exit_lo.store(new_lo, Ordering::Release);
        metrics::counter!("userseg_changes_events_total", "reason" => "expired")
            .increment(n as u64);
        tolerate(appended).map(|()| n)
    }

    /// [`MemStore::delete_users`] logged at `through`; with a feed, an `exited`/`deleted`
    /// event for each live membership removed.
    pub fn delete_users_through(
        &self,
        user_ids: &[String],
        through: Option<u64>,
    ) -> Result<usize, PortError> {
        let Some(feed) = self.feed.get() else {
            return Ok(self.delete_users(user_ids));
        };
        let mut st = feed.state.lock().unwrap_or_else(|e| e.into_inner());
        let exit_lo = st.exit_lo;
        let now = feed.clock.now();
        let users: Vec<(&String, u32)> = user_ids
            .iter()
            .filter_map(|id| Some((id, self.users.get(id.as_bytes())?)))
            .collect();
        let mut frames = st.frames(0);
        if !users.is_empty() {
            let segments: Vec<(Box<str>, Arc<std::sync::RwLock<Segment>>)> = read(&self.segments)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            for (name, seg) in segments {
                let mut seg = write(&seg);
                for &(id, u) in &users {
                    if let Some(b) = seg.remove_user(u) {
                        if b > exit_lo {
                            let key = through.map_or(b, |t| t as i64);
                            frames.push(id, &name, ChangeReason::Deleted, now, key);
                        }
                    }
                }
            }
        }
        let found = self.delete_users(user_ids);
        metrics::counter!("userseg_changes_events_total", "reason" => "deleted")
            .increment(frames.events);
        let appended = st.append(feed.log.as_ref(), vec![frames], through, None);
        // Erasure: their ids leave the change log with the next snapshot.
        if let Some(end) = feed.log.erasure_offset() {
            for id in user_ids {
                st.erased.insert(id.clone(), end);
            }
        }
        tolerate(appended).map(|()| found)
    }

    /// Deleted users whose ids the change log may hold (a deletion replayed at start-up
    /// without detection): the next snapshot redacts them up to the current end of the log.
    pub fn note_erased(&self, user_ids: &[String]) {
        if let Some((feed, end)) = self
            .feed
            .get()
            .and_then(|f| Some((f, f.log.erasure_offset()?)))
        {
            let mut st = feed.state.lock().unwrap_or_else(|e| e.into_inner());
            for id in user_ids {
                st.erased.insert(id.clone(), end);
            }
        }
    }

    /// The erased ids to redact from the change log (see [`FileChangeLog::redact`]), handed
    /// over once.
    pub fn take_erased(&self) -> HashMap<String, u64> {
        match self.feed.get() {
            Some(feed) => {
                std::mem::take(&mut feed.state.lock().unwrap_or_else(|e| e.into_inner()).erased)
            }
            None => HashMap::new(),
        }
    }

    /// Hands erased ids back after a redaction failed (retried with the next snapshot).
    pub fn return_erased(&self, ids: HashMap<String, u64>) {
        if let Some(feed) = self.feed.get() {
            let mut st = feed.state.lock().unwrap_or_else(|e| e.into_inner());
            for (id, end) in ids {
                let e = st.erased.entry(id).or_insert(end);
                *e = (*e).max(end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::changes::ChangeLogConfig;
    use rand::{Rng, SeedableRng};
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;
    use userseg_domain::{ChangeEvent, ChangeKind, Window};
    use userseg_usecase::ManualClock;

    const T0: i64 = 1_800_000_000;

    struct Harness {
        store: MemStore,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
        log: Arc<FileChangeLog>,
        /// Where the events not read yet start.
        cursor: crate::changes::Cursor,
    }

    fn harness(window: u64, shards: usize, threads: usize, parallel_min: usize) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(T0));
        let w = Window::from_secs(window).unwrap();
        let store = MemStore::with_parallelism(w, shards, threads, parallel_min);
        let (log, _) = FileChangeLog::open(
            ChangeLogConfig::new(dir.path(), Duration::from_secs(86_400)),
            clock.clone(),
        )
        .unwrap();
        let log = Arc::new(log);
        let lo = store.initial_exit_lo(T0);
        assert!(store.attach_feed(log.clone(), clock.clone(), lo));
        Harness {
            store,
            clock,
            _dir: dir,
            log,
            cursor: crate::changes::Cursor { offset: 0, skip: 0 },
        }
    }

    impl Harness {
        fn new_events(&mut self) -> Vec<ChangeEvent> {
            let mut out = Vec::new();
            loop {
                let b = self.log.read_at(self.cursor, 1000).unwrap();
                self.cursor = crate::changes::parse_cursor(&b.next).unwrap();
                if b.records.is_empty() {
                    return out;
                }
                out.extend(b.records.into_iter().map(|r| r.event));
            }
        }
    }

    /// The ES index's sink gets the same events as the file log, in order, and keeps no
    /// user ids to erase.
    #[test]
    fn an_event_sink_gets_the_events_in_order() {
        let got: Arc<Mutex<Vec<ChangeEvent>>> = Arc::default();
        let sink = {
            let got = got.clone();
            EventSink::new(move |e| got.lock().unwrap().extend(e))
        };
        let clock = Arc::new(ManualClock::new(T0));
        let store = MemStore::new(Window::from_secs(3600).unwrap());
        assert!(store.attach_event_sink(sink, clock.clone(), store.initial_exit_lo(T0)));
        store
            .apply_through(&[pair(1, 1, T0), pair(2, 1, T0), pair(1, 1, T0 + 5)], None)
            .unwrap();
        store
            .delete_users_through(&["u2".to_string()], Some(7))
            .unwrap();
        clock.set(T0 + 3600 + 120);
        assert_eq!(store.tick_changes(clock.now()).unwrap(), 1);
        let got = got.lock().unwrap().clone();
        let kinds: Vec<(String, ChangeReason)> =
            got.iter().map(|e| (e.user_id.clone(), e.reason)).collect();
        assert_eq!(
            kinds,
            vec![
                ("u1".to_string(), ChangeReason::Pair),
                ("u2".to_string(), ChangeReason::Pair),
                ("u2".to_string(), ChangeReason::Deleted),
                ("u1".to_string(), ChangeReason::Expired),
            ]
        );
        assert!(store.take_erased().is_empty());
    }

    fn pair(u: u32, s: u32, ts: i64) -> Pair {
        Pair {
            user_id: format!("u{u}"),
            segment: format!("s{s}"),
            ts,
        }
    }

    #[test]
    fn enter_refresh_backfill_expire_delete() {
        let mut h = harness(600, 4, 1, usize::MAX);
        let bs = h.store.bucketing().bucket_secs();
        assert_eq!(bs, 1);
        h.store.apply_through(&[pair(1, 1, T0)], Some(10)).unwrap();
        let e = h.new_events();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (
                e[0].kind(),
                e[0].user_id.as_str(),
                e[0].segment.as_str(),
                e[0].ts
            ),
            (ChangeKind::Entered, "u1", "s1", T0)
        );
        // A refresh of a live membership, and a backfilled pair already expired: nothing.
        h.store
            .apply_through(
                &[pair(1, 1, T0 - 5), pair(1, 1, T0 + 3), pair(2, 1, T0 - 700)],
                Some(20),
            )
            .unwrap();
        assert!(h.new_events().is_empty());
        assert_eq!(h.store.count("s1", T0), 1);
        // Expiry: the exit comes at ts + window, not before.
        h.clock.set(T0 + 3 + 599);
        h.store.tick_changes(h.clock.now()).unwrap();
        assert!(h.new_events().is_empty());
        h.clock.set(T0 + 3 + 600);
        assert_eq!(h.store.tick_changes(h.clock.now()).unwrap(), 1);
        let e = h.new_events();
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].reason, e[0].ts),
            (ChangeReason::Expired, T0 + 3 + 600)
        );
        // Again (a new membership), then a deletion.
        let now = h.clock.now();
        h.store
            .apply_through(&[pair(1, 1, now), pair(1, 2, now)], Some(30))
            .unwrap();
        assert_eq!(h.new_events().len(), 2);
        h.store
            .delete_users_through(&["u1".into(), "nobody".into()], Some(40))
            .unwrap();
        let e = h.new_events();
        assert_eq!(e.len(), 2);
        assert!(e
            .iter()
            .all(|e| e.reason == ChangeReason::Deleted && e.ts == now));
        // Nothing left to expire for the deleted user.
        h.clock.advance(10_000);
        assert_eq!(h.store.tick_changes(h.clock.now()).unwrap(), 0);
    }

    /// A batch large enough to be encoded in two halves on two threads gives the events of
    /// the one-thread encoding, in the same order: exits a sweep made in either half come
    /// just before the `entered` of the pair that made them.
    #[test]
    fn a_batch_encoded_in_halves_matches_one_thread() {
        let events = |threads: usize| {
            let mut h = harness(600, 4, threads, 1000);
            let users = 30_000u32;
            let first: Vec<Pair> = (0..users).map(|u| pair(u, u % 4, T0)).collect();
            h.store.apply_through(&first, Some(1)).unwrap();
            // Far ahead with no tick: the first pair of each segment sweeps its memberships,
            // which are above the exit watermark, so their exits come with this batch. Segment
            // 3's pairs all come in the second half.
            h.clock.advance(80_000);
            let now = h.clock.now();
            let mut second: Vec<Pair> = (0..30_000u32)
                .map(|k| pair(users + k, k % 3, now))
                .collect();
            second.extend((0..10_000u32).map(|k| pair(2 * users + k, 3, now)));
            h.store.apply_through(&second, Some(2)).unwrap();
            let events = h.new_events();
            let counted = crate::changes::count_all(h._dir.path()).unwrap();
            assert_eq!(counted, events.len() as u64);
            events
        };
        let one = events(1);
        let two = events(2);
        assert!(one.len() > 2 * PARALLEL_ENCODE);
        let kinds = |e: &[ChangeEvent], r| e.iter().filter(|e| e.reason == r).count();
        assert_eq!(kinds(&one, ChangeReason::Expired), 30_000);
        assert_eq!(kinds(&one, ChangeReason::Pair), 70_000);
        // Segment 3's exits come after the first entered events of the second batch, in the
        // second half.
        let first_s3_exit = one
            .iter()
            .position(|e| e.reason == ChangeReason::Expired && e.segment == "s3")
            .unwrap();
        assert!(first_s3_exit > 30_000 + 20_000, "{first_s3_exit}");
        assert!(one == two, "the two encodings differ");
    }

    /// Random workloads against a brute-force model of exact times: every enter and exit is
    /// emitted once, in a valid order, none spurious; exits come within one bucket of
    /// `last_seen + window` (plus the clock step between ticks); event times are right.
    #[test]
    fn random_workloads_match_the_model() {
        for seed in 0..16u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let window = [120u64, 600, 7200, 14 * 86_400][seed as usize % 4];
            let w = window as i64;
            let (shards, threads, min) =
                [(1, 1, usize::MAX), (4, 2, 8), (4, 3, 1)][seed as usize % 3];
            let mut h = harness(window, shards, threads, min);
            let bs = h.store.bucketing().bucket_secs();
            // Exact latest ts per membership, and the feed's view from the events.
            let mut latest: BTreeMap<(String, String), i64> = BTreeMap::new();
            let mut tops: HashMap<String, i64> = HashMap::new();
            let mut inside: BTreeSet<(String, String)> = BTreeSet::new();
            let mut last_tick = T0;
            let mut through = 0u64;
            for step in 0..300 {
                let now = h.clock.now();
                match rng.random_range(0..11) {
                    10 => {
                        // The clock jumps with no tick (as over a restart), sometimes past the
                        // sweep of the modular codes: the next pairs sweep memberships whose
                        // exits are not emitted yet, so the apply emits them.
                        h.clock.advance(rng.random_range(1..=70_000 * bs));
                        last_tick = i64::MIN / 2;
                        continue;
                    }
                    0..=4 => {
                        let n = rng.random_range(1..40);
                        let batch: Vec<Pair> = (0..n)
                            .map(|_| {
                                let back = match rng.random_range(0..10) {
                                    0 => rng.random_range(0..2 * w),
                                    1 => -rng.random_range(0..300),
                                    _ => rng.random_range(0..w / 4 + 1),
                                };
                                pair(rng.random_range(0..30), rng.random_range(0..4), now - back)
                            })
                            .collect();
                        through += 1;
                        h.store.apply_through(&batch, Some(through)).unwrap();
                        // The store keeps a pair unless it is older than its segment's ring
                        // (then it was expired when it came): so does the model.
                        for p in &batch {
                            let b = h.store.bucketing().bucket_of(p.ts);
                            let top = tops.entry(p.segment.clone()).or_insert(b);
                            *top = (*top).max(b);
                            if b <= *top - h.store.ring_len {
                                continue;
                            }
                            let e = latest
                                .entry((p.user_id.clone(), p.segment.clone()))
                                .or_insert(p.ts);
                            *e = (*e).max(p.ts);
                        }
                    }
                    5 => {
                        let u = format!("u{}", rng.random_range(0..30));
                        through += 1;
                        h.store
                            .delete_users_through(std::slice::from_ref(&u), Some(through))
                            .unwrap();
                        latest.retain(|(uu, _), _| *uu != u);
                    }
                    6 => {
                        h.store.expire(now);
                    }
                    _ => {
                        // Time passes by a bucket or less most often, sometimes by a lot.
                        let dt = if rng.random_bool(0.8) {
                            rng.random_range(1..=bs)
                        } else {
                            rng.random_range(1..2 * w)
                        };
                        h.clock.advance(dt);
                        let now = h.clock.now();
                        h.store.tick_changes(now).unwrap();
                        for e in h.new_events() {
                            if e.reason == ChangeReason::Expired {
                                let key = (e.user_id.clone(), e.segment.clone());
                                let t = latest[&key];
                                let due = t + w;
                                assert!(
                                    (e.ts - due).abs() < bs,
                                    "seed {seed} step {step}: exit ts {} vs due {due}",
                                    e.ts
                                );
                                assert!(
                                    due < now + bs,
                                    "seed {seed} step {step}: exit before its time"
                                );
                                assert!(due > last_tick - 2 * bs, "seed {seed} step {step}: exit due at {due} was late (previous tick {last_tick})");
                            }
                            replay(&mut inside, &e, seed, step);
                        }
                        last_tick = now;
                        // Against exact times, away from the bucket edge.
                        for (key, &t) in &latest {
                            let live_far = t + w > now + bs && t <= now + 300;
                            let dead_far = t + w <= now - bs;
                            if live_far && t + w > now + bs && t >= now - w + bs {
                                // Live now; it was live when it arrived unless backfilled
                                // past its expiry, which `t + w > now` rules out.
                                assert!(inside.contains(key), "seed {seed} step {step}: {key:?} (ts {t}) is live at {now} but the feed says out");
                            }
                            if dead_far {
                                assert!(!inside.contains(key), "seed {seed} step {step}: {key:?} (ts {t}) expired before {now} but the feed says in");
                            }
                        }
                        for key in &inside {
                            assert!(
                                latest.contains_key(key),
                                "seed {seed} step {step}: {key:?} is in the feed but deleted"
                            );
                        }
                        continue;
                    }
                }
                for e in h.new_events() {
                    replay(&mut inside, &e, seed, step);
                }
                // The store's own invariant: in the feed iff held above the watermark.
                let exit_lo = h.store.feed.get().unwrap().exit_lo();
                assert_eq!(
                    inside,
                    held_above(&h.store, exit_lo),
                    "seed {seed} step {step}"
                );
            }
        }
    }

    /// The (user, segment) memberships the store holds with a bucket above `exit_lo`.
    fn held_above(store: &MemStore, exit_lo: i64) -> BTreeSet<(String, String)> {
        let mut ids = HashMap::new();
        store.users.for_each(|u, id| {
            ids.insert(u, String::from_utf8_lossy(id).into_owned());
        });
        let mut out = BTreeSet::new();
        for (name, seg) in read(&store.segments).iter() {
            read(seg).for_each(|u, b| {
                if b > exit_lo {
                    out.insert((ids[&u].clone(), name.to_string()));
                }
            });
        }
        out
    }

    fn replay(inside: &mut BTreeSet<(String, String)>, e: &ChangeEvent, seed: u64, step: usize) {
        let key = (e.user_id.clone(), e.segment.clone());
        match e.kind() {
            ChangeKind::Entered => assert!(
                inside.insert(key),
                "seed {seed} step {step}: entered twice: {e:?}"
            ),
            ChangeKind::Exited => assert!(
                inside.remove(&key),
                "seed {seed} step {step}: exited without entering: {e:?}"
            ),
        }
    }
}
