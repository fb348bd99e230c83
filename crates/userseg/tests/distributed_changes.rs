//! The distributed change feed end to end — USS → Kafka (tansu) → ES (index, detection,
//! emitter) → KAFKA_CHANGES_TOPIC → ES's `GET /v1/changes` — on the real servers, driving the
//! real binaries: every change arrives once per id, each partition has one emitter, and after
//! a SIGKILL of an ES repeats carry the same id and nothing is missing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::{now, until, Api, Cluster};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::ClientConfig;
use serde_json::{json, Value};
use userseg_kafka::{KafkaChangeLog, KafkaConfig};
use userseg_testkit::feed::Feed;
use userseg_testkit::keys::{get_status, write_keys_file, Key};
use userseg_testkit::Proc;
use userseg_usecase::ChangeLog;

async fn push(uss: &Proc, pairs: Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/pairs", uss.base))
        .json(&json!({ "pairs": pairs }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

fn users(prefix: &str, n: usize, segment: &str, ts: i64) -> Value {
    (0..n)
        .map(|i| json!({"user_id": format!("{prefix}{i}"), "segment": segment, "ts": ts}))
        .collect()
}

/// An SSE subscription to `GET /v1/changes{query}`.
async fn open_feed(base: &str, query: &str) -> Feed {
    let resp = reqwest::Client::new()
        .get(format!("{base}/v1/changes{query}"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let feed = Feed::new(resp).await;
    assert!(feed.is_sse());
    feed
}

/// (type, reason, user, segment) of an event.
fn what(e: &Value) -> (String, String, String, String) {
    let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
    (s("type"), s("reason"), s("user_id"), s("segment"))
}

fn count(events: &[Value], reason: &str) -> usize {
    events.iter().filter(|e| e["reason"] == reason).count()
}

/// Ids must be unique among the events (each change once).
fn assert_once_per_id(events: &[Value]) {
    let mut seen = BTreeSet::new();
    for e in events {
        assert!(
            seen.insert(e["id"].as_str().unwrap().to_string()),
            "{e} arrived twice"
        );
    }
}

async fn es_serving(es: &Proc) {
    until("the index serves", 60, async || {
        es.metric("userseg_index_serving").await == 1.0
    })
    .await;
}

/// One ES with a short window: entered for new members only (not refreshes), deleted for a
/// deleted user, and an expired exit for every member left, each once, through the topic and
/// ES's own `GET /v1/changes`; pairs that arrived before any ES ran are announced once.
/// Resuming by cursor from ES gives exactly the events after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entered_deleted_and_expired_arrive_once_through_the_topic() {
    let c = Cluster::new("chfeed");
    c.migrate();
    let changes = format!("{}-changes", c.topic);
    let env = [
        ("WINDOW", "8s"),
        ("KAFKA_CHANGES_TOPIC", changes.as_str()),
        ("KAFKA_SESSION_TIMEOUT", "10s"),
    ];
    let mut uss = c.spawn("uss", &[("WINDOW", "8s")]);
    uss.ready().await;
    // In the pair log before any ES runs: announced by the first ES once it has caught up.
    push(&uss, users("old", 5, "s", now())).await;
    let mut es = c.spawn("es", &env);
    es.ready().await;
    es_serving(&es).await;
    until("ES has the old members", 30, async || {
        !es.counts().await.is_empty()
    })
    .await;
    let mut feed = open_feed(&es.base, "").await;
    let t = now();
    push(&uss, users("u", 20, "s", t)).await;
    // Refreshes of live members and of the old ones: nothing.
    push(&uss, users("u", 20, "s", t + 1)).await;
    feed.until("20 entered", 30, |f| count(&f.values(), "pair") >= 20)
        .await;
    let r = reqwest::Client::new()
        .delete(format!("{}/v1/users/u0", uss.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    feed.until("a deleted exit", 30, |f| count(&f.values(), "deleted") >= 1)
        .await;
    // Every member left expires: the 19 u* and the 5 old ones.
    feed.until("24 expired exits", 40, |f| {
        count(&f.values(), "expired") >= 24
    })
    .await;
    let events = feed.values();
    assert_once_per_id(&events);
    let got: BTreeSet<_> = events.iter().map(what).collect();
    let mut want = BTreeSet::new();
    for i in 0..20 {
        want.insert(what(&json!({"type": "entered", "reason": "pair", "user_id": format!("u{i}"), "segment": "s"})));
        let reason = if i == 0 { "deleted" } else { "expired" };
        want.insert(what(&json!({"type": "exited", "reason": reason, "user_id": format!("u{i}"), "segment": "s"})));
    }
    for i in 0..5 {
        want.insert(what(&json!({"type": "exited", "reason": "expired", "user_id": format!("old{i}"), "segment": "s"})));
    }
    assert_eq!(got, want);
    assert_eq!(events.len(), want.len(), "no event twice");
    // An expired exit comes at most a bucket (1 s for 8 s) plus the tick after its time.
    for e in events.iter().filter(|e| e["reason"] == "expired") {
        assert!(e["ts"].as_i64().unwrap() <= now(), "{e}");
    }
    // The topic holds the same events, with their ids, readable from its start; before them,
    // the old members' entries: nobody had announced them (no ES ran when they arrived), so
    // the ES announced them once it had caught up, before the subscription above began.
    let log = open_log(&c, &changes).await;
    let all = read_all(&log).await;
    let ids: BTreeSet<String> = all.iter().map(|(id, _)| id.clone()).collect();
    let fed: BTreeSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let earlier: BTreeSet<_> = all
        .iter()
        .filter(|(id, _)| !fed.contains(id))
        .map(|(_, w)| w.clone())
        .collect();
    let old_entries: BTreeSet<_> = (0..5)
        .map(|i| {
            (
                "entered".to_string(),
                "pair".to_string(),
                format!("old{i}"),
                "s".to_string(),
            )
        })
        .collect();
    assert_eq!(earlier, old_entries);
    assert!(fed.is_subset(&ids));
    assert_eq!(all.len(), ids.len(), "no event twice in the topic");
    // Resuming after the 10th event's cursor gives exactly the events after it.
    let cursor = events[9]["cursor"].as_str().unwrap().to_string();
    let mut resumed = open_feed(&es.base, &format!("?after={cursor}")).await;
    let rest = events.len() - 10;
    resumed
        .until("the events after the cursor", 30, |f| f.count >= rest)
        .await;
    let after: BTreeSet<String> = resumed
        .values()
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = events[10..]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(after, want);
}

async fn open_log(c: &Cluster, topic: &str) -> KafkaChangeLog {
    KafkaChangeLog::open(&KafkaConfig::new(c.kafka.clone()), topic, false)
        .await
        .expect("open the change topic")
}

/// Every event of the topic from its start: (id hex, (type, reason, user, segment)).
async fn read_all(log: &KafkaChangeLog) -> Vec<(String, (String, String, String, String))> {
    let mut cursor = log.start().await.unwrap();
    let mut out = Vec::new();
    loop {
        let b = log.read(&cursor, 1000, Duration::ZERO).await.unwrap();
        if b.records.is_empty() {
            return out;
        }
        for r in b.records {
            let e = r.event;
            out.push((
                e.id_hex(),
                (
                    e.kind().as_str().to_string(),
                    e.reason.as_str().to_string(),
                    e.user_id,
                    e.segment,
                ),
            ));
        }
        cursor = b.next;
    }
}

/// Joins the group as a plain consumer until it is assigned partitions, then leaves: tansu 0.6
/// drops a dead member only when a join arrives after its session expired (see
/// `es_killed_mid_stream_loses_and_doubles_nothing` in distributed.rs), and the leave hands
/// every partition to the members left.
async fn join_and_leave(c: &Cluster) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka)
        .set("group.id", &c.group)
        .set("enable.auto.commit", "false")
        .set("session.timeout.ms", "10000")
        .create()
        .unwrap();
    consumer.subscribe(&[&c.topic]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let _ = tokio::time::timeout(Duration::from_millis(200), consumer.recv()).await;
        if consumer.assignment().is_ok_and(|a| a.count() > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the test consumer got no partition"
        );
    }
    tokio::task::spawn_blocking(move || {
        consumer.unsubscribe();
        drop(consumer);
    })
    .await
    .unwrap();
}

/// Two ES: each partition's events come from one of them only (no event twice, both emit).
/// Then one is killed with SIGKILL right after more pairs arrived; once its partitions moved
/// to the other, every change is in the topic, and a repeat carries the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_emitter_per_partition_and_a_sigkill_repeats_only_by_id() {
    let c = Cluster::new("chtwo");
    c.migrate();
    let changes = format!("{}-changes", c.topic);
    let env = [
        ("KAFKA_CHANGES_TOPIC", changes.as_str()),
        ("KAFKA_SESSION_TIMEOUT", "10s"),
        ("BATCH_SIZE", "200"),
    ];
    let mut uss = c.spawn("uss", &[]);
    uss.ready().await;
    let mut es1 = c.spawn("es", &env);
    let mut es2 = c.spawn("es", &env);
    es1.ready().await;
    es2.ready().await;
    es_serving(&es1).await;
    es_serving(&es2).await;
    until("both ES own partitions", 60, async || {
        let l1 = std::fs::read_to_string(&es1.log).unwrap_or_default();
        let l2 = std::fs::read_to_string(&es2.log).unwrap_or_default();
        l1.contains("partitions assigned") && l2.contains("partitions assigned")
    })
    .await;
    let log = open_log(&c, &changes).await;
    let t = now();
    push(&uss, users("a", 60, "s", t)).await;
    until("60 entered in the topic", 30, async || {
        read_all(&log).await.len() >= 60
    })
    .await;
    let first = read_all(&log).await;
    let ids: BTreeSet<&String> = first.iter().map(|(id, _)| id).collect();
    assert_eq!(
        ids.len(),
        first.len(),
        "no event twice: one emitter per partition"
    );
    assert_eq!(first.len(), 60);
    // The counters move right after the broker's acknowledgement.
    until("the emitters counted 60 events", 10, async || {
        es1.metric("userseg_changes_emitted_total").await
            + es2.metric("userseg_changes_emitted_total").await
            >= 60.0
    })
    .await;
    let e1 = es1.metric("userseg_changes_emitted_total").await;
    let e2 = es2.metric("userseg_changes_emitted_total").await;
    assert!(e1 > 0.0 && e2 > 0.0, "both ES emit: {e1} {e2}");
    assert_eq!(e1 + e2, 60.0, "each event published by one ES");

    // More changes, then es1 dies at once (whatever it had not published yet is lost with it).
    push(&uss, users("b", 60, "s", now())).await;
    let r = reqwest::Client::new()
        .post(format!("{}/v1/users/delete", uss.base))
        .json(&json!({"user_ids": ["a1", "a2", "a3"]}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    es1.sigkill();
    // es2 has detected every change (it follows the whole topic) and kept those of es1's
    // partitions; it publishes them once it owns them.
    tokio::time::sleep(Duration::from_secs(11)).await;
    join_and_leave(&c).await;
    let mut want: BTreeSet<(String, String, String, String)> = BTreeSet::new();
    for p in ["a", "b"] {
        for i in 0..60 {
            let u = format!("{p}{i}");
            want.insert(("entered".into(), "pair".into(), u, "s".into()));
        }
    }
    for u in ["a1", "a2", "a3"] {
        want.insert(("exited".into(), "deleted".into(), u.into(), "s".into()));
    }
    until("every change is in the topic", 60, async || {
        let got: BTreeSet<_> = read_all(&log).await.into_iter().map(|(_, w)| w).collect();
        got == want
    })
    .await;
    let all = read_all(&log).await;
    let mut ids_of: BTreeMap<(String, String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (id, w) in &all {
        ids_of.entry(w.clone()).or_default().insert(id.clone());
    }
    for (w, ids) in &ids_of {
        assert_eq!(
            ids.len(),
            1,
            "{w:?}: repeats carry the same id, got {ids:?}"
        );
    }
    assert!(
        es2.metric("userseg_changes_replayed_total").await > 0.0,
        "es2 replayed the kept events of the partitions it took over"
    );
}

/// Rows of `SELECT count() ...` on the test ClickHouse.
async fn ch_count(c: &Cluster, sql: &str) -> u64 {
    let r = reqwest::Client::new()
        .post(&c.clickhouse)
        .body(sql.to_string())
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{sql}: {text}"))
}

/// No ES runs for a while: the changes made meanwhile — pairs that arrived (in the pair log,
/// not yet in ClickHouse) and memberships that expired (their exits were due while nobody
/// emitted) — are published by the next ES, late but never lost, each once per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_made_while_no_es_ran_are_published_by_the_next_one() {
    let c = Cluster::new("chgap");
    c.migrate();
    let changes = format!("{}-changes", c.topic);
    let env = [
        ("WINDOW", "20s"),
        ("KAFKA_CHANGES_TOPIC", changes.as_str()),
        ("KAFKA_SESSION_TIMEOUT", "6s"),
    ];
    let mut uss = c.spawn("uss", &[("WINDOW", "20s")]);
    uss.ready().await;
    let mut es1 = c.spawn("es", &env);
    es1.ready().await;
    es_serving(&es1).await;
    let log = open_log(&c, &changes).await;
    let t = now();
    push(&uss, users("a", 10, "s", t)).await;
    until("10 entered in the topic", 30, async || {
        read_all(&log).await.len() >= 10
    })
    .await;
    // The pairs are in ClickHouse (written only after their events were published) and the
    // emitter has saved an exit mark.
    let pairs = format!("SELECT count() FROM `{}`.pairs", c.database);
    let marks = format!("SELECT count() FROM `{}`.change_marks", c.database);
    until(
        "the pairs are in ClickHouse and a mark is saved",
        30,
        async || ch_count(&c, &pairs).await >= 10 && ch_count(&c, &marks).await > 0,
    )
    .await;
    es1.sigkill();
    assert!(
        now() < t + 20,
        "the members must expire while no ES runs: the test was too slow"
    );
    // While no ES runs: the `a` members expire (20 s after t), and new members arrive.
    let expired_at = t + 22;
    while now() < expired_at {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    push(&uss, users("b", 10, "s", now())).await;
    let mut es2 = c.spawn("es", &env);
    es2.ready().await;
    es_serving(&es2).await;
    let mut want: BTreeSet<(String, String, String, String)> = BTreeSet::new();
    for i in 0..10 {
        want.insert(("entered".into(), "pair".into(), format!("a{i}"), "s".into()));
        want.insert((
            "exited".into(),
            "expired".into(),
            format!("a{i}"),
            "s".into(),
        ));
        want.insert(("entered".into(), "pair".into(), format!("b{i}"), "s".into()));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got: BTreeSet<_> = read_all(&log)
            .await
            .into_iter()
            .map(|(_, w)| w)
            .filter(|w| !(w.2.starts_with('b') && w.1 == "expired"))
            .collect();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "every change made while no ES ran is in the topic: missing {:?}, extra {:?}",
            want.difference(&got).collect::<Vec<_>>(),
            got.difference(&want).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut ids_of: BTreeMap<(String, String, String, String), BTreeSet<String>> = BTreeMap::new();
    for (id, w) in read_all(&log).await {
        ids_of.entry(w).or_default().insert(id);
    }
    for (w, ids) in &ids_of {
        assert_eq!(
            ids.len(),
            1,
            "{w:?}: repeats carry the same id, got {ids:?}"
        );
    }
    assert_eq!(
        es2.metric("userseg_changes_caught_up_exits_total").await,
        10.0,
        "the exits due while no ES ran came from the catch-up"
    );
}

/// ES's `GET /v1/changes` (reading the change topic): the `members` role is needed (403
/// naming it otherwise), a malformed cursor is 400, and ten clients that stop reading while
/// 40 MB of events wait for them hold ES to a few MiB each (a topic reader's bounded
/// prefetch: librdkafka's defaults held ~70 MB per stalled client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es_feed_needs_members_and_stalled_clients_stay_bounded() {
    use std::io::Write;
    let c = Cluster::new("chstall");
    c.migrate();
    let changes = format!("{}-changes", c.topic);
    let dir = tempfile::tempdir().unwrap();
    let keys = write_keys_file(
        dir.path(),
        &[
            Key {
                name: "reader",
                roles: &["read"],
                token: "read-token",
            },
            Key {
                name: "member",
                roles: &["members"],
                token: "members-token",
            },
        ],
    );
    let keys_path = keys.to_string_lossy().into_owned();
    let mut es = c.spawn(
        "es",
        &[
            ("KAFKA_CHANGES_TOPIC", changes.as_str()),
            ("API_KEYS_FILE", keys_path.as_str()),
        ],
    );
    es.ready().await;
    let client = reqwest::Client::new();
    let get = |url: String, token: &'static str| {
        let client = client.clone();
        async move { get_status(&client, &url, token, "application/x-ndjson").await }
    };
    let (st, body) = get(format!("{}/v1/changes", es.base), "read-token").await;
    assert_eq!(st, 403, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("members"),
        "{body}"
    );
    let (st, body) = get(
        format!("{}/v1/changes?after=k1.x", es.base),
        "members-token",
    )
    .await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_argument");
    assert_eq!(
        get(format!("{}/v1/changes", es.base), "members-token")
            .await
            .0,
        200
    );

    // ~30 MB of events in the topic (written by the adapter ES reads it with).
    let log = open_log(&c, &changes).await;
    let start = log.start().await.unwrap();
    const N: usize = 50_000;
    let long = "x".repeat(600);
    for b in 0..N / 5_000 {
        let events = (0..5_000)
            .map(|i| {
                userseg_domain::ChangeEvent::new(
                    format!("user-{b}-{i}-{long}"),
                    "s",
                    userseg_domain::ChangeReason::Pair,
                    1_800_000_000,
                    1,
                )
            })
            .collect();
        log.append(events).await.unwrap();
    }
    // A reading client gets everything (the data is really there), which also brings ES to
    // its working size for streaming.
    let r = client
        .get(format!("{}/v1/changes?after={start}", es.base))
        .bearer_auth("members-token")
        .header("accept", "application/x-ndjson")
        .send()
        .await
        .unwrap();
    let mut r = Feed::new(r).await.counting_only();
    r.until("the reading client gets every event", 180, |f| f.count >= N)
        .await;
    let bytes = r.bytes;
    drop(r);
    assert!(bytes > 25 << 20, "the stream is {bytes} bytes");
    let before = es.rss_kib();
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", es.port)).unwrap();
        write!(
            s,
            "GET /v1/changes?after={start} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer members-token\r\naccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        stalled.push(s);
    }
    // Each is answered 200 (they read the status line, then nothing more).
    for s in &mut stalled {
        use std::io::Read;
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 200", "{}", String::from_utf8_lossy(&head));
    }
    // They fill their sockets, and ES's reads for them stop there: the most ES holds meanwhile.
    let mut during = 0;
    for _ in 0..20 {
        during = during.max(es.rss_kib());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let grew = during.saturating_sub(before);
    eprintln!(
        "ES RSS {before} KiB before, {during} KiB with 10 stalled clients; stream {bytes} bytes"
    );
    assert!(
        grew < 80 << 10,
        "ES RSS grew by {grew} KiB with 10 stalled clients ({before} -> {during} KiB)"
    );
    drop(stalled);
}

/// What a random workload does, at an offset from its start.
#[derive(Clone, Debug)]
enum Act {
    /// A pair of (user, segment) at the current time, or (`backfill`) older than its latest.
    Push(usize, usize, bool),
    Delete(usize),
}

/// A random workload against a model, through USS → Kafka → ES → the change topic: every
/// entry and exit the model makes arrives (each id once, no other event), an `expired` exit
/// names its membership's true expiry (`last_seen + WINDOW`) and an `entered` its pair's ts.
/// Refreshes come 2 s after a pair, re-entries 12 s after (the window is 8 s), so no change
/// sits at an expiry's edge; backfills (older than a live membership's latest pair) change
/// nothing; deletions come only when each of the user's memberships is either clearly live or
/// clearly expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_random_workload_makes_exactly_the_models_changes() {
    random_workload_against_the_model("chmodel", false).await;
}

/// The same with two ES, one of them killed with SIGKILL at a random moment of the workload and
/// started again once its session expired: its partitions move to the other and back, and the
/// topic should still hold exactly the model's changes (a repeat only ever with the id of the
/// same change). It fails for some seeds (e.g. `USERSEG_TEST_SEED=647737569700566121`): a
/// known defect, docs/CHANGES.md "Limits": the restarted ES's catch-up of exits reads the
/// memberships from ClickHouse while refreshes of them still wait in the pair topic (no one
/// consumed its partitions while it was dead), so it publishes exits that did not happen and
/// then entries for the refreshes. Run it with `--ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "known defect: the restart catch-up ignores pairs still in the topic (docs/CHANGES.md, Limits)"]
async fn a_random_workload_across_a_sigkill_and_rebalances_makes_exactly_the_models_changes() {
    random_workload_against_the_model("chmodelkill", true).await;
}

async fn random_workload_against_the_model(name: &str, kill: bool) {
    use rand::{Rng, SeedableRng};
    const W: i64 = 8;
    const USERS: usize = 10;
    const SEGMENTS: usize = 2;
    let seed: u64 = std::env::var("USERSEG_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (USERSEG_TEST_SEED)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    // The schedule, in whole seconds from the start.
    let mut acts: Vec<(i64, Act)> = Vec::new();
    let mut pushes: BTreeMap<(usize, usize), Vec<i64>> = BTreeMap::new();
    for u in 0..USERS {
        for s in 0..SEGMENTS {
            if !rng.random_bool(0.8) {
                continue;
            }
            let mut t = rng.random_range(0..3);
            while t < 22 {
                acts.push((t, Act::Push(u, s, false)));
                pushes.entry((u, s)).or_default().push(t);
                t += if rng.random_bool(0.6) { 2 } else { 12 };
            }
            if rng.random_bool(0.3) {
                acts.push((rng.random_range(0..22), Act::Push(u, s, true)));
            }
        }
    }
    // Deletions at a time no membership of the user is within 2 s of its expiry.
    for u in 0..USERS {
        if !rng.random_bool(0.3) {
            continue;
        }
        let t = rng.random_range(3..22);
        let clear = pushes
            .iter()
            .filter(|((pu, _), _)| *pu == u)
            .all(|(_, ts)| {
                let last = ts.iter().filter(|&&x| x < t).max();
                last.is_none_or(|&l| (t - (l + W)).abs() > 2) && !ts.contains(&t)
            });
        if clear {
            acts.push((t, Act::Delete(u)));
        }
    }
    acts.sort_by_key(|(t, _)| *t);

    // With `kill`: which second of the schedule the second ES dies at.
    let kill_at = kill.then(|| rng.random_range(3..15i64));
    eprintln!("kill at {kill_at:?}");

    let c = Cluster::new(name);
    c.migrate();
    let changes = format!("{}-changes", c.topic);
    let env = [
        ("WINDOW", "8s"),
        ("KAFKA_CHANGES_TOPIC", changes.as_str()),
        ("KAFKA_SESSION_TIMEOUT", "10s"),
    ];
    let mut uss = c.spawn("uss", &[("WINDOW", "8s")]);
    uss.ready().await;
    let mut es = c.spawn("es", &env);
    es.ready().await;
    es_serving(&es).await;
    let mut other = None;
    if kill {
        let mut es2 = c.spawn("es", &env);
        es2.ready().await;
        es_serving(&es2).await;
        until("both ES own partitions", 60, async || {
            let l1 = std::fs::read_to_string(&es.log).unwrap_or_default();
            let l2 = std::fs::read_to_string(&es2.log).unwrap_or_default();
            l1.contains("partitions assigned") && l2.contains("partitions assigned")
        })
        .await;
        other = Some(es2);
    }
    let mut killed: Option<Instant> = None;
    let user = |u: usize| format!("m{u}");
    let seg = |s: usize| format!("s{s}");

    // Run the schedule; the model follows what was really sent, at the second it was sent.
    let start = Instant::now();
    let mut live: BTreeMap<(usize, usize), i64> = BTreeMap::new();
    let mut want: Vec<(String, String, String, String, Option<i64>)> = Vec::new();
    let expire_until = |live: &mut BTreeMap<(usize, usize), i64>,
                        want: &mut Vec<(String, String, String, String, Option<i64>)>,
                        t: i64| {
        live.retain(|&(u, s), last| {
            let gone = *last + W <= t;
            if gone {
                want.push((
                    "exited".into(),
                    "expired".into(),
                    user(u),
                    seg(s),
                    Some(*last + W),
                ));
            }
            !gone
        });
    };
    for (at, act) in &acts {
        let due = start + Duration::from_secs(*at as u64);
        tokio::time::sleep_until(due.into()).await;
        if kill_at.is_some_and(|k| *at >= k) && killed.is_none() {
            if let Some(es2) = other.as_mut() {
                es2.sigkill();
                killed = Some(Instant::now());
            }
        }
        let t = now();
        expire_until(&mut live, &mut want, t);
        match act {
            Act::Push(u, s, backfill) => {
                // A backfill: older than the live membership's latest pair (USS refuses pairs
                // already expired), which changes nothing.
                let ts = match (*backfill, live.get(&(*u, *s))) {
                    (false, _) => t,
                    (true, Some(&last)) if last - 1 > t - W + 1 => last - 1,
                    (true, _) => continue,
                };
                push(
                    &uss,
                    json!([{"user_id": user(*u), "segment": seg(*s), "ts": ts}]),
                )
                .await;
                if !backfill {
                    if !live.contains_key(&(*u, *s)) {
                        want.push(("entered".into(), "pair".into(), user(*u), seg(*s), Some(ts)));
                    }
                    live.insert((*u, *s), ts);
                }
            }
            Act::Delete(u) => {
                let r = reqwest::Client::new()
                    .post(format!("{}/v1/users/delete", uss.base))
                    .json(&json!({"user_ids": [user(*u)]}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.status());
                live.retain(|&(lu, s), _| {
                    if lu == *u {
                        want.push(("exited".into(), "deleted".into(), user(lu), seg(s), None));
                    }
                    lu != *u
                });
            }
        }
    }
    // The killed ES starts again once its session expired (tansu 0.6 drops a dead member at
    // the first join after that): the group rebalances over both again.
    let mut restarted = None;
    if let Some(at) = killed {
        tokio::time::sleep_until((at + Duration::from_secs(11)).into()).await;
        let mut es2 = c.spawn("es", &env);
        es2.ready().await;
        restarted = Some(es2);
    }
    expire_until(&mut live, &mut want, i64::MAX);
    want.sort();

    // Every event the topic holds, each id once, against the model.
    let log = open_log(&c, &changes).await;
    let read = async || {
        let mut cursor = log.start().await.unwrap();
        let mut by_id: BTreeMap<u64, (String, String, String, String, Option<i64>)> =
            BTreeMap::new();
        loop {
            let b = log.read(&cursor, 1000, Duration::ZERO).await.unwrap();
            if b.records.is_empty() {
                break;
            }
            for r in b.records {
                let e = r.event;
                let ts = (e.reason != userseg_domain::ChangeReason::Deleted).then_some(e.ts);
                let w = (
                    e.kind().as_str().to_string(),
                    e.reason.as_str().to_string(),
                    e.user_id.clone(),
                    e.segment.clone(),
                    ts,
                );
                if let Some(old) = by_id.insert(e.id, w.clone()) {
                    assert_eq!(old, w, "one id, two different events");
                }
            }
            cursor = b.next;
        }
        let mut got: Vec<_> = by_id.into_values().collect();
        got.sort();
        got
    };
    let deadline = Instant::now() + Duration::from_secs(if kill { 90 } else { 60 });
    loop {
        let got = read().await;
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: the topic's changes differ from the model's:\nwant {want:#?}\ngot {got:#?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if let Some(es2) = restarted.as_ref() {
        // The restarted ES serves again.
        es_serving(es2).await;
    }
}
