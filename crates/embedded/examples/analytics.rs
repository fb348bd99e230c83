//! Measures the analytics of the embedded store at scale (the same Zipf data as `scale`): user
//! lookup, `within` counts, a 3-term expression over the largest segments, the overlap matrix of
//! the 20 largest, export of a large segment (members/s and RSS), deleting 10,000 users, and
//! memory per live pair. The expression and the overlap are also timed with `within=1d` (most
//! memberships out of the lookback) and a day and a minute later with no expiry sweep in between
//! (the oldest minute's memberships expired but still held). Prints one JSON object (used by
//! scripts/bench.sh).
//!
//! cargo run --release -p userseg-embedded --example analytics -- [pairs] [segments] [users]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{latency_ms, rss_bytes, Rng, Scale};
use userseg_domain::{Expr, Within};
use userseg_embedded::MemStore;

/// p50 / p99 / max in milliseconds of `n` runs of `f`.
fn timed(n: usize, mut f: impl FnMut(usize)) -> serde_json::Value {
    let mut t = Vec::with_capacity(n);
    for i in 0..n {
        let s = Instant::now();
        f(i);
        t.push(s.elapsed());
    }
    t.sort();
    let mut latency = latency_ms(&t);
    latency["runs"] = n.into();
    latency
}

#[derive(serde::Serialize)]
struct Line<'a> {
    user_id: &'a str,
    last_seen: i64,
}

fn main() {
    let scale = Scale::from_args();
    let (segments, users, window, now) = (scale.segments, scale.users, scale.window, scale.now);
    let sizes = &scale.sizes;

    let rss0 = rss_bytes();
    let store = Arc::new(MemStore::new(window));
    let mut rng = Rng::new();
    scale.fill(&store, &mut rng);
    let rss1 = rss_bytes();
    let mem = store.memory();
    let live = mem.live_pairs;

    let lookup = timed(20_000, |_| {
        let u = rng.next() % users;
        std::hint::black_box(store.user_segments(&format!("user-{u:012}"), now));
    });
    let day = Within::from_secs(86_400, window).ok();
    let within_all = timed(1000, |_| {
        std::hint::black_box(store.count_all_within(now, day));
    });
    let expr = Expr::parse("segment-000 AND segment-001 AND NOT segment-002").expect("valid");
    let expr_ms = timed(50, |_| {
        std::hint::black_box(store.count_expr(&expr, now, None));
    });
    let expr_users = store.count_expr(&expr, now, None);
    let not_expr = Expr::parse("NOT segment-000").expect("valid");
    let not_ms = timed(5, |_| {
        std::hint::black_box(store.count_expr(&not_expr, now, None));
    });
    let top20: Vec<String> = (0..20).map(|k| format!("segment-{k:03}")).collect();
    let overlap_ms = timed(20, |_| {
        std::hint::black_box(store.overlap(&top20, now, None));
    });
    let expr_day_ms = timed(20, |_| {
        std::hint::black_box(store.count_expr(&expr, now, day));
    });
    let overlap_day_ms = timed(10, |_| {
        std::hint::black_box(store.overlap(&top20, now, day));
    });
    // A day and a minute on, the expiry sweep not yet run (it runs every minute): the oldest
    // minute's memberships are expired but still held. The first query scans and lists the
    // memberships about to expire; the next ones use that list.
    let later = now + 86_400 + 60;
    let expr_expired_ms = timed(100, |_| {
        std::hint::black_box(store.count_expr(&expr, later, None));
    });
    let overlap_expired_ms = timed(100, |_| {
        std::hint::black_box(store.overlap(&top20, later, None));
    });

    // Export: the segment closest to 5M members, serialized as NDJSON on a second thread (as the
    // API does), RSS sampled every 10 ms meanwhile.
    let (target, _) = sizes
        .iter()
        .enumerate()
        .min_by_key(|(_, s)| s.abs_diff(5_000_000))
        .map(|(k, s)| (format!("segment-{k:03}"), *s))
        .unwrap_or_default();
    let rss_before_export = rss_bytes();
    let peak = Arc::new(AtomicU64::new(rss_before_export));
    let done = Arc::new(AtomicBool::new(false));
    let monitor = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<userseg_usecase::Member>>(4);
    let consumer = std::thread::spawn(move || {
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut out = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            out.clear();
            for m in chunk {
                n += 1;
                // As the API writes a line: a struct of a string and an integer.
                let _ = serde_json::to_writer(
                    &mut out,
                    &Line {
                        user_id: &m.user_id,
                        last_seen: m.last_seen,
                    },
                );
                out.push(b'\n');
            }
            bytes += out.len() as u64;
        }
        (n, bytes)
    });
    let t = Instant::now();
    let sent = store
        .export_blocking(&target, now, None, 4096, &tx)
        .unwrap_or(0);
    drop(tx);
    let (received, ndjson_bytes) = consumer.join().unwrap_or((0, 0));
    let export_secs = t.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let _ = monitor.join();
    assert_eq!(sent, received);

    // Delete 10,000 existing users (one request's worth).
    let victims: Vec<String> = (0..10_000)
        .map(|_| format!("user-{:012}", rng.next() % users))
        .collect();
    let t = Instant::now();
    let found = store.delete_users(&victims);
    let delete_secs = t.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "requested_pairs": scale.pairs,
            "live_pairs": live,
            "users": mem.users,
            "segments": segments,
            "largest_segments": &sizes[..3],
            "rss_bytes_per_live_pair": (rss1.saturating_sub(rss0)) as f64 / live as f64,
            "accounted_bytes_per_live_pair": (mem.member_bytes + mem.dict_bytes) as f64 / live as f64,
            "user_lookup_ms": lookup,
            "within_1d_all_segments_ms": within_all,
            "expr_3_terms_largest_ms": expr_ms,
            "expr_3_terms_users": expr_users,
            "expr_not_largest_ms": not_ms,
            "overlap_top20_ms": overlap_ms,
            "expr_3_terms_within_1d_ms": expr_day_ms,
            "overlap_top20_within_1d_ms": overlap_day_ms,
            "expr_3_terms_1d1m_later_unswept_ms": expr_expired_ms,
            "overlap_top20_1d1m_later_unswept_ms": overlap_expired_ms,
            "export": {
                "segment": target,
                "members": sent,
                "seconds": export_secs,
                "members_per_second": sent as f64 / export_secs,
                "ndjson_bytes": ndjson_bytes,
                "rss_growth_bytes": peak.load(Ordering::Relaxed).saturating_sub(rss_before_export),
            },
            "delete_10k_users": {"seconds": delete_secs, "found": found},
        })
    );
}
