//! Approximate mode on a larger data set: within a stated relative error of the exact count,
//! with expiry exact to the second.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use userseg_clickhouse::ClickHouseStore;
use userseg_domain::{Pair, Window};
use userseg_usecase::{Mode, SegmentCounter, SegmentWriter};

use crate::common::{fresh_store, pair};

const DAY: i64 = 86_400;
const W: i64 = 14 * DAY;
const T0: i64 = 1_763_942_400;
/// The bound asserted: uniqCombined's standard error is about 0.3 % at these sizes (expiry is
/// exact, so time adds no error).
const MAX_RELATIVE_ERROR: f64 = 0.02;

/// Segments and their user populations; every user gets 1..=3 pairs spread over 20 days.
const SEGMENTS: &[(&str, usize)] = &[
    ("big", 150_000),
    ("mid", 30_000),
    ("small", 2_000),
    ("tiny", 7),
];

async fn load(store: &ClickHouseStore, rng: &mut StdRng) -> usize {
    let mut total = 0;
    let mut batch: Vec<Pair> = Vec::with_capacity(100_000);
    for (segment, users) in SEGMENTS {
        for u in 0..*users {
            let user = format!("user-{u:08}-{}", rng.random_range(0..1_000_000u32));
            for _ in 0..rng.random_range(1..=3) {
                // Anywhere from 20 days before T0 + 14 days to T0 + 14 days.
                let ts = T0 - 6 * DAY + rng.random_range(0..20 * DAY);
                batch.push(pair(&user, segment, ts));
            }
            if batch.len() >= 100_000 {
                total += batch.len();
                store
                    .write(std::mem::take(&mut batch).into())
                    .await
                    .unwrap();
            }
        }
    }
    total += batch.len();
    store.write(batch.into()).await.unwrap();
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approx_counts_are_within_the_stated_error() {
    let store = fresh_store(Window::DEFAULT).await;
    let mut rng = StdRng::seed_from_u64(7);
    let started = Instant::now();
    let rows = load(&store, &mut rng).await;
    let load_secs = started.elapsed().as_secs_f64();
    println!(
        "approx: inserted {rows} pairs in {load_secs:.2} s ({:.0} rows/s)",
        rows as f64 / load_secs
    );

    let mut worst: f64 = 0.0;
    for at in [
        T0 + W - 3 * DAY,
        T0 + W,
        T0 + W + 4 * DAY + 1234,
        T0 + W + 7 * DAY + 59,
    ] {
        let t = Instant::now();
        let (exact, is_exact) = store.count_all(at, Mode::Exact).await.unwrap();
        let exact_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let (approx, is_exact_approx) = store.count_all(at, Mode::Approx).await.unwrap();
        let approx_ms = t.elapsed().as_secs_f64() * 1e3;
        assert!(is_exact && !is_exact_approx);
        let names = |l: &[userseg_usecase::SegmentCount]| {
            l.iter().map(|c| c.segment.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(&exact), names(&approx), "same segments at {at}");
        for (e, a) in exact.iter().zip(&approx) {
            let err = (a.users as f64 - e.users as f64).abs() / e.users as f64;
            worst = worst.max(err);
            println!(
                "approx: at {at} {}: exact {} approx {} error {:.3}%",
                e.segment,
                e.users,
                a.users,
                err * 100.0
            );
            assert!(
                err <= MAX_RELATIVE_ERROR,
                "{} at {at}: exact {} approx {} ({:.2}%)",
                e.segment,
                e.users,
                a.users,
                err * 100.0
            );
            let (one, _) = store.count(&e.segment, at, Mode::Approx).await.unwrap();
            assert_eq!(one, a.users, "count and count_all agree");
        }
        println!("approx: count_all at {at}: exact {exact_ms:.1} ms, approx {approx_ms:.1} ms");
    }
    println!("approx: worst relative error {:.3}%", worst * 100.0);
}

#[tokio::test]
async fn approx_expiry_is_exact_to_the_second_across_day_boundaries() {
    let store = fresh_store(Window::DEFAULT).await;
    // Event times at, just after and just before day boundaries, and mid-minute.
    let times = [
        T0,
        T0 + 1,
        T0 + 30,
        T0 + DAY - 1,
        T0 + DAY,
        T0 + DAY / 2 + 17,
    ];
    let batch: Vec<Pair> = times
        .iter()
        .enumerate()
        .map(|(i, ts)| pair(&format!("u{i}"), &format!("s{i}"), *ts))
        .collect();
    store.write(batch.into()).await.unwrap();
    for (i, ts) in times.iter().enumerate() {
        let seg = format!("s{i}");
        for (at, want) in [
            (*ts, 1),
            (ts + DAY, 1),
            (ts + W - DAY, 1),
            (ts + W - 1, 1),
            (ts + W, 0),
            (ts + W + 1, 0),
        ] {
            for mode in [Mode::Exact, Mode::Approx] {
                assert_eq!(
                    store.count(&seg, at, mode).await.unwrap().0,
                    want,
                    "{mode:?}: pair at {ts} counted at {at}"
                );
            }
        }
    }
}
