//! End-to-end tests of the real `userseg` binary in standalone mode.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{Pair, PushRequest};
use userseg_testkit::{free_port, now, until, Proc};

fn spawn(data: &Path, port: u16, extra: &[(&str, &str)]) -> Proc {
    let mut env = vec![
        ("DATA_DIR".to_string(), data.to_string_lossy().into_owned()),
        ("FLUSH_INTERVAL".to_string(), "50ms".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Proc::spawn(
        env!("CARGO_BIN_EXE_userseg"),
        &["standalone"],
        &env,
        port,
        data.with_extension("log"),
    )
}

async fn ready(p: &mut Proc) {
    p.ready().await;
}

async fn counts(base: &str) -> Vec<(String, u64)> {
    let body: Value = reqwest::get(format!("{base}/v1/segments"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["segment"].as_str().unwrap().to_string(),
                s["users"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Pushes from several clients while the process is killed with SIGKILL; after a restart every
/// acknowledged pair is counted (and nothing beyond what was sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_pair_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    // Small snapshot thresholds so a snapshot and log truncation happen during the run too.
    let extra = [
        ("CHECKPOINT_LOG_BYTES", "1MiB"),
        ("CHECKPOINT_INTERVAL", "1s"),
    ];
    let mut p = spawn(&data, port, &extra);
    ready(&mut p).await;

    const CLIENTS: usize = 4;
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..CLIENTS).map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let (acked, sent, base) = (acked.clone(), sent.clone(), p.base.clone());
        tasks.push(tokio::spawn(async move {
            let Ok(mut client) = SegmentsClient::connect(base).await else {
                return;
            };
            // Each client has its own segment and unique users, batches of 500.
            for b in 0u64.. {
                let pairs: Vec<Pair> = (0..500)
                    .map(|i| Pair {
                        user_id: format!("c{c}-u{}", b * 500 + i),
                        segment: format!("seg{c}"),
                        ts: None,
                    })
                    .collect();
                sent[c].store((b + 1) * 500, Ordering::SeqCst);
                match client.push(PushRequest { pairs }).await {
                    Ok(r) => {
                        assert_eq!(r.into_inner().accepted, 500);
                        acked[c].store((b + 1) * 500, Ordering::SeqCst);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Kill once a good amount has been acknowledged, in the middle of the stream.
    until("enough pairs are acknowledged", 60, async || {
        acked.iter().map(|a| a.load(Ordering::SeqCst)).sum::<u64>() >= 60_000
    })
    .await;
    p.sigkill();
    for t in tasks {
        let _ = t.await;
    }
    let acked: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let sent: Vec<u64> = sent.iter().map(|a| a.load(Ordering::SeqCst)).collect();

    let mut p = spawn(&data, port, &extra);
    ready(&mut p).await;
    let got = counts(&p.base).await;
    assert_eq!(got.len(), CLIENTS, "{got:?}");
    for (c, (name, users)) in got.iter().enumerate() {
        assert_eq!(name, &format!("seg{c}"));
        assert!(
            *users >= acked[c] && *users <= sent[c],
            "seg{c}: {users} counted, {} acknowledged, {} sent",
            acked[c],
            sent[c]
        );
    }
    // Still writable after recovery.
    let mut client = SegmentsClient::connect(p.base.clone()).await.unwrap();
    client
        .push(PushRequest {
            pairs: vec![Pair {
                user_id: "after".into(),
                segment: "restart".into(),
                ts: None,
            }],
        })
        .await
        .unwrap();
    until("the new pair is counted", 10, async || {
        counts(&p.base)
            .await
            .iter()
            .any(|(s, n)| s == "restart" && *n == 1)
    })
    .await;
}

/// With a 4 s window, memberships expire on their own; a re-send extends one. (The pair sent
/// 2 s old stays acceptable for 2 s more: a loaded machine may take a second to deliver it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memberships_expire_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(&dir.path().join("data"), free_port(), &[("WINDOW", "4s")]);
    ready(&mut p).await;
    let http = reqwest::Client::new();
    let push = |body: Value| {
        let http = http.clone();
        let url = format!("{}/v1/pairs", p.base);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 200, "{:?}", r.text().await);
        }
    };
    let t0 = now();
    push(serde_json::json!({"pairs": [
        {"user_id": "a", "segment": "short"},
        {"user_id": "b", "segment": "short"},
        {"user_id": "c", "segment": "short", "ts": t0 - 2},
    ]}))
    .await;
    until(
        "all three are counted or c already expired",
        5,
        async || {
            let c = counts(&p.base).await;
            c == vec![("short".to_string(), 3)] || c == vec![("short".to_string(), 2)]
        },
    )
    .await;
    let started = Instant::now();
    until("c (sent 2 s old) expires first", 5, async || {
        counts(&p.base).await == vec![("short".to_string(), 2)]
    })
    .await;
    // Keep a alive by re-sending it.
    push(serde_json::json!({"pairs": [{"user_id": "a", "segment": "short"}]})).await;
    until("b expires, a (re-sent) stays", 8, async || {
        counts(&p.base).await == vec![("short".to_string(), 1)]
    })
    .await;
    until("everything expires", 8, async || {
        counts(&p.base).await.is_empty()
    })
    .await;
    assert!(started.elapsed() >= Duration::from_secs(2));
    // The expired pair can no longer be pushed with its old ts.
    let r = http
        .post(format!("{}/v1/pairs", p.base))
        .json(&serde_json::json!({"pairs": [{"user_id": "c", "segment": "short", "ts": t0 - 2}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
}

/// SIGTERM stops accepting, flushes, snapshots, exits 0; a restart finds every pair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    // A long flush interval: only the shutdown flush can apply the pairs before exit.
    let mut p = spawn(&data, port, &[("FLUSH_INTERVAL", "1h")]);
    ready(&mut p).await;
    let body = serde_json::json!({"pairs": (0..100).map(|i| serde_json::json!({"user_id": format!("u{i}"), "segment": "term"})).collect::<Vec<_>>()});
    let r = reqwest::Client::new()
        .post(format!("{}/v1/pairs", p.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let status = p.sigterm(30).await;
    assert!(status.success(), "exit status {status}");
    let snapshots: Vec<_> = std::fs::read_dir(data.join("snapshots")).unwrap().collect();
    assert_eq!(snapshots.len(), 1, "a final snapshot is written");
    let mut p = spawn(&data, port, &[]);
    ready(&mut p).await;
    assert_eq!(counts(&p.base).await, vec![("term".to_string(), 100)]);
}

#[test]
fn invalid_config_fails_fast_naming_the_variable() {
    for (var, value) in [
        ("WINDOW", "fortnight"),
        ("BATCH_SIZE", "0"),
        ("SERVICE_HOST", "not a host"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
            .arg("standalone")
            .env("DATA_DIR", "/nonexistent/never-created")
            .env(var, value)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(var), "{var}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
        .arg("version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("userseg {}", env!("CARGO_PKG_VERSION"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_share_the_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut p = spawn(&data, free_port(), &[]);
    ready(&mut p).await;
    let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
        .arg("standalone")
        .env("DATA_DIR", &data)
        .env("SERVICE_PORT", free_port().to_string())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use by another userseg process"));
}

async fn json(url: String) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// A deletion acknowledged before SIGKILL stays applied after the restart (pairs acknowledged
/// after it count again), its user leaves every file in DATA_DIR once the snapshot after it is
/// written, and history samples survive the kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_and_history_survive_sigkill() {
    const VICTIM: &str = "erase me/ü@example.com";
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let port = free_port();
    let extra = [("HISTORY_INTERVAL", "1s"), ("CHECKPOINT_INTERVAL", "1h")];
    let mut p = spawn(&data, port, &extra);
    ready(&mut p).await;
    let c = reqwest::Client::new();
    let push = |pairs: Value| {
        let (c, base) = (c.clone(), p.base.clone());
        async move {
            let r = c
                .post(format!("{base}/v1/pairs"))
                .json(&serde_json::json!({ "pairs": pairs }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    push(serde_json::json!([
        {"user_id": VICTIM, "segment": "a"}, {"user_id": VICTIM, "segment": "b"},
        {"user_id": "keeper", "segment": "a"}, {"user_id": "other", "segment": "b"},
    ]))
    .await;
    let enc: String = VICTIM
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    // Read-your-writes: the memberships are there right after the acknowledgement.
    until("the victim's memberships are visible", 5, async || {
        json(format!("{}/v1/users/{enc}/segments", p.base)).await["segments"]
            .as_array()
            .map(Vec::len)
            == Some(2)
    })
    .await;
    // History samples every second: wait for a few with a = 2.
    until("history has samples", 20, async || {
        let v = json(format!(
            "{}/v1/segments/a/history?step=1s&from={}",
            p.base,
            now() - 60
        ))
        .await;
        v["points"]
            .as_array()
            .is_some_and(|pts| pts.iter().filter(|x| x["users"] == 2).count() >= 2)
    })
    .await;
    let r = c
        .delete(format!("{}/v1/users/{enc}", p.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["deleted"], 1);
    until("the deletion is applied", 5, async || {
        counts(&p.base).await == vec![("a".to_string(), 1), ("b".to_string(), 1)]
    })
    .await;
    // A later pair of the same user counts again.
    push(serde_json::json!([{"user_id": VICTIM, "segment": "c"}])).await;
    until("the re-added membership is visible", 5, async || {
        counts(&p.base).await.len() == 3
    })
    .await;
    let history_before = json(format!(
        "{}/v1/segments/a/history?step=1s&from={}",
        p.base,
        now() - 120
    ))
    .await;
    p.child.kill().unwrap(); // SIGKILL
    p.child.wait().unwrap();

    let mut p = spawn(&data, port, &extra);
    ready(&mut p).await;
    assert_eq!(
        counts(&p.base).await,
        vec![
            ("a".to_string(), 1),
            ("b".to_string(), 1),
            ("c".to_string(), 1)
        ]
    );
    let v = json(format!("{}/v1/users/{enc}/segments", p.base)).await;
    let segs: Vec<&str> = v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["segment"].as_str().unwrap())
        .collect();
    assert_eq!(
        segs,
        vec!["c"],
        "only the membership after the deletion: {v}"
    );
    // Every sample taken before the kill is still there.
    let after = json(format!(
        "{}/v1/segments/a/history?step=1s&from={}",
        p.base,
        now() - 180
    ))
    .await;
    let pts = |v: &Value| v["points"].as_array().cloned().unwrap_or_default();
    for point in pts(&history_before) {
        assert!(
            pts(&after).contains(&point),
            "sample {point} lost in the restart"
        );
    }
    assert!(pts(&after).iter().any(|x| x["users"] == 2));
    // Delete the victim again; after the snapshot that follows, no file holds the id.
    let r = c
        .post(format!("{}/v1/users/delete", p.base))
        .json(&serde_json::json!({"user_ids": [VICTIM]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    until(
        "no file in DATA_DIR holds the deleted user",
        20,
        async || {
            let mut clean = true;
            let mut stack = vec![data.clone()];
            while let Some(d) = stack.pop() {
                for e in std::fs::read_dir(&d).unwrap().flatten() {
                    let path = e.path();
                    if path.is_dir() {
                        stack.push(path);
                    } else if let Ok(bytes) = std::fs::read(&path) {
                        clean &= !bytes.windows(VICTIM.len()).any(|w| w == VICTIM.as_bytes());
                    }
                }
            }
            clean
        },
    )
    .await;
    assert!(
        json(format!("{}/v1/users/{enc}/segments", p.base)).await["segments"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}
