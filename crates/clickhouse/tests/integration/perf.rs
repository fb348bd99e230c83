//! A measurement, not a check: `cargo test -p userseg-clickhouse --test integration perf --
//! --ignored --nocapture`. Loads `USERSEG_PERF_ROWS` pairs (default 2,000,000) and prints insert
//! throughput and the latency of exact and approximate counts.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use userseg_clickhouse::ClickHouseStore;
use userseg_domain::{Pair, Window};
use userseg_usecase::{Mode, SegmentCounter, SegmentWriter};

use crate::common::{fresh_store, pair};

const DAY: i64 = 86_400;
const T0: i64 = 1_763_942_400;
const SEGMENTS: usize = 50;
const BATCH: usize = 100_000;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run explicitly"]
async fn perf() {
    let rows: usize = std::env::var("USERSEG_PERF_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000_000);
    let users = rows / 3;
    let store = fresh_store(Window::DEFAULT).await;
    let mut rng = StdRng::seed_from_u64(1);
    let now = T0 + 14 * DAY;
    let mut in_write = Duration::ZERO;
    let mut written = 0;
    while written < rows {
        let n = BATCH.min(rows - written);
        let batch: Vec<Pair> = (0..n)
            .map(|_| {
                // Segment sizes fall off like 1/rank.
                let r: f64 = rng.random();
                let seg = ((SEGMENTS as f64).powf(r) as usize).min(SEGMENTS) - 1;
                pair(
                    &format!("user-{:09}", rng.random_range(0..users)),
                    &format!("segment-{seg:02}"),
                    now - rng.random_range(0..16 * DAY),
                )
            })
            .collect();
        let t = Instant::now();
        store.write(batch.into()).await.expect("write");
        in_write += t.elapsed();
        written += n;
    }
    println!(
        "perf: {rows} pairs in batches of {BATCH}: {:.1} s in write(), {:.0} rows/s",
        in_write.as_secs_f64(),
        rows as f64 / in_write.as_secs_f64()
    );

    measure(&store, now, "fresh parts").await;
    let t = Instant::now();
    for table in userseg_clickhouse::PARTITIONED_TABLES {
        store
            .client()
            .execute(&format!(
                "OPTIMIZE TABLE `{}`.{table} FINAL",
                store.database()
            ))
            .await
            .expect("optimize");
    }
    println!(
        "perf: OPTIMIZE FINAL of all tables took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    measure(&store, now, "merged parts").await;

    let (exact, _) = store.count_all(now, Mode::Exact).await.unwrap();
    let (approx, _) = store.count_all(now, Mode::Approx).await.unwrap();
    let worst = exact
        .iter()
        .zip(&approx)
        .map(|(e, a)| (a.users as f64 - e.users as f64).abs() / e.users as f64)
        .fold(0.0, f64::max);
    println!(
        "perf: worst approx relative error over {SEGMENTS} segments: {:.3}%",
        worst * 100.0
    );
}

async fn measure(store: &ClickHouseStore, now: i64, label: &str) {
    for mode in [Mode::Exact, Mode::Approx] {
        let mut one = Vec::new();
        let mut all = Vec::new();
        let mut biggest = 0;
        for i in 0..5 {
            let at = now + i * 600;
            let t = Instant::now();
            let (list, _) = store.count_all(at, mode).await.expect("count_all");
            all.push(t.elapsed());
            biggest = list.iter().map(|c| c.users).max().unwrap_or(0);
            let t = Instant::now();
            store.count("segment-00", at, mode).await.expect("count");
            one.push(t.elapsed());
        }
        println!(
            "perf: {label}: {mode:?}: count(largest segment, {biggest} users) median {:.1} ms, count_all({SEGMENTS} segments) median {:.1} ms",
            median(one).as_secs_f64() * 1e3,
            median(all).as_secs_f64() * 1e3,
        );
    }
}
