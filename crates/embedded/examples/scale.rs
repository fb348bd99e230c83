//! Measures the embedded store at scale: memory per live pair, estimate latency, snapshot and
//! restart time. Prints one JSON object (used by scripts/bench.sh).
//!
//! cargo run --release -p userseg-embedded --example scale -- [pairs] [segments] [users]

use std::time::{Duration, Instant};

use userseg_domain::{Pair, Window};
use userseg_embedded::store::snapshot;
use userseg_embedded::MemStore;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// xorshift: cheap deterministic randomness.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn main() {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .filter_map(|a| a.replace('_', "").parse().ok())
        .collect();
    let pairs = *args.first().unwrap_or(&10_000_000);
    let segments = *args.get(1).unwrap_or(&500);
    let users = *args.get(2).unwrap_or(&(pairs / 5).max(1));
    let window = Window::DEFAULT;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);

    // Segment sizes follow a Zipf-like law: segment k gets a share ∝ 1/(k+1).
    let harmonic: f64 = (1..=segments).map(|k| 1.0 / k as f64).sum();
    let sizes: Vec<u64> = (1..=segments)
        .map(|k| ((pairs as f64 / harmonic) / k as f64).max(1.0) as u64)
        .map(|s| s.min(users))
        .collect();
    let total: u64 = sizes.iter().sum();

    let rss0 = rss_bytes();
    let store = MemStore::new(window);
    let mut rng = Rng(0x9e3779b97f4a7c15);
    let started = Instant::now();
    let mut batch = Vec::with_capacity(100_000);
    let mut applying = Duration::ZERO;
    for (k, &size) in sizes.iter().enumerate() {
        let segment = format!("segment-{k:03}");
        // Distinct users per segment: a random stride walk over the user space.
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
                let t = Instant::now();
                let _ = store.apply(&batch);
                applying += t.elapsed();
                batch.clear();
            }
        }
    }
    let t = Instant::now();
    let _ = store.apply(&batch);
    applying += t.elapsed();
    drop(batch);
    let ingest = started.elapsed();
    let rss1 = rss_bytes();
    let mem = store.memory();

    let mut all = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let list = store.count_all(now);
        all.push(t.elapsed());
        std::hint::black_box(list);
    }
    all.sort();
    let mut one = Vec::new();
    for i in 0..2000 {
        let t = Instant::now();
        std::hint::black_box(store.count(&format!("segment-{:03}", i % segments), now));
        one.push(t.elapsed());
    }
    one.sort();

    let dir = std::env::var("SCALE_DIR").unwrap_or_else(|_| "/tmp/userseg-scale".into());
    let dir = std::path::PathBuf::from(dir);
    let _ = std::fs::remove_dir_all(&dir);
    let t = Instant::now();
    let path = snapshot::write(&store, &dir, 1).unwrap_or_else(|e| panic!("snapshot: {e}"));
    let snap_write = t.elapsed();
    let snap_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let expected = store.count_all(now);
    drop(store);
    let t = Instant::now();
    let (loaded, _) = snapshot::load(&path, window).unwrap_or_else(|e| panic!("load: {e}"));
    let snap_load = t.elapsed();
    assert_eq!(
        loaded.count_all(now),
        expected,
        "restart must reproduce the counts"
    );
    let _ = std::fs::remove_dir_all(&dir);

    let live = mem.live_pairs;
    println!(
        "{}",
        serde_json::json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "requested_pairs": pairs,
            "live_pairs": live,
            "generated_pairs": total,
            "segments": segments,
            "users": mem.users,
            "ingest_seconds": ingest.as_secs_f64(),
            "ingest_pairs_per_second": total as f64 / ingest.as_secs_f64(),
            "apply_pairs_per_second": total as f64 / applying.as_secs_f64(),
            "rss_bytes_per_live_pair": (rss1.saturating_sub(rss0)) as f64 / live as f64,
            "accounted_bytes_per_live_pair": (mem.member_bytes + mem.dict_bytes) as f64 / live as f64,
            "member_bytes_per_live_pair": mem.member_bytes as f64 / live as f64,
            "dict_bytes_per_user": mem.dict_bytes as f64 / mem.users.max(1) as f64,
            "estimate_all_ms": {"p50": percentile(&all, 0.5), "p99": percentile(&all, 0.99), "max": percentile(&all, 1.0)},
            "estimate_one_ms": {"p50": percentile(&one, 0.5), "p99": percentile(&one, 0.99), "max": percentile(&one, 1.0)},
            "snapshot_write_seconds": snap_write.as_secs_f64(),
            "snapshot_bytes": snap_bytes,
            "restart_from_snapshot_seconds": snap_load.as_secs_f64(),
        })
    );
}
