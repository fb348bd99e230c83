//! What the store suites share: the suite's window and start time, a brute-force [`Model`] of
//! every read, and a random [`Workload`] of pushes, re-sends, backfills and clock moves.
//!
//! All times are multiples of 60 s and the window is 14 days, so stores that bucket time by up
//! to 60 s must match the exact model exactly.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use userseg_domain::{Expr, Pair, UnixSeconds, Window, Within};

use crate::{Member, Membership, Overlap, SegmentCount};

/// The window every suite test uses.
pub fn window() -> Window {
    Window::DEFAULT
}

/// The window in seconds.
pub const W: i64 = 14 * 86_400;
/// A minute-aligned start time (2025-11-24T00:00:00Z).
pub const T0: UnixSeconds = 1_763_942_400;

pub fn pair(user: &str, segment: &str, ts: UnixSeconds) -> Pair {
    Pair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

/// The exact meaning of every analytics read, by brute force: the latest ts of each
/// (user, segment), scanned in full for every question.
#[derive(Clone, Debug)]
pub struct Model {
    pub window: Window,
    latest: HashMap<(String, String), UnixSeconds>,
}

impl Model {
    pub fn new(window: Window) -> Model {
        Model {
            window,
            latest: HashMap::new(),
        }
    }

    pub fn apply(&mut self, pairs: &[Pair]) {
        for p in pairs {
            let e = self
                .latest
                .entry((p.user_id.clone(), p.segment.clone()))
                .or_insert(p.ts);
            *e = (*e).max(p.ts);
        }
    }

    pub fn delete(&mut self, users: &[String]) {
        let users: HashSet<&String> = users.iter().collect();
        self.latest.retain(|(u, _), _| !users.contains(u));
    }

    fn within(&self, within: Option<Within>) -> Within {
        within.unwrap_or(Within::full(self.window))
    }

    /// Live `(user, segment, latest ts)`.
    pub fn live(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> impl Iterator<Item = (&str, &str, UnixSeconds)> + '_ {
        let w = self.within(within);
        self.latest
            .iter()
            .filter(move |(_, ts)| w.is_live(**ts, at))
            .map(|((u, s), ts)| (u.as_str(), s.as_str(), *ts))
    }

    fn sets(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> (HashSet<&str>, HashMap<&str, HashSet<&str>>) {
        let mut universe = HashSet::new();
        let mut by_segment: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (u, s, _) in self.live(at, within) {
            universe.insert(u);
            by_segment.entry(s).or_default().insert(u);
        }
        (universe, by_segment)
    }

    pub fn user_segments(&self, user: &str, at: UnixSeconds) -> Vec<Membership> {
        let mut out: Vec<Membership> = self
            .live(at, None)
            .filter(|(u, _, _)| *u == user)
            .map(|(_, s, ts)| Membership {
                segment: s.to_owned(),
                last_seen: ts,
                expires_at: ts + self.window.secs() as i64,
            })
            .collect();
        out.sort_by(|a, b| a.segment.cmp(&b.segment));
        out
    }

    pub fn count(&self, segment: &str, at: UnixSeconds, within: Option<Within>) -> u64 {
        self.live(at, within)
            .filter(|(_, s, _)| *s == segment)
            .count() as u64
    }

    pub fn count_all(&self, at: UnixSeconds, within: Option<Within>) -> Vec<SegmentCount> {
        let mut m: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, s, _) in self.live(at, within) {
            *m.entry(s).or_default() += 1;
        }
        m.into_iter()
            .map(|(s, users)| SegmentCount {
                segment: s.to_owned(),
                users,
            })
            .collect()
    }

    pub fn count_expr(&self, expr: &Expr, at: UnixSeconds, within: Option<Within>) -> u64 {
        let (universe, by_segment) = self.sets(at, within);
        universe
            .iter()
            .filter(|u| expr.matches(&|s| by_segment.get(s).is_some_and(|m| m.contains(*u))))
            .count() as u64
    }

    pub fn overlap(&self, segments: &[String], at: UnixSeconds, within: Option<Within>) -> Overlap {
        let (_, by_segment) = self.sets(at, within);
        let empty = HashSet::new();
        let sets: Vec<&HashSet<&str>> = segments
            .iter()
            .map(|s| by_segment.get(s.as_str()).unwrap_or(&empty))
            .collect();
        Overlap {
            users: sets.iter().map(|s| s.len() as u64).collect(),
            both: sets
                .iter()
                .map(|a| {
                    sets.iter()
                        .map(|b| a.intersection(b).count() as u64)
                        .collect()
                })
                .collect(),
        }
    }

    /// Live members, sorted by user id.
    pub fn members(&self, segment: &str, at: UnixSeconds, within: Option<Within>) -> Vec<Member> {
        let mut out: Vec<Member> = self
            .live(at, within)
            .filter(|(_, s, _)| *s == segment)
            .map(|(u, _, ts)| Member {
                user_id: u.to_owned(),
                last_seen: ts,
            })
            .collect();
        out.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        out
    }
}

/// A random workload over `user-{i}` and `seg-{j}`: batches of new pairs (event times from
/// almost a window ago to 5 minutes ahead) mixed with re-sends of pairs already sent, and a
/// clock that moves by minutes or days.
pub struct Workload {
    pub rng: StdRng,
    /// How many users and segments the workload draws from.
    pub users: u32,
    pub segments: u32,
    /// The workload's clock.
    pub now: UnixSeconds,
    sent: Vec<Pair>,
}

impl Workload {
    /// A workload of `seed` over a random number of users and segments, starting at [`T0`].
    pub fn new(seed: u64, users: Range<u32>, segments: Range<u32>) -> Workload {
        let mut rng = StdRng::seed_from_u64(seed);
        let users = rng.random_range(users);
        let segments = rng.random_range(segments);
        Workload {
            rng,
            users,
            segments,
            now: T0,
            sent: Vec::new(),
        }
    }

    /// A random user (of `users + extra`, so `extra` ids were never sent).
    pub fn user(&mut self, extra: u32) -> String {
        format!("user-{}", self.rng.random_range(0..self.users + extra))
    }

    /// A random segment.
    pub fn segment(&mut self) -> String {
        format!("seg-{}", self.rng.random_range(0..self.segments))
    }

    /// A batch of `sizes` pairs, each a re-send of a pair already sent with probability
    /// `resend`; remembered for later re-sends.
    pub fn batch(&mut self, sizes: Range<usize>, resend: f64) -> Vec<Pair> {
        let n = self.rng.random_range(sizes);
        let batch: Vec<Pair> = (0..n)
            .map(|_| {
                if !self.sent.is_empty() && self.rng.random_bool(resend) {
                    self.sent[self.rng.random_range(0..self.sent.len())].clone()
                } else {
                    let minutes = self.rng.random_range(-(W / 60 - 1)..=5);
                    let (user, segment) = (self.user(0), self.segment());
                    pair(&user, &segment, self.now + minutes * 60)
                }
            })
            .collect();
        self.sent.extend(batch.iter().cloned());
        batch
    }

    /// Moves the clock by up to 3 days.
    pub fn days_pass(&mut self) {
        self.now += self.rng.random_range(0..=3 * 24 * 60) * 60;
    }

    /// Moves the clock by up to 5 minutes.
    pub fn minutes_pass(&mut self) {
        self.now += self.rng.random_range(0..=5) * 60;
    }
}

/// One `#[tokio::test]` per case of a suite: `$suite::$case($store).await`, `$store` an
/// expression making a fresh store. Used by the suites' own macros.
#[doc(hidden)]
#[macro_export]
macro_rules! __suite_tests {
    ($suite:ident, $store:expr; $($case:ident),+ $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                $suite::$case($store).await;
            }
        )+
    };
}
