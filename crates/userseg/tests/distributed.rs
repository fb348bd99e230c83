//! End-to-end tests of the distributed mode — USS → Kafka (tansu) → ES → ClickHouse — on the
//! real servers started by scripts/test.sh, driving the real binaries.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{now, seg, until, Api, Cluster};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use serde_json::json;
use userseg_domain::Pair as DomainPair;
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{Pair, PushRequest};

fn pair(user: &str, segment: &str, ts: Option<i64>) -> Pair {
    Pair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

/// Pairs pushed over gRPC and HTTP to USS are counted exactly by ES from its in-memory index,
/// with re-sends and backfilled timestamps, and expire with a short window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_pairs_are_counted_exactly_and_expire() {
    counted_exactly_and_expire(true).await;
}

/// The same, with ES answering from ClickHouse (ES_INDEX=false): exact and approximate queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_queries_count_exactly_and_expire() {
    counted_exactly_and_expire(false).await;
}

async fn counted_exactly_and_expire(index: bool) {
    let c = Cluster::new(if index { "e2e" } else { "e2e_ch" });
    c.migrate();
    let window = [("WINDOW", "8s")];
    let mut uss = c.spawn("uss", &window);
    let mut es = c.spawn(
        "es",
        &[
            ("WINDOW", "8s"),
            ("ES_INDEX", if index { "true" } else { "false" }),
        ],
    );
    uss.ready().await;
    es.ready().await;
    if index {
        until("the index serves", 30, async || {
            es.metric("userseg_index_serving").await == 1.0
        })
        .await;
    }

    let mut grpc = SegmentsClient::connect(uss.base.clone()).await.unwrap();
    let users: Vec<Pair> = (0..40)
        .map(|i| pair(&format!("g{i}"), "grpc", None))
        .collect();
    for _ in 0..3 {
        // Re-sends never inflate.
        let r = grpc
            .push(PushRequest {
                pairs: users.clone(),
            })
            .await
            .unwrap();
        assert_eq!(r.into_inner().accepted, 40);
    }
    let t = now();
    let http = reqwest::Client::new();
    let body = json!({"pairs": (0..25).map(|i| json!({"user_id": format!("h{i}"), "segment": "http", "ts": t - 2})).collect::<Vec<_>>()});
    let r = http
        .post(format!("{}/v1/pairs", uss.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Backfilled, older pairs for the same users do not change anything.
    let body = json!({"pairs": (0..25).map(|i| json!({"user_id": format!("h{i}"), "segment": "http", "ts": t - 5})).collect::<Vec<_>>()});
    let r = http
        .post(format!("{}/v1/pairs", uss.base))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // Invalid input is refused by USS with the same errors as standalone.
    let r = http
        .post(format!("{}/v1/pairs", uss.base))
        .json(&json!({"pairs": [{"user_id": "x", "segment": "bad seg"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);

    until("ES counts every user once", 30, async || {
        es.counts().await == vec![seg("grpc", 40), seg("http", 25)]
    })
    .await;
    let approx: serde_json::Value =
        reqwest::get(format!("{}/v1/segments/grpc?mode=approx", es.base))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    // The index is exact whatever the mode; ClickHouse answers approx from sketches.
    assert_eq!(approx["exact"], index);
    assert_eq!(
        approx["users"], 40,
        "small segments are exact even in approx mode"
    );
    // The http pairs are 2 s older: they expire first, then the grpc ones.
    until("the backfilled segment expires", 30, async || {
        es.counts().await == vec![seg("grpc", 40)]
    })
    .await;
    until("everything expires", 30, async || {
        es.counts().await.is_empty()
    })
    .await;
}

/// ES's index holds what ClickHouse held at start (even pairs that never went through this
/// topic), what the topic held beyond the committed offsets, and what arrives later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_loads_clickhouse_then_follows_the_topic() {
    let c = Cluster::new("index");
    c.migrate();
    let t = now();
    let rows: Vec<String> = (0..30)
        .map(|i| format!("('seeded', 's{i}', toDateTime({}))", t - i))
        .chain(std::iter::once(format!(
            "('seeded', 'old', toDateTime({}))",
            t - 3 * 86_400
        )))
        .collect();
    let sql = format!(
        "INSERT INTO `{}`.pairs (segment, user_id, ts) VALUES {}",
        c.database,
        rows.join(",")
    );
    let r = reqwest::Client::new()
        .post(&c.clickhouse)
        .body(sql)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    let window = [("WINDOW", "1d")];
    let mut uss = c.spawn("uss", &window);
    uss.ready().await;
    let mut grpc = SegmentsClient::connect(uss.base.clone()).await.unwrap();
    let logged: Vec<Pair> = (0..20)
        .map(|i| pair(&format!("l{i}"), "logged", None))
        .collect();
    grpc.push(PushRequest { pairs: logged }).await.unwrap();

    let mut es = c.spawn("es", &window);
    es.ready().await;
    until("the index serves", 60, async || {
        es.metric("userseg_index_serving").await == 1.0
    })
    .await;
    let scanned = es.metric("userseg_index_scanned_pairs_total").await;
    assert!(scanned >= 30.0, "the scan read {scanned} pairs");
    assert_eq!(
        es.counts().await,
        vec![seg("logged", 20), seg("seeded", 30)]
    );
    // Only the index answers now; it learns later pairs from the topic.
    let later: Vec<Pair> = (0..10)
        .map(|i| pair(&format!("n{i}"), "later", None))
        .collect();
    grpc.push(PushRequest { pairs: later }).await.unwrap();
    until("later pairs are counted", 30, async || {
        es.counts().await == vec![seg("later", 10), seg("logged", 20), seg("seeded", 30)]
    })
    .await;
    let one: serde_json::Value = reqwest::get(format!("{}/v1/segments/seeded", es.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(one["users"], 30);
    assert_eq!(one["exact"], true);
}

/// Messages that cannot be decoded or hold an invalid pair go to the DLQ with their reason;
/// valid messages around them are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_messages_on_the_topic_go_to_the_dlq() {
    let c = Cluster::new("dlq");
    c.migrate();
    let mut es = c.spawn("es", &[]);
    es.ready().await;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka)
        .set("message.timeout.ms", "10000")
        .create()
        .unwrap();
    let valid = |u: &str| {
        userseg_kafka::encode_batch(&[DomainPair {
            user_id: u.into(),
            segment: "dl".into(),
            ts: now(),
        }])
    };
    let invalid_pair = userseg_kafka::encode_batch(&[DomainPair {
        user_id: "x".into(),
        segment: "no spaces allowed".into(),
        ts: now(),
    }]);
    let payloads: Vec<(&str, Vec<u8>)> = vec![
        ("a", valid("a")),
        ("garbage", b"\xff\xfe not a protobuf \x00".to_vec()),
        ("b", valid("b")),
        ("x", invalid_pair),
        ("c", valid("c")),
    ];
    for (key, payload) in &payloads {
        producer
            .send(
                FutureRecord::to(&c.topic).key(*key).payload(payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)
            .unwrap();
    }
    until("the valid pairs are counted", 30, async || {
        es.counts().await == vec![seg("dl", 3)]
    })
    .await;

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &c.kafka)
        .set("group.id", format!("{}-reader", c.group))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&c.dlq]).unwrap();
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while kinds.len() < 2 {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, consumer.recv())
            .await
            .expect("two dead letters within 30 s")
            .unwrap();
        let mut kind = String::new();
        let mut reason = String::new();
        if let Some(h) = msg.headers() {
            for header in h.iter() {
                let v = String::from_utf8_lossy(header.value.unwrap_or_default()).to_string();
                match header.key {
                    "userseg-kind" => kind = v,
                    "userseg-reason" => reason = v,
                    _ => {}
                }
            }
        }
        assert!(!reason.is_empty(), "a dead letter carries its reason");
        kinds.push((kind, reason, msg.payload().map(<[u8]>::to_vec)));
    }
    kinds.sort();
    assert_eq!(kinds[0].0, "invalid_pair");
    assert!(kinds[0].1.contains("segment"), "{}", kinds[0].1);
    assert_eq!(kinds[1].0, "undecodable");
    assert_eq!(
        kinds[1].2.as_deref(),
        Some(&b"\xff\xfe not a protobuf \x00"[..]),
        "the raw bytes are kept"
    );
    assert_eq!(es.counts().await, vec![seg("dl", 3)]);
}

/// A pusher that sends batches of unique users to USS until told to stop; returns how many
/// pairs were acknowledged.
fn pusher(
    base: String,
    segment: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut client = SegmentsClient::connect(base).await.unwrap();
        let mut acked = 0u64;
        let mut b = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let pairs: Vec<Pair> = (0..200)
                .map(|i| pair(&format!("{segment}-{}", b * 200 + i), segment, None))
                .collect();
            let r = client.push(PushRequest { pairs }).await.unwrap();
            acked += r.into_inner().accepted;
            b += 1;
        }
        acked
    })
}

/// ES killed with SIGKILL in the middle of a stream and restarted: every acknowledged pair is
/// counted, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn es_killed_mid_stream_loses_and_doubles_nothing() {
    let c = Cluster::new("kill");
    c.migrate();
    // A short session so the killed member's partitions move quickly.
    let batch = [("BATCH_SIZE", "500"), ("KAFKA_SESSION_TIMEOUT", "10s")];
    let mut uss = c.spawn("uss", &[]);
    let mut es = c.spawn("es", &batch);
    uss.ready().await;
    es.ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = pusher(uss.base.clone(), "k", stop.clone());
    until("ES has written some batches", 60, async || {
        es.metric("userseg_processor_batches_written_total").await >= 3.0
    })
    .await;
    es.sigkill();
    // Pushing goes on while ES is down. The restarted ES joins after the killed member's
    // session (10 s) has expired: tansu 0.6 drops a dead member only when a join arrives after
    // its session expired; a member joining earlier gets a rebalance that hands every partition
    // to the dead member, and no rebalance follows when that session expires (a real Kafka
    // rebalances then). tansu describes the dead member as a live one until then, so there is
    // no condition to await: this waits out the session.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut es = c.spawn("es", &batch);
    es.ready().await;
    until("the restarted ES writes", 60, async || {
        es.metric("userseg_processor_batches_written_total").await >= 2.0
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let acked = task.await.unwrap();
    assert!(acked >= 2000, "only {acked} pairs were pushed");
    until(
        "every acknowledged pair is counted exactly once",
        60,
        async || es.counts().await == vec![seg("k", acked)],
    )
    .await;
}

/// Two ES processes in one consumer group split the partitions; counts stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_es_in_one_group_split_the_partitions() {
    let c = Cluster::new("group");
    c.migrate();
    let mut uss = c.spawn("uss", &[]);
    uss.ready().await; // creates the 6-partition topic
    let member = [("BATCH_SIZE", "200"), ("KAFKA_SESSION_TIMEOUT", "10s")];
    let mut es1 = c.spawn("es", &member);
    let mut es2 = c.spawn("es", &member);
    es1.ready().await;
    es2.ready().await;
    let stop = Arc::new(AtomicBool::new(false));
    let task = pusher(uss.base.clone(), "two", stop.clone());
    until("both members write batches", 90, async || {
        es1.metric("userseg_processor_pairs_written_total").await > 0.0
            && es2.metric("userseg_processor_pairs_written_total").await > 0.0
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let acked = task.await.unwrap();
    until("both report the exact count", 60, async || {
        es1.counts().await == vec![seg("two", acked)]
            && es2.counts().await == vec![seg("two", acked)]
    })
    .await;
    let log1 = std::fs::read_to_string(&es1.log).unwrap_or_default();
    let log2 = std::fs::read_to_string(&es2.log).unwrap_or_default();
    assert!(log1.contains("partitions assigned") && log2.contains("partitions assigned"));
}

/// USS with the broker down answers UNAVAILABLE / 503 within the configured bound and never
/// acknowledges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uss_without_a_broker_answers_unavailable_in_bounded_time() {
    let c = Cluster::new("down");
    let dead = format!("127.0.0.1:{}", common::free_port());
    let mut uss = c.spawn(
        "uss",
        &[("KAFKA_BROKER_URL", &dead), ("KAFKA_ACK_TIMEOUT", "2s")],
    );
    uss.up().await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/pairs", uss.base))
        .json(&json!({"pairs": [{"user_id": "u", "segment": "s"}]}))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status().as_u16(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    let mut grpc = SegmentsClient::connect(uss.base.clone()).await.unwrap();
    let started = Instant::now();
    let e = grpc
        .push(PushRequest {
            pairs: vec![pair("u", "s", None)],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(started.elapsed() < Duration::from_secs(6));
    assert_eq!(uss.readyz().await.0, 503);
}
