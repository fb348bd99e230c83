//! The behaviour every segment store must have, written once. Each store adapter runs it with
//! [`store_test_suite!`](crate::store_test_suite) against a fresh store per test.
//!
//! All times are multiples of 60 s and the window is 14 days, so stores that bucket time by up to
//! 60 s must match the exact model exactly.

use std::sync::Arc;

use rand::Rng;
use userseg_domain::{Pair, UnixSeconds};

use crate::suite_model::{pair, Model, Workload, W};
pub use crate::suite_model::{window, T0};
use crate::{Mode, SegmentCount, SegmentCounter, SegmentWriter};

/// A store under test: both sides of one instance.
pub struct SuiteStore {
    pub writer: Arc<dyn SegmentWriter>,
    pub counter: Arc<dyn SegmentCounter>,
}

async fn write(s: &SuiteStore, pairs: Vec<Pair>) {
    s.writer
        .write(pairs.into())
        .await
        .expect("the store accepts valid pairs");
}

async fn count(s: &SuiteStore, segment: &str, at: UnixSeconds) -> u64 {
    let (users, exact) = s
        .counter
        .count(segment, at, Mode::Exact)
        .await
        .expect("count");
    assert!(exact, "exact mode must be exact");
    users
}

async fn all(s: &SuiteStore, at: UnixSeconds) -> Vec<(String, u64)> {
    let (list, exact) = s
        .counter
        .count_all(at, Mode::Exact)
        .await
        .expect("count_all");
    assert!(exact, "exact mode must be exact");
    list.into_iter()
        .map(|SegmentCount { segment, users }| (segment, users))
        .collect()
}

pub async fn empty_store_counts_zero(s: SuiteStore) {
    assert_eq!(count(&s, "nobody", T0).await, 0);
    assert!(all(&s, T0).await.is_empty());
}

pub async fn counts_distinct_users_and_resends_do_not_inflate(s: SuiteStore) {
    let batch = vec![
        pair("u1", "sports", T0),
        pair("u2", "sports", T0),
        pair("u1", "sports", T0),
        pair("u1", "news", T0 - 60),
    ];
    write(&s, batch.clone()).await;
    write(&s, batch).await;
    write(&s, vec![pair("u2", "sports", T0 - 120)]).await;
    assert_eq!(count(&s, "sports", T0).await, 2);
    assert_eq!(count(&s, "news", T0).await, 1);
    assert_eq!(count(&s, "weather", T0).await, 0);
    assert_eq!(
        all(&s, T0).await,
        vec![("news".to_string(), 1), ("sports".to_string(), 2)]
    );
}

pub async fn membership_expires_exactly_one_window_after_latest_ts(s: SuiteStore) {
    write(&s, vec![pair("u1", "s", T0), pair("u2", "s", T0 + 600)]).await;
    assert_eq!(count(&s, "s", T0 + 600).await, 2);
    assert_eq!(count(&s, "s", T0 + W - 60).await, 2);
    assert_eq!(count(&s, "s", T0 + W).await, 1, "u1 expires at ts + window");
    assert_eq!(count(&s, "s", T0 + 600 + W - 60).await, 1);
    assert_eq!(count(&s, "s", T0 + 600 + W).await, 0);
    assert!(all(&s, T0 + 600 + W).await.is_empty());
}

pub async fn latest_ts_wins_and_backfill_never_shortens(s: SuiteStore) {
    write(&s, vec![pair("u1", "s", T0)]).await;
    write(&s, vec![pair("u1", "s", T0 + 3600)]).await;
    // A backfilled, older pair arrives late: it must not shorten the membership.
    write(&s, vec![pair("u1", "s", T0 - 3600)]).await;
    assert_eq!(count(&s, "s", T0 + W + 1800).await, 1);
    assert_eq!(count(&s, "s", T0 + 3600 + W).await, 0);
}

pub async fn list_is_sorted_and_omits_empty_segments(s: SuiteStore) {
    write(
        &s,
        vec![
            pair("u1", "b.seg", T0),
            pair("u1", "a:seg", T0),
            pair("u2", "a:seg", T0),
            pair("u3", "c-seg", T0 - W + 120),
            pair("u4", "A_SEG", T0),
        ],
    )
    .await;
    assert_eq!(
        all(&s, T0).await,
        vec![
            ("A_SEG".to_string(), 1),
            ("a:seg".to_string(), 2),
            ("b.seg".to_string(), 1),
            ("c-seg".to_string(), 1),
        ]
    );
    assert_eq!(
        all(&s, T0 + 180).await,
        vec![
            ("A_SEG".to_string(), 1),
            ("a:seg".to_string(), 2),
            ("b.seg".to_string(), 1),
        ]
    );
}

pub async fn odd_but_valid_names_round_trip(s: SuiteStore) {
    let long_user = "é".repeat(128);
    let quote_user = "o'brien \"quoted\" \\ back`tick";
    let seg = "x".repeat(128);
    write(
        &s,
        vec![
            pair(&long_user, &seg, T0),
            pair(quote_user, &seg, T0),
            pair("用户", "seg:with.dots-and_underscores", T0),
        ],
    )
    .await;
    assert_eq!(count(&s, &seg, T0).await, 2);
    assert_eq!(count(&s, "seg:with.dots-and_underscores", T0).await, 1);
}

/// Random streams of pushes, re-sends, backfills and clock moves, checked after every step
/// against a brute-force model: a user is in a segment at `t` when the latest ts of its pairs
/// there is newer than `t - window`.
pub async fn random_streams_match_brute_force_model(s: SuiteStore, seed: u64, steps: usize) {
    let mut load = Workload::new(seed, 3..60, 1..8);
    let mut model = Model::new(window());
    for step in 0..steps {
        match load.rng.random_range(0..10) {
            0..=5 => {
                let batch = load.batch(1..40, 0.25);
                model.apply(&batch);
                write(&s, batch).await;
            }
            6..=7 => load.days_pass(),
            _ => load.minutes_pass(),
        }
        let now = load.now;
        let expected: Vec<(String, u64)> = model
            .count_all(now, None)
            .into_iter()
            .map(|SegmentCount { segment, users }| (segment, users))
            .collect();
        assert_eq!(
            all(&s, now).await,
            expected,
            "seed {seed} step {step}: count_all at {now}"
        );
        let probe = load.segment();
        assert_eq!(
            count(&s, &probe, now).await,
            model.count(&probe, now, None),
            "seed {seed} step {step}: count({probe}) at {now}"
        );
    }
}

/// Generates one `#[tokio::test]` per suite case. `$make` is an async fn taking the suite's
/// [`window`] and returning a fresh [`SuiteStore`]; `$seeds` random-stream cases of `$steps`
/// steps each are run.
#[macro_export]
macro_rules! store_test_suite {
    ($make:ident, seeds = $seeds:expr, steps = $steps:expr) => {
        mod store_suite {
            use $crate::store_suite as suite;

            $crate::__suite_tests!(suite, super::$make(suite::window()).await;
                empty_store_counts_zero,
                counts_distinct_users_and_resends_do_not_inflate,
                membership_expires_exactly_one_window_after_latest_ts,
                latest_ts_wins_and_backfill_never_shortens,
                list_is_sorted_and_omits_empty_segments,
                odd_but_valid_names_round_trip,
            );
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_streams_match_brute_force_model() {
                for seed in 0..$seeds {
                    suite::random_streams_match_brute_force_model(
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
