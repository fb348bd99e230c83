//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh):
//! publishing: partitioning and keys like Java clients, splitting, topics, a full local queue.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use userseg_domain::Pair;
use userseg_kafka::{decode_batch, ensure_topics, partition_for, KafkaPublisher, KafkaSource};
use userseg_usecase::{Content, PairPublisher, PortError};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_keeps_each_user_in_one_partition() {
    let cfg = config("roundtrip", 4);
    let publisher = setup(&cfg).await;

    // Three requests; every user appears in several of them and with several segments.
    let mut requests = Vec::new();
    for r in 0..3 {
        let mut req = Vec::new();
        for u in 0..60 {
            for s in 0..2 {
                req.push(pair(
                    &format!("user-{u}"),
                    &format!("seg-{r}-{s}"),
                    1_700_000_000 + r,
                ));
            }
        }
        requests.push(req);
    }
    let expected_messages: usize = requests
        .iter()
        .map(|req| {
            req.iter()
                .map(|p| partition_for(p.user_id.as_bytes(), 4))
                .collect::<BTreeSet<_>>()
                .len()
        })
        .sum();
    let total: usize = requests.iter().map(Vec::len).sum();
    for req in &requests {
        publisher.publish(req.clone()).await.expect("publish");
    }
    assert_eq!(publisher.cached_partitions(), Some(4));

    let mut source = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut source, LONG, |m| pair_count(m) >= total).await;
    // One message per partition per request.
    assert_eq!(got.len(), expected_messages);

    let mut partition_of_user: HashMap<String, i32> = HashMap::new();
    let mut partitions = BTreeSet::new();
    for m in &got {
        let Content::Pairs(pairs) = &m.content else {
            panic!("invalid message at {:?}", m.position);
        };
        partitions.insert(m.position.partition);
        for p in pairs {
            assert_eq!(partition_for(p.user_id.as_bytes(), 4), m.position.partition);
            let seen = partition_of_user
                .entry(p.user_id.clone())
                .or_insert(m.position.partition);
            assert_eq!(
                *seen, m.position.partition,
                "{} in two partitions",
                p.user_id
            );
        }
    }
    assert_eq!(
        partitions.len(),
        4,
        "60 users should cover all 4 partitions"
    );

    // Every pair arrived exactly once, and per user in publish order.
    let mut want: Vec<Pair> = requests.concat();
    let mut have = pairs_of(&got);
    let per_user = |pairs: &[Pair]| {
        let mut m: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for p in pairs {
            m.entry(p.user_id.clone())
                .or_default()
                .push((p.segment.clone(), p.ts));
        }
        m
    };
    assert_eq!(per_user(&have), per_user(&want));
    want.sort_by(|a, b| (&a.user_id, &a.segment).cmp(&(&b.user_id, &b.segment)));
    have.sort_by(|a, b| (&a.user_id, &a.segment).cmp(&(&b.user_id, &b.segment)));
    assert_eq!(have, want);
    assert_quiet(&mut source, Duration::from_millis(500)).await;
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_keyed_and_partitioned_like_java_clients() {
    let cfg = config("keys", 6);
    let publisher = setup(&cfg).await;
    let users: Vec<String> = (0..40).map(|i| format!("u{i}-ユーザー")).collect();
    publisher
        .publish(users.iter().map(|u| pair(u, "s", 1)).collect())
        .await
        .expect("publish");
    let expected = users
        .iter()
        .map(|u| partition_for(u.as_bytes(), 6))
        .collect::<BTreeSet<_>>()
        .len();
    let raw = read_raw(&cfg, &cfg.topic, 6, expected).await;
    for m in &raw {
        let pairs = decode_batch(m.payload().expect("value")).expect("PairBatch");
        assert_eq!(
            m.key(),
            Some(pairs[0].user_id.as_bytes()),
            "the key is the first pair's user id"
        );
        for p in &pairs {
            assert_eq!(partition_for(p.user_id.as_bytes(), 6), m.partition());
        }
    }

    // librdkafka's `murmur2` partitioner is the Java client's default partitioner: keyed
    // records it places must land where partition_for says.
    let java_like: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("partitioner", "murmur2")
        .create()
        .expect("producer");
    for u in &users {
        let d = java_like
            .send(
                FutureRecord::to(&cfg.dlq_topic)
                    .key(u.as_str())
                    .payload("x"),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .expect("send");
        assert_eq!(d.partition, partition_for(u.as_bytes(), 6), "user {u}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_partition_groups_are_split_below_max_message_bytes() {
    let mut cfg = config("split", 2);
    cfg.max_message_bytes = 4096;
    let publisher = setup(&cfg).await;
    let pairs: Vec<Pair> = (0..2000)
        .map(|i| pair(&format!("user-{}", i % 50), &format!("segment-{i}"), i))
        .collect();
    publisher.publish(pairs.clone()).await.expect("publish");
    let raw = read_raw(&cfg, &cfg.topic, 2, 10).await;
    for m in &raw {
        assert!(m.payload().map_or(0, <[u8]>::len) <= 4096);
    }
    let mut source = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut source, LONG, |m| pair_count(m) >= pairs.len()).await;
    assert!(got.len() > 10, "{} messages", got.len());
    let mut have = pairs_of(&got);
    let mut want = pairs;
    have.sort_by_key(|p| p.ts);
    want.sort_by_key(|p| p.ts);
    assert_eq!(have, want);
    source.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensure_topics_is_idempotent() {
    let cfg = config("ensure", 3);
    ensure_topics(&cfg).await.expect("first");
    ensure_topics(&cfg).await.expect("second");
    let publisher = setup(&cfg).await;
    assert_eq!(publisher.cached_partitions(), Some(3));
    let mut dlq = cfg.clone();
    dlq.topic = cfg.dlq_topic.clone();
    dlq.dlq_topic = format!("{}-other", cfg.dlq_topic);
    let p = KafkaPublisher::new(&dlq).expect("publisher");
    p.check_ready().await.expect("the dlq topic exists");
    assert_eq!(p.cached_partitions(), Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_local_queue_is_overloaded() {
    let mut cfg = config("overload", 4);
    cfg.queue_max_messages = 1;
    cfg.linger = Duration::from_millis(500);
    let publisher = setup(&cfg).await;
    let pairs: Vec<Pair> = (0..40).map(|i| pair(&format!("o{i}"), "s", 1)).collect();
    match publisher.publish(pairs).await {
        Err(PortError::Overloaded(_)) => {}
        other => panic!("expected Overloaded, got {other:?}"),
    }
}
