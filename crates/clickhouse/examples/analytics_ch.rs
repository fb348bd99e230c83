//! Measures the analytics of the ClickHouse store (what ES answers from with `ES_INDEX=false`)
//! on the Zipf data of the embedded `analytics` example: user lookup, `within=1d` counts of all
//! segments, `a AND b AND NOT c` over the largest segments, the overlap matrix of the 20
//! largest, export of the largest segment, deleting 10,000 users, and the bytes a history
//! sample costs.
//!
//! ```text
//! scripts/clickhouse.sh start /tmp/userseg-ch && set -a && . /tmp/userseg-ch/clickhouse.env && set +a
//! cargo run --release -p userseg-clickhouse --example analytics_ch -- [pairs] [segments] [users]
//! ```
//!
//! Defaults: 10,000,000 pairs, 500 segments, 2,000,000 users. The server is
//! `USERSEG_TEST_CLICKHOUSE_URL` (or `CLICKHOUSE_ADDR`); the data goes into a fresh database
//! `userseg_bench_<pid>`, dropped at the end unless `KEEP=1`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use userseg_clickhouse::{migrate, quote_string, ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Expr, Pair, UserDeletion, Window, Within};
use userseg_usecase::{
    HistoryStore, Member, Mode, SegmentAnalytics, SegmentCount, SegmentCounter, SegmentWriter,
};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn ms(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

/// Runs `f` `n` times and prints p50 / p99 / max in milliseconds.
async fn timed<F, Fut>(what: &str, n: usize, mut f: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut t = Vec::with_capacity(n);
    for i in 0..n {
        let s = Instant::now();
        f(i).await;
        t.push(s.elapsed());
    }
    t.sort();
    println!(
        "{what:<44} p50 {:>8.1} ms  p99 {:>8.1} ms  max {:>8.1} ms  ({n} runs)",
        ms(&t, 0.5),
        ms(&t, 0.99),
        ms(&t, 1.0)
    );
}

async fn scalar(store: &ClickHouseStore, sql: &str) -> u64 {
    let body = store.client().query(sql).await.expect(sql);
    let mut a = [0u8; 8];
    a.copy_from_slice(&body[..8]);
    u64::from_le_bytes(a)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let pairs = *args.first().unwrap_or(&10_000_000);
    let segments = *args.get(1).unwrap_or(&500);
    let users = *args.get(2).unwrap_or(&2_000_000);
    let addr = std::env::var("USERSEG_TEST_CLICKHOUSE_URL")
        .or_else(|_| std::env::var("CLICKHOUSE_ADDR"))
        .expect("set USERSEG_TEST_CLICKHOUSE_URL (scripts/clickhouse.sh start DIR writes it)");
    let config = ClickHouseConfig {
        addr,
        database: format!("userseg_bench_{}", std::process::id()),
        request_timeout: Duration::from_secs(600),
        ..ClickHouseConfig::default()
    };
    migrate(&config).await.expect("migrate");
    let window = Window::DEFAULT;
    let store = Arc::new(ClickHouseStore::new(config.clone(), window).expect("store"));
    let db = format!("`{}`", config.database);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);

    // The data: segment k holds ~pairs/(k·H) users (Zipf), each user a stride walk over the
    // user ids, ts uniform over the last 13 days.
    let harmonic: f64 = (1..=segments).map(|k| 1.0 / k as f64).sum();
    let sizes: Vec<u64> = (1..=segments)
        .map(|k| ((pairs as f64 / harmonic) / k as f64).max(1.0) as u64)
        .map(|s| s.min(users))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut batch = Vec::with_capacity(500_000);
    let t = Instant::now();
    let mut written = 0u64;
    for (k, &size) in sizes.iter().enumerate() {
        let segment = format!("segment-{k:03}");
        let stride = (rng.next() % users.max(2)) | 1;
        let mut u = rng.next() % users;
        for _ in 0..size {
            u = (u + stride) % users;
            batch.push(Pair {
                user_id: format!("user-{u:012}"),
                segment: segment.clone(),
                ts: now - (rng.next() % (13 * 86_400)) as i64,
            });
            if batch.len() == batch.capacity() {
                written += batch.len() as u64;
                store
                    .write(std::mem::take(&mut batch).into())
                    .await
                    .expect("write");
                batch.reserve(500_000);
            }
        }
    }
    written += batch.len() as u64;
    store.write(batch.into()).await.expect("write");
    let load = t.elapsed().as_secs_f64();
    let (all, _) = store.count_all(now, Mode::Exact).await.expect("count_all");
    let live_users = scalar(
        &store,
        &format!("SELECT toUInt64(uniqExact(user_id)) FROM {db}.pairs FORMAT RowBinary"),
    )
    .await;
    println!(
        "loaded {written} pairs ({} segments, {live_users} users; largest {:?}) in {load:.1} s: {:.0} pairs/s",
        all.len(),
        &sizes[..3],
        written as f64 / load
    );
    println!(
        "cores: {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let mut lookup_rng = Rng(7);
    let s = store.clone();
    timed("user lookup", 200, |_| {
        let u = lookup_rng.next() % users;
        let s = s.clone();
        async move {
            std::hint::black_box(
                s.user_segments(&format!("user-{u:012}"), now)
                    .await
                    .expect("lookup"),
            );
        }
    })
    .await;
    let day = Within::from_secs(86_400, window).ok();
    let s = store.clone();
    timed("within=1d, all segments", 20, |_| {
        let s = s.clone();
        async move {
            std::hint::black_box(s.count_all_within(now, day).await.expect("count_all"));
        }
    })
    .await;
    let expr = Expr::parse("segment-000 AND segment-001 AND NOT segment-002").expect("valid");
    let s = store.clone();
    let e = expr.clone();
    timed(
        "segment-000 AND segment-001 AND NOT segment-002",
        20,
        |_| {
            let (s, e) = (s.clone(), e.clone());
            async move {
                std::hint::black_box(s.count_expr(&e, now, None).await.expect("expr"));
            }
        },
    )
    .await;
    println!(
        "  = {} users",
        store.count_expr(&expr, now, None).await.expect("expr")
    );
    let not = Expr::parse("NOT segment-000").expect("valid");
    let s = store.clone();
    timed("NOT segment-000 (every live row)", 5, |_| {
        let (s, e) = (s.clone(), not.clone());
        async move {
            std::hint::black_box(s.count_expr(&e, now, None).await.expect("expr"));
        }
    })
    .await;
    let top20: Vec<String> = (0..20).map(|k| format!("segment-{k:03}")).collect();
    let s = store.clone();
    timed("overlap of the 20 largest", 10, |_| {
        let (s, top) = (s.clone(), top20.clone());
        async move {
            std::hint::black_box(s.overlap(&top, now, None).await.expect("overlap"));
        }
    })
    .await;

    // Export of the largest segment.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Member>>(4);
    let consumer = tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(c) = rx.recv().await {
            n += c.len() as u64;
        }
        n
    });
    let t = Instant::now();
    let sent = store
        .export_members("segment-000", now, None, 4096, tx)
        .await
        .expect("export");
    let received = consumer.await.expect("consumer");
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(sent, received);
    println!(
        "export of segment-000: {sent} members in {secs:.2} s = {:.0} members/s",
        sent as f64 / secs
    );

    // Delete 10,000 users that exist.
    let mut del_rng = Rng(99);
    let victims: Vec<String> = (0..10_000)
        .map(|_| format!("user-{:012}", del_rng.next() % users))
        .collect();
    let deletion = UserDeletion::new(victims).expect("valid ids");
    let held = scalar(
        &store,
        &format!(
            "SELECT toUInt64(count()) FROM {db}.pairs WHERE user_id IN ({}) FORMAT RowBinary",
            deletion
                .user_ids()
                .iter()
                .take(100)
                .map(|u| quote_string(u))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    let t = Instant::now();
    store.delete_users(deletion).await.expect("delete");
    println!(
        "delete 10,000 users (rows of the first 100: {held}): {:.2} s (mutation of {written} rows and the sketch rebuild of every day)",
        t.elapsed().as_secs_f64()
    );
    let (exact, _) = store.count("segment-000", now, Mode::Exact).await.unwrap();
    let (approx, _) = store.count("segment-000", now, Mode::Approx).await.unwrap();
    println!(
        "  after: segment-000 exact {exact}, approx {approx} ({:+.2} %)",
        (approx as f64 / exact.max(1) as f64 - 1.0) * 100.0
    );

    // History: a day of samples every minute of every segment, then its size on disk.
    let counts: Vec<SegmentCount> = all;
    let tick0 = now - now % 86_400 - 86_400;
    let t = Instant::now();
    for i in 0..1440 {
        store.record(tick0 + i * 60, &counts).await.expect("record");
    }
    let rec = t.elapsed().as_secs_f64();
    store
        .client()
        .execute(&format!("OPTIMIZE TABLE {db}.history FINAL"))
        .await
        .expect("optimize");
    let bytes = scalar(
        &store,
        &format!(
            "SELECT toUInt64(sum(bytes_on_disk)) FROM system.parts WHERE database = {} AND table = 'history' AND active FORMAT RowBinary",
            quote_string(&config.database)
        ),
    )
    .await;
    let compressed = scalar(
        &store,
        &format!(
            "SELECT toUInt64(sum(data_compressed_bytes)) FROM system.parts WHERE database = {} AND table = 'history' AND active FORMAT RowBinary",
            quote_string(&config.database)
        ),
    )
    .await;
    let rows = 1440 * (counts.len() as u64 + 1);
    println!(
        "history: 1440 samples of {} segments recorded in {rec:.1} s; {bytes} bytes on disk ({compressed} compressed data): {:.1} bytes per segment per sample, {:.1} KB per sample",
        counts.len(),
        bytes as f64 / rows as f64,
        bytes as f64 / 1440.0 / 1024.0
    );
    let s = store.clone();
    timed("history read, one segment, a day by 1 h", 20, |_| {
        let s = s.clone();
        async move {
            std::hint::black_box(
                s.read("segment-000", tick0, tick0 + 86_399, 3600)
                    .await
                    .expect("read"),
            );
        }
    })
    .await;

    if std::env::var("KEEP").as_deref() != Ok("1") {
        store
            .client()
            .execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .expect("drop the database");
    }
}
