//! The change feed's cost on durable ingest: the standalone pipeline in one process (write-ahead
//! log with group commit → batch processor → store), fed by concurrent publishers as fast as
//! it goes, with the feed off and on. Prints one JSON object per run and the overhead.
//!
//! cargo run --release -p userseg-embedded --example changes -- [pairs per phase] [users] [segments]
//! (defaults 4000000 5000000 500)
//! cargo run --release -p userseg-embedded --example changes -- apply   (the store alone)
//!
//! Workload (like `userseg load`): segment `s` holds `users / (s + 1)` users; a pair picks a
//! membership uniformly among all of them, ts = now. Two phases per run: `fill` (an empty
//! store: almost every pair is a new membership, so almost every pair makes an `entered`
//! event: the feed's worst case) and `refresh` (the same pairs a minute later: every pair
//! refreshes a live membership, no event: the cost of detection alone).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use userseg_domain::{Pair, Window};
use userseg_embedded::{
    open_standalone_with, ChangesSetup, EmbeddedStore, FileDeadLetters, WalConfig,
};
use userseg_usecase::{
    BatchConfig, BatchProcessor, Clock, PairPublisher, SegmentWriter, SystemClock,
};

const BATCH: usize = 10_000;

/// xorshift64: deterministic, so both runs see the same pairs.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}
const PUBLISHERS: usize = 4;

struct Workload {
    users: u64,
    /// Cumulative populations.
    cumulative: Vec<u64>,
}

impl Workload {
    fn new(users: u64, segments: usize) -> Workload {
        let mut cumulative = Vec::with_capacity(segments);
        let mut total = 0;
        for s in 0..segments as u64 {
            total += users.div_ceil(s + 1);
            cumulative.push(total);
        }
        Workload { users, cumulative }
    }

    /// Pre-built batches of `pairs` pairs (so that generating costs nothing in the timed part).
    fn batches(&self, pairs: usize, now: i64, rng: &mut Rng) -> Vec<Vec<Pair>> {
        let total = *self.cumulative.last().unwrap_or(&1);
        (0..pairs.div_ceil(BATCH))
            .map(|_| {
                (0..BATCH)
                    .map(|_| {
                        let r = rng.next() % total;
                        let s = self.cumulative.partition_point(|&c| c <= r);
                        let base = if s == 0 { 0 } else { self.cumulative[s - 1] };
                        // Members of segment s: an affine image of 0..population.
                        let k = r - base;
                        let user = (k * 2_654_435_761 + s as u64 * 97) % self.users;
                        Pair {
                            user_id: format!("user-{user:08}"),
                            segment: format!("segment-{s:03}"),
                            ts: now,
                        }
                    })
                    .collect()
            })
            .collect()
    }
}

/// CPU seconds this process used so far (user + system, from /proc/self/stat): the cost
/// figure that a busy machine distorts least.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime is the 12th, stime 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// The same pairs a minute later.
fn later(batches: &[Vec<Pair>]) -> Vec<Vec<Pair>> {
    batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|p| Pair {
                    ts: p.ts + 60,
                    ..p.clone()
                })
                .collect()
        })
        .collect()
}

/// Publishes every batch through the log (4 publishers) and waits until the store applied
/// them; returns the elapsed time.
async fn run_phase(
    log: &userseg_embedded::WalLog,
    wal: &userseg_embedded::WalHandle,
    batches: Vec<Vec<Pair>>,
) -> Duration {
    let started = Instant::now();
    let queue = Arc::new(std::sync::Mutex::new(batches));
    let mut tasks = Vec::new();
    for _ in 0..PUBLISHERS {
        let (queue, log) = (queue.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let Some(b) = queue.lock().unwrap().pop() else {
                    return;
                };
                while let Err(e) = log.publish(b.clone()).await {
                    // Overloaded: the processor is behind; wait a little.
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    while wal.committed() < wal.written() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    started.elapsed()
}

async fn run(feed: bool, fill: &[Vec<Pair>], refresh: &[Vec<Pair>]) -> serde_json::Value {
    let (fill, refresh) = (fill.to_vec(), refresh.to_vec());
    let dir =
        std::env::var("CHANGES_BENCH_DIR").unwrap_or_else(|_| "/tmp/userseg-changes-bench".into());
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::remove_dir_all(&dir);
    let setup = feed.then(|| ChangesSetup {
        retention: Duration::from_secs(7 * 86_400),
        clock: Arc::new(SystemClock),
    });
    let sa = open_standalone_with(&dir, Window::DEFAULT, WalConfig::new(""), setup)
        .unwrap_or_else(|e| panic!("open: {e}"));
    let store = EmbeddedStore(sa.store.clone());
    let writer: Arc<dyn SegmentWriter> = Arc::new(store);
    let processor = BatchProcessor::new(
        writer,
        Arc::new(FileDeadLetters::new(dir.join("dead-letters.ndjson"))),
        BatchConfig {
            batch_size: 100_000,
            flush_interval: Duration::from_millis(200),
            ..BatchConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let source = sa.source;
    let task = {
        let stop = stop.clone();
        tokio::spawn(async move { processor.run(source, stop).await })
    };
    let fill_pairs: usize = fill.iter().map(Vec::len).sum();
    let refresh_pairs: usize = refresh.iter().map(Vec::len).sum();
    let c0 = cpu_seconds();
    let t_fill = run_phase(&sa.log, &sa.wal, fill).await;
    let cpu_fill = cpu_seconds() - c0;
    let events_fill = events(&dir);
    let c0 = cpu_seconds();
    let t_refresh = run_phase(&sa.log, &sa.wal, refresh).await;
    let cpu_refresh = cpu_seconds() - c0;
    let events_all = events(&dir);
    stop.cancel();
    let _ = task.await;
    let change_bytes = dir_bytes(&dir.join("changes"));
    serde_json::json!({
        "feed": feed,
        "fill": {
            "pairs": fill_pairs,
            "seconds": t_fill.as_secs_f64(),
            "pairs_per_s": (fill_pairs as f64 / t_fill.as_secs_f64()).round(),
            "events": events_fill,
            "events_per_s": (events_fill as f64 / t_fill.as_secs_f64()).round(),
            "cpu_s_per_million_pairs": cpu_fill * 1e6 / fill_pairs as f64,
        },
        "refresh": {
            "pairs": refresh_pairs,
            "seconds": t_refresh.as_secs_f64(),
            "pairs_per_s": (refresh_pairs as f64 / t_refresh.as_secs_f64()).round(),
            "events": events_all - events_fill,
            "events_per_s": ((events_all - events_fill) as f64 / t_refresh.as_secs_f64()).round(),
            "cpu_s_per_million_pairs": cpu_refresh * 1e6 / refresh_pairs as f64,
        },
        "change_log_bytes": change_bytes,
        "live_pairs": sa.store.memory().live_pairs,
    })
}

fn events(dir: &std::path::Path) -> u64 {
    let changes = dir.join("changes");
    if !changes.exists() {
        return 0;
    }
    // Counted, not decoded: a few million decoded events would churn the heap the next phase
    // allocates from, in the runs with the feed only.
    userseg_embedded::changes::count_all(&changes).unwrap_or(0)
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The store's apply path alone (no log, no processor): the same batches applied with the
/// feed off and on; returns pairs/s per phase and the events made.
fn apply_only(feed: bool, fill: &[Vec<Pair>], refresh: &[Vec<Pair>]) -> serde_json::Value {
    let store = userseg_embedded::MemStore::new(Window::DEFAULT);
    let dir = std::path::PathBuf::from("/tmp/userseg-changes-bench-apply");
    let _ = std::fs::remove_dir_all(&dir);
    let log = feed.then(|| {
        let clock = Arc::new(SystemClock);
        let cfg = userseg_embedded::ChangeLogConfig::new(&dir, Duration::from_secs(86_400));
        let (log, _) = userseg_embedded::FileChangeLog::open(cfg, clock.clone()).unwrap();
        let log = Arc::new(log);
        store.attach_feed(log.clone(), clock, store.initial_exit_lo(SystemClock.now()));
        log
    });
    let mut out = serde_json::Map::new();
    for (name, batches) in [("fill", fill), ("refresh", refresh)] {
        // Batches of 100,000 pairs, as the processor writes them at full load.
        let big: Vec<Vec<Pair>> = batches.chunks(10).map(|c| c.concat()).collect();
        let n: usize = big.iter().map(Vec::len).sum();
        let started = Instant::now();
        let c0 = cpu_seconds();
        for (i, b) in big.iter().enumerate() {
            store.apply_through(b, Some(i as u64 + 1)).unwrap();
        }
        let t = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - c0;
        out.insert(
            name.into(),
            serde_json::json!({
                "pairs_per_s": (n as f64 / t).round(),
                "seconds": t,
                "cpu_s_per_million_pairs": cpu * 1e6 / n as f64,
            }),
        );
    }
    out.insert("feed".into(), feed.into());
    out.insert(
        "change_log_bytes".into(),
        log.map_or(0, |l| l.end_offset()).into(),
    );
    serde_json::Value::Object(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("apply") {
        let w = Workload::new(5_000_000, 500);
        let mut rng = Rng::new();
        let now = SystemClock.now();
        let fill = w.batches(4_000_000, now, &mut rng);
        let refresh = later(&fill);
        let only = std::env::var("CHANGES_BENCH_ONLY").ok();
        for feed in [false, true, false, true] {
            if only.as_deref().is_some_and(|o| (o == "on") != feed) {
                continue;
            }
            println!("{}", apply_only(feed, &fill, &refresh));
        }
        return;
    }
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let pairs = *args.first().unwrap_or(&4_000_000) as usize;
    let users = *args.get(1).unwrap_or(&5_000_000);
    let segments = *args.get(2).unwrap_or(&500) as usize;
    let now = SystemClock.now();
    let w = Workload::new(users, segments);
    let mut rng = Rng::new();
    let fill = w.batches(pairs, now, &mut rng);
    let refresh = later(&fill);
    let mut results = Vec::new();
    // Off and on alternately, CHANGES_BENCH_RUNS times each (default 2): the best of them
    // each, so a noisy neighbour weighs less (and the medians).
    let runs: usize = std::env::var("CHANGES_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(2);
    for feed in (0..2 * runs).map(|i| i % 2 == 1) {
        let r = run(feed, &fill, &refresh).await;
        println!("{r}");
        results.push(r);
    }
    let best = |feed: bool, phase: &str| {
        results
            .iter()
            .filter(|r| r["feed"] == feed)
            .map(|r| r[phase]["pairs_per_s"].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    let least_cpu = |feed: bool, phase: &str| {
        results
            .iter()
            .filter(|r| r["feed"] == feed)
            .map(|r| r[phase]["cpu_s_per_million_pairs"].as_f64().unwrap_or(0.0))
            .fold(f64::MAX, f64::min)
    };
    // The median run of each: on a shared machine the best run of one configuration may have
    // had the machine to itself, which the median weighs less.
    let median = |feed: bool, phase: &str, key: &str| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|r| r["feed"] == feed)
            .map(|r| r[phase][key].as_f64().unwrap_or(0.0))
            .collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    };
    for phase in ["fill", "refresh"] {
        let (off, on) = (best(false, phase), best(true, phase));
        let (m_off, m_on) = (
            median(false, phase, "pairs_per_s"),
            median(true, phase, "pairs_per_s"),
        );
        let (mc_off, mc_on) = (
            median(false, phase, "cpu_s_per_million_pairs"),
            median(true, phase, "cpu_s_per_million_pairs"),
        );
        let (cpu_off, cpu_on) = (least_cpu(false, phase), least_cpu(true, phase));
        println!(
            "{}",
            serde_json::json!({
                "phase": phase,
                "pairs_per_s_feed_off": off,
                "pairs_per_s_feed_on": on,
                "throughput_cost_percent": ((1.0 - on / off) * 1000.0).round() / 10.0,
                "cpu_s_per_million_pairs_feed_off": (cpu_off * 1000.0).round() / 1000.0,
                "cpu_s_per_million_pairs_feed_on": (cpu_on * 1000.0).round() / 1000.0,
                "cpu_cost_percent": ((cpu_on / cpu_off - 1.0) * 1000.0).round() / 10.0,
                "median_throughput_cost_percent": ((1.0 - m_on / m_off) * 1000.0).round() / 10.0,
                "median_cpu_cost_percent": ((mc_on / mc_off - 1.0) * 1000.0).round() / 10.0,
            })
        );
    }
}
