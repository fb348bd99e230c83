//! The ClickHouse store at scale (issue 11): 500 million pairs, 10 million users, 500 segments
//! with Zipf sizes (capped at the number of users), ts over the 14 UTC days before the day the
//! run starts. Prints one JSON object.
//!
//! ```text
//! scripts/clickhouse.sh start /tmp/chscale/ch && set -a && . /tmp/chscale/ch/clickhouse.env && set +a
//! cargo run --release -p userseg-clickhouse --example scale_ch -- [pairs] [segments] [users] [slice]
//! ```
//!
//! Defaults: 500,000,000 pairs, 500 segments, 10,000,000 users, a slice of 20,000,000 pairs.
//!
//! 1. **The slice** (`slice` pairs: the first `slice/pairs` of every segment's users) goes
//!    through the real writer, `ClickHouseStore::write`, in batches of 100,000 pairs (ES's
//!    default `BATCH_SIZE`), one UTC day after the other and shuffled within the day (a batch
//!    of the real ES holds pairs received together: mixed segments and users, one day). The
//!    insert rate is the pairs over the time spent in `write`.
//! 2. **The fill**: the rest of the pairs, generated server-side by `INSERT INTO pairs SELECT …
//!    FROM numbers(…)` (one INSERT per day and group of segments), into the same `pairs` table,
//!    so its materialized views fill `agg_day` and `pairs_by_user` exactly as `write` does.
//!    Stops (and drops the database) when the free space of `DF_PATH` (default `/`) falls below
//!    `MIN_FREE_GB` (default 8).
//! 3. Waits for background merges to settle (no OPTIMIZE), then measures `count` and
//!    `count_all`, exact and approximate, at an instant half a day after the data's last day
//!    (so the window's first day is half expired and approximate counts read it raw), the user
//!    lookup, and bytes on disk per pair of every table (`system.parts`).
//!
//! Segment `k` (0-based) holds users `(offset_k + stride_k · i) mod users` for `i <
//! size_k` (distinct: the stride is prime to `users`), with ts on day `i mod 14` at second
//! `(i · 2654435761 + k · 40503) mod 86400`, so the Rust slice and the SQL fill produce pairs
//! of the one data set. The database `userseg_scale_<pid>` (or `SCALE_DB`) is dropped at the
//! end unless `KEEP=1`; `PHASES=measure` measures a kept database without loading it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};
use userseg_clickhouse::{migrate, quote_string, ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Pair, Window};
use userseg_usecase::{Mode, SegmentAnalytics, SegmentCounter, SegmentWriter};

const DAY: u64 = 86_400;
const DAYS: u64 = 14;
const BATCH: usize = 100_000;
/// Rows per server-side INSERT of the fill (at most; one day, several segments).
const FILL_ROWS: u64 = 12_000_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

struct Segment {
    name: String,
    size: u64,
    slice: u64,
    offset: u64,
    stride: u64,
}

struct Shape {
    users: u64,
    /// Start of the first of the 14 days.
    start: u64,
    segments: Vec<Segment>,
}

impl Shape {
    fn new(pairs: u64, segments: u64, users: u64, slice: u64, start: u64) -> Shape {
        // Zipf sizes c/k capped at `users`, with c chosen so that they add up to `pairs`.
        let total = |c: f64| -> f64 {
            (1..=segments)
                .map(|k| (c / k as f64).min(users as f64).floor())
                .sum()
        };
        let (mut lo, mut hi) = (0.0f64, pairs as f64 * 2.0);
        for _ in 0..200 {
            let mid = (lo + hi) / 2.0;
            if total(mid) < pairs as f64 {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let segments = (1..=segments)
            .map(|k| {
                let size = ((hi / k as f64).min(users as f64).floor() as u64).max(1);
                let mut stride = rng.next() % users.max(2);
                while stride == 0 || gcd(stride, users) != 1 {
                    stride += 1;
                }
                Segment {
                    name: format!("segment-{:03}", k - 1),
                    size,
                    slice: (size as u128 * slice as u128).div_ceil(pairs as u128) as u64,
                    offset: rng.next() % users,
                    stride,
                }
            })
            .collect();
        Shape {
            users,
            start,
            segments,
        }
    }

    fn user(&self, k: usize, i: u64) -> u64 {
        let s = &self.segments[k];
        (s.offset + s.stride * i) % self.users
    }

    fn ts(&self, k: usize, i: u64) -> u64 {
        self.start + (i % DAYS) * DAY + (i.wrapping_mul(2_654_435_761) + k as u64 * 40_503) % DAY
    }

    fn pairs(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// The fill of segment `k` on day `d`: rows `i = d + 14 j` with `slice <= i < size`, as
    /// a SELECT of `segment, user_id, ts`; `None` when there is none.
    fn fill_select(&self, k: usize, d: u64) -> Option<(String, u64)> {
        let s = &self.segments[k];
        // First j with d + 14 j >= slice, and the count of j with d + 14 j < size.
        let j0 = s.slice.saturating_sub(d).div_ceil(DAYS);
        let j1 = s.size.saturating_sub(d).div_ceil(DAYS);
        if j1 <= j0 {
            return None;
        }
        let n = j1 - j0;
        Some((
            format!(
                "SELECT {seg} AS segment, \
                 concat('user-', substring(toString(toUInt64(1000000000000 + ({off} + {stride} * i) % {users})), 2)) AS user_id, \
                 toDateTime(toUInt32({start} + {d} * 86400 + (i * 2654435761 + {k} * 40503) % 86400)) AS ts \
                 FROM (SELECT toUInt64({d} + 14 * ({j0} + number)) AS i FROM numbers({n}))",
                seg = quote_string(&s.name),
                off = s.offset,
                stride = s.stride,
                users = self.users,
                start = self.start,
                k = k as u64,
            ),
            n,
        ))
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Free bytes of the file system holding `path` (from `df`).
fn free_bytes(path: &str) -> u64 {
    let out = std::process::Command::new("df")
        .args(["-Pk", path])
        .output()
        .expect("df");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[i] * 10.0).round() / 10.0
}

fn note(v: &str) {
    eprintln!(
        "[{:>7.1} min, load {}] {v}",
        started().elapsed().as_secs_f64() / 60.0,
        load_average()
    );
}

fn started() -> &'static Instant {
    static S: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    S.get_or_init(Instant::now)
}

/// Runs `f` `n` times: p50, p99, max in milliseconds, and the load averages seen.
async fn timed<F, Fut, T>(what: &str, n: usize, mut f: F) -> (Value, T)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let load_before = load_average();
    let mut t = Vec::with_capacity(n);
    let mut last = None;
    for i in 0..n {
        let s = Instant::now();
        last = Some(f(i).await);
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    let v = json!({
        "runs": n, "p50_ms": pct(&t, 0.5), "p99_ms": pct(&t, 0.99), "max_ms": pct(&t, 1.0),
        "load_before": load_before, "load_after": load_average(),
    });
    note(&format!("{what}: {v}"));
    (v, last.expect("n > 0"))
}

async fn scalar(store: &ClickHouseStore, sql: &str) -> u64 {
    let body = store.client().query(sql).await.expect(sql);
    let mut a = [0u8; 8];
    a.copy_from_slice(&body[..8]);
    u64::from_le_bytes(a)
}

async fn drop_db(store: &ClickHouseStore, db: &str) {
    if std::env::var("KEEP").as_deref() != Ok("1") {
        store
            .client()
            .execute(&format!("DROP DATABASE IF EXISTS {db}"))
            .await
            .expect("drop the database");
        note("database dropped");
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    started();
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let pairs = *args.first().unwrap_or(&500_000_000);
    let segments = *args.get(1).unwrap_or(&500);
    let users = *args.get(2).unwrap_or(&10_000_000);
    let slice = (*args.get(3).unwrap_or(&20_000_000)).min(pairs);
    let phases = std::env::var("PHASES").unwrap_or_else(|_| "load,measure".into());
    let df_path = std::env::var("DF_PATH").unwrap_or_else(|_| "/".into());
    let min_free: u64 = std::env::var("MIN_FREE_GB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8)
        << 30;
    let addr = std::env::var("USERSEG_TEST_CLICKHOUSE_URL")
        .or_else(|_| std::env::var("CLICKHOUSE_ADDR"))
        .expect("set USERSEG_TEST_CLICKHOUSE_URL (scripts/clickhouse.sh start DIR writes it)");
    let database = std::env::var("SCALE_DB")
        .unwrap_or_else(|_| format!("userseg_scale_{}", std::process::id()));
    let config = ClickHouseConfig {
        addr,
        database,
        request_timeout: Duration::from_secs(3600),
        ..ClickHouseConfig::default()
    };
    let window = Window::DEFAULT;
    let store = Arc::new(ClickHouseStore::new(config.clone(), window).expect("store"));
    let db = format!("`{}`", config.database);
    let dbs = quote_string(&config.database);
    // The 14 days before today (UTC); counts are asked half a day after their end.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let start = std::env::var("SCALE_START")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(now / DAY * DAY - DAYS * DAY);
    let at = (start + DAYS * DAY + DAY / 2) as i64;
    let shape = Shape::new(pairs, segments, users, slice, start);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out = json!({
        "pairs": shape.pairs(), "segments": segments, "users": users,
        "largest": shape.segments.iter().take(3).map(|s| s.size).collect::<Vec<_>>(),
        "smallest": shape.segments.last().map(|s| s.size),
        "data_start": start, "at": at, "cores": cores, "database": config.database,
        "free_gb_at_start": free_bytes(&df_path) >> 30,
    });
    note(&format!("{out}"));

    if phases.contains("load") {
        migrate(&config).await.expect("migrate");
        // 1. The slice, through the writer.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut in_write = Duration::ZERO;
        let mut written = 0u64;
        let mut inserts = 0u64;
        let load_before = load_average();
        let wall = Instant::now();
        for d in 0..DAYS {
            let mut day = Vec::new();
            for (k, s) in shape.segments.iter().enumerate() {
                let mut i = d;
                while i < s.slice {
                    day.push(Pair {
                        user_id: format!("user-{:012}", shape.user(k, i)),
                        segment: s.name.clone(),
                        ts: shape.ts(k, i) as i64,
                    });
                    i += DAYS;
                }
            }
            day.shuffle(&mut rng);
            for batch in day.chunks(BATCH) {
                let batch: Arc<[Pair]> = batch.into();
                let t = Instant::now();
                store.write(batch.clone()).await.expect("write");
                in_write += t.elapsed();
                written += batch.len() as u64;
                inserts += 1;
            }
        }
        let wall = wall.elapsed().as_secs_f64();
        out["writer"] = json!({
            "pairs": written, "batch": BATCH, "writes": inserts,
            "seconds_in_write": (in_write.as_secs_f64() * 10.0).round() / 10.0,
            "pairs_per_s": (written as f64 / in_write.as_secs_f64()).round(),
            "wall_seconds": (wall * 10.0).round() / 10.0,
            "load_before": load_before, "load_after": load_average(),
        });
        note(&format!("writer: {}", out["writer"]));

        // 2. The fill, server-side, day by day, several segments per INSERT.
        let t = Instant::now();
        let load_before = load_average();
        let mut filled = 0u64;
        let mut statements = 0u64;
        let mut min_free_seen = u64::MAX;
        let mut stopped = None;
        'days: for d in 0..DAYS {
            let mut group: Vec<String> = Vec::new();
            let mut rows = 0u64;
            for k in 0..=shape.segments.len() {
                let next = (k < shape.segments.len())
                    .then(|| shape.fill_select(k, d))
                    .flatten();
                let flush = k == shape.segments.len()
                    || next.as_ref().is_some_and(|(_, n)| rows + n > FILL_ROWS);
                if flush && !group.is_empty() {
                    let free = free_bytes(&df_path);
                    min_free_seen = min_free_seen.min(free);
                    if free < min_free {
                        stopped = Some(format!(
                            "free space {} GB below {} GB after {filled} pairs",
                            free >> 30,
                            min_free >> 30
                        ));
                        break 'days;
                    }
                    let sql = format!(
                        "INSERT INTO {db}.pairs (segment, user_id, ts) SELECT segment, user_id, ts FROM ({})",
                        group.join(" UNION ALL ")
                    );
                    let s = Instant::now();
                    store.client().execute(&sql).await.expect("fill insert");
                    filled += rows;
                    statements += 1;
                    note(&format!(
                        "fill day {d}: {rows} rows in {:.1} s, {filled} filled, {:.0} rows/s overall, {} GB free",
                        s.elapsed().as_secs_f64(),
                        filled as f64 / t.elapsed().as_secs_f64(),
                        free >> 30
                    ));
                    group.clear();
                    rows = 0;
                }
                if let Some((sql, n)) = next {
                    group.push(sql);
                    rows += n;
                }
            }
        }
        let secs = t.elapsed().as_secs_f64();
        out["fill"] = json!({
            "pairs": filled, "inserts": statements, "seconds": (secs * 10.0).round() / 10.0,
            "pairs_per_s": (filled as f64 / secs).round(),
            "min_free_gb": min_free_seen >> 30,
            "load_before": load_before, "load_after": load_average(),
        });
        note(&format!("fill: {}", out["fill"]));
        if let Some(why) = stopped {
            out["stopped"] = json!(why);
            println!("{out}");
            drop_db(&store, &db).await;
            std::process::exit(1);
        }
    }

    if phases.contains("measure") {
        // 3. Merges settle.
        let t = Instant::now();
        loop {
            let merging = scalar(
                &store,
                &format!("SELECT toUInt64(count()) FROM system.merges WHERE database = {dbs} FORMAT RowBinary"),
            )
            .await;
            if merging == 0 {
                break;
            }
            if free_bytes(&df_path) < min_free {
                out["stopped"] = json!("free space below the limit while merging");
                println!("{out}");
                drop_db(&store, &db).await;
                std::process::exit(1);
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        out["merges_settled_after_s"] = json!(t.elapsed().as_secs());
        let mut tables = serde_json::Map::new();
        let total = scalar(
            &store,
            &format!("SELECT toUInt64(count()) FROM {db}.pairs FORMAT RowBinary"),
        )
        .await;
        for table in ["pairs", "agg_day", "pairs_by_user"] {
            let q = |col: &str| {
                format!(
                    "SELECT toUInt64({col}) FROM system.parts WHERE database = {dbs} AND table = '{table}' AND active FORMAT RowBinary"
                )
            };
            let bytes = scalar(&store, &q("sum(bytes_on_disk)")).await;
            let rows = scalar(&store, &q("sum(rows)")).await;
            let parts = scalar(&store, &q("count()")).await;
            let uncompressed = scalar(&store, &q("sum(data_uncompressed_bytes)")).await;
            tables.insert(
                table.into(),
                json!({
                    "rows": rows, "parts": parts, "bytes_on_disk": bytes,
                    "uncompressed_bytes": uncompressed,
                    "bytes_per_row": (bytes as f64 / rows.max(1) as f64 * 100.0).round() / 100.0,
                    "bytes_per_pair": (bytes as f64 / total.max(1) as f64 * 100.0).round() / 100.0,
                }),
            );
        }
        out["rows_in_pairs"] = json!(total);
        out["storage"] = Value::Object(tables);
        out["free_gb_loaded"] = json!(free_bytes(&df_path) >> 30);
        note(&format!("storage: {}", out["storage"]));

        // Sanity: the largest segment holds exactly its users (distinct by construction).
        let s0 = &shape.segments[0];
        let (exact0, _) = store.count(&s0.name, at, Mode::Exact).await.expect("count");
        let bound = at as u64 - window.secs();
        let expected = (0..s0.size).filter(|&i| shape.ts(0, i) > bound).count();
        out["largest_live_users"] = json!(exact0);
        out["largest_live_users_expected"] = json!(expected);
        let mid = &shape.segments[shape.segments.len() / 10].name;
        let small = &shape.segments[shape.segments.len() - 1].name;
        let mut counts = serde_json::Map::new();
        for (label, seg, runs) in [
            ("largest", &s0.name, 10),
            ("rank_50", mid, 20),
            ("smallest", small, 20),
        ] {
            for mode in [Mode::Exact, Mode::Approx] {
                let s = store.clone();
                let (mut v, n) = timed(&format!("count {label} {mode:?}"), runs, |_| {
                    let s = s.clone();
                    let seg = seg.clone();
                    async move { s.count(&seg, at, mode).await.expect("count").0 }
                })
                .await;
                v["segment"] = json!(seg);
                v["users"] = json!(n);
                counts.insert(format!("count_{label}_{mode:?}").to_lowercase(), v);
            }
        }
        for (mode, runs) in [(Mode::Approx, 5), (Mode::Exact, 3)] {
            // One run first: the exact count of every segment may exceed the server's memory
            // limit, which is a finding, not a reason to stop.
            let label = format!("count_all_{mode:?}").to_lowercase();
            let t = Instant::now();
            match store.count_all(at, mode).await {
                Err(e) => {
                    let v = json!({"error": e.to_string(), "after_ms": t.elapsed().as_millis() as u64, "load": load_average()});
                    note(&format!("{label}: {v}"));
                    counts.insert(label, v);
                }
                Ok((c, _)) => {
                    let s = store.clone();
                    let (mut v, _) = timed(&label, runs, |_| {
                        let s = s.clone();
                        async move { s.count_all(at, mode).await.expect("count_all").0.len() }
                    })
                    .await;
                    v["segments"] = json!(c.len());
                    v["first_run_ms"] = json!(t.elapsed().as_millis() as u64);
                    counts.insert(label, v);
                }
            }
        }
        out["counts"] = Value::Object(counts);
        let mut lookup_rng = Rng(11);
        let s = store.clone();
        let (v, _) = timed("user lookup", 200, |_| {
            let u = lookup_rng.next() % users;
            let s = s.clone();
            async move {
                s.user_segments(&format!("user-{u:012}"), at)
                    .await
                    .expect("lookup")
                    .len()
            }
        })
        .await;
        out["user_lookup"] = v;
        out["load_at_end"] = json!(load_average());
    }
    println!("{out}");
    drop_db(&store, &db).await;
}
