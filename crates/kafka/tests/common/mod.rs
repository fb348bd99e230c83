//! Helpers for the tests against a real broker (USERSEG_TEST_KAFKA).

#![allow(dead_code, unused_imports)]

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use userseg_domain::Pair;
use userseg_kafka::{ensure_topics, KafkaConfig, KafkaPublisher, KafkaSource, Position};
use userseg_usecase::{Message, PairPublisher, PairSource};

pub use userseg_testkit::{free_port, init_tracing, servers, unique};

/// The broker under test. Never skips: without a broker these tests fail, loudly.
pub fn broker() -> String {
    servers::kafka()
}

/// A configuration with its own topic, DLQ topic and group.
pub fn config(name: &str, partitions: i32) -> KafkaConfig {
    init_tracing();
    let base = unique(&format!("t-{name}"));
    let mut c = KafkaConfig::new(broker());
    c.topic = base.clone();
    c.dlq_topic = format!("{base}-dlq");
    c.group_id = format!("{base}-group");
    c.partitions = partitions;
    c.session_timeout = Duration::from_secs(10);
    c.max_poll_interval = Duration::from_secs(30);
    c.stats_interval = Duration::from_secs(1);
    c
}

/// Creates the topics and waits until the publisher sees them.
pub async fn setup(config: &KafkaConfig) -> KafkaPublisher {
    ensure_topics(config).await.expect("ensure_topics");
    let publisher = KafkaPublisher::new(config).expect("publisher");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match publisher.check_ready().await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "waiting for the topic");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("topic {} never became ready: {e}", config.topic),
        }
    }
    publisher
}

pub fn pair(user: &str, segment: &str, ts: i64) -> Pair {
    Pair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

/// The next message, failing the test after `within`.
pub async fn next_within(source: &mut KafkaSource, within: Duration) -> Message<Position> {
    match tokio::time::timeout(within, source.next()).await {
        Ok(Ok(Some(m))) => m,
        Ok(Ok(None)) => panic!("the source closed"),
        Ok(Err(e)) => panic!("the source failed: {e}"),
        Err(_) => panic!("no message within {within:?}"),
    }
}

/// Reads messages until `done` says so, failing the test after `within`. Transient source
/// errors (e.g. the topic not yet known to a fresh consumer) are retried.
pub async fn read_until(
    source: &mut KafkaSource,
    within: Duration,
    mut done: impl FnMut(&[Message<Position>]) -> bool,
) -> Vec<Message<Position>> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, source.next()).await {
            Ok(Ok(Some(m))) => got.push(m),
            Ok(Ok(None)) => panic!("the source closed"),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "source error while reading; retrying");
                source.idle(Duration::from_millis(100)).await;
            }
            Err(_) => panic!(
                "condition not reached within {within:?}; got {} messages",
                got.len()
            ),
        }
    }
    got
}

/// Asserts that no message arrives for `quiet`.
pub async fn assert_quiet(source: &mut KafkaSource, quiet: Duration) {
    if let Ok(Ok(Some(m))) = tokio::time::timeout(quiet, source.next()).await {
        panic!("unexpected message at {:?}", m.position);
    }
}

pub fn raw_producer(config: &KafkaConfig) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("acks", "all")
        .create()
        .expect("raw producer")
}

/// Reads `n` messages of `topic` (all `partitions`, from the beginning, outside any group).
pub async fn read_raw(
    config: &KafkaConfig,
    topic: &str,
    partitions: i32,
    n: usize,
) -> Vec<OwnedMessage> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", unique("raw"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("raw consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.recv()).await {
            Ok(Ok(m)) => out.push(m.detach()),
            Ok(Err(e)) => tracing::debug!(error = %e, "raw consumer error"),
            Err(_) => panic!("read {} of {n} raw messages from {topic}", out.len()),
        }
    }
    out.sort_by_key(|m| (m.partition(), m.offset()));
    out
}

/// Creates a source and waits until it has joined the group with at least one partition.
pub async fn joined_source(config: &KafkaConfig) -> KafkaSource {
    let mut source = KafkaSource::new(config).expect("source");
    wait_assigned(&mut source, Duration::from_secs(60), |p| !p.is_empty()).await;
    source
}

/// Polls the source (idling, so no message is consumed) until its assignment satisfies `ok`.
pub async fn wait_assigned(
    source: &mut KafkaSource,
    within: Duration,
    mut ok: impl FnMut(&[i32]) -> bool,
) -> Vec<i32> {
    let deadline = Instant::now() + within;
    loop {
        let assigned = source.assigned_partitions().expect("assignment");
        if ok(&assigned) {
            return assigned;
        }
        assert!(
            Instant::now() < deadline,
            "assignment {assigned:?} not as expected within {within:?}"
        );
        source.idle(Duration::from_millis(100)).await;
    }
}

pub fn pairs_of(messages: &[Message<Position>]) -> Vec<Pair> {
    messages
        .iter()
        .flat_map(|m| match &m.content {
            userseg_usecase::Content::Pairs(p) => p.clone(),
            userseg_usecase::Content::Invalid { reason, .. } => {
                panic!("unexpected invalid message at {:?}: {reason}", m.position)
            }
        })
        .collect()
}

pub fn pair_count(messages: &[Message<Position>]) -> usize {
    messages
        .iter()
        .map(|m| match &m.content {
            userseg_usecase::Content::Pairs(p) => p.len(),
            userseg_usecase::Content::Invalid { .. } => 0,
        })
        .sum()
}
