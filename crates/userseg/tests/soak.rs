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

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use userseg_testkit::{free_port, Proc};

fn env_secs(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number of seconds: {e}")),
        Err(_) => default,
    }
}

/// The binary under test: `SOAK_BIN` (make soak: the release build) or Cargo's build.
fn bin() -> PathBuf {
    std::env::var_os("SOAK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_userseg")))
}

const USERS: &str = "50000";
const SEGMENTS: &str = "10";

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

/// `userseg load ... --json` as a child process; its stdout is the summary.
fn load(target: &str, flags: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(bin())
        .arg("load")
        .args(["--target", target, "--json"])
        .args(["--users", USERS, "--segments", SEGMENTS])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start userseg load")
}

async fn summary(child: tokio::process::Child) -> (bool, Value) {
    let out = child.wait_with_output().await.expect("userseg load");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from userseg load: {text}"));
    (out.status.success(), json)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Lag probe: one new user a second in segment `lag-probe`, pushed until acknowledged; the lag
/// is from the acknowledgement to the count showing it. Probes whose wait spans a kill are
/// reported apart (their lag includes the restart).
#[derive(Default)]
struct Lags {
    acked: u64,
    calm: Vec<f64>,
    across_kill: Vec<f64>,
}

async fn probe_count(c: &reqwest::Client, base: &str) -> Option<u64> {
    let r = c
        .get(format!("{base}/v1/segments/lag-probe"))
        .send()
        .await
        .ok()?;
    r.json::<Value>().await.ok()?["users"].as_u64()
}

async fn probe(base: String, kills: Arc<AtomicU64>, stop: Arc<AtomicBool>, lags: Arc<Mutex<Lags>>) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = serde_json::json!({"pairs": [{"user_id": format!("probe-{i}"), "segment": "lag-probe"}]});
        let ok = c
            .post(format!("{base}/v1/pairs"))
            .json(&body)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let acked = Instant::now();
        let kills_before = kills.load(Ordering::SeqCst);
        i += 1;
        lags.lock().unwrap().acked = i;
        loop {
            if probe_count(&c, &base).await.is_some_and(|n| n >= i) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            assert!(
                acked.elapsed() < Duration::from_secs(120),
                "probe {i} not visible 120 s after its acknowledgement"
            );
        }
        let lag = acked.elapsed().as_secs_f64();
        {
            let mut l = lags.lock().unwrap();
            if kills.load(Ordering::SeqCst) == kills_before {
                l.calm.push(lag);
            } else {
                l.across_kill.push(lag);
            }
        }
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
}

/// The median RSS of process `generation` between seconds `from` and `to`.
fn median(curve: &[(u64, f64, u64)], generation: u64, from: u64, to: u64) -> f64 {
    let mut v: Vec<f64> = curve
        .iter()
        .filter(|(t, _, g)| *g == generation && (from..=to).contains(t))
        .map(|(_, r, _)| *r)
        .collect();
    assert!(
        !v.is_empty(),
        "no RSS sample of process {generation} in {from}..={to} s"
    );
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn p99(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get((s.len() * 99 / 100).min(s.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
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
    println!(
        "soak: pairs generated {}, accepted {} ({:.0} pairs/s), retries {}, errors {}",
        s["pairs_generated"],
        s["pairs_accepted"],
        s["pairs_per_sec"].as_f64().unwrap_or(0.0),
        s["retries"],
        s["errors"]
    );
    println!(
        "soak: kills {}, restart to ready max {:.2} s",
        kills.load(Ordering::SeqCst),
        max(&restarts)
    );
    println!(
        "soak: acked → visible lag: {} probes without a kill: max {:.3} s, p99 {:.3} s; {} across a kill: max {:.2} s",
        l.calm.len(),
        max(&l.calm),
        p99(&l.calm),
        l.across_kill.len(),
        max(&l.across_kill)
    );
    let verify = &s["verify"];
    println!(
        "soak: verify ok={} exact={} memberships {} segments expected users {} actual {} (waited {:.2} s)",
        verify["ok"], verify["exact"], verify["memberships"], verify["expected_users"], verify["actual_users"], verify["waited_secs"].as_f64().unwrap_or(-1.0)
    );
    let curve_text: Vec<String> = curve
        .iter()
        .step_by((curve.len() / 30).max(1))
        .map(|(t, r, _)| format!("{t}s:{r:.0}"))
        .collect();
    println!("soak: RSS MiB curve {}", curve_text.join(" "));
    let (g, from, to) = warm_window.expect("a kill");
    let warm = median(&curve, g, from, to);
    println!(
        "soak: RSS (median over the second half of a process's life) after warm-up {warm:.1} MiB, at the end {end_rss:.1} MiB ({:+.1}%)",
        (end_rss / warm - 1.0) * 100.0
    );

    // Verdicts.
    assert!(status.success(), "userseg load failed: {s}");
    assert_eq!(s["fatal"], Value::Null, "{s}");
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["exact"], true, "{verify}");
    // Exact: no membership near a window edge, the sums equal, no segment off.
    assert_eq!(verify["uncertain"], 0, "{verify}");
    assert_eq!(verify["expected_users"], verify["actual_users"], "{verify}");
    assert_eq!(verify["mismatches"], serde_json::json!([]), "{verify}");
    assert_eq!(
        verify["segments_checked"],
        SEGMENTS.parse::<u64>().unwrap(),
        "{verify}"
    );
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
