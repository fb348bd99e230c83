//! The synthetic workload: which (user, segment) pairs are sent, with which event times.
//!
//! * Segment `s` (0-based) has a population of `ceil(users / (s + 1)^skew)` users: segment 0
//!   holds every user, segment 1 half of them, and so on (Zipf-like: a few huge segments and a
//!   long tail). Each user is therefore in about `H(segments, skew)` segments (≈ 5.2 for 100
//!   segments and skew 1).
//! * The members of segment `s` are the images of `0..population` under an affine bijection
//!   `k -> (a_s * k + b_s) mod users`, so populations of different segments overlap
//!   pseudo-randomly and nothing is stored per user.
//! * A fresh pair picks a membership uniformly among all memberships (one random number gives
//!   both the segment, weighted by its population, and the member).
//! * With probability `resend_ratio` a pair is instead an exact copy of a pair generated
//!   recently (from a ring of the last [`RESEND_RING`] fresh pairs), like an at-least-once
//!   producer retrying.
//!
//! A [`Generator`] is deterministic: the same workload, seed and `now` values give the same
//! sequence of pairs.

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

/// Fresh pairs remembered as candidates for re-sends.
pub const RESEND_RING: usize = 1 << 16;

/// One generated pair: indexes into the workload's users and segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GenPair {
    pub user: u32,
    pub segment: u32,
    /// Event time (unix seconds); `None` lets the server use its receive time.
    pub ts: Option<i64>,
}

#[derive(Clone, Debug)]
struct SegmentSpec {
    population: u32,
    a: u64,
    b: u64,
    /// The inverse of `a` modulo the number of users: `member(s, k) = u` iff
    /// `k = a_inv * (u - b) mod users`.
    a_inv: u64,
}

/// The shape of the workload, shared by all generators of a run.
#[derive(Clone, Debug)]
pub struct Workload {
    users: u32,
    segments: Vec<SegmentSpec>,
    /// `cumulative[s]` = sum of the populations of segments `0..=s`.
    cumulative: Vec<u64>,
    resend_ratio: f64,
    ts_spread: u32,
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The inverse of `a` modulo `n` (`gcd(a, n) = 1`, `n ≥ 1`).
fn inverse(a: u64, n: u64) -> u64 {
    let (mut r0, mut r1) = (i128::from(n), i128::from(a % n));
    let (mut t0, mut t1) = (0i128, 1i128);
    while r1 != 0 {
        let q = r0 / r1;
        (r0, r1) = (r1, r0 - q * r1);
        (t0, t1) = (t1, t0 - q * t1);
    }
    t0.rem_euclid(i128::from(n)) as u64
}

/// Segment `s`'s population for `users` and `skew`.
fn population(users: u32, s: u32, skew: f64) -> u32 {
    let f = (f64::from(s) + 1.0).powf(-skew);
    ((f64::from(users) * f).ceil() as u32).clamp(1, users)
}

/// All memberships of a workload of `users`, `segments` and `skew`.
fn memberships_of(users: u32, segments: u32, skew: f64) -> u64 {
    (0..segments.max(1))
        .map(|s| u64::from(population(users, s, skew)))
        .sum()
}

/// The Zipf exponent (in `[0, 10]`) whose workload holds the number of memberships closest to
/// `target`: 0 when `target ≥ users × segments`, 10 when it is below the fewest possible.
pub fn skew_for(users: u32, segments: u32, target: u64) -> f64 {
    let users = users.max(1);
    let (mut lo, mut hi) = (0.0f64, 10.0f64);
    if memberships_of(users, segments, lo) <= target {
        return lo;
    }
    if memberships_of(users, segments, hi) >= target {
        return hi;
    }
    // memberships_of is non-increasing in skew: keep memberships(lo) > target ≥ memberships(hi).
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if memberships_of(users, segments, mid) > target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let d = |k: f64| memberships_of(users, segments, k).abs_diff(target);
    if d(lo) < d(hi) {
        lo
    } else {
        hi
    }
}

impl Workload {
    /// `users` ≥ 1, `segments` ≥ 1, `skew` ≥ 0, `resend_ratio` in [0, 1), `ts_spread` in seconds
    /// (0 = no ts). The populations and permutations derive from `seed`.
    pub fn new(
        users: u32,
        segments: u32,
        skew: f64,
        resend_ratio: f64,
        ts_spread: u32,
        seed: u64,
    ) -> Workload {
        let users = users.max(1);
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5e67_5e67_5e67_5e67);
        let mut specs = Vec::with_capacity(segments as usize);
        let mut cumulative = Vec::with_capacity(segments as usize);
        let mut total = 0u64;
        for s in 0..segments.max(1) {
            let population = population(users, s, skew);
            let n = u64::from(users);
            let a = if n == 1 {
                1
            } else {
                loop {
                    let a = rng.random_range(1..n);
                    if gcd(a, n) == 1 {
                        break a;
                    }
                }
            };
            let b = rng.random_range(0..n);
            specs.push(SegmentSpec {
                population,
                a,
                b,
                a_inv: inverse(a, n),
            });
            total += u64::from(population);
            cumulative.push(total);
        }
        Workload {
            users,
            segments: specs,
            cumulative,
            resend_ratio: resend_ratio.clamp(0.0, 1.0),
            ts_spread,
        }
    }

    pub fn users(&self) -> u32 {
        self.users
    }

    pub fn segments(&self) -> u32 {
        self.segments.len() as u32
    }

    /// How many users segment `s` can hold.
    pub fn population(&self, s: u32) -> u32 {
        self.segments[s as usize].population
    }

    /// All memberships: the sum of the populations.
    pub fn memberships(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The `k`-th member (`k < population`) of segment `s`.
    pub fn member(&self, s: u32, k: u32) -> u32 {
        let spec = &self.segments[s as usize];
        ((spec.a * u64::from(k) + spec.b) % u64::from(self.users)) as u32
    }

    /// Whether `user` is a member of segment `s` (the inverse of [`Workload::member`]).
    #[inline]
    pub fn is_member(&self, s: u32, user: u32) -> bool {
        let spec = &self.segments[s as usize];
        if spec.population >= self.users {
            return true;
        }
        let n = u64::from(self.users);
        let u = u64::from(user);
        let d = if u >= spec.b {
            u - spec.b
        } else {
            u + n - spec.b
        };
        (d * spec.a_inv) % n < u64::from(spec.population)
    }

    /// The membership at position `x` in `0..memberships()`.
    fn membership(&self, x: u64) -> (u32, u32) {
        let s = self.cumulative.partition_point(|&c| c <= x);
        let before = if s == 0 { 0 } else { self.cumulative[s - 1] };
        (s as u32, self.member(s as u32, (x - before) as u32))
    }

    /// A generator for one worker.
    pub fn generator(&self, seed: u64) -> Generator<'_> {
        Generator {
            w: self,
            rng: SmallRng::seed_from_u64(seed),
            ring: Vec::with_capacity(RESEND_RING.min(1 << 12)),
            ring_next: 0,
            resend_threshold: (self.resend_ratio * (u64::MAX as f64)) as u64,
        }
    }
}

/// Fills a store: sends every membership of a [`Workload`] whose user lies in a range exactly
/// once, user by user (a user's segments are consecutive pairs, so they share a request), in
/// increasing segment order. No re-sends.
pub struct Filler<'a> {
    w: &'a Workload,
    next_user: u32,
    end_user: u32,
    /// The segments of the current user not sent yet (reversed: popped from the end).
    pending: Vec<u32>,
    current: u32,
    rng: SmallRng,
}

impl Workload {
    /// A filler for the users `range` (clamped to the workload's users).
    pub fn filler(&self, range: std::ops::Range<u32>, seed: u64) -> Filler<'_> {
        Filler {
            w: self,
            next_user: range.start.min(self.users),
            end_user: range.end.min(self.users),
            pending: Vec::with_capacity(self.segments.len()),
            current: 0,
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// The users worker `id` of `n` fills: a contiguous share of `0..users`.
    pub fn fill_range(&self, n: usize, id: usize) -> std::ops::Range<u32> {
        let users = u64::from(self.users);
        let (n, id) = (n.max(1) as u64, id as u64);
        ((users * id / n) as u32)..((users * (id + 1) / n) as u32)
    }
}

impl Filler<'_> {
    /// Appends up to `n` pairs to `out`; returns how many (0: every membership was sent).
    /// `now` as in [`Generator::next_pair`].
    pub fn fill(&mut self, out: &mut Vec<GenPair>, n: usize, now: i64) -> usize {
        let mut produced = 0;
        while produced < n {
            if self.pending.is_empty() {
                if self.next_user >= self.end_user {
                    break;
                }
                let u = self.next_user;
                self.next_user += 1;
                self.current = u;
                for s in (0..self.w.segments()).rev() {
                    if self.w.is_member(s, u) {
                        self.pending.push(s);
                    }
                }
                continue;
            }
            let take = (n - produced).min(self.pending.len());
            for _ in 0..take {
                let Some(segment) = self.pending.pop() else {
                    break;
                };
                let ts = (self.w.ts_spread > 0)
                    .then(|| now - (self.rng.next_u64() % u64::from(self.w.ts_spread)) as i64);
                out.push(GenPair {
                    user: self.current,
                    segment,
                    ts,
                });
            }
            produced += take;
        }
        produced
    }
}

/// Generates pairs of a [`Workload`]. Allocation-free after the resend ring has filled.
pub struct Generator<'a> {
    w: &'a Workload,
    rng: SmallRng,
    ring: Vec<GenPair>,
    ring_next: usize,
    resend_threshold: u64,
}

impl Generator<'_> {
    /// The next pair, and whether it is a re-send. `now` is the current unix time: fresh pairs
    /// get `ts` in `(now - ts_spread, now]` (or none when the spread is 0).
    #[inline]
    pub fn next_pair(&mut self, now: i64) -> (GenPair, bool) {
        if !self.ring.is_empty() && self.rng.next_u64() < self.resend_threshold {
            let i = (self.rng.next_u64() % self.ring.len() as u64) as usize;
            let mut p = self.ring[i];
            // A re-send is an exact copy, unless the original is about to leave the range the
            // run was told to use (a slow run): then it is refreshed to the oldest allowed ts.
            if let Some(ts) = &mut p.ts {
                *ts = (*ts).max(now - i64::from(self.w.ts_spread) + 1);
            }
            return (p, true);
        }
        let x = self.rng.next_u64() % self.w.memberships();
        let (segment, user) = self.w.membership(x);
        let ts = (self.w.ts_spread > 0)
            .then(|| now - (self.rng.next_u64() % u64::from(self.w.ts_spread)) as i64);
        let p = GenPair { user, segment, ts };
        if self.ring.len() < RESEND_RING {
            self.ring.push(p);
        } else {
            self.ring[self.ring_next] = p;
            self.ring_next = (self.ring_next + 1) % RESEND_RING;
        }
        (p, false)
    }

    /// Appends `n` pairs to `out`; returns how many were re-sends.
    pub fn fill(&mut self, out: &mut Vec<GenPair>, n: usize, now: i64) -> u64 {
        out.reserve(n);
        let mut resends = 0;
        for _ in 0..n {
            let (p, r) = self.next_pair(now);
            resends += u64::from(r);
            out.push(p);
        }
        resends
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    #[test]
    fn deterministic_for_a_seed() {
        let w = Workload::new(10_000, 50, 1.0, 0.1, 3600, 7);
        let run = |seed| {
            let mut g = w.generator(seed);
            let mut v = Vec::new();
            g.fill(&mut v, 20_000, 1_764_000_000);
            v
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        // The workload itself (populations, permutations) is a function of its seed too.
        let w2 = Workload::new(10_000, 50, 1.0, 0.1, 3600, 7);
        let mut a = Vec::new();
        let mut b = Vec::new();
        w.generator(3).fill(&mut a, 1000, 0);
        w2.generator(3).fill(&mut b, 1000, 0);
        assert_eq!(a, b);
    }

    #[test]
    fn members_are_a_permutation() {
        for users in [1u32, 2, 97, 1000, 4096] {
            let w = Workload::new(users, 5, 1.0, 0.0, 0, 1);
            for s in 0..5 {
                let pop = w.population(s);
                let set: HashSet<u32> = (0..pop).map(|k| w.member(s, k)).collect();
                assert_eq!(set.len(), pop as usize, "users {users} segment {s}");
                assert!(set.iter().all(|&u| u < users));
            }
        }
    }

    #[test]
    fn segment_sizes_are_skewed() {
        let w = Workload::new(100_000, 100, 1.0, 0.0, 0, 42);
        let mut g = w.generator(1);
        let mut distinct: Vec<HashSet<u32>> = vec![HashSet::new(); 100];
        let mut pairs = Vec::new();
        g.fill(&mut pairs, 500_000, 0);
        for p in &pairs {
            distinct[p.segment as usize].insert(p.user);
        }
        let mut sizes: Vec<usize> = distinct.iter().map(HashSet::len).collect();
        sizes.sort_unstable();
        let largest = sizes[99];
        let median = sizes[50];
        assert!(median > 0);
        assert!(
            largest >= 20 * median,
            "largest {largest} should dwarf the median {median}"
        );
        // Users are in several segments each.
        let mut per_user: HashMap<u32, HashSet<u32>> = HashMap::new();
        for p in &pairs {
            per_user.entry(p.user).or_default().insert(p.segment);
        }
        let avg = per_user.values().map(HashSet::len).sum::<usize>() as f64 / per_user.len() as f64;
        assert!(avg > 2.0, "average segments per user {avg}");
    }

    #[test]
    fn resend_ratio_is_honoured() {
        for ratio in [0.0, 0.1, 0.5] {
            let w = Workload::new(1_000_000, 100, 1.0, ratio, 86_400, 3);
            let mut g = w.generator(9);
            let mut seen: HashSet<GenPair> = HashSet::new();
            let n = 200_000;
            let mut resends = 0;
            for _ in 0..n {
                let (p, resend) = g.next_pair(1_764_000_000);
                if resend {
                    resends += 1;
                    assert!(
                        seen.contains(&p),
                        "a re-send repeats an earlier pair exactly"
                    );
                }
                seen.insert(p);
            }
            let got = f64::from(resends) / f64::from(n);
            assert!((got - ratio).abs() < 0.01, "ratio {ratio}: got {got}");
        }
    }

    #[test]
    fn inverse_and_membership() {
        for n in [1u64, 2, 97, 1000, 4096, 4_294_967_295] {
            for a in [1u64, 3, 7, 12_345, 4_294_967_291] {
                if gcd(a, n) != 1 {
                    continue;
                }
                assert_eq!(
                    (inverse(a, n) as u128 * a as u128) % n as u128,
                    1 % n as u128
                );
            }
        }
        let w = Workload::new(1000, 20, 0.7, 0.0, 0, 5);
        for s in 0..20 {
            let members: HashSet<u32> = (0..w.population(s)).map(|k| w.member(s, k)).collect();
            for u in 0..1000 {
                assert_eq!(
                    w.is_member(s, u),
                    members.contains(&u),
                    "segment {s} user {u}"
                );
            }
        }
    }

    #[test]
    fn skew_is_solved_for_a_target() {
        // 10,000 users × 500 segments, 100 segments per user on average: as close as can be.
        let k = skew_for(10_000, 500, 1_000_000);
        assert!(k > 0.0 && k < 1.0, "skew {k}");
        let got = memberships_of(10_000, 500, k);
        assert!(got.abs_diff(1_000_000) < 1_000, "{got}");
        // Sizes stay Zipf-like: the first segment holds everyone, the last far fewer.
        assert_eq!(population(10_000, 0, k), 10_000);
        assert!(population(10_000, 499, k) < 2_000);
        assert_eq!(skew_for(100, 10, 1_000), 0.0, "everything: skew 0");
        assert_eq!(skew_for(100, 10, 5_000), 0.0);
        assert_eq!(skew_for(100, 10, 1), 10.0, "below the fewest possible");
    }

    #[test]
    fn the_fillers_send_every_membership_once_user_by_user() {
        let users = 5_000;
        let k = skew_for(users, 60, 100_000);
        let w = Workload::new(users, 60, k, 0.5, 0, 11);
        let expected: HashSet<(u32, u32)> = (0..60)
            .flat_map(|s| (0..w.population(s)).map(move |i| (s, i)))
            .map(|(s, i)| (w.member(s, i), s))
            .collect();
        assert_eq!(expected.len() as u64, w.memberships());
        let workers = 3;
        let mut seen = HashSet::new();
        let mut sent = 0u64;
        for id in 0..workers {
            let mut f = w.filler(w.fill_range(workers, id), 1);
            let mut out = Vec::new();
            loop {
                out.clear();
                let n = f.fill(&mut out, 777, 0);
                assert_eq!(n, out.len());
                if n == 0 {
                    break;
                }
                // Within a batch, one user's pairs are consecutive and its segments increase.
                for pair in out.windows(2) {
                    assert!(
                        pair[0].user < pair[1].user
                            || pair[0].user == pair[1].user && pair[0].segment < pair[1].segment
                    );
                }
                for p in &out {
                    assert_eq!(p.ts, None);
                    assert!(seen.insert((p.user, p.segment)), "sent twice: {p:?}");
                }
                sent += n as u64;
            }
        }
        assert_eq!(sent, w.memberships());
        assert_eq!(seen, expected);
        // With a spread, every pair carries a ts inside it.
        let w = Workload::new(100, 5, 0.5, 0.0, 600, 1);
        let mut f = w.filler(0..100, 2);
        let mut out = Vec::new();
        f.fill(&mut out, 1_000, 1_764_000_000);
        assert!(!out.is_empty());
        assert!(out.iter().all(|p| p
            .ts
            .is_some_and(|ts| ts > 1_764_000_000 - 600 && ts <= 1_764_000_000)));
    }

    #[test]
    fn ts_within_the_spread() {
        let now = 1_764_000_000;
        let w = Workload::new(1000, 10, 1.0, 0.2, 600, 3);
        let mut v = Vec::new();
        w.generator(1).fill(&mut v, 10_000, now);
        assert!(v
            .iter()
            .all(|p| p.ts.is_some_and(|ts| ts > now - 600 && ts <= now)));
        let w = Workload::new(1000, 10, 1.0, 0.2, 0, 3);
        v.clear();
        w.generator(1).fill(&mut v, 1000, now);
        assert!(v.iter().all(|p| p.ts.is_none()));
    }
}
