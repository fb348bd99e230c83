//! The embedded segment store: exact, in memory, made durable by the write-ahead log plus
//! periodic snapshots (see [`crate::checkpoint`]).
//!
//! Layout: user ids are interned into dense `u32`s ([`dict::UserDict`]); each segment maps
//! user index → bucket of the latest ts as a 2-byte code ([`members`], by the share of the
//! users it spans that it holds: a 6-byte-slot open-addressing table for sparse segments, a
//! packed bitmap-rank layout (a bit per user index, the codes of the members in key order) for
//! the middle, a dense array of codes indexed by user for segments holding nearly all), and
//! keeps a [`ring::Ring`] of member counts per bucket with the window sum cached, so an
//! estimate is O(1) at the time of the latest data and never touches the memberships.

mod analytics;
mod catchup;
mod dict;
pub(crate) mod feed;
mod hint;
mod members;
mod ring;
pub mod snapshot;

use std::collections::HashMap as StdHashMap;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Barrier, RwLock};

use async_trait::async_trait;
use foldhash::fast::FixedState;
use userseg_domain::{Bucketing, Pair, UnixSeconds, Window};
use userseg_usecase::{Mode, PortError, SegmentCount, SegmentCounter, SegmentWriter};

pub use dict::{UserDict, Users};
use members::{Code, Coder, Layout, Repr};
use ring::Ring;

/// Memberships with `u16` codes when the ring leaves enough room below `u16::MAX` for sweeps to
/// be rare (windows up to about 34 days at 60 s buckets), else `u32` codes.
pub(crate) enum Members {
    Narrow(Repr<u16>),
    Wide(Repr<u32>),
}

/// Buckets the top may move between two sweeps for codes of modulus `C::M`.
fn sweep_gap<C: Code>(ring_len: i64) -> i64 {
    C::M - ring_len
}

fn narrow_fits(ring_len: i64) -> bool {
    sweep_gap::<u16>(ring_len) >= 1 << 14
}

pub(crate) struct Segment {
    pub(crate) members: Members,
    pub(crate) ring: Ring,
    /// Codes are relative to the ring top.
    coder: Coder,
    /// Ring top at the last sweep: every entry's bucket is above `epoch - ring.len()`, so codes
    /// stay unambiguous while the top is below `epoch + sweep_gap`.
    epoch: i64,
}

/// What an observation changed: `None` nothing (not newer), `Some(None)` a new membership,
/// `Some(Some(old))` a membership raised from bucket `old`.
type Observed = Option<Option<i64>>;

#[inline]
fn observe_in<C: Code>(
    repr: &mut Repr<C>,
    ring: &mut Ring,
    coder: Coder,
    user: u32,
    bucket: i64,
) -> Observed {
    let mut change = None;
    repr.upsert(user, |code| match code {
        Some(code) => {
            let old = coder.decode(code);
            if bucket > old {
                if ring.holds(old) {
                    ring.dec(old);
                }
                ring.inc(bucket);
                change = Some(Some(old));
                Some(coder.encode(bucket))
            } else {
                None
            }
        }
        None => {
            ring.inc(bucket);
            change = Some(None);
            Some(coder.encode(bucket))
        }
    });
    change
}

/// Exits found while sweeping: `(user, bucket)` of memberships above `exit_lo` removed by a
/// sweep of the modular codes (only when the exit tick is behind; see `feed`).
pub(crate) struct Swept<'a> {
    pub(crate) exit_lo: i64,
    /// The batch position of the pair being observed (a sweep happens before its insert).
    pub(crate) at: u32,
    /// (user, bucket, batch position of the pair whose observation swept it).
    pub(crate) exits: &'a mut Vec<(u32, i64, u32)>,
}

/// Did an observation make the user live (bucket above `exit_lo`) where it was not?
#[inline]
fn entered(change: Observed, bucket: i64, exit_lo: i64) -> bool {
    match change {
        None => false,
        Some(old) => bucket > exit_lo && old.is_none_or(|o| o <= exit_lo),
    }
}

/// What change detection found in a batch.
#[derive(Default)]
pub(crate) struct Detected {
    /// Positions in the batch of the pairs that made their user enter.
    pub(crate) entered: Vec<u32>,
    /// Memberships above `exit_lo` a sweep removed: (segment, user, bucket, batch position
    /// of the pair whose observation swept it).
    pub(crate) swept: Vec<(Box<str>, u32, i64, u32)>,
}

impl Detected {
    fn add_swept(&mut self, segment: &str, exits: Vec<(u32, i64, u32)>) {
        self.swept.extend(
            exits
                .into_iter()
                .map(|(u, b, at)| (Box::from(segment), u, b, at)),
        );
    }
}

fn expire_in<C: Code>(
    repr: &mut Repr<C>,
    ring: &mut Ring,
    coder: Coder,
    lo: i64,
    mut dropped: impl FnMut(u32, i64),
) -> usize {
    let before = repr.len();
    repr.retain(|u, c| {
        let b = coder.decode(c);
        if b <= lo {
            if ring.holds(b) {
                ring.dec(b);
            }
            dropped(u, b);
            false
        } else {
            true
        }
    });
    before - repr.len()
}

impl Segment {
    #[cfg(test)]
    fn new(ring_len: i64, window_buckets: i64) -> Segment {
        Segment::with_capacity(ring_len, window_buckets, 0, 0, Layout::Auto)
    }

    /// A segment sized for `n` members among users below `universe`.
    fn with_capacity(
        ring_len: i64,
        window_buckets: i64,
        n: usize,
        universe: usize,
        layout: Layout,
    ) -> Segment {
        let ring = Ring::new(ring_len, window_buckets);
        let (members, coder) = if narrow_fits(ring.len()) {
            (
                Members::Narrow(Repr::with_capacity(n, universe, layout)),
                Coder::new::<u16>(ring.top()),
            )
        } else {
            (
                Members::Wide(Repr::with_capacity(n, universe, layout)),
                Coder::new::<u32>(ring.top()),
            )
        };
        Segment {
            members,
            coder,
            epoch: ring.top(),
            ring,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match &self.members {
            Members::Narrow(r) => r.len(),
            Members::Wide(r) => r.len(),
        }
    }

    /// Moves the ring top up to `bucket`, first sweeping out entries whose codes could become
    /// ambiguous (they are below the new ring anyway).
    fn advance(&mut self, bucket: i64, mut swept: Option<&mut Swept<'_>>) {
        let len = self.ring.len();
        let coder = self.coder;
        let keep_above = bucket - len;
        let mut keep = |u: u32, b: i64| {
            if b > keep_above {
                return true;
            }
            if let Some(s) = swept.as_deref_mut() {
                if b > s.exit_lo {
                    s.exits.push((u, b, s.at));
                }
            }
            false
        };
        match &mut self.members {
            Members::Narrow(r) => {
                if r.len() == 0 {
                    self.epoch = bucket;
                } else if bucket - self.epoch >= sweep_gap::<u16>(len) {
                    r.retain(|u, c| keep(u, coder.decode(c)));
                    self.epoch = bucket;
                }
                self.coder = Coder::new::<u16>(bucket);
            }
            Members::Wide(r) => {
                if r.len() == 0 {
                    self.epoch = bucket;
                } else if bucket - self.epoch >= sweep_gap::<u32>(len) {
                    r.retain(|u, c| keep(u, coder.decode(c)));
                    self.epoch = bucket;
                }
                self.coder = Coder::new::<u32>(bucket);
            }
        }
        self.ring.advance(bucket);
    }

    /// Starts fetching the memory an observation of `user` will touch (see
    /// [`Repr::prefetch`]).
    #[inline]
    fn prefetch(&self, user: u32) {
        match &self.members {
            Members::Narrow(r) => r.prefetch(user),
            Members::Wide(r) => r.prefetch(user),
        }
    }

    /// Records that `user` was seen in bucket `bucket`; keeps the latest.
    #[inline]
    fn observe(&mut self, user: u32, bucket: i64) {
        self.observe_swept(user, bucket, None);
    }

    /// [`Segment::observe`], saying what changed, and handing exits of a sweep to `swept`.
    #[inline]
    pub(crate) fn observe_swept(
        &mut self,
        user: u32,
        bucket: i64,
        swept: Option<&mut Swept<'_>>,
    ) -> Observed {
        if bucket > self.ring.top() {
            self.advance(bucket, swept);
        } else if !self.ring.holds(bucket) {
            // Older than anything the ring holds: expired for every estimate we can be asked.
            return None;
        }
        match &mut self.members {
            Members::Narrow(r) => observe_in(r, &mut self.ring, self.coder, user, bucket),
            Members::Wide(r) => observe_in(r, &mut self.ring, self.coder, user, bucket),
        }
    }

    /// Drops memberships whose bucket is at or below `lo`; returns how many.
    fn expire(&mut self, lo: i64) -> usize {
        self.expire_with(lo, |_, _| {})
    }

    /// [`Segment::expire`], calling `dropped(user, bucket)` for each membership dropped.
    pub(crate) fn expire_with(&mut self, lo: i64, dropped: impl FnMut(u32, i64)) -> usize {
        match &mut self.members {
            Members::Narrow(r) => expire_in(r, &mut self.ring, self.coder, lo, dropped),
            Members::Wide(r) => expire_in(r, &mut self.ring, self.coder, lo, dropped),
        }
    }

    /// Calls `f(user, bucket)` for every membership.
    pub(crate) fn for_each(&self, mut f: impl FnMut(u32, i64)) {
        let coder = self.coder;
        match &self.members {
            Members::Narrow(r) => r.for_each(|u, c| f(u, coder.decode(c))),
            Members::Wide(r) => r.for_each(|u, c| f(u, coder.decode(c))),
        }
    }

    #[cfg(test)]
    fn is_dense(&self) -> bool {
        match &self.members {
            Members::Narrow(r) => r.is_dense(),
            Members::Wide(r) => r.is_dense(),
        }
    }

    #[cfg(test)]
    fn is_packed(&self) -> bool {
        match &self.members {
            Members::Narrow(r) => r.is_packed(),
            Members::Wide(r) => r.is_packed(),
        }
    }

    fn memory_bytes(&self) -> usize {
        let m = match &self.members {
            Members::Narrow(r) => r.memory_bytes(),
            Members::Wide(r) => r.memory_bytes(),
        };
        m + self.ring.memory_bytes()
    }
}

/// Memory held by the store, for the memory-per-pair figure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub live_pairs: u64,
    pub users: u64,
    pub segments: u64,
    pub member_bytes: u64,
    pub dict_bytes: u64,
}

pub struct MemStore {
    window: Window,
    bucketing: Bucketing,
    ring_len: i64,
    pub(crate) users: Users,
    pub(crate) segments: RwLock<StdHashMap<Box<str>, Arc<RwLock<Segment>>>>,
    /// Threads applying a large batch (at most one per dictionary shard).
    threads: usize,
    /// Batches of fewer pairs are applied on the calling thread alone.
    parallel_min: usize,
    /// Deletions applied (see [`MemStore::erasures`]).
    erasures: std::sync::atomic::AtomicU64,
    /// Admits at most [`analytics::HEAVY_QUERIES`] bitset queries at once.
    heavy: Arc<tokio::sync::Semaphore>,
    /// The change feed, once attached (see [`feed`]).
    pub(crate) feed: std::sync::OnceLock<feed::Feed>,
    /// How new segments lay out their memberships.
    layout: Layout,
}

/// Dictionary shards: a power of two, at least the cores we expect to use.
const SHARDS: usize = 4;
/// Below this many pairs a batch is applied on one thread (spawning costs more than it saves).
const PARALLEL_MIN: usize = 4096;
/// Marks a pair that is not applied (its ts is out of range) in the per-pair user indices.
const SKIP: u32 = u32::MAX;

/// Buckets are stored as u32; timestamps before 1970 are treated as expired.
fn bucket_u32(b: i64) -> Option<i64> {
    (0..=i64::from(u32::MAX)).contains(&b).then_some(b)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

fn too_many_users() -> PortError {
    PortError::Permanent("the embedded store holds 2^32 users".into())
}

/// A segment and positions of its pairs in a batch.
type Group<'a> = (&'a str, Vec<u32>);

/// Positions of a batch's pairs grouped by segment, groups in order of first appearance and
/// positions in batch order.
#[derive(Default)]
struct Groups<'a> {
    index: StdHashMap<&'a str, usize, FixedState>,
    groups: Vec<Group<'a>>,
}

impl<'a> Groups<'a> {
    fn group(pairs: &'a [Pair], range: std::ops::Range<usize>) -> Groups<'a> {
        let mut g = Groups::default();
        let mut last: Option<(&str, usize)> = None;
        for i in range {
            let seg = pairs[i].segment.as_str();
            let k = match last {
                Some((name, k)) if name == seg => k,
                _ => {
                    let k = g.slot(seg);
                    last = Some((seg, k));
                    k
                }
            };
            g.groups[k].1.push(i as u32);
        }
        g
    }

    fn slot(&mut self, seg: &'a str) -> usize {
        let groups = &mut self.groups;
        *self.index.entry(seg).or_insert_with(|| {
            groups.push((seg, Vec::new()));
            groups.len() - 1
        })
    }

    /// Appends `other`'s positions (all after ours) to the groups.
    fn merge(&mut self, other: Groups<'a>) {
        for (seg, pos) in other.groups {
            let k = self.slot(seg);
            let mine = &mut self.groups[k].1;
            if mine.is_empty() {
                *mine = pos;
            } else {
                mine.extend_from_slice(&pos);
            }
        }
    }
}

/// How many observations ahead the segment loops prefetch (see [`Lookahead`]).
const AHEAD: usize = 8;

type SegmentGuard<'a> = std::sync::RwLockWriteGuard<'a, Segment>;

/// Walks groups of observations (one segment each, in order) and prefetches the memory of the
/// observation [`AHEAD`] positions ahead, so that the cache and TLB misses into the member
/// tables (GBs at scale: nearly every observation misses) overlap instead of following one
/// another. Near the end of a group it looks into the next group, whose segment it then locks
/// with `try_write` (never waiting while holding a lock, so no lock order is imposed on
/// anyone); when that lock is taken the next group simply starts unprefetched.
struct Lookahead<'a, L, U> {
    segs: &'a [Arc<RwLock<Segment>>],
    /// Observations in group `g`.
    len: L,
    /// The user of observation `k` of group `g` (`None`: not applied).
    user: U,
    /// The next group's segment, locked ahead of time.
    next: Option<(usize, SegmentGuard<'a>)>,
    /// The next group's lock was taken by someone else: do not try again.
    next_busy: bool,
}

impl<'a, L, U> Lookahead<'a, L, U>
where
    L: Fn(usize) -> usize,
    U: Fn(usize, usize) -> Option<u32>,
{
    fn new(segs: &'a [Arc<RwLock<Segment>>], len: L, user: U) -> Self {
        Lookahead {
            segs,
            len,
            user,
            next: None,
            next_busy: false,
        }
    }

    /// Locks group `g`'s segment (taking the guard locked ahead, if any) and prefetches its
    /// first observations.
    fn start(&mut self, g: usize) -> SegmentGuard<'a> {
        let seg = match self.next.take() {
            Some((n, guard)) if n == g => guard,
            other => {
                // Never wait for a lock while holding another.
                drop(other);
                write(&self.segs[g])
            }
        };
        self.next_busy = false;
        for k in 0..AHEAD.min((self.len)(g)) {
            if let Some(u) = (self.user)(g, k) {
                seg.prefetch(u);
            }
        }
        seg
    }

    /// Before observation `k` of group `g` (whose segment is `seg`): prefetches observation
    /// `k + AHEAD`, in this group or the next.
    #[inline]
    fn ahead(&mut self, seg: &Segment, g: usize, k: usize) {
        let len = (self.len)(g);
        let j = k + AHEAD;
        if j < len {
            if let Some(u) = (self.user)(g, j) {
                seg.prefetch(u);
            }
            return;
        }
        let (n, j) = (g + 1, j - len);
        if n >= self.segs.len() || j >= (self.len)(n) || self.next_busy {
            return;
        }
        if self.next.is_none() {
            match self.segs[n].try_write() {
                Ok(guard) => self.next = Some((n, guard)),
                Err(std::sync::TryLockError::Poisoned(e)) => self.next = Some((n, e.into_inner())),
                Err(std::sync::TryLockError::WouldBlock) => {
                    self.next_busy = true;
                    return;
                }
            }
        }
        if let (Some((_, next)), Some(u)) = (&self.next, (self.user)(n, j)) {
            next.prefetch(u);
        }
    }
}

impl MemStore {
    pub fn new(window: Window) -> MemStore {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        MemStore::with_parallelism(window, SHARDS, threads, PARALLEL_MIN)
    }

    /// A store with `shards` dictionary shards (rounded up to a power of two) applying
    /// batches of at least `parallel_min` pairs on up to `threads` threads.
    pub(crate) fn with_parallelism(
        window: Window,
        shards: usize,
        threads: usize,
        parallel_min: usize,
    ) -> MemStore {
        let bucketing = Bucketing::for_window(window);
        let users = Users::new(shards);
        MemStore {
            window,
            bucketing,
            ring_len: bucketing.window_buckets() + bucketing.future_buckets() + 1,
            threads: threads.clamp(1, users.shards()),
            parallel_min: parallel_min.max(1),
            users,
            segments: RwLock::new(StdHashMap::new()),
            erasures: Default::default(),
            heavy: Arc::new(tokio::sync::Semaphore::new(analytics::HEAVY_QUERIES)),
            feed: std::sync::OnceLock::new(),
            layout: Layout::Auto,
        }
    }

    /// A store whose segments use the packed layout whatever their size (tests).
    #[cfg(test)]
    pub(crate) fn packed(window: Window) -> MemStore {
        MemStore {
            layout: Layout::Packed,
            ..MemStore::new(window)
        }
    }

    pub fn window(&self) -> Window {
        self.window
    }

    pub fn bucketing(&self) -> Bucketing {
        self.bucketing
    }

    fn segment(&self, name: &str) -> Arc<RwLock<Segment>> {
        if let Some(s) = read(&self.segments).get(name) {
            return s.clone();
        }
        write(&self.segments)
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(RwLock::new(Segment::with_capacity(
                    self.ring_len,
                    self.bucketing.window_buckets(),
                    0,
                    0,
                    self.layout,
                )))
            })
            .clone()
    }

    /// Applies pairs: idempotent, order-independent (the latest ts per membership wins).
    ///
    /// Large batches use several threads: the users are interned shard by shard in parallel,
    /// then the segments are updated in parallel; each segment still sees its pairs in batch
    /// order, so the result is the same as on one thread.
    pub fn apply(&self, pairs: &[Pair]) -> Result<(), PortError> {
        self.apply_detect(pairs, None).map(|_| ())
    }

    /// [`MemStore::apply`]; with `detect = Some(exit_lo)` also says which pairs made their
    /// user live (bucket above `exit_lo`) where it was not, and which memberships above
    /// `exit_lo` a sweep removed (see `feed`).
    pub(crate) fn apply_detect(
        &self,
        pairs: &[Pair],
        detect: Option<i64>,
    ) -> Result<Detected, PortError> {
        if pairs.is_empty() {
            return Ok(Detected::default());
        }
        let threads = self.threads.min(pairs.len().div_ceil(self.parallel_min));
        if threads <= 1 || pairs.len() >= SKIP as usize {
            return self.apply_serial(pairs, detect);
        }
        self.apply_parallel(pairs, threads, detect)
    }

    fn apply_serial(&self, pairs: &[Pair], detect: Option<i64>) -> Result<Detected, PortError> {
        // Intern users and group by segment under the dictionary locks.
        let mut group_of: StdHashMap<&str, usize, FixedState> = StdHashMap::default();
        // Per segment: (user, bucket, position in the batch) of its pairs.
        type SegmentPairs = Vec<(u32, i64, u32)>;
        let mut groups: Vec<(&str, SegmentPairs)> = Vec::new();
        {
            let mut users = self.users.lock_all();
            let mut last: Option<(&str, usize)> = None;
            for (i, p) in pairs.iter().enumerate() {
                let Some(bucket) = bucket_u32(self.bucketing.bucket_of(p.ts)) else {
                    continue;
                };
                let user = self
                    .users
                    .intern_in(&mut users, p.user_id.as_bytes())
                    .ok_or_else(too_many_users)?;
                let g = match last {
                    Some((name, g)) if name == p.segment => g,
                    _ => {
                        let g = *group_of.entry(p.segment.as_str()).or_insert_with(|| {
                            groups.push((p.segment.as_str(), Vec::new()));
                            groups.len() - 1
                        });
                        last = Some((&p.segment, g));
                        g
                    }
                };
                groups[g].1.push((user, bucket, i as u32));
            }
        }
        let mut detected = Detected::default();
        let segs: Vec<_> = groups.iter().map(|(name, _)| self.segment(name)).collect();
        let mut ahead = Lookahead::new(&segs, |g| groups[g].1.len(), |g, k| Some(groups[g].1[k].0));
        for (g, (name, members)) in groups.iter().enumerate() {
            let mut seg = ahead.start(g);
            match detect {
                None => {
                    for (k, &(user, bucket, _)) in members.iter().enumerate() {
                        ahead.ahead(&seg, g, k);
                        seg.observe(user, bucket);
                    }
                }
                Some(exit_lo) => {
                    let mut exits = Vec::new();
                    let mut swept = Swept {
                        exit_lo,
                        at: 0,
                        exits: &mut exits,
                    };
                    for (k, &(user, bucket, i)) in members.iter().enumerate() {
                        ahead.ahead(&seg, g, k);
                        swept.at = i;
                        let change = seg.observe_swept(user, bucket, Some(&mut swept));
                        if entered(change, bucket, exit_lo) {
                            detected.entered.push(i);
                        }
                    }
                    detected.add_swept(name, exits);
                }
            }
        }
        Ok(detected)
    }

    /// Two phases on `threads` threads. First each thread hashes the user ids and groups the
    /// positions by segment of its share of the batch, then (after a barrier) interns the
    /// users of its dictionary shards, locking only those. Then the segment groups, balanced
    /// by pair count, are applied in parallel.
    fn apply_parallel(
        &self,
        pairs: &[Pair],
        threads: usize,
        detect: Option<i64>,
    ) -> Result<Detected, PortError> {
        let n = pairs.len();
        let hashes: Vec<std::sync::atomic::AtomicU64> =
            (0..n).map(|_| Default::default()).collect();
        // Per pair: the user index (SKIP if the pair is not applied) and the bucket, compact so
        // that the segment updates read them cheaply.
        let users: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(SKIP)).collect();
        let buckets: Vec<AtomicU32> = (0..n).map(|_| AtomicU32::new(0)).collect();
        let chunk = n.div_ceil(threads);
        let barrier = Barrier::new(threads);
        let shards = self.users.shards();
        let work = |t: usize| -> (Groups<'_>, Result<(), PortError>) {
            let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
            for i in range.clone() {
                let p = &pairs[i];
                if let Some(b) = bucket_u32(self.bucketing.bucket_of(p.ts)) {
                    hashes[i].store(dict::hash_id(p.user_id.as_bytes()), Relaxed);
                    buckets[i].store(b as u32, Relaxed);
                    // Any value but SKIP: to be interned.
                    users[i].store(0, Relaxed);
                }
            }
            let groups = Groups::group(pairs, range);
            barrier.wait();
            let mut guards: Vec<_> = (t..shards)
                .step_by(threads)
                .map(|s| self.users.lock(s))
                .collect();
            let mut mine: Vec<u32> = Vec::with_capacity(n / threads + n / 16);
            for (i, (hash, user)) in hashes.iter().zip(&users).enumerate() {
                // Other threads store indices of their pairs meanwhile: never SKIP either.
                let s = self.users.shard_of(hash.load(Relaxed));
                if s % threads == t && user.load(Relaxed) != SKIP {
                    mine.push(i as u32);
                }
            }
            // Lookups mostly miss the cache (the tables and arenas are far bigger): fetch the
            // table slot `2 * AHEAD` pairs ahead and the entry it points at `AHEAD` ahead, so
            // several misses are in flight at once.
            const AHEAD: usize = 8;
            let touch = |guards: &[std::sync::MutexGuard<'_, UserDict>], k: usize, entry: bool| {
                if let Some(&i) = mine.get(k) {
                    let hash = hashes[i as usize].load(Relaxed);
                    let g = &guards[self.users.shard_of(hash) / threads];
                    if entry {
                        g.touch_entry(hash);
                    } else {
                        g.touch_slot(hash);
                    }
                }
            };
            for k in 0..2 * AHEAD {
                touch(&guards, k, false);
                if k < AHEAD {
                    touch(&guards, k, true);
                }
            }
            for (k, &i) in mine.iter().enumerate() {
                touch(&guards, k + 2 * AHEAD, false);
                touch(&guards, k + AHEAD, true);
                let i = i as usize;
                let hash = hashes[i].load(Relaxed);
                let s = self.users.shard_of(hash);
                let Some(user) = guards[s / threads]
                    .intern_hashed(hash, pairs[i].user_id.as_bytes())
                    .and_then(|local| self.users.global(s, local))
                else {
                    return (groups, Err(too_many_users()));
                };
                users[i].store(user, Relaxed);
            }
            (groups, Ok(()))
        };
        let parts: Vec<(Groups<'_>, Result<(), PortError>)> = std::thread::scope(|scope| {
            let work = &work;
            let handles: Vec<_> = (1..threads).map(|t| scope.spawn(move || work(t))).collect();
            let mut parts = vec![work(0)];
            for h in handles {
                parts.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            }
            parts
        });
        let mut groups = Groups::default();
        for (g, r) in parts {
            r?;
            groups.merge(g);
        }
        let users: Vec<u32> = users.into_iter().map(AtomicU32::into_inner).collect();
        let buckets: Vec<u32> = buckets.into_iter().map(AtomicU32::into_inner).collect();

        // Largest groups first, each to the least loaded thread.
        let mut order: Vec<Group<'_>> = groups.groups;
        order.sort_unstable_by_key(|g| std::cmp::Reverse(g.1.len()));
        let mut bins: Vec<(usize, Vec<Group<'_>>)> =
            (0..threads).map(|_| (0, Vec::new())).collect();
        for g in order {
            if let Some(bin) = bins.iter_mut().min_by_key(|b| b.0) {
                bin.0 += g.1.len();
                bin.1.push(g);
            }
        }
        let apply_bin = |bin: &[Group<'_>]| {
            let mut detected = Detected::default();
            let segs: Vec<_> = bin.iter().map(|(name, _)| self.segment(name)).collect();
            let mut ahead = Lookahead::new(
                &segs,
                |g| bin[g].1.len(),
                |g, k| {
                    let user = users[bin[g].1[k] as usize];
                    (user != SKIP).then_some(user)
                },
            );
            for (g, (name, positions)) in bin.iter().enumerate() {
                let mut seg = ahead.start(g);
                let Some(exit_lo) = detect else {
                    for (k, &i) in positions.iter().enumerate() {
                        ahead.ahead(&seg, g, k);
                        let user = users[i as usize];
                        if user == SKIP {
                            continue;
                        }
                        seg.observe(user, i64::from(buckets[i as usize]));
                    }
                    continue;
                };
                let mut exits = Vec::new();
                let mut swept = Swept {
                    exit_lo,
                    at: 0,
                    exits: &mut exits,
                };
                for (k, &i) in positions.iter().enumerate() {
                    ahead.ahead(&seg, g, k);
                    let user = users[i as usize];
                    if user == SKIP {
                        continue;
                    }
                    let bucket = i64::from(buckets[i as usize]);
                    swept.at = i;
                    let change = seg.observe_swept(user, bucket, Some(&mut swept));
                    if entered(change, bucket, exit_lo) {
                        detected.entered.push(i);
                    }
                }
                detected.add_swept(name, exits);
            }
            detected
        };
        let parts: Vec<Detected> = std::thread::scope(|scope| {
            let apply_bin = &apply_bin;
            let mut rest = bins.iter().filter(|b| !b.1.is_empty());
            let first = rest.next();
            let handles: Vec<_> = rest
                .map(|bin| scope.spawn(move || apply_bin(&bin.1)))
                .collect();
            let mut parts = Vec::new();
            if let Some(bin) = first {
                parts.push(apply_bin(&bin.1));
            }
            for h in handles {
                parts.push(h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)));
            }
            parts
        });
        let mut detected = Detected::default();
        for mut p in parts {
            detected.entered.append(&mut p.entered);
            detected.swept.append(&mut p.swept);
        }
        Ok(detected)
    }

    /// Users in `segment` at `at`.
    pub fn count(&self, segment: &str, at: UnixSeconds) -> u64 {
        let (lo, _) = self.bucketing.live_range(at);
        match read(&self.segments).get(segment) {
            Some(s) => read(s).ring.sum_above(lo),
            None => 0,
        }
    }

    /// Every segment with users at `at`, sorted by name.
    pub fn count_all(&self, at: UnixSeconds) -> Vec<SegmentCount> {
        let (lo, _) = self.bucketing.live_range(at);
        let segments = read(&self.segments);
        let mut out: Vec<SegmentCount> = segments
            .iter()
            .filter_map(|(name, s)| {
                let users = read(s).ring.sum_above(lo);
                (users > 0).then(|| SegmentCount {
                    segment: name.to_string(),
                    users,
                })
            })
            .collect();
        out.sort_unstable_by(|a, b| a.segment.cmp(&b.segment));
        out
    }

    /// Drops memberships expired at `now` (their memory is reclaimed); returns how many.
    pub fn expire(&self, now: UnixSeconds) -> usize {
        let (lo, _) = self.bucketing.live_range(now);
        // With a change feed, only memberships whose exit is already emitted go.
        let lo = self.feed.get().map_or(lo, |f| lo.min(f.exit_lo()));
        let segments: Vec<_> = read(&self.segments).values().cloned().collect();
        let mut dropped = 0;
        for s in segments {
            dropped += write(&s).expire(lo);
        }
        metrics::counter!("userseg_embedded_expired_pairs_total").increment(dropped as u64);
        dropped
    }

    pub fn memory(&self) -> MemoryStats {
        let segments: Vec<_> = read(&self.segments).values().cloned().collect();
        let mut stats = MemoryStats {
            segments: segments.len() as u64,
            ..Default::default()
        };
        for s in segments {
            let s = read(&s);
            stats.live_pairs += s.len() as u64;
            stats.member_bytes += s.memory_bytes() as u64;
        }
        stats.users = self.users.len() as u64;
        stats.dict_bytes = self.users.memory_bytes() as u64;
        stats
    }
}

/// The store as the batch processor's writer and the estimation use case's counter.
#[derive(Clone)]
pub struct EmbeddedStore(pub Arc<MemStore>);

#[async_trait]
impl SegmentWriter for EmbeddedStore {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        self.write_through(pairs, None).await
    }

    async fn write_through(
        &self,
        pairs: Arc<[Pair]>,
        through: Option<u64>,
    ) -> Result<(), PortError> {
        if pairs.len() < 4096 {
            return self.0.apply_through(&pairs, through);
        }
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || store.apply_through(&pairs, through))
            .await
            .map_err(|e| PortError::Transient(format!("apply task failed: {e}")))?
    }

    async fn delete_users(&self, deletion: userseg_domain::UserDeletion) -> Result<(), PortError> {
        self.delete_users_through(deletion, None).await
    }

    async fn delete_users_through(
        &self,
        deletion: userseg_domain::UserDeletion,
        through: Option<u64>,
    ) -> Result<(), PortError> {
        let store = self.0.clone();
        let found = tokio::task::spawn_blocking(move || {
            store.delete_users_through(deletion.user_ids(), through)
        })
        .await
        .map_err(|e| PortError::Transient(format!("delete task failed: {e}")))??;
        tracing::info!(found, "applied a user deletion");
        Ok(())
    }
}

#[async_trait]
impl SegmentCounter for EmbeddedStore {
    async fn count(
        &self,
        segment: &str,
        at: UnixSeconds,
        _mode: Mode,
    ) -> Result<(u64, bool), PortError> {
        Ok((self.0.count(segment, at), true))
    }

    async fn count_all(
        &self,
        at: UnixSeconds,
        _mode: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError> {
        Ok((self.0.count_all(at), true))
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn suite_store(store: MemStore) -> userseg_usecase::store_suite::SuiteStore {
        let s = EmbeddedStore(Arc::new(store));
        userseg_usecase::store_suite::SuiteStore {
            writer: Arc::new(s.clone()),
            counter: Arc::new(s),
        }
    }

    fn suite_analytics(store: MemStore) -> userseg_usecase::analytics_suite::SuiteAnalytics {
        let s = EmbeddedStore(Arc::new(store));
        userseg_usecase::analytics_suite::SuiteAnalytics {
            writer: Arc::new(s.clone()),
            analytics: Arc::new(s),
        }
    }

    async fn make_store(window: Window) -> userseg_usecase::store_suite::SuiteStore {
        suite_store(MemStore::new(window))
    }

    userseg_usecase::store_test_suite!(make_store, seeds = 40, steps = 60);

    async fn make_analytics(window: Window) -> userseg_usecase::analytics_suite::SuiteAnalytics {
        suite_analytics(MemStore::new(window))
    }

    userseg_usecase::analytics_test_suite!(make_analytics, seeds = 30, steps = 50);

    /// The shared suites again, every segment in the packed layout whatever its size: counts,
    /// lookups, lookbacks, expressions, overlaps, exports and deletions over it.
    mod packed_layout {
        use super::*;

        async fn make_store(window: Window) -> userseg_usecase::store_suite::SuiteStore {
            suite_store(MemStore::packed(window))
        }

        userseg_usecase::store_test_suite!(make_store, seeds = 20, steps = 60);

        async fn make_analytics(
            window: Window,
        ) -> userseg_usecase::analytics_suite::SuiteAnalytics {
            suite_analytics(MemStore::packed(window))
        }

        userseg_usecase::analytics_test_suite!(make_analytics, seeds = 20, steps = 50);

        #[test]
        fn every_segment_is_packed() {
            let store = MemStore::packed(Window::DEFAULT);
            store.apply(&[p(1, 1, 1_800_000_000)]).unwrap();
            assert!(read(&read(&store.segments)["s1"]).is_packed());
        }
    }

    fn p(u: u32, s: u32, ts: i64) -> Pair {
        Pair {
            user_id: format!("u{u}"),
            segment: format!("s{s}"),
            ts,
        }
    }

    #[test]
    fn expire_reclaims_without_changing_counts() {
        let w = Window::from_secs(3600).unwrap();
        let store = MemStore::new(w);
        let now = 1_800_000_000;
        let pairs: Vec<Pair> = (0..1000)
            .map(|i| p(i, i % 3, now - (i as i64 * 7 % 7200)))
            .collect();
        // Apply in ts order so nothing is older than the ring when it arrives.
        let mut sorted = pairs.clone();
        sorted.sort_by_key(|p| p.ts);
        store.apply(&sorted).unwrap();
        let before = store.count_all(now);
        let dropped = store.expire(now);
        assert!(dropped > 0);
        assert_eq!(store.count_all(now), before);
        assert_eq!(store.memory().live_pairs, 1000 - dropped as u64);
    }

    /// A model of the store at the bucket level: latest bucket per (user, segment), the ring
    /// top per segment, and the same ring length.
    struct Model {
        ring_len: i64,
        latest: std::collections::HashMap<(u32, u32), i64>,
        top: std::collections::HashMap<u32, i64>,
    }

    impl Model {
        fn observe(&mut self, u: u32, s: u32, b: i64) {
            let top = self.top.entry(s).or_insert(b);
            *top = (*top).max(b);
            if b <= *top - self.ring_len {
                return;
            }
            let e = self.latest.entry((u, s)).or_insert(b);
            *e = (*e).max(b);
        }
        fn expire(&mut self, lo: i64) {
            self.latest.retain(|_, b| *b > lo);
        }
        fn count(&self, s: u32, lo: i64) -> u64 {
            let Some(top) = self.top.get(&s) else {
                return 0;
            };
            let lo = lo.max(top - self.ring_len);
            self.latest
                .iter()
                .filter(|((_, ss), b)| *ss == s && **b > lo)
                .count() as u64
        }
    }

    proptest! {
        /// Counts match the bucket-level model through table/packed/dense switches (many users
        /// per segment) or in the packed layout throughout, expiry, large jumps of time (sweeps of the modular codes) and narrow and
        /// wide codes (short and long windows).
        #[test]
        fn counts_match_model_across_representations(
            packed in any::<bool>(),
            window_pick in 0usize..3,
            users in 1u32..600,
            events in proptest::collection::vec((0u32..600, 0u32..3, 0u8..20, 0i64..1000), 1..1500),
        ) {
            let window = [3600u64, 14 * 86_400, 60 * 86_400][window_pick];
            let w = Window::from_secs(window).unwrap();
            let store = if packed { MemStore::packed(w) } else { MemStore::new(w) };
            let b = store.bucketing();
            let mut model = Model { ring_len: store.ring_len, latest: Default::default(), top: Default::default() };
            let mut now = 1_700_000_000i64;
            let mut batch = Vec::new();
            for (u, s, op, x) in events {
                let u = u % users;
                match op {
                    // Time moves: a little, or by up to ~3 windows and beyond the code modulus.
                    0 => now += x * 37,
                    1 => now += x * (window as i64) / 300,
                    2 => now += 70_000 * 60 * (x % 3),
                    3 => {
                        store.apply(&batch).unwrap();
                        batch.clear();
                        let (lo, _) = b.live_range(now);
                        store.expire(now);
                        model.expire(lo);
                    }
                    _ => {
                        let ts = now - x * (window as i64) / 900;
                        batch.push(p(u, s, ts));
                        model.observe(u, s, b.bucket_of(ts));
                        if batch.len() > 97 {
                            store.apply(&batch).unwrap();
                            batch.clear();
                        }
                    }
                }
                if op == 5 {
                    store.apply(&batch).unwrap();
                    batch.clear();
                    for seg in 0..3u32 {
                        for at in [now, now - 1000, now + 5000] {
                            let (lo, _) = b.live_range(at);
                            prop_assert_eq!(store.count(&format!("s{seg}"), at), model.count(seg, lo));
                        }
                    }
                }
            }
            store.apply(&batch).unwrap();
            // Entries below a segment's ring may be swept early; after expiry none are left.
            store.expire(now);
            model.expire(b.live_range(now).0);
            prop_assert_eq!(store.memory().live_pairs, model.latest.len() as u64);
        }
    }

    /// A large batch through the parallel path (any shard and thread count) gives the same
    /// counts and memberships as applying it pair by pair.
    #[test]
    fn parallel_apply_matches_pair_by_pair() {
        let w = Window::from_secs(3600).unwrap();
        let now = 1_800_000_000i64;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut batches: Vec<Vec<Pair>> = Vec::new();
        for b in 0..3i64 {
            let mut batch: Vec<Pair> = (0..20_000)
                .map(|_| {
                    let r = rnd();
                    // Skewed segments: one big (dense), many small; ts moving forward with
                    // stragglers, some beyond the ring and some before 1970.
                    let seg = if r % 3 == 0 { 0 } else { (r >> 8) % 40 } as u32;
                    let ts = match (r >> 20) % 50 {
                        0 => -5_000,
                        1 => now - 10 * 3600,
                        _ => now + b * 900 - ((r >> 28) % 4000) as i64,
                    };
                    p(((r >> 40) % 15_000) as u32, seg, ts)
                })
                .collect();
            // Runs of the same segment, as producers batch them.
            batch[..3000].sort_by(|a, b| a.segment.cmp(&b.segment));
            batches.push(batch);
        }
        let serial = MemStore::with_parallelism(w, 1, 1, usize::MAX);
        for batch in &batches {
            for pair in batch {
                serial.apply(std::slice::from_ref(pair)).unwrap();
            }
        }
        for (shards, threads, min) in [
            (1, 2, 1),
            (2, 2, 4096),
            (4, 2, 1000),
            (4, 3, 1),
            (8, 4, 100),
        ] {
            let store = MemStore::with_parallelism(w, shards, threads, min);
            for batch in &batches {
                store.apply(batch).unwrap();
            }
            let at = now + 1800;
            for at in [now - 1000, now, at, now + 3000, now + 7000] {
                assert_eq!(
                    store.count_all(at),
                    serial.count_all(at),
                    "{shards}/{threads} at {at}"
                );
            }
            let (m, sm) = (store.memory(), serial.memory());
            assert_eq!((m.live_pairs, m.users), (sm.live_pairs, sm.users));
            // Same memberships, user by user.
            let members = |s: &MemStore| {
                let mut ids: Vec<(u32, Vec<u8>)> = Vec::new();
                s.users.for_each(|g, id| ids.push((g, id.to_vec())));
                let ids: std::collections::HashMap<u32, Vec<u8>> = ids.into_iter().collect();
                let mut out = Vec::new();
                for (name, seg) in read(&s.segments).iter() {
                    read(seg).for_each(|u, b| out.push((name.to_string(), ids[&u].clone(), b)));
                }
                out.sort();
                out
            };
            assert_eq!(members(&store), members(&serial), "{shards}/{threads}");
            // Re-applying changes nothing.
            store.apply(&batches[2]).unwrap();
            assert_eq!(store.count_all(now), serial.count_all(now));
        }
    }

    #[test]
    fn big_segments_go_dense_and_come_back() {
        let w = Window::DEFAULT;
        let store = MemStore::new(w);
        let now = 1_800_000_000;
        let pairs: Vec<Pair> = (0..20_000)
            .map(|i| p(i, if i % 10 == 0 { 1 } else { 0 }, now - i64::from(i) * 50))
            .collect();
        store.apply(&pairs).unwrap();
        let segs = read(&store.segments);
        assert!(read(&segs["s0"]).is_dense());
        assert!(!read(&segs["s1"]).is_dense());
        drop(segs);
        assert_eq!(store.count("s0", now), 18_000);
        // Expire most of s0: it becomes a table again and keeps counting exactly.
        let later = now + (w.secs() as i64) - 60_000;
        store.expire(later);
        let want = (0..20_000i64)
            .filter(|i| i % 10 != 0 && now - i * 50 > later - (w.secs() as i64) + 60)
            .count() as u64;
        assert!(!read(&read(&store.segments)["s0"]).is_dense());
        assert_eq!(store.count("s0", later), want);
    }

    proptest! {
        /// Exact against a brute-force model for any window, with timestamps of any alignment,
        /// within the documented time error of one bucket (checked at times away from bucket
        /// edges of every pair, where the bucketed answer must be exact).
        #[test]
        fn exact_away_from_bucket_edges(
            window in 1u64..200_000,
            events in proptest::collection::vec((0u32..30, 0u32..4, 0i64..400_000, 0i64..400), 1..200),
        ) {
            let w = Window::from_secs(window).unwrap();
            let store = MemStore::new(w);
            let b = store.bucketing();
            let mut model: std::collections::HashMap<(u32, u32), i64> = Default::default();
            let mut now = 1_700_000_000i64;
            for (u, s, dt, back) in events {
                now += dt % 3600;
                // A valid pair at `now`: up to 5 min ahead, never expired.
                let ts = (now - back * (window as i64) / 400).max(now - window as i64 + 1).min(now + 300);
                store.apply(&[p(u, s, ts)]).unwrap();
                let e = model.entry((u, s)).or_insert(ts);
                *e = (*e).max(ts);
                // Ask only where no membership is within one bucket of its expiry edge.
                let at = now;
                let near_edge = model.values().any(|t| (t + window as i64 - at).abs() <= b.bucket_secs());
                if near_edge { continue; }
                for seg in 0..4u32 {
                    let want = model.iter().filter(|((_, ss), t)| *ss == seg && **t > at - window as i64).count() as u64;
                    prop_assert_eq!(store.count(&format!("s{seg}"), at), want);
                }
            }
        }
    }
}
