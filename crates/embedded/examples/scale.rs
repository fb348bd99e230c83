//! Measures the embedded store at scale: memory per live pair, estimate latency, snapshot and
//! restart time. Prints one JSON object (used by scripts/bench.sh).
//!
//! cargo run --release -p userseg-embedded --example scale -- [pairs] [segments] [users]

mod common;

use std::time::Instant;

use common::{latency_ms, rss_bytes, Rng, Scale};
use userseg_embedded::store::snapshot;
use userseg_embedded::MemStore;

fn main() {
    let scale = Scale::from_args();
    let (pairs, segments, window, now) = (scale.pairs, scale.segments, scale.window, scale.now);
    // Pairs generated in all (a segment holds at most every user).
    let total: u64 = scale.sizes.iter().sum();

    let rss0 = rss_bytes();
    let store = MemStore::new(window);
    let started = Instant::now();
    let applying = scale.fill(&store, &mut Rng::new());
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
            "estimate_all_ms": latency_ms(&all),
            "estimate_one_ms": latency_ms(&one),
            "snapshot_write_seconds": snap_write.as_secs_f64(),
            "snapshot_bytes": snap_bytes,
            "restart_from_snapshot_seconds": snap_load.as_secs_f64(),
        })
    );
}
