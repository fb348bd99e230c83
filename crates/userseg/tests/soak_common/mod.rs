//! What the soaks with kills share (crates/userseg/tests/soak.rs, standalone, and
//! crates/userseg/tests/soak_distributed.rs): the binary under test, `userseg load` as a child
//! process, RSS samples and their medians, and the acked → visible lag probe.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn env_secs(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number of seconds: {e}")),
        Err(_) => default,
    }
}

/// The binary under test: `SOAK_BIN` (make soak: the release build) or Cargo's build.
pub fn bin() -> PathBuf {
    std::env::var_os("SOAK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_userseg")))
}

pub const SEGMENTS: &str = "10";

/// Distinct users of the generated workload: `SOAK_USERS`; by default 50,000 for a soak of 5
/// minutes or more and 5,000 for the short forms. Every membership (users × 10 segments) must
/// exist early in the run, so that the data stops growing and the RSS after warm-up and at the
/// end can be compared: the short forms push only ~100k pairs.
pub fn users() -> String {
    std::env::var("SOAK_USERS").unwrap_or_else(|_| {
        let long = std::env::var("SOAK_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|secs| secs >= 300);
        if long { "50000" } else { "5000" }.into()
    })
}

/// `userseg load ... --json` as a child process; its stdout is the summary.
pub fn load(target: &str, flags: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(bin())
        .arg("load")
        .args(["--target", target, "--json"])
        .args(["--users", &users(), "--segments", SEGMENTS])
        .args(flags)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start userseg load")
}

pub async fn summary(child: tokio::process::Child) -> (bool, Value) {
    let out = child.wait_with_output().await.expect("userseg load");
    let text = String::from_utf8_lossy(&out.stdout);
    let json = text
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<Value>(l).ok())
        .unwrap_or_else(|| panic!("no JSON summary from userseg load: {text}"));
    (out.status.success(), json)
}

/// Asserts that `userseg load --verify` found every segment's count equal to the generator's
/// exact count.
pub fn assert_exact(ok: bool, s: &Value) {
    let verify = &s["verify"];
    assert!(ok, "userseg load failed: {s}");
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
}

/// Prints the load generator's figures and its verdict.
pub fn print_load(tag: &str, s: &Value) {
    println!(
        "{tag}: pairs generated {}, accepted {} ({:.0} pairs/s), retries {}, errors {}",
        s["pairs_generated"],
        s["pairs_accepted"],
        s["pairs_per_sec"].as_f64().unwrap_or(0.0),
        s["retries"],
        s["errors"]
    );
    let verify = &s["verify"];
    println!(
        "{tag}: verify ok={} exact={} memberships {} segments expected users {} actual {} (waited {:.2} s)",
        verify["ok"], verify["exact"], verify["memberships"], verify["expected_users"], verify["actual_users"], verify["waited_secs"].as_f64().unwrap_or(-1.0)
    );
}

pub fn rss_mib(pid: u32) -> Option<f64> {
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
/// is from the acknowledgement to the count showing it. Probes whose wait spans a disruption
/// (a kill, a restart) are reported apart (their lag includes the restart).
#[derive(Default)]
pub struct Lags {
    pub acked: u64,
    pub calm: Vec<f64>,
    pub across_kill: Vec<f64>,
}

pub async fn probe_count(c: &reqwest::Client, base: &str) -> Option<u64> {
    let r = c
        .get(format!("{base}/v1/segments/lag-probe"))
        .send()
        .await
        .ok()?;
    r.json::<Value>().await.ok()?["users"].as_u64()
}

/// Pushes probes to `push` and reads their count from `read` until `stop`; `kills` counts the
/// disruptions so far.
pub async fn probe(
    push: String,
    read: String,
    kills: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    lags: Arc<Mutex<Lags>>,
) {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let body = serde_json::json!({"pairs": [{"user_id": format!("probe-{i}"), "segment": "lag-probe"}]});
        let ok = c
            .post(format!("{push}/v1/pairs"))
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
            if probe_count(&c, &read).await.is_some_and(|n| n >= i) {
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

/// Prints the lag probe's figures.
pub fn print_lags(tag: &str, l: &Lags) {
    println!(
        "{tag}: acked → visible lag: {} probes without a disruption: max {:.3} s, p99 {:.3} s; {} across a kill or restart: max {:.2} s",
        l.calm.len(),
        max(&l.calm),
        p99(&l.calm),
        l.across_kill.len(),
        max(&l.across_kill)
    );
}

/// The median RSS of process `generation` between seconds `from` and `to`.
pub fn median(curve: &[(u64, f64, u64)], generation: u64, from: u64, to: u64) -> f64 {
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

/// About 30 points of an RSS curve, `second s:MiB`.
pub fn curve_text(curve: &[(u64, f64, u64)]) -> String {
    curve
        .iter()
        .step_by((curve.len() / 30).max(1))
        .map(|(t, r, _)| format!("{t}s:{r:.0}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

pub fn p99(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get((s.len() * 99 / 100).min(s.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}
