//! Standalone on a full disk, for real: DATA_DIR on a 16 MiB tmpfs (the tests run as root; the
//! test fails, never skips, when the mount fails), filled to the last byte by a filler file.
//! Ingest answers 503 `unavailable` / UNAVAILABLE saying the disk is full, `/readyz` says so,
//! reads count every acknowledged pair, a snapshot that cannot be written leaves the previous
//! one, and writes resume by themselves, without a restart, once the filler is removed. Then
//! the same with a SIGKILL while the disk is full: nothing acknowledged is lost, and every
//! acknowledged pair's `entered` event reaches the change log once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{Pair, PushRequest};
use userseg_testkit::feed::Feed;
use userseg_testkit::metrics::metric;
use userseg_testkit::{free_port, until, Proc};

/// A tmpfs mounted for the test, unmounted when dropped (also when the test fails).
struct Tmpfs {
    path: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().expect("temp dir");
        let path = parent.path().join("disk");
        std::fs::create_dir(&path).expect("mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test needs a real small file system: `mount -t tmpfs -o size={size} tmpfs {}` failed (run the tests as root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path,
            _parent: parent,
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (a process not yet reaped): detach it now, freed when unused.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Fills the file system of `dir` to the last byte with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("filler");
    let chunk = vec![0xa5u8; 1 << 16];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // Whatever a 64 KiB write could not take, byte by byte at most one page.
    while f.write(&[0xa5]).is_ok_and(|n| n == 1) {}
    path
}

fn spawn(data: &Path, logs: &Path, port: u16) -> Proc {
    let env: Vec<(String, String)> = [
        ("DATA_DIR", data.to_string_lossy().as_ref()),
        ("FLUSH_INTERVAL", "50ms"),
        // Snapshots only by log size, so the test knows when one is due.
        ("CHECKPOINT_INTERVAL", "1h"),
        ("CHECKPOINT_LOG_BYTES", "1MiB"),
        ("RUST_LOG", "info"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    Proc::spawn(
        env!("CARGO_BIN_EXE_userseg"),
        &["standalone"],
        &env,
        port,
        logs.join("standalone.log"),
    )
}

/// Pushes `n` new users (`u<from>`..) to segment `disk` over HTTP: the number accepted, or the
/// status and error body.
async fn push(c: &reqwest::Client, p: &Proc, from: u64, n: u64) -> Result<u64, (u16, Value)> {
    let pairs: Vec<Value> = (from..from + n)
        .map(|i| json!({"user_id": format!("u{i}"), "segment": "disk"}))
        .collect();
    let r = c
        .post(format!("{}/v1/pairs", p.base))
        .json(&json!({ "pairs": pairs }))
        .send()
        .await
        .expect("the server answers");
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    if status == 200 {
        assert_eq!(body["accepted"], n);
        Ok(n)
    } else {
        Err((status, body))
    }
}

/// Pushes batches until the disk-full refusal comes; returns the users acknowledged meanwhile
/// and the refusal. (The log's last page may still take a few records.)
async fn push_until_full(c: &reqwest::Client, p: &Proc, next: &mut u64) -> (u64, (u16, Value)) {
    let mut acked = 0;
    for _ in 0..1000 {
        match push(c, p, *next, 50).await {
            Ok(n) => acked += n,
            Err(refusal) => return (acked, refusal),
        }
        *next += 50;
    }
    panic!("1000 batches were accepted on a full disk:\n{}", p.logs());
}

fn assert_disk_full(refusal: &(u16, Value)) {
    let (status, body) = refusal;
    assert_eq!(*status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let msg = body["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("disk full"), "{msg}");
}

async fn count(p: &Proc) -> u64 {
    let Ok(r) = reqwest::get(format!("{}/v1/segments/disk", p.base)).await else {
        return u64::MAX;
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["users"].as_u64().unwrap_or(u64::MAX)
}

/// The snapshot files, name and bytes.
fn snapshots(data: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(data.join("snapshots"))
        .map(|d| {
            d.flatten()
                .map(|e| {
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        std::fs::read(e.path()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// After space is freed: retries a push until it is accepted; returns how long that took.
async fn until_writes_resume(c: &reqwest::Client, p: &Proc, next: &mut u64) -> Duration {
    let freed = Instant::now();
    loop {
        match push(c, p, *next, 50).await {
            Ok(_) => {
                *next += 50;
                return freed.elapsed();
            }
            Err(refusal) => assert_disk_full(&refusal),
        }
        assert!(
            freed.elapsed() < Duration::from_secs(5),
            "writes did not resume within 5 s of freeing space:\n{}",
            p.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The snapshot files, without temporary ones.
fn finished_snapshots(data: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v = snapshots(data);
    v.retain(|(n, _)| n.ends_with(".snap"));
    v
}

/// Reads the change feed from its start until `want` events came (or 30 s passed): the
/// events read and the distinct users that entered segment `disk`, each id counted once.
async fn entered_events(c: &reqwest::Client, p: &Proc, want: u64) -> (u64, u64) {
    let r = c
        .get(format!("{}/v1/changes?after=0&format=ndjson", p.base))
        .send()
        .await
        .unwrap();
    let mut feed = Feed::new(r).await;
    // Not `until`: the caller asserts the count, with its context.
    feed.read_until(30, |f| f.count as u64 >= want).await;
    let (mut ids, mut users) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for e in feed.values() {
        assert_eq!(
            (e["type"].as_str(), e["segment"].as_str()),
            (Some("entered"), Some("disk")),
            "{e}"
        );
        assert!(
            ids.insert(e["id"].as_str().unwrap().to_string()),
            "{e} twice"
        );
        users.insert(e["user_id"].as_str().unwrap().to_string());
    }
    (feed.count as u64, users.len() as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_resumes_by_itself_even_across_sigkill() {
    let disk = Tmpfs::mount("16m");
    let logs = tempfile::tempdir().unwrap();
    let data = disk.path.join("data");
    let port = free_port();
    let mut p = spawn(&data, logs.path(), port);
    p.ready().await;
    let c = reqwest::Client::new();
    let mut next = 0u64;
    let mut acked = 0u64;

    // A snapshot (after 1 MiB of log), then some pairs it does not cover.
    for _ in 0..500 {
        if !finished_snapshots(&data).is_empty() {
            break;
        }
        acked += push(&c, &p, next, 1000).await.unwrap();
        next += 1000;
    }
    until("a snapshot is written", 20, async || {
        !finished_snapshots(&data).is_empty()
    })
    .await;
    acked += push(&c, &p, next, 2000).await.unwrap();
    next += 2000;
    let snapshot_before = finished_snapshots(&data);
    assert_eq!(snapshot_before.len(), 1);

    // Fill the disk: writes are refused, with a message saying why.
    let filler = fill(&disk.path);
    let (n, refusal) = push_until_full(&c, &p, &mut next).await;
    acked += n;
    assert_disk_full(&refusal);
    eprintln!("refused: {}", refusal.1);
    let mut grpc = SegmentsClient::connect(p.base.clone()).await.unwrap();
    let status = grpc
        .push(PushRequest {
            pairs: vec![Pair {
                user_id: "g".into(),
                segment: "disk".into(),
                ts: None,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(status.message().contains("disk full"), "{status:?}");
    // User deletions go through the log too.
    let r = c
        .delete(format!("{}/v1/users/u0", p.base))
        .send()
        .await
        .unwrap();
    assert_disk_full(&(r.status().as_u16(), r.json().await.unwrap()));
    let (status, ready) = p.readyz().await;
    assert_eq!(status, 503, "{ready}");
    eprintln!("/readyz: {ready}");
    assert!(
        ready["checks"]["log"]
            .as_str()
            .is_some_and(|m| m.contains("disk full")),
        "{ready}"
    );
    let refusals = metric(&p.base, "userseg_wal_disk_full_refusals_total").await;
    assert!(refusals.expect("metrics") >= 3.0, "{refusals:?}");

    // Reads go on, with every acknowledged pair; the process stays up.
    until("every acknowledged pair is counted", 10, async || {
        count(&p).await == acked
    })
    .await;
    assert!(reqwest::get(format!("{}/healthz", p.base))
        .await
        .unwrap()
        .status()
        .is_success());

    // Free the space: writes resume by themselves, no restart.
    std::fs::remove_file(&filler).unwrap();
    let took = until_writes_resume(&c, &p, &mut next).await;
    eprintln!(
        "writes resumed {} ms after space was freed",
        took.as_millis()
    );
    acked += 50;
    p.ready().await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "the process stayed up"
    );
    until("every acknowledged pair is counted", 10, async || {
        count(&p).await == acked
    })
    .await;

    // Full again. SIGTERM: the final snapshot finds no room; the previous snapshot stays as it
    // was and no temporary file is left behind.
    let filler = fill(&disk.path);
    let (n, refusal) = push_until_full(&c, &p, &mut next).await;
    acked += n;
    assert_disk_full(&refusal);
    p.sigterm(30).await;
    assert!(
        p.logs().contains("final snapshot failed"),
        "the final snapshot should have failed for lack of space:\n{}",
        p.logs()
    );
    assert_eq!(snapshots(&data), snapshot_before);

    // The restart on the full disk recovers from that snapshot and the log; the first write
    // finds the disk full. SIGKILL then, and again nothing acknowledged is lost.
    let mut p = spawn(&data, logs.path(), port);
    p.up().await;
    until(
        "every acknowledged pair is counted after the restart",
        20,
        async || count(&p).await == acked,
    )
    .await;
    let refusal = push(&c, &p, next, 50).await.unwrap_err();
    assert_disk_full(&refusal);
    assert_eq!(p.readyz().await.0, 503);
    p.sigkill();
    let mut p = spawn(&data, logs.path(), port);
    p.up().await;
    until(
        "every acknowledged pair is counted after the SIGKILL",
        20,
        async || count(&p).await == acked,
    )
    .await;
    std::fs::remove_file(&filler).unwrap();
    let took = until_writes_resume(&c, &p, &mut next).await;
    eprintln!(
        "after the restarts, writes resumed {} ms after space was freed",
        took.as_millis()
    );
    acked += 50;
    until("every acknowledged pair is counted", 10, async || {
        count(&p).await == acked
    })
    .await;
    // Every acknowledged pair's `entered` event is in the change log exactly once: those
    // whose append found the disk full were written once there was room again, and the
    // recoveries after SIGTERM and SIGKILL regenerated none twice.
    let (events, users) = entered_events(&c, &p, acked).await;
    assert_eq!(users, acked, "one user entered per acknowledged pair");
    assert_eq!(events, acked, "no event twice");
    // With room again, the snapshot that could not be written is written.
    p.sigterm(30).await;
    let after = finished_snapshots(&data);
    assert_eq!(after.len(), 1);
    assert_ne!(
        after, snapshot_before,
        "a newer snapshot replaced the old one"
    );
    assert!(
        snapshots(&data).len() == 1,
        "no temporary file: {:?}",
        snapshots(&data).iter().map(|s| &s.0).collect::<Vec<_>>()
    );
}
