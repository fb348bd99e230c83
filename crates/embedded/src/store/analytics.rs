//! Analytics on the embedded store: per-user lookup, deletion, counts with a lookback, set
//! expressions, overlap and member export.
//!
//! A set expression or an overlap works on bitsets over the user indices (one bit per interned
//! user: 1.2 MiB at 10M users), one per segment it names, then combines them word by word.
//! A segment's bitset of live members comes from its maintained index when it keeps one (the
//! large segments: see `members.rs`): when the ring's per-bucket counts say every member is
//! live under the query's lookback, the index is that bitset as is; when most are, the index is
//! copied and the members whose bucket code is not live are cleared (a sequential scan that
//! writes only for them). Otherwise the segment is scanned into a zeroed bitset, deciding each
//! membership's liveness from its bucket code. Bitsets are built in parallel, largest segments
//! first; an overlap counts its pairwise intersections block by block of words, so each block
//! of every bitset is read from cache. A per-user lookup probes each segment once. An export
//! scans the user dictionary block by block against the segment's bitset, so its memory is one
//! bitset plus one block whatever the segment's size.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use userseg_domain::{Expr, UnixSeconds, Within};
use userseg_usecase::{Member, Membership, Overlap, PortError, SegmentCount};

use super::members::{Code, Coder, Expiring, Repr};
use super::ring::Ring;
use super::{read, write, MemStore, Members, Segment};

/// Most heavy queries (expressions, overlaps, exports) computing at once; each holds a few
/// bitsets of `users / 8` bytes.
pub(crate) const HEAVY_QUERIES: usize = 2;

/// Bitset words covering user indices below `universe`.
fn words(universe: usize) -> usize {
    universe.div_ceil(64)
}

impl Segment {
    /// The bucket of `user`'s membership, if any.
    pub(crate) fn bucket_of_user(&self, user: u32) -> Option<i64> {
        let coder = self.coder;
        match &self.members {
            Members::Narrow(r) => r.get(user).map(|c| coder.decode(c)),
            Members::Wide(r) => r.get(user).map(|c| coder.decode(c)),
        }
    }

    /// Removes `user`'s membership; returns its bucket if there was one.
    pub(crate) fn remove_user(&mut self, user: u32) -> Option<i64> {
        let coder = self.coder;
        let bucket = match &mut self.members {
            Members::Narrow(r) => r.remove(user).map(|c| coder.decode(c)),
            Members::Wide(r) => r.remove(user).map(|c| coder.decode(c)),
        };
        if let Some(b) = bucket {
            if self.ring.holds(b) {
                self.ring.dec(b);
            }
        }
        bucket
    }

    /// Whether the ring counts every member as above `lo` (then the index, if any, is exactly
    /// the live set), and how many it counts so.
    fn live_above(&self, lo: i64) -> (u64, bool) {
        let live = self.ring.sum_above(lo);
        (live, live == self.len() as u64)
    }

    /// ORs the members whose bucket is above `lo` into `bits`.
    pub(crate) fn fill_bits(&self, lo: i64, bits: &mut [u64]) {
        // A code's bucket is `top - d`, `d = (top_code - code) mod M`: live iff `d < top - lo`.
        let (top_code, k) = self.coder.live_window(lo);
        if k <= 0 {
            return;
        }
        let (live, all) = self.live_above(lo);
        match &self.members {
            Members::Narrow(r) => or_live(r, bits, top_code, k, live > 0 && all),
            Members::Wide(r) => or_live(r, bits, top_code, k, live > 0 && all),
        }
    }

    /// The members whose bucket is above `lo`, as a bitset of `n` words.
    pub(crate) fn live_bits(&self, lo: i64, n: usize) -> Vec<u64> {
        let (top_code, k) = self.coder.live_window(lo);
        if k <= 0 {
            return vec![0; n];
        }
        let (live, all) = self.live_above(lo);
        let mostly = live > 0 && live * 2 >= self.len() as u64;
        let at = Edge {
            coder: self.coder,
            ring: &self.ring,
            lo,
            top_code,
            k,
        };
        match &self.members {
            Members::Narrow(r) => live_bits_in(r, n, &at, all, mostly),
            Members::Wide(r) => live_bits_in(r, n, &at, all, mostly),
        }
    }
}

/// A query's lookback edge on one segment.
struct Edge<'a> {
    coder: Coder,
    ring: &'a Ring,
    lo: i64,
    top_code: i64,
    k: i64,
}

/// Buckets above a query's edge that its list of expiring keys covers: later queries whose
/// edge moved by less find the members expired since in the list.
const EXPIRING_SPAN: i64 = 120;

#[inline]
fn clear_bit(bits: &mut [u64], key: u32) {
    if let Some(w) = bits.get_mut(key as usize / 64) {
        *w &= !(1 << (key % 64));
    }
}

/// Clears from `bits` (a copy of the index) the entries of `r` that are not live at `at`.
///
/// The members that expired since the last sweep are few, and are found among the keys a query
/// listed earlier (those at or below `upto`, a little above that query's edge) when the list
/// is complete: the keys still at or below `upto` and in the ring number as many as the ring
/// counts at or below `upto` (buckets only rise, so a missing key would be one that arrived
/// since with an old bucket, and the counts would differ). Otherwise one scan clears the dead
/// entries and lists the keys at or below `at.lo + EXPIRING_SPAN` for the next queries.
fn clear_expired<C: Code>(r: &Repr<C>, bits: &mut [u64], at: &Edge<'_>) {
    let mut slot = r.expiring().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(list) = slot.as_ref().filter(|l| l.upto >= at.lo) {
        let mut listed = 0u64;
        for &key in &list.keys {
            if let Some(c) = r.get(key) {
                let b = at.coder.decode(c);
                listed += u64::from(b <= list.upto && at.ring.holds(b));
                if !c.live(at.top_code, at.k) {
                    clear_bit(bits, key);
                }
            }
        }
        let in_ring_upto = at.ring.sum_above(i64::MIN) - at.ring.sum_above(list.upto);
        if listed == in_ring_upto {
            return;
        }
    }
    let upto = at.lo.saturating_add(EXPIRING_SPAN);
    let mut keys = Vec::new();
    r.for_each(|key, c| {
        if !c.live(at.top_code, at.k) {
            clear_bit(bits, key);
        }
        if at.coder.decode(c) <= upto {
            keys.push(key);
        }
    });
    keys.shrink_to_fit();
    *slot = Some(Expiring { upto, keys });
}

/// ORs the live entries of `r` into `bits`: its index when `all_live`, else a scan.
fn or_live<C: Code>(r: &Repr<C>, bits: &mut [u64], top_code: i64, k: i64, all_live: bool) {
    match r.index() {
        Some(ix) if all_live => {
            for (a, b) in bits.iter_mut().zip(ix) {
                *a |= b;
            }
        }
        _ => r.fill_bits(bits, top_code, k),
    }
}

/// The live entries of `r` in `n` words: its index when every entry is live, the index less the
/// dead entries when most are live, else a scan.
fn live_bits_in<C: Code>(
    r: &Repr<C>,
    n: usize,
    at: &Edge<'_>,
    all_live: bool,
    mostly_live: bool,
) -> Vec<u64> {
    match r.index() {
        Some(ix) if all_live || mostly_live => {
            // Written once: the index's words, then zeros up to `n`.
            let mut bits = Vec::with_capacity(n);
            bits.extend_from_slice(&ix[..ix.len().min(n)]);
            bits.resize(n, 0);
            if !all_live {
                clear_expired(r, &mut bits, at);
            }
            bits
        }
        _ => {
            let mut bits = vec![0u64; n];
            r.fill_bits(&mut bits, at.top_code, at.k);
            bits
        }
    }
}

fn popcount(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

/// Where an export's members go, chunk by chunk.
struct ExportSink<'a> {
    seg: &'a RwLock<Segment>,
    lo: i64,
    bucket_secs: i64,
    sink: &'a mpsc::Sender<Vec<Member>>,
    sent: u64,
    failed: Option<PortError>,
}

impl ExportSink<'_> {
    /// Sends the pending members that are still live; false once the receiver is gone.
    fn flush(&mut self, pending: &mut Vec<(u32, String)>) -> bool {
        let members: Vec<Member> = {
            let seg = read(self.seg);
            pending
                .drain(..)
                .filter_map(|(u, user_id)| {
                    // Re-checked: the membership may have been deleted since the bitset.
                    let b = seg.bucket_of_user(u).filter(|&b| b > self.lo)?;
                    Some(Member {
                        user_id,
                        last_seen: b * self.bucket_secs,
                    })
                })
                .collect()
        };
        if members.is_empty() {
            return true;
        }
        let n = members.len() as u64;
        if self.sink.blocking_send(members).is_err() {
            self.failed = Some(PortError::Transient(
                "the export's receiver went away".into(),
            ));
            return false;
        }
        self.sent += n;
        true
    }
}

/// A set during expression evaluation: `bits`, or its complement within the universe.
struct Set {
    bits: Vec<u64>,
    negated: bool,
}

fn eval(expr: &Expr, sets: &HashMap<&str, Vec<u64>>, n: usize) -> Set {
    let leaf = |s: &str| sets.get(s).cloned().unwrap_or_else(|| vec![0; n]);
    match expr {
        Expr::Segment(s) => Set {
            bits: leaf(s),
            negated: false,
        },
        Expr::Not(e) => {
            let s = eval(e, sets, n);
            Set {
                bits: s.bits,
                negated: !s.negated,
            }
        }
        // A ∧ ¬B = A \ B; ¬A ∧ ¬B = ¬(A ∨ B).
        Expr::And(items) | Expr::Or(items) => {
            let and = matches!(expr, Expr::And(_));
            let mut pos: Option<Vec<u64>> = None;
            let mut neg: Option<Vec<u64>> = None;
            for e in items {
                let s = eval(e, sets, n);
                // For AND: positives are intersected, negatives' sets united. For OR (by De
                // Morgan): positives united, negatives' sets intersected.
                let (slot, combine_and) = if s.negated {
                    (&mut neg, !and)
                } else {
                    (&mut pos, and)
                };
                match slot {
                    None => *slot = Some(s.bits),
                    Some(acc) => {
                        for (a, b) in acc.iter_mut().zip(&s.bits) {
                            if combine_and {
                                *a &= b;
                            } else {
                                *a |= b;
                            }
                        }
                    }
                }
            }
            match (pos, neg, and) {
                (Some(p), None, _) => Set {
                    bits: p,
                    negated: false,
                },
                (None, Some(q), _) => Set {
                    bits: q,
                    negated: true,
                },
                // AND: P \ N.
                (Some(mut p), Some(q), true) => {
                    for (a, b) in p.iter_mut().zip(&q) {
                        *a &= !b;
                    }
                    Set {
                        bits: p,
                        negated: false,
                    }
                }
                // OR: P ∪ ¬Q = ¬(Q \ P).
                (Some(p), Some(mut q), false) => {
                    for (a, b) in q.iter_mut().zip(&p) {
                        *a &= !b;
                    }
                    Set {
                        bits: q,
                        negated: true,
                    }
                }
                (None, None, _) => Set {
                    bits: vec![0; n],
                    negated: false,
                },
            }
        }
    }
}

/// Runs `f` over `items` on up to `threads` threads, results in item order.
fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks(chunk)
            .skip(1)
            .map(|part| scope.spawn(move || part.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out: Vec<R> = items
            .chunks(chunk)
            .next()
            .unwrap_or(&[])
            .iter()
            .map(f)
            .collect();
        for h in handles {
            match h.join() {
                Ok(part) => out.extend(part),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        out
    })
}

/// Runs `f` over `items` on up to `threads` threads, results in item order; items are taken
/// one at a time in decreasing `cost`, so large and small items balance across the threads.
fn par_map_by_cost<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    cost: impl Fn(&T) -> usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let mut order: Vec<usize> = (0..items.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(cost(&items[i])));
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        while let Some(&i) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
            done.push((i, f(&items[i])));
        }
        done
    };
    let parts: Vec<Vec<(usize, R)>> = std::thread::scope(|scope| {
        let work = &work;
        let handles: Vec<_> = (1..threads).map(|_| scope.spawn(work)).collect();
        let mut parts = vec![work()];
        for h in handles {
            match h.join() {
                Ok(part) => parts.push(part),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        parts
    });
    let mut out: Vec<Option<R>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        out[i] = Some(r);
    }
    out.into_iter().flatten().collect()
}

/// Adds to `both[i * k + j]` (`i <= j`) the common bits of bitsets `i` and `j` in words
/// `from..to`.
#[inline(always)]
fn pair_counts_generic(bits: &[Vec<u64>], from: usize, to: usize, both: &mut [u64]) {
    let k = bits.len();
    for i in 0..k {
        let a = &bits[i][from..to];
        for j in i..k {
            let c = &bits[j][from..to];
            both[i * k + j] += a
                .iter()
                .zip(c)
                .map(|(x, y)| u64::from((x & y).count_ones()))
                .sum::<u64>();
        }
    }
}

/// [`pair_counts_generic`] compiled for AVX2 and POPCNT (the count is most of an overlap's time
/// without a popcount instruction, which the baseline x86-64 target lacks).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,popcnt")]
fn pair_counts_avx2(bits: &[Vec<u64>], from: usize, to: usize, both: &mut [u64]) {
    pair_counts_generic(bits, from, to, both)
}

/// [`pair_counts_generic`], with the CPU's popcount instruction when it has one.
// The workspace denies unsafe code; this is the one call of a function compiled for CPU features
// detected at run time.
#[allow(unsafe_code)]
fn pair_counts(bits: &[Vec<u64>], from: usize, to: usize, both: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("popcnt")
    {
        // SAFETY: the CPU has the features the function is compiled for (detected just above).
        unsafe { pair_counts_avx2(bits, from, to, both) };
        return;
    }
    pair_counts_generic(bits, from, to, both)
}

/// Words per block of an overlap count: small enough that the blocks of 20 bitsets stay in the
/// first-level caches together.
const PAIR_BLOCK: usize = 512;

/// The pairwise common bits of `bits` (all of `n` words), as a `k × k` matrix, counted on up
/// to `threads` threads.
fn pairwise(bits: &[Vec<u64>], n: usize, threads: usize) -> Vec<Vec<u64>> {
    let k = bits.len();
    let blocks: Vec<usize> = (0..n.div_ceil(PAIR_BLOCK)).collect();
    let per_thread = blocks.len().div_ceil(threads.max(1)).max(1);
    let parts = par_map(
        &blocks.chunks(per_thread).collect::<Vec<_>>(),
        threads,
        |mine| {
            let mut both = vec![0u64; k * k];
            for &b in mine.iter() {
                let (from, to) = (b * PAIR_BLOCK, ((b + 1) * PAIR_BLOCK).min(n));
                pair_counts(bits, from, to, &mut both);
            }
            both
        },
    );
    // Upper triangle summed over the parts, mirrored below the diagonal.
    let mut flat = vec![0u64; k * k];
    for p in parts {
        for (a, b) in flat.iter_mut().zip(&p) {
            *a += b;
        }
    }
    (0..k)
        .map(|i| (0..k).map(|j| flat[i.min(j) * k + i.max(j)]).collect())
        .collect()
}

impl MemStore {
    fn lo(&self, at: UnixSeconds, within: Option<Within>) -> i64 {
        let w = within.unwrap_or(Within::full(self.window));
        self.bucketing.live_range_within(at, w).0
    }

    fn segment_opt(&self, name: &str) -> Option<Arc<RwLock<Segment>>> {
        read(&self.segments).get(name).cloned()
    }

    /// The live memberships of `user_id`, sorted by segment. Times are bucket starts.
    pub fn user_segments(&self, user_id: &str, at: UnixSeconds) -> Vec<Membership> {
        let Some(user) = self.users.get(user_id.as_bytes()) else {
            return Vec::new();
        };
        let lo = self.lo(at, None);
        let bs = self.bucketing.bucket_secs();
        let wb = self.bucketing.window_buckets();
        let segments: Vec<(Box<str>, Arc<RwLock<Segment>>)> = read(&self.segments)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out: Vec<Membership> = segments
            .iter()
            .filter_map(|(name, seg)| {
                let b = read(seg).bucket_of_user(user)?;
                (b > lo).then(|| Membership {
                    segment: name.to_string(),
                    last_seen: b * bs,
                    expires_at: (b + wb) * bs,
                })
            })
            .collect();
        out.sort_unstable_by(|a, b| a.segment.cmp(&b.segment));
        out
    }

    /// Users in `segment` under a lookback.
    pub fn count_within(&self, segment: &str, at: UnixSeconds, within: Option<Within>) -> u64 {
        let lo = self.lo(at, within);
        self.segment_opt(segment)
            .map_or(0, |s| read(&s).ring.sum_above(lo))
    }

    /// Every segment with users under a lookback, sorted by name.
    pub fn count_all_within(&self, at: UnixSeconds, within: Option<Within>) -> Vec<SegmentCount> {
        let lo = self.lo(at, within);
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

    /// Bitsets of the live members of each name (all zero for unknown segments), built in
    /// parallel, each of `n` words.
    fn bitsets(&self, names: &[&str], lo: i64, n: usize) -> Vec<Vec<u64>> {
        let segs: Vec<(Option<Arc<RwLock<Segment>>>, usize)> = names
            .iter()
            .map(|s| {
                let seg = self.segment_opt(s);
                let len = seg.as_ref().map_or(0, |s| read(s).len());
                (seg, len)
            })
            .collect();
        par_map_by_cost(
            &segs,
            self.threads,
            |(_, len)| *len,
            |(seg, _)| match seg {
                Some(seg) => read(seg).live_bits(lo, n),
                None => vec![0u64; n],
            },
        )
    }

    /// Users with at least one membership above `lo`.
    fn universe_count(&self, lo: i64, n: usize) -> u64 {
        let segs: Vec<Arc<RwLock<Segment>>> = read(&self.segments).values().cloned().collect();
        let parts = par_map(
            &segs
                .chunks(segs.len().div_ceil(self.threads.max(1)).max(1))
                .collect::<Vec<_>>(),
            self.threads,
            |part| {
                let mut bits = vec![0u64; n];
                for seg in part.iter() {
                    read(seg).fill_bits(lo, &mut bits);
                }
                bits
            },
        );
        let mut all = vec![0u64; n];
        for p in parts {
            for (a, b) in all.iter_mut().zip(&p) {
                *a |= b;
            }
        }
        popcount(&all)
    }

    /// Users the expression selects (exact at bucket precision).
    pub fn count_expr(&self, expr: &Expr, at: UnixSeconds, within: Option<Within>) -> u64 {
        let lo = self.lo(at, within);
        let n = words(self.users.universe());
        let names = expr.segments();
        let bits = self.bitsets(&names, lo, n);
        let sets: HashMap<&str, Vec<u64>> = names.iter().copied().zip(bits).collect();
        let set = eval(expr, &sets, n);
        if set.negated {
            // The set is within the universe (it is made of live memberships).
            self.universe_count(lo, n) - popcount(&set.bits)
        } else {
            popcount(&set.bits)
        }
    }

    /// The pairwise intersections of `segments`.
    pub fn overlap(&self, segments: &[String], at: UnixSeconds, within: Option<Within>) -> Overlap {
        let lo = self.lo(at, within);
        let n = words(self.users.universe());
        let names: Vec<&str> = segments.iter().map(String::as_str).collect();
        let bits = self.bitsets(&names, lo, n);
        let k = bits.len();
        let both = pairwise(&bits, n, self.threads);
        Overlap {
            users: (0..k).map(|i| both[i][i]).collect(),
            both,
        }
    }

    /// Streams the live members of `segment` to `sink` in chunks of at most `chunk` (blocking:
    /// call from a blocking thread). Memory: one bitset and one dictionary block.
    pub fn export_blocking(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: &mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let chunk = chunk.max(1);
        let Some(seg) = self.segment_opt(segment) else {
            return Ok(0);
        };
        let lo = self.lo(at, within);
        let n = words(self.users.universe());
        let bits = read(&seg).live_bits(lo, n);
        let mut left = popcount(&bits);
        if left == 0 {
            return Ok(0);
        }
        let mut out = ExportSink {
            seg: &seg,
            lo,
            bucket_secs: self.bucketing.bucket_secs(),
            sink,
            sent: 0,
            failed: None,
        };
        let mut pending: Vec<(u32, String)> = Vec::with_capacity(chunk);
        let mut buf = Vec::new();
        self.users.scan(&mut buf, |u, id| {
            let (w, bit) = (u as usize / 64, u % 64);
            if bits.get(w).is_some_and(|x| x & (1 << bit) != 0) {
                pending.push((u, String::from_utf8_lossy(id).into_owned()));
                left -= 1;
                if pending.len() >= chunk && !out.flush(&mut pending) {
                    return false;
                }
            }
            // Every member found: the rest of the dictionary holds none.
            left > 0
        });
        if out.failed.is_none() && !pending.is_empty() {
            out.flush(&mut pending);
        }
        match out.failed {
            Some(e) => Err(e),
            None => Ok(out.sent),
        }
    }

    /// Removes every membership of these users and erases their ids from the dictionary, so
    /// that they count nowhere, are listed nowhere, and later snapshots do not hold them.
    /// Returns how many of them the store held.
    pub fn delete_users(&self, user_ids: &[String]) -> usize {
        let found: Vec<u32> = user_ids
            .iter()
            .filter_map(|id| self.users.get(id.as_bytes()))
            .collect();
        if found.is_empty() {
            return 0;
        }
        let segs: Vec<Arc<RwLock<Segment>>> = read(&self.segments).values().cloned().collect();
        let removed: Vec<u64> = par_map(
            &segs
                .chunks(segs.len().div_ceil(self.threads.max(1)).max(1))
                .collect::<Vec<_>>(),
            self.threads,
            |part| {
                let mut n = 0u64;
                for seg in part.iter() {
                    let mut seg = write(seg);
                    for &u in &found {
                        n += u64::from(seg.remove_user(u).is_some());
                    }
                }
                n
            },
        );
        // Memberships first, then the ids: a snapshot being written meanwhile may hold a
        // membership of an erased user, which loading skips (the deletion is replayed anyway).
        for id in user_ids {
            self.users.erase(id.as_bytes());
        }
        self.erasures
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        metrics::counter!("userseg_embedded_deleted_memberships_total")
            .increment(removed.iter().sum());
        found.len()
    }

    /// How many deletions were applied since the store was opened (the checkpointer writes a
    /// fresh snapshot after one, so the erased ids leave the disk promptly).
    pub fn erasures(&self) -> u64 {
        self.erasures.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl super::EmbeddedStore {
    /// Runs a heavy query on a blocking thread, at most [`HEAVY_QUERIES`] at once.
    async fn heavy<R: Send + 'static>(
        &self,
        f: impl FnOnce(&MemStore) -> R + Send + 'static,
    ) -> Result<R, PortError> {
        let _permit = self
            .0
            .heavy
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| PortError::Transient("the store is closing".into()))?;
        let store = self.0.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| PortError::Transient(format!("query task failed: {e}")))
    }
}

#[async_trait::async_trait]
impl userseg_usecase::SegmentAnalytics for super::EmbeddedStore {
    async fn user_segments(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, PortError> {
        Ok(self.0.user_segments(user_id, at))
    }

    async fn count_within(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        Ok(self.0.count_within(segment, at, within))
    }

    async fn count_all_within(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        Ok(self.0.count_all_within(at, within))
    }

    async fn count_expr(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        let expr = expr.clone();
        self.heavy(move |s| s.count_expr(&expr, at, within)).await
    }

    async fn overlap(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, PortError> {
        let segments = segments.to_vec();
        self.heavy(move |s| s.overlap(&segments, at, within)).await
    }

    async fn export_members(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let segment = segment.to_owned();
        self.heavy(move |s| s.export_blocking(&segment, at, within, chunk, &sink))
            .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn naive_pairs(bits: &[Vec<u64>]) -> Vec<Vec<u64>> {
        bits.iter()
            .map(|a| {
                bits.iter()
                    .map(|b| {
                        a.iter()
                            .zip(b)
                            .map(|(x, y)| u64::from((x & y).count_ones()))
                            .sum()
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn blocked_pair_counts_equal_naive_ones() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Word counts around the block edges, and empty, single and 21-segment sets.
        for n in [
            0,
            1,
            PAIR_BLOCK - 1,
            PAIR_BLOCK,
            PAIR_BLOCK + 1,
            3 * PAIR_BLOCK + 37,
        ] {
            for k in [0usize, 1, 2, 21] {
                let bits: Vec<Vec<u64>> = (0..k)
                    .map(|i| {
                        (0..n)
                            .map(|_| next() & next() & if i % 5 == 0 { 0 } else { u64::MAX })
                            .collect()
                    })
                    .collect();
                let want = naive_pairs(&bits);
                for threads in [1, 2, 3] {
                    assert_eq!(
                        pairwise(&bits, n, threads),
                        want,
                        "n {n} k {k} threads {threads}"
                    );
                }
            }
        }
    }

    #[test]
    fn par_map_by_cost_keeps_item_order() {
        let items: Vec<usize> = (0..37).map(|i| (i * 7919) % 101).collect();
        for threads in [1, 2, 4] {
            let out = par_map_by_cost(&items, threads, |&c| c, |&c| c * 2);
            assert_eq!(out, items.iter().map(|c| c * 2).collect::<Vec<_>>());
        }
        assert!(par_map_by_cost(&[] as &[usize], 2, |&c| c, |&c| c).is_empty());
    }

    proptest! {
        /// A segment's live bitset (from its index whole, its index less the dead members, or a
        /// scan) is exactly its members above `lo`, whatever `lo` (at and around bucket edges,
        /// below the ring, above the top), through removals and expiry; so is an OR into a
        /// bitset already holding other bits.
        #[test]
        fn live_bits_are_the_members_above_lo(
            users in 64u32..4000,
            share in 1u32..8,
            spread in 1i64..40,
            removals in 0u32..200,
            expire_back in 0i64..60,
            narrow in any::<bool>(),
        ) {
            let (ring_len, win) = if narrow { (90, 60) } else { (1 << 17, 1 << 16) };
            let mut seg = Segment::new(ring_len, win);
            let top = 1_000_000i64;
            let mut x = u64::from(users) * 31 + u64::from(share);
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            for u in 0..users {
                if next() % u64::from(share) == 0 {
                    seg.observe(u, top - (next() % spread as u64) as i64);
                }
            }
            for _ in 0..removals {
                seg.remove_user((next() % u64::from(users)) as u32);
            }
            if expire_back > 0 {
                seg.expire(top - expire_back);
            }
            let n = words(users as usize + 70);
            let mut members = Vec::new();
            seg.for_each(|u, b| members.push((u, b)));
            for lo in [top - spread - 1, top - spread, top - spread / 2, top - 1, top, top + 1,
                       top - ring_len - 5, i64::MIN / 4] {
                let mut want = vec![0u64; n];
                for &(u, b) in &members {
                    if b > lo {
                        want[u as usize / 64] |= 1 << (u % 64);
                    }
                }
                prop_assert_eq!(&seg.live_bits(lo, n), &want, "lo {}", top - lo);
                let noise: Vec<u64> = (0..n).map(|_| next() & next() & next()).collect();
                let mut ored = noise.clone();
                seg.fill_bits(lo, &mut ored);
                let both: Vec<u64> = noise.iter().zip(&want).map(|(a, b)| a | b).collect();
                prop_assert_eq!(ored, both);
            }
        }
    }

    /// Queries between sweeps find the members expired since in a list made by an earlier
    /// query; exact through late arrivals with old buckets, updates, removals and sweeps.
    #[test]
    fn expired_members_found_between_sweeps_exactly() {
        let mut seg = Segment::new(20_200, 20_160);
        let top = 1_000_000i64;
        let users = 5000u32;
        for u in 0..users {
            seg.observe(u, top - 10_000 - i64::from(u % 5000));
        }
        let n = words(users as usize + 400);
        let brute = |seg: &Segment, lo: i64| {
            let mut want = vec![0u64; n];
            seg.for_each(|u, b| {
                if b > lo {
                    want[u as usize / 64] |= 1 << (u % 64);
                }
            });
            want
        };
        let listed = |seg: &Segment| match &seg.members {
            Members::Narrow(r) => r.expiring().lock().unwrap().as_ref().map(|l| l.upto),
            Members::Wide(r) => r.expiring().lock().unwrap().as_ref().map(|l| l.upto),
        };
        // The edge moves a bucket at a time, as the clock does between sweeps.
        let mut lo = top - 15_000;
        for step in 0..300u32 {
            lo += 1;
            match step % 7 {
                // A late arrival of a new user with an old bucket (above the edge).
                0 => seg.observe(users + step, lo + 3),
                // An old member seen again: its bucket rises.
                1 => seg.observe(step * 13 % users, top),
                2 => {
                    seg.remove_user(step * 7 % users);
                }
                3 if step % 70 == 3 => {
                    seg.expire(lo);
                }
                _ => {}
            }
            assert_eq!(seg.live_bits(lo, n), brute(&seg, lo), "step {step}");
        }
        // The last queries used the list an earlier one made.
        let upto = listed(&seg).expect("a list");
        assert!(upto >= lo && upto < lo + EXPIRING_SPAN, "{upto} {lo}");
    }

    /// Through a store: unknown segments are empty sets, an empty overlap is empty, and indexed
    /// segments (hundreds of members) agree with a brute force over the pairs, with and without
    /// a lookback.
    #[test]
    fn store_expressions_and_overlap_with_unknown_and_indexed_segments() {
        use userseg_domain::{Pair, Window};
        let w = Window::from_secs(14 * 86_400).expect("window");
        let store = MemStore::new(w);
        let now = 1_800_000_000i64;
        let mut pairs = Vec::new();
        for u in 0..3000u32 {
            for s in 0..3u32 {
                if (u + s) % (s + 2) == 0 {
                    pairs.push(Pair {
                        user_id: format!("u{u}"),
                        segment: format!("s{s}"),
                        ts: now - 1800 - i64::from(u % 20) * 3600,
                    });
                }
            }
        }
        pairs.sort_by_key(|p| p.ts);
        store.apply(&pairs).expect("apply");
        let hours = |h: u64| Within::from_secs(h * 3600, w).ok();
        for h in [None, Some(5), Some(15)] {
            let within = h.and_then(hours);
            let lo_ts = h.map_or(i64::MIN, |h| now - h as i64 * 3600);
            let members = |s: &str| -> std::collections::HashSet<&str> {
                pairs
                    .iter()
                    .filter(|p| p.segment == s && p.ts > lo_ts)
                    .map(|p| p.user_id.as_str())
                    .collect()
            };
            let (s0, s1) = (members("s0"), members("s1"));
            let q = |e: &str| store.count_expr(&Expr::parse(e).expect("expr"), now, within);
            assert_eq!(q("s0 AND nope"), 0);
            assert_eq!(q("s0 AND NOT nope"), s0.len() as u64);
            assert_eq!(q("s0 AND s1"), s0.intersection(&s1).count() as u64);
            assert_eq!(q("s0 AND NOT s1"), s0.difference(&s1).count() as u64);
            let names = ["s0".to_string(), "nope".to_string(), "s1".to_string()];
            let o = store.overlap(&names, now, within);
            assert_eq!(o.users, vec![s0.len() as u64, 0, s1.len() as u64]);
            assert_eq!(o.both[0][2], s0.intersection(&s1).count() as u64);
            assert_eq!(o.both[2][0], o.both[0][2]);
            assert_eq!(o.both[1], vec![0, 0, 0]);
        }
        let empty = store.overlap(&[], now, None);
        assert!(empty.users.is_empty() && empty.both.is_empty());
    }

    #[test]
    fn large_segments_keep_an_index_and_cut_within_at_a_bucket_edge() {
        let mut seg = Segment::new(90, 60);
        let top = 5_000i64;
        // Users 0..2000, bucket top - (u % 10): each bucket edge cuts a tenth.
        for u in 0..2000u32 {
            seg.observe(u, top - i64::from(u % 10));
        }
        let has_index = match &seg.members {
            Members::Narrow(r) => r.index().is_some(),
            Members::Wide(r) => r.index().is_some(),
        };
        assert!(has_index);
        let n = words(2000);
        let count = |lo: i64| popcount(&seg.live_bits(lo, n));
        assert_eq!(count(top - 10), 2000); // every member: the index as is
        assert_eq!(count(top - 3), 600); // within 3 buckets: most dead, scanned
        assert_eq!(count(top - 8), 1600); // most live: the index less the dead
        assert_eq!(count(top - 9), 1800);
        assert_eq!(count(top), 0);
        assert_eq!(count(top - 1), 200);
    }
}
