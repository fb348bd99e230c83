//! Soak with kills, standalone: `userseg standalone` under a paced load at ~70% of the capacity
//! measured on this machine just before (the same binary, `userseg load` unpaced on a fresh
//! server), SIGKILLed every `SOAK_KILL_EVERY` seconds and restarted on the same DATA_DIR, for
//! `SOAK_SECS` seconds. At the end `userseg load --verify` finds every segment's count equal to
//! the generator's exact count, a lag probe's segment counts every acknowledged probe, and the
//! server's RSS at the end is within 20% of its value after warm-up. RSS under this load swings
//! with the batches in flight, so both are medians of the samples (one a second) over the second
//! half of a process's life: of the first restarted process (the first one grows its store
//! from nothing, every later one recovers it from a snapshot and the log), and of the last. It prints the figures: pairs, kills, restart times, acked → visible lag, RSS curve.
//!
//! `make test` runs the short form (30 s, a kill every 10 s, the debug binary); `make soak`
//! the long one (scripts/soak.sh: 10 minutes, a kill a minute, the release binary through
//! `SOAK_BIN`).

mod soak_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use soak_common::{
    assert_exact, bin, curve_text, env_secs, load, max, median, print_lags, print_load, probe,
    probe_count, rss_mib, summary, Lags,
};
use userseg_testkit::{free_port, Proc};

fn spawn_server(data: &Path, port: u16, logs: &Path) -> Proc {
    let env: Vec<(String, String)> = [
        ("DATA_DIR", data.to_string_lossy().as_ref()),
        // Snapshots (and log truncation) during the run, so kills land around them too.
        ("CHECKPOINT_INTERVAL", "10s"),
        // Bounds the pairs accepted but not yet applied (default 1,000,000, ~100 MiB): a
        // moment of backlog on a busy machine then shows as a short overload, not as RSS.
        ("MAX_INFLIGHT_PAIRS", "200000"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Proc::spawn(bin(), &["standalone"], &env, port, logs.join("server.log"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_soak_with_sigkills_loses_nothing_and_keeps_rss_flat() {
    let secs = env_secs("SOAK_SECS", 30);
    let kill_every = env_secs("SOAK_KILL_EVERY", 10);
    let capacity_secs = env_secs("SOAK_CAPACITY_SECS", 5);
    assert!(
        kill_every >= 2 && secs >= 2 * kill_every,
        "SOAK_SECS must be at least 2 × SOAK_KILL_EVERY"
    );
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path();
    println!("soak: binary {}", bin().display());

    // Capacity: unpaced, on a fresh server.
    let capacity = {
        let mut p = spawn_server(&dir.path().join("capacity"), free_port(), logs);
        p.ready().await;
        let (ok, s) = summary(load(&p.base, &["--duration", &format!("{capacity_secs}s")])).await;
        assert!(ok, "capacity run failed: {s}");
        s["pairs_per_sec"].as_f64().expect("pairs_per_sec")
    };
    let rate = (capacity * 0.7).round();
    println!("soak: capacity {capacity:.0} pairs/s (unpaced, {capacity_secs} s); soaking at {rate:.0} pairs/s for {secs} s, SIGKILL every {kill_every} s");

    let data = dir.path().join("data");
    let port = free_port();
    let mut p = spawn_server(&data, port, logs);
    p.ready().await;
    let base = p.base.clone();
    let started = Instant::now();
    let mut gen = load(
        &base,
        &[
            "--rate",
            &rate.to_string(),
            "--duration",
            &format!("{secs}s"),
            "--segment-prefix",
            "soak-",
            "--verify",
            "--verify-timeout",
            "120s",
        ],
    );
    let kills = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let lags = Arc::new(Mutex::new(Lags::default()));
    let prober = tokio::spawn(probe(
        base.clone(),
        base.clone(),
        kills.clone(),
        stop.clone(),
        lags.clone(),
    ));

    // RSS every second; a kill every `kill_every` s, the last at least one interval before
    // the end.
    // (second, RSS MiB, process generation = kills before the sample)
    let mut curve: Vec<(u64, f64, u64)> = Vec::new();
    let mut born = 0u64;
    let mut warm_window: Option<(u64, u64, u64)> = None;
    let mut restarts: Vec<f64> = Vec::new();
    let mut next_kill = kill_every;
    let status = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = started.elapsed().as_secs();
        let rss = rss_mib(p.child.id());
        if let Some(r) = rss {
            curve.push((t, r, kills.load(Ordering::SeqCst)));
        }
        if let Some(status) = gen.try_wait().expect("userseg load") {
            break status;
        }
        if t >= next_kill && next_kill + kill_every <= secs {
            // Warm-up: the second half of the first restarted process's life (of the first
            // process's when it is the only one killed).
            let generation = kills.load(Ordering::SeqCst);
            if generation == 1 || (warm_window.is_none() && next_kill + 2 * kill_every > secs) {
                warm_window = Some((generation, (born + t) / 2, t));
            }
            kills.fetch_add(1, Ordering::SeqCst);
            p.sigkill();
            let killed = Instant::now();
            p = spawn_server(&data, port, logs);
            p.ready().await;
            let took = killed.elapsed().as_secs_f64();
            restarts.push(took);
            born = started.elapsed().as_secs();
            println!("soak: t={t}s SIGKILL; ready again after {took:.2} s");
            next_kill += kill_every;
        }
        assert!(
            started.elapsed() < Duration::from_secs(secs + 300),
            "the load did not finish within 300 s of its duration"
        );
    };
    let last_gen = kills.load(Ordering::SeqCst);
    let end_t = started.elapsed().as_secs();
    let end_rss = median(&curve, last_gen, (born + end_t) / 2, end_t);
    stop.store(true, Ordering::Relaxed);
    prober.await.unwrap();
    let (_, s) = summary(gen).await;

    // Figures.
    let l = std::mem::take(&mut *lags.lock().unwrap());
    print_load("soak", &s);
    println!(
        "soak: kills {}, restart to ready max {:.2} s",
        kills.load(Ordering::SeqCst),
        max(&restarts)
    );
    print_lags("soak", &l);
    println!("soak: RSS MiB curve {}", curve_text(&curve));
    let (g, from, to) = warm_window.expect("a kill");
    let warm = median(&curve, g, from, to);
    println!(
        "soak: RSS (median over the second half of a process's life) after warm-up {warm:.1} MiB, at the end {end_rss:.1} MiB ({:+.1}%)",
        (end_rss / warm - 1.0) * 100.0
    );

    // Verdicts.
    assert!(status.success(), "userseg load failed: {s}");
    assert_exact(status.success(), &s);
    assert!(kills.load(Ordering::SeqCst) >= 1);
    let acked_probes = l.acked;
    let c = reqwest::Client::new();
    assert_eq!(
        probe_count(&c, &base).await,
        Some(acked_probes),
        "every acknowledged probe counted once"
    );
    assert!(
        (end_rss - warm).abs() <= 0.2 * warm,
        "RSS at the end ({end_rss:.1} MiB) is not within 20% of its value after warm-up ({warm:.1} MiB)"
    );

    // And the final state survives one more SIGKILL exactly.
    let before = segments(&c, &base).await;
    p.sigkill();
    let mut p = spawn_server(&data, port, logs);
    p.ready().await;
    assert_eq!(segments(&c, &base).await, before);
}

async fn segments(c: &reqwest::Client, base: &str) -> Vec<(String, u64)> {
    let v: Value = c
        .get(format!("{base}/v1/segments"))
        .send()
        .await
        .expect("segments")
        .json()
        .await
        .expect("json");
    v["segments"]
        .as_array()
        .expect("segments array")
        .iter()
        .map(|s| {
            (
                s["segment"].as_str().unwrap_or_default().to_string(),
                s["users"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}
