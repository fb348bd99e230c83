//! The log follower against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio::time::Instant;
use userseg_domain::Pair;
use userseg_kafka::{
    encode_batch, partition_for, KafkaConfig, KafkaFollower, KafkaSource, Position,
};
use userseg_usecase::{Followed, LogFollower, PairPublisher, PairSource, PortError};

const LONG: Duration = Duration::from_secs(60);

/// Opens a follower, retrying while the broker does not know the fresh topic yet.
async fn open(cfg: &KafkaConfig) -> KafkaFollower {
    let deadline = Instant::now() + LONG;
    loop {
        match KafkaFollower::open(cfg).await {
            Ok(f) => return f,
            Err(PortError::Transient(e)) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "follower not open yet; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("opening the follower: {e}"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Event {
    Pairs(Vec<Pair>),
    Delete(Vec<String>),
    CaughtUp,
}

/// Reads from the follower until `done` says so, failing the test after `within`. Transient
/// errors are retried.
async fn follow_until(
    follower: &mut KafkaFollower,
    within: Duration,
    mut done: impl FnMut(&[Event]) -> bool,
) -> Vec<Event> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, follower.next()).await {
            Ok(Ok(Followed::Pairs(p))) => {
                assert!(!p.is_empty(), "the follower handed out no pairs");
                got.push(Event::Pairs(p));
            }
            Ok(Ok(Followed::CaughtUp)) => got.push(Event::CaughtUp),
            Ok(Ok(Followed::Delete(d))) => got.push(Event::Delete(d.into_user_ids())),
            Ok(Err(PortError::Transient(e))) => {
                tracing::debug!(error = %e, "transient follower error; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(Err(e)) => panic!("the follower failed: {e}"),
            Err(_) => panic!("condition not reached within {within:?}; got {got:?}"),
        }
    }
    got
}

fn caught_up(events: &[Event]) -> bool {
    events.contains(&Event::CaughtUp)
}

fn count_pairs(events: &[Event]) -> usize {
    events
        .iter()
        .map(|e| match e {
            Event::Pairs(p) => p.len(),
            Event::Delete(_) | Event::CaughtUp => 0,
        })
        .sum()
}

fn sorted(mut pairs: Vec<Pair>) -> Vec<Pair> {
    pairs.sort_by(|a, b| (&a.user_id, &a.segment, a.ts).cmp(&(&b.user_id, &b.segment, b.ts)));
    pairs
}

/// The pairs before the (single) CaughtUp, and after it.
fn split_at_caught_up(events: Vec<Event>) -> (Vec<Pair>, Vec<Pair>) {
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut seen = 0;
    for e in events {
        match e {
            Event::CaughtUp => seen += 1,
            Event::Pairs(p) if seen == 0 => before.extend(p),
            Event::Pairs(p) => after.extend(p),
            Event::Delete(d) => panic!("unexpected deletion of {d:?}"),
        }
    }
    assert_eq!(seen, 1, "CaughtUp must come exactly once");
    (before, after)
}

/// Asserts that the follower hands out nothing for `quiet`.
async fn assert_follower_quiet(follower: &mut KafkaFollower, quiet: Duration) {
    if let Ok(r) = tokio::time::timeout(quiet, follower.next()).await {
        panic!("unexpected {r:?}");
    }
}

/// One user name per partition, in partition order.
fn user_per_partition(partitions: i32) -> Vec<String> {
    let mut users: BTreeMap<i32, String> = BTreeMap::new();
    for i in 0.. {
        let u = format!("user-{i}");
        users
            .entry(partition_for(u.as_bytes(), partitions))
            .or_insert(u);
        if users.len() == partitions as usize {
            break;
        }
    }
    users.into_values().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_from_the_committed_offsets_then_catches_up_then_follows_new_pairs() {
    let cfg = config("follow", 3);
    let publisher = setup(&cfg).await;
    let users = user_per_partition(3);
    // Ten requests, one message per partition each.
    let mut published: Vec<Pair> = Vec::new();
    for i in 0..10 {
        let req: Vec<Pair> = users.iter().map(|u| pair(u, &format!("s{i}"), i)).collect();
        publisher.publish(req.clone()).await.expect("publish");
        published.extend(req);
    }

    // The group reads everything and commits the first 4 messages of partition 0 and the first
    // 7 of partition 1; nothing of partition 2.
    let mut source = joined_source(&cfg).await;
    let got = read_until(&mut source, LONG, |m| m.len() >= 30).await;
    let mut by_partition: BTreeMap<i32, Vec<Position>> = BTreeMap::new();
    for m in &got {
        by_partition
            .entry(m.position.partition)
            .or_default()
            .push(m.position);
    }
    assert_eq!(by_partition.len(), 3);
    let mut commit = by_partition[&0][..4].to_vec();
    commit.extend_from_slice(&by_partition[&1][..7]);
    source.commit(commit).await.expect("commit");
    source.close().await;

    // Every pair after the committed offsets: ts 4..10 of partition 0's user, 7..10 of
    // partition 1's, all of partition 2's.
    let expected: Vec<Pair> = published
        .iter()
        .filter(|p| {
            let from = match partition_for(p.user_id.as_bytes(), 3) {
                0 => 4,
                1 => 7,
                _ => 0,
            };
            p.ts >= from
        })
        .cloned()
        .collect();
    assert_eq!(expected.len(), 6 + 3 + 10);

    let mut follower = open(&cfg).await;
    assert_eq!(
        follower.lag(),
        Some(19),
        "messages after the committed offsets"
    );
    let events = follow_until(&mut follower, LONG, caught_up).await;
    assert_eq!(events.last(), Some(&Event::CaughtUp));
    let (before, after) = split_at_caught_up(events);
    assert!(after.is_empty());
    assert_eq!(sorted(before), sorted(expected));
    assert_eq!(follower.lag(), Some(0));

    // Later pairs follow, one by one or merged; reading with short timeouts that often cancel
    // `next` loses nothing.
    let mut later = Vec::new();
    for i in 100..110 {
        let req: Vec<Pair> = users.iter().map(|u| pair(u, &format!("s{i}"), i)).collect();
        publisher.publish(req.clone()).await.expect("publish");
        later.extend(req);
    }
    let deadline = Instant::now() + LONG;
    let mut followed = Vec::new();
    while followed.len() < later.len() {
        assert!(
            Instant::now() < deadline,
            "only {} of {} later pairs followed",
            followed.len(),
            later.len()
        );
        match tokio::time::timeout(Duration::from_millis(3), follower.next()).await {
            Err(_) => {} // cancelled
            Ok(Ok(Followed::Pairs(p))) => followed.extend(p),
            Ok(Ok(Followed::CaughtUp)) => panic!("a second CaughtUp"),
            Ok(Ok(Followed::Delete(d))) => panic!("unexpected deletion {d:?}"),
            Ok(Err(e)) => tracing::debug!(error = %e, "follower error; retrying"),
        }
    }
    assert_eq!(sorted(followed), sorted(later));
    assert_follower_quiet(&mut follower, Duration::from_millis(500)).await;
    assert_eq!(follower.lag(), Some(0));

    // The follower never committed for the group: its offsets are still the ones above.
    let mut again = KafkaSource::new(&cfg).expect("source");
    let rest = read_until(&mut again, LONG, |m| pair_count(m) >= 19 + 30).await;
    assert_eq!(pair_count(&rest), 19 + 30);
    again.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_empty_messages_are_skipped() {
    let cfg = config("follow-skip", 1);
    let _publisher = setup(&cfg).await;
    let mut follower = open(&cfg).await;
    // An empty topic: caught up at once.
    assert!(matches!(follower.next().await, Ok(Followed::CaughtUp)));

    let raw = raw_producer(&cfg);
    let valid = vec![pair("alice", "s", 1), pair("bob", "s", 2)];
    let encoded = encode_batch(&valid);
    let records = [
        FutureRecord::to(&cfg.topic)
            .key("k")
            .payload(&b"garbage"[..]),
        FutureRecord::to(&cfg.topic).key("k").payload(&b""[..]),
        FutureRecord::to(&cfg.topic).key("k"), // no value at all
        FutureRecord::to(&cfg.topic).key("k").payload(&encoded[..]),
    ];
    for r in records {
        raw.send(r, Timeout::After(Duration::from_secs(10)))
            .await
            .map_err(|(e, _)| e)
            .expect("send");
    }
    let events = follow_until(&mut follower, LONG, |e| count_pairs(e) >= 2).await;
    assert_eq!(events, vec![Event::Pairs(valid)]);
    assert_follower_quiet(&mut follower, Duration::from_millis(500)).await;
    assert_eq!(follower.lag(), Some(0));

    // Opened again from the start, the skipped messages count towards catching up.
    let mut again = open(&cfg).await;
    assert_eq!(again.lag(), Some(4));
    let events = follow_until(&mut again, LONG, caught_up).await;
    let (before, _) = split_at_caught_up(events);
    assert_eq!(before, vec![pair("alice", "s", 1), pair("bob", "s", 2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_or_fully_committed_topic_is_caught_up_first() {
    let cfg = config("follow-empty", 4);
    let publisher = setup(&cfg).await;
    let mut follower = open(&cfg).await;
    assert_eq!(follower.lag(), Some(0));
    assert!(matches!(
        tokio::time::timeout(LONG, follower.next()).await,
        Ok(Ok(Followed::CaughtUp))
    ));
    // Then it follows what comes.
    publisher
        .publish(vec![pair("carol", "s", 5)])
        .await
        .expect("publish");
    let events = follow_until(&mut follower, LONG, |e| count_pairs(e) >= 1).await;
    assert_eq!(events, vec![Event::Pairs(vec![pair("carol", "s", 5)])]);
    drop(follower);

    // Everything committed by the group: caught up first again, and nothing to read.
    let mut source = joined_source(&cfg).await;
    let got = read_until(&mut source, LONG, |m| !m.is_empty()).await;
    source
        .commit(got.iter().map(|m| m.position).collect())
        .await
        .expect("commit");
    source.close().await;
    let mut follower = open(&cfg).await;
    assert_eq!(follower.lag(), Some(0));
    assert!(matches!(
        tokio::time::timeout(LONG, follower.next()).await,
        Ok(Ok(Followed::CaughtUp))
    ));
    assert_follower_quiet(&mut follower, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_transient() {
    init_tracing();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut cfg = KafkaConfig::new(format!("127.0.0.1:{port}"));
    cfg.metadata_timeout = Duration::from_secs(1);
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(20), KafkaFollower::open(&cfg)).await {
        Ok(Err(PortError::Transient(_))) => {}
        Ok(Err(e)) => panic!("expected a transient error, got {e}"),
        Ok(Ok(_)) => panic!("opened a follower without a broker"),
        Err(_) => panic!("open did not give up within 20 s"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // An invalid configuration never reaches the adapter: the binary's typed config refuses it
    // (crates/userseg/src/config).
}
