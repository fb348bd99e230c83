//! The behaviour every [`SegmentAnalytics`] and [`HistoryStore`] adapter must have, written once
//! and checked against a brute-force [`Model`]. Each adapter runs it with
//! [`analytics_test_suite!`](crate::analytics_test_suite) and
//! [`history_test_suite!`](crate::history_test_suite) against a fresh store per test.
//!
//! All times and lookbacks are multiples of 60 s and the window is 14 days, so stores that
//! bucket time by up to 60 s must match the exact model exactly.

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::Rng;
use userseg_domain::{Expr, Pair, UnixSeconds, UserDeletion, Within};

use crate::suite_model::{pair, Workload, W};
pub use crate::suite_model::{window, Model, T0};
use crate::{HistoryPoint, HistoryStore, Member, SegmentAnalytics, SegmentCount, SegmentWriter};

/// A store under test: the writing side and the analytics side of one instance.
pub struct SuiteAnalytics {
    pub writer: Arc<dyn SegmentWriter>,
    pub analytics: Arc<dyn SegmentAnalytics>,
}

fn within(secs: u64) -> Option<Within> {
    Some(Within::from_secs(secs, window()).expect("a valid lookback"))
}

impl SuiteAnalytics {
    async fn write(&self, model: &mut Model, pairs: Vec<Pair>) {
        model.apply(&pairs);
        self.writer
            .write(pairs.into())
            .await
            .expect("the store accepts valid pairs");
    }

    async fn delete(&self, model: &mut Model, users: &[&str]) {
        let ids: Vec<String> = users.iter().map(|s| s.to_string()).collect();
        model.delete(&ids);
        self.writer
            .delete_users(UserDeletion::new(ids).expect("valid ids"))
            .await
            .expect("the store deletes users");
    }

    async fn export(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
    ) -> Vec<Member> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let a = self.analytics.clone();
        let seg = segment.to_owned();
        let task = tokio::spawn(async move { a.export_members(&seg, at, within, chunk, tx).await });
        let mut out = Vec::new();
        while let Some(c) = rx.recv().await {
            assert!(
                !c.is_empty() && c.len() <= chunk,
                "chunks hold 1..={chunk} members, got {}",
                c.len()
            );
            out.extend(c);
        }
        let sent = task.await.expect("export task").expect("export");
        assert_eq!(sent, out.len() as u64, "export reports what it sent");
        out.sort_by(|a, b| a.user_id.cmp(&b.user_id));
        out
    }

    /// Every read at `at` under `within` equals the model's.
    async fn check_all(&self, model: &Model, at: UnixSeconds, within: Option<Within>, ctx: &str) {
        let a = &self.analytics;
        let all = model.count_all(at, within);
        assert_eq!(
            a.count_all_within(at, within).await.expect("count_all"),
            all,
            "{ctx}: count_all_within"
        );
        for sc in &all {
            assert_eq!(
                a.count_within(&sc.segment, at, within)
                    .await
                    .expect("count"),
                sc.users,
                "{ctx}: count_within({})",
                sc.segment
            );
        }
    }
}

pub async fn user_lookup_lists_live_memberships_sorted(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    s.write(
        &mut m,
        vec![
            pair("u1", "sports", T0 - 600),
            pair("u1", "sports", T0 - 1200),
            pair("u1", "news", T0 - 60),
            pair("u1", "autos", T0 - W + 120),
            pair("u2", "news", T0),
            pair("用户 /with space", "b.seg:x", T0),
        ],
    )
    .await;
    let got = s.analytics.user_segments("u1", T0).await.expect("lookup");
    assert_eq!(got, m.user_segments("u1", T0));
    assert_eq!(
        got.iter().map(|x| x.segment.as_str()).collect::<Vec<_>>(),
        ["autos", "news", "sports"]
    );
    assert_eq!(got[2].last_seen, T0 - 600, "the latest ts wins");
    assert_eq!(got[2].expires_at, T0 - 600 + W);
    // Two minutes later the oldest membership has expired.
    let later = s
        .analytics
        .user_segments("u1", T0 + 120)
        .await
        .expect("lookup");
    assert_eq!(later, m.user_segments("u1", T0 + 120));
    assert_eq!(later.len(), 2);
    assert_eq!(
        s.analytics
            .user_segments("用户 /with space", T0)
            .await
            .expect("lookup"),
        m.user_segments("用户 /with space", T0)
    );
    assert!(s
        .analytics
        .user_segments("nobody", T0)
        .await
        .expect("lookup")
        .is_empty());
}

pub async fn within_counts_only_recent_memberships(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    let mut batch = Vec::new();
    for i in 0..30i64 {
        // One membership every 12 hours back in time.
        batch.push(pair(&format!("u{i}"), "s", T0 - i * 43_200));
        batch.push(pair(
            &format!("u{i}"),
            if i % 2 == 0 { "even" } else { "odd" },
            T0 - i * 3600,
        ));
    }
    s.write(&mut m, batch).await;
    for d in [60u64, 3600, 86_400, 7 * 86_400, 14 * 86_400] {
        s.check_all(&m, T0, within(d), &format!("within {d}")).await;
        s.check_all(&m, T0 + 7200, within(d), &format!("within {d} later"))
            .await;
    }
    s.check_all(&m, T0, None, "no within").await;
    // within=1d at T0: ts in (T0 - 1d, T0]: i = 0, 1 (i = 2 is exactly 1 day old).
    assert_eq!(
        s.analytics
            .count_within("s", T0, within(86_400))
            .await
            .expect("count"),
        2
    );
    assert_eq!(
        s.analytics
            .count_within("nothing", T0, within(86_400))
            .await
            .expect("count"),
        0
    );
}

pub async fn expressions_follow_set_semantics(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    // a = {1,2,3,4}, b = {3,4,5}, c = {4,6}, "and" (a keyword name) = {1,6}; user 7 only in an
    // old membership (expired); user 8 only in d within 1 day.
    let mut batch = Vec::new();
    for (u, segs) in [
        (1, &["a", "and"][..]),
        (2, &["a"]),
        (3, &["a", "b"]),
        (4, &["a", "b", "c"]),
        (5, &["b"]),
        (6, &["c", "and"]),
    ] {
        for seg in segs {
            batch.push(pair(&format!("u{u}"), seg, T0 - 3 * 86_400));
        }
    }
    batch.push(pair("u7", "a", T0 - W));
    batch.push(pair("u8", "d", T0 - 600));
    s.write(&mut m, batch).await;
    let cases = [
        "a",
        "a AND b",
        "a and b and not c",
        "a OR c",
        "NOT a",
        "not a and not b",
        "\"and\" OR b",
        "(a OR b) AND NOT (c OR \"and\")",
        "NOT nothing",
        "nothing",
        "a AND NOT a",
        "a OR NOT a",
    ];
    for q in cases {
        let e = Expr::parse(q).expect("valid expression");
        let want = m.count_expr(&e, T0, None);
        assert_eq!(
            s.analytics
                .count_expr(&e, T0, None)
                .await
                .expect("count_expr"),
            want,
            "{q}"
        );
    }
    // Spot checks of the model itself, so a wrong model cannot pass silently.
    let e = |q: &str| Expr::parse(q).expect("valid");
    assert_eq!(m.count_expr(&e("a AND b AND NOT c"), T0, None), 1);
    assert_eq!(m.count_expr(&e("NOT a"), T0, None), 3);
    assert_eq!(m.count_expr(&e("\"and\" OR b"), T0, None), 5);
    // Within one day only u8 is live: NOT a = {u8}.
    for (q, want) in [("NOT a", 1u64), ("d", 1), ("a", 0), ("NOT d", 0)] {
        assert_eq!(
            s.analytics
                .count_expr(&e(q), T0, within(86_400))
                .await
                .expect("count_expr"),
            want,
            "{q} within 1d"
        );
    }
}

pub async fn overlap_is_the_symmetric_intersection_matrix(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    let mut batch = Vec::new();
    for u in 0..200i64 {
        for (k, seg) in ["x", "y", "z", "w"].iter().enumerate() {
            if u % (k as i64 + 2) == 0 {
                batch.push(pair(&format!("u{u}"), seg, T0 - (u % 20) * 3600));
            }
        }
    }
    s.write(&mut m, batch).await;
    let segs: Vec<String> = ["z", "x", "nothing", "w", "y"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for w in [None, within(6 * 3600)] {
        let got = s.analytics.overlap(&segs, T0, w).await.expect("overlap");
        let want = m.overlap(&segs, T0, w);
        assert_eq!(got, want, "within {w:?}");
        for i in 0..segs.len() {
            assert_eq!(got.both[i][i], got.users[i]);
            for j in 0..segs.len() {
                assert_eq!(got.both[i][j], got.both[j][i]);
            }
        }
    }
    // x = multiples of 2, y of 3: both = multiples of 6 below 200.
    let two = vec!["x".to_string(), "y".to_string()];
    let got = s.analytics.overlap(&two, T0, None).await.expect("overlap");
    assert_eq!(got.users, vec![100, 67]);
    assert_eq!(got.both[0][1], 34);
}

pub async fn export_streams_every_live_member_once(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    let batch: Vec<Pair> = (0..5000i64)
        .flat_map(|u| {
            let ts = T0 - (u % 48) * 3600;
            let mut v = vec![pair(&format!("member-{u}"), "big", ts)];
            if u % 7 == 0 {
                v.push(pair(&format!("member-{u}"), "small", ts));
            }
            v
        })
        .collect();
    s.write(&mut m, batch).await;
    s.write(&mut m, vec![pair("member-1", "big", T0 - 60)])
        .await;
    for (seg, w, chunk) in [
        ("big", None, 100usize),
        ("big", within(86_400), 7),
        ("small", None, 4096),
        ("none", None, 10),
    ] {
        let got = s.export(seg, T0, w, chunk).await;
        assert_eq!(got, m.members(seg, T0, w), "{seg} within {w:?}");
    }
    assert_eq!(s.export("big", T0, None, 100).await.len(), 5000);
    // A dropped receiver stops the export with an error instead of running on.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let a = s.analytics.clone();
    let task = tokio::spawn(async move { a.export_members("big", T0, None, 10, tx).await });
    assert!(rx.recv().await.is_some());
    drop(rx);
    let r = task.await.expect("export task");
    assert!(r.is_err(), "export to a dropped receiver must fail: {r:?}");
}

pub async fn deleted_users_count_nowhere_until_new_pairs(s: SuiteAnalytics) {
    let mut m = Model::new(window());
    let mut batch = Vec::new();
    for u in 0..50 {
        for seg in ["a", "b", "c"] {
            if (u + seg.len()) % 2 == 0 || seg == "a" {
                batch.push(pair(&format!("u{u}"), seg, T0 - 60 * u as i64));
            }
        }
    }
    s.write(&mut m, batch).await;
    s.delete(&mut m, &["u0", "u1", "u2", "never-seen", "u2"])
        .await;
    s.check_all(&m, T0, None, "after delete").await;
    assert_eq!(
        s.analytics
            .count_within("a", T0, None)
            .await
            .expect("count"),
        47
    );
    assert!(s
        .analytics
        .user_segments("u1", T0)
        .await
        .expect("lookup")
        .is_empty());
    let members = s.export("a", T0, None, 64).await;
    assert!(members
        .iter()
        .all(|x| !["u0", "u1", "u2"].contains(&x.user_id.as_str())));
    assert_eq!(members, m.members("a", T0, None));
    let e = Expr::parse("NOT b").expect("valid");
    assert_eq!(
        s.analytics
            .count_expr(&e, T0, None)
            .await
            .expect("count_expr"),
        m.count_expr(&e, T0, None)
    );
    // Deleting again changes nothing; a pair after the deletion counts as usual.
    s.delete(&mut m, &["u1"]).await;
    s.write(&mut m, vec![pair("u1", "c", T0)]).await;
    s.check_all(&m, T0, None, "after re-add").await;
    assert_eq!(
        s.analytics.user_segments("u1", T0).await.expect("lookup"),
        m.user_segments("u1", T0)
    );
    assert_eq!(m.user_segments("u1", T0).len(), 1);
}

fn random_expr(rng: &mut StdRng, segments: usize, depth: u32) -> Expr {
    let leaf = |rng: &mut StdRng| Expr::Segment(format!("seg-{}", rng.random_range(0..=segments)));
    if depth == 0 || rng.random_bool(0.3) {
        return leaf(rng);
    }
    match rng.random_range(0..3) {
        0 => Expr::Not(Box::new(random_expr(rng, segments, depth - 1))),
        k => {
            let n = rng.random_range(2..4);
            let items = (0..n)
                .map(|_| random_expr(rng, segments, depth - 1))
                .collect();
            // Re-parse so the tree has the parser's shape (flattened chains).
            let e = if k == 1 {
                Expr::And(items)
            } else {
                Expr::Or(items)
            };
            Expr::parse(&e.to_string()).expect("a generated expression parses")
        }
    }
}

/// Random pushes, re-sends, deletions and clock moves; after each step every read (counts with
/// random lookbacks, a random expression, the overlap of random segments, a random user's
/// memberships, a random segment's members) is compared with the model.
pub async fn random_workloads_match_brute_force_model(s: SuiteAnalytics, seed: u64, steps: usize) {
    let mut load = Workload::new(seed, 3..80, 2..7);
    let mut m = Model::new(window());
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step} at {}", load.now);
        match load.rng.random_range(0..12) {
            0..=5 => {
                let batch = load.batch(1..60, 0.2);
                s.write(&mut m, batch).await;
            }
            6 => {
                let n = load.rng.random_range(1..4);
                let ids: Vec<String> = (0..n).map(|_| load.user(2)).collect();
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                s.delete(&mut m, &refs).await;
            }
            7..=8 => load.days_pass(),
            _ => load.minutes_pass(),
        }
        let (now, segments) = (load.now, load.segments as usize);
        let rng = &mut load.rng;
        let w = match rng.random_range(0..4) {
            0 => None,
            _ => within(rng.random_range(1..=W / 60) as u64 * 60),
        };
        s.check_all(&m, now, w, &ctx).await;
        let e = random_expr(rng, segments, 3);
        assert_eq!(
            s.analytics
                .count_expr(&e, now, w)
                .await
                .expect("count_expr"),
            m.count_expr(&e, now, w),
            "{ctx}: count({e}) within {w:?}"
        );
        let mut segs: Vec<String> = (0..=segments).map(|i| format!("seg-{i}")).collect();
        segs.truncate(rng.random_range(2..=segments + 1));
        assert_eq!(
            s.analytics.overlap(&segs, now, w).await.expect("overlap"),
            m.overlap(&segs, now, w),
            "{ctx}: overlap within {w:?}"
        );
        let user = load.user(0);
        assert_eq!(
            s.analytics.user_segments(&user, now).await.expect("lookup"),
            m.user_segments(&user, now),
            "{ctx}: segments of {user}"
        );
        let seg = load.segment();
        let chunk = load.rng.random_range(1..50);
        assert_eq!(
            s.export(&seg, now, w, chunk).await,
            m.members(&seg, now, w),
            "{ctx}: members of {seg} within {w:?}"
        );
    }
}

fn counts(v: &[(&str, u64)]) -> Vec<SegmentCount> {
    v.iter()
        .map(|(s, n)| SegmentCount {
            segment: s.to_string(),
            users: *n,
        })
        .collect()
}

fn point(ts: UnixSeconds, users: u64) -> HistoryPoint {
    HistoryPoint { ts, users }
}

pub async fn history_steps_hold_their_latest_sample(h: Arc<dyn HistoryStore>) {
    assert_eq!(h.last_tick().await.expect("last_tick"), None);
    // Ticks every minute for 10 minutes; segment a grows, b vanishes after minute 4.
    for k in 0..10i64 {
        let mut c = vec![("a", 10 + k as u64)];
        if k < 5 {
            c.push(("b", 100));
        }
        h.record(T0 + k * 60, &counts(&c)).await.expect("record");
    }
    assert_eq!(h.last_tick().await.expect("last_tick"), Some(T0 + 540));
    let read = |seg: &'static str, from, to, step| {
        let h = h.clone();
        async move { h.read(seg, from, to, step).await.expect("read") }
    };
    // One point per minute.
    let all = read("a", T0, T0 + 540, 60).await;
    assert_eq!(
        all,
        (0..10)
            .map(|k| point(T0 + k * 60, 10 + k as u64))
            .collect::<Vec<_>>()
    );
    // 3-minute steps from T0: [0,3) [3,6) [6,9) [9,..]: the latest sample of each.
    assert_eq!(
        read("a", T0, T0 + 540, 180).await,
        vec![
            point(T0 + 120, 12),
            point(T0 + 300, 15),
            point(T0 + 480, 18),
            point(T0 + 540, 19)
        ]
    );
    // `to` clips the last step; `from` need not be a tick.
    assert_eq!(
        read("a", T0 + 30, T0 + 200, 120).await,
        vec![point(T0 + 120, 12), point(T0 + 180, 13)]
    );
    // A segment absent from a sample had no users then.
    assert_eq!(
        read("b", T0 + 240, T0 + 420, 60).await,
        vec![
            point(T0 + 240, 100),
            point(T0 + 300, 0),
            point(T0 + 360, 0),
            point(T0 + 420, 0)
        ]
    );
    assert_eq!(
        read("unknown", T0, T0 + 120, 60).await,
        vec![point(T0, 0), point(T0 + 60, 0), point(T0 + 120, 0)]
    );
    // Steps without samples are left out.
    assert!(read("a", T0 - 3600, T0 - 1, 60).await.is_empty());
    assert_eq!(read("a", T0 - 3600, T0, 600).await, vec![point(T0, 10)]);
}

pub async fn history_keeps_one_sample_per_tick(h: Arc<dyn HistoryStore>) {
    h.record(T0, &counts(&[("a", 1)])).await.expect("record");
    h.record(T0, &counts(&[("a", 1)]))
        .await
        .expect("record again");
    h.record(T0 + 60, &counts(&[("a", 2)]))
        .await
        .expect("record");
    assert_eq!(
        h.read("a", T0, T0 + 60, 1).await.expect("read"),
        vec![point(T0, 1), point(T0 + 60, 2)]
    );
}

pub async fn history_prunes_before_retention(h: Arc<dyn HistoryStore>) {
    for k in 0..5i64 {
        h.record(T0 + k * 86_400, &counts(&[("a", k as u64)]))
            .await
            .expect("record");
    }
    h.prune(T0 + 2 * 86_400).await.expect("prune");
    assert_eq!(
        h.read("a", T0, T0 + 5 * 86_400, 86_400)
            .await
            .expect("read"),
        vec![
            point(T0 + 2 * 86_400, 2),
            point(T0 + 3 * 86_400, 3),
            point(T0 + 4 * 86_400, 4)
        ]
    );
    assert_eq!(
        h.last_tick().await.expect("last_tick"),
        Some(T0 + 4 * 86_400)
    );
}

/// Generates one `#[tokio::test]` per analytics suite case. `$make` is an async fn taking the
/// suite's [`window`] and returning a fresh [`SuiteAnalytics`].
#[macro_export]
macro_rules! analytics_test_suite {
    ($make:ident, seeds = $seeds:expr, steps = $steps:expr) => {
        mod analytics_suite {
            use $crate::analytics_suite as suite;

            $crate::__suite_tests!(suite, super::$make(suite::window()).await;
                user_lookup_lists_live_memberships_sorted,
                within_counts_only_recent_memberships,
                expressions_follow_set_semantics,
                overlap_is_the_symmetric_intersection_matrix,
                export_streams_every_live_member_once,
                deleted_users_count_nowhere_until_new_pairs,
            );
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_workloads_match_brute_force_model() {
                for seed in 0..$seeds {
                    suite::random_workloads_match_brute_force_model(
                        super::$make(suite::window()).await,
                        seed,
                        $steps,
                    )
                    .await;
                }
            }
        }
    };
}

/// Generates one `#[tokio::test]` per history suite case. `$make` is an async fn returning a
/// fresh, empty `Arc<dyn HistoryStore>`.
#[macro_export]
macro_rules! history_test_suite {
    ($make:ident) => {
        mod history_suite {
            use $crate::analytics_suite as suite;

            $crate::__suite_tests!(suite, super::$make().await;
                history_steps_hold_their_latest_sample,
                history_keeps_one_sample_per_tick,
                history_prunes_before_retention,
            );
        }
    };
}
