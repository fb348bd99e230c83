//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh):
//! consuming: commits, invalid messages, a group of two members, idling.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use userseg_domain::Pair;
use userseg_kafka::{partition_for, KafkaSource, Position};
use userseg_usecase::{Content, DeadLetterKind, InvalidReason, PairPublisher, PairSource};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_then_a_new_member_resumes_after_the_committed_offsets() {
    let cfg = config("commit", 2);
    let publisher = setup(&cfg).await;
    for i in 0..10 {
        publisher
            .publish(vec![
                pair("alice", &format!("s{i}"), i),
                pair("bob", &format!("s{i}"), i),
            ])
            .await
            .expect("publish");
    }
    // alice and bob must live in different partitions for this test to cover both.
    assert_ne!(partition_for(b"alice", 2), partition_for(b"bob", 2));

    let mut first = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut first, LONG, |m| m.len() >= 20).await;
    // Commit what was read first in each partition: 4 messages of one, 7 of the other.
    let mut by_partition: BTreeMap<i32, Vec<Position>> = BTreeMap::new();
    for m in &got {
        by_partition
            .entry(m.position.partition)
            .or_default()
            .push(m.position);
    }
    assert_eq!(by_partition.len(), 2);
    let mut commit = Vec::new();
    let mut uncommitted = BTreeSet::new();
    for (i, positions) in by_partition.values().enumerate() {
        let k = if i == 0 { 4 } else { 7 };
        commit.extend_from_slice(&positions[..k]);
        uncommitted.extend(positions[k..].iter().copied());
    }
    // In two calls, the second one lower: a commit never moves an offset backwards.
    first.commit(commit.clone()).await.expect("commit");
    first.commit(commit[..1].to_vec()).await.expect("commit");
    first.close().await;

    let mut second = KafkaSource::new(&cfg).expect("source");
    let again = read_until(&mut second, LONG, |m| m.len() >= uncommitted.len()).await;
    let positions: BTreeSet<Position> = again.iter().map(|m| m.position).collect();
    assert_eq!(
        positions, uncommitted,
        "exactly the uncommitted messages come again"
    );
    assert_quiet(&mut second, Duration::from_millis(500)).await;
    second.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_invalid_messages_come_out_invalid() {
    let cfg = config("invalid", 1);
    let publisher = setup(&cfg).await;
    let raw = raw_producer(&cfg);
    let unknown_version = userseg_proto::v1::PairBatch {
        version: 99,
        pairs: vec![],
        deletion: None,
    }
    .encode_to_vec();
    let bad_pair = userseg_proto::v1::PairBatch {
        version: userseg_proto::PAIR_BATCH_VERSION,
        pairs: vec![
            userseg_proto::v1::LogPair {
                user_id: "ok".into(),
                segment: "ok".into(),
                ts: 1,
            },
            userseg_proto::v1::LogPair {
                user_id: "bad\nuser".into(),
                segment: "ok".into(),
                ts: 1,
            },
        ],
        deletion: None,
    }
    .encode_to_vec();
    let garbage = vec![0xff, 0x00, 0xfe, 0x13];
    for value in [&garbage, &unknown_version, &bad_pair] {
        raw.send(
            FutureRecord::<str, _>::to(&cfg.topic).payload(value.as_slice()),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .expect("send");
    }
    raw.send(
        FutureRecord::<str, [u8]>::to(&cfg.topic).key("no-value"),
        Timeout::After(Duration::from_secs(10)),
    )
    .await
    .expect("send");
    // A valid message after them, with a ts far older than any window: lag is normal.
    publisher
        .publish(vec![pair("late", "s", 1)])
        .await
        .expect("publish");

    let mut source = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut source, LONG, |m| m.len() >= 5).await;
    let invalid = |i: usize| match &got[i].content {
        Content::Invalid { payload, reason } => (payload.clone(), reason.clone()),
        other => panic!("message {i} should be invalid, got {other:?}"),
    };
    let (payload, reason) = invalid(0);
    assert_eq!(payload, garbage);
    assert_eq!(reason.kind(), DeadLetterKind::Undecodable, "{reason}");
    let (payload, reason) = invalid(1);
    assert_eq!(payload, unknown_version);
    assert_eq!(reason.kind(), DeadLetterKind::Undecodable, "{reason}");
    assert!(
        reason
            .to_string()
            .starts_with("undecodable: unknown PairBatch version 99"),
        "{reason}"
    );
    let (payload, reason) = invalid(2);
    assert_eq!(payload, bad_pair);
    assert!(
        matches!(reason, InvalidReason::InvalidPair { index: 1, .. }),
        "{reason}"
    );
    assert!(
        reason
            .to_string()
            .starts_with("invalid pair 1: user_id contains"),
        "{reason}"
    );
    let (payload, reason) = invalid(3);
    assert!(payload.is_empty());
    assert_eq!(
        reason,
        InvalidReason::Undecodable("the message has no value".into())
    );
    match &got[4].content {
        Content::Pairs(p) => assert_eq!(p, &vec![pair("late", "s", 1)]),
        other => panic!("valid message came out as {other:?}"),
    }
    let offsets: Vec<i64> = got.iter().map(|m| m.position.offset).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3, 4]);
    source.close().await;
}

/// The group's committed offsets of partitions 0..n.
async fn group_offsets(cfg: &userseg_kafka::KafkaConfig, n: i32) -> BTreeMap<i32, Offset> {
    let checker: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .create()
        .expect("checker");
    let mut tpl = TopicPartitionList::new();
    for p in 0..n {
        tpl.add_partition(&cfg.topic, p);
    }
    let committed = tokio::task::spawn_blocking(move || {
        checker.committed_offsets(tpl, Duration::from_secs(10))
    })
    .await
    .expect("join")
    .expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_hands_revoked_partitions_over_only_after_committing_what_it_read() {
    let cfg = config("group", 4);
    let publisher = setup(&cfg).await;
    let users: Vec<String> = (0..40).map(|i| format!("member-user-{i}")).collect();
    publisher
        .publish(users.iter().map(|u| pair(u, "s", 1)).collect())
        .await
        .expect("publish");
    let per_partition: BTreeMap<i32, usize> = users.iter().fold(BTreeMap::new(), |mut m, u| {
        *m.entry(partition_for(u.as_bytes(), 4)).or_default() += 1;
        m
    });
    assert_eq!(per_partition.len(), 4);

    // The first member owns everything and reads everything, without committing yet.
    let mut a = KafkaSource::new(&cfg).expect("source a");
    let read_by_a = read_until(&mut a, LONG, |m| m.len() >= 4).await;
    assert_eq!(
        a.assigned_partitions().expect("assignment"),
        vec![0, 1, 2, 3]
    );

    // A second member joins. `a` hands nothing new out while its partitions are revoked: only
    // one empty message (at a position it already handed out) telling its processor to write
    // what it holds now. The partitions move only once `a` committed everything it read, so
    // `b` starts after it and never reads those messages again.
    let mut b = KafkaSource::new(&cfg).expect("source b");
    let deadline = tokio::time::Instant::now() + LONG;
    let mut markers = Vec::new();
    let mut read_by_b = Vec::new();
    let (owned_a, owned_b) = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the two members never split the partitions"
        );
        let (next_a, next_b) = tokio::join!(
            tokio::time::timeout(Duration::from_millis(100), a.next()),
            tokio::time::timeout(Duration::from_millis(100), b.next())
        );
        if let Ok(Ok(Some(m))) = next_a {
            match &m.content {
                Content::Pairs(p) if p.is_empty() => {
                    assert!(
                        read_by_a.iter().any(|r| r.position == m.position),
                        "the flush marker repeats a position handed out: {:?}",
                        m.position
                    );
                    assert!(markers.is_empty(), "one flush marker per revocation");
                    assert!(a.is_drained(), "a revoking source asks for a flush");
                    markers.push(m.position);
                    let mut all: Vec<Position> = read_by_a.iter().map(|m| m.position).collect();
                    all.push(m.position);
                    a.commit(all).await.expect("commit");
                }
                other => panic!("a revoking member handed out {other:?} at {:?}", m.position),
            }
        }
        if let Ok(Ok(Some(m))) = next_b {
            read_by_b.push(m);
        }
        let owned_a = a.assigned_partitions().expect("assignment a");
        let owned_b = b.assigned_partitions().expect("assignment b");
        if !owned_a.is_empty() && !owned_b.is_empty() && owned_a.len() + owned_b.len() == 4 {
            break (owned_a, owned_b);
        }
    };
    assert_eq!(markers.len(), 1);
    assert!(!a.is_drained());
    let all: BTreeSet<i32> = owned_a.iter().chain(&owned_b).copied().collect();
    assert_eq!(all, BTreeSet::from([0, 1, 2, 3]), "{owned_a:?} {owned_b:?}");
    for p in 0..4 {
        assert_eq!(
            group_offsets(&cfg, 4).await[&p],
            Offset::Offset(1),
            "partition {p} committed before it moved"
        );
    }
    assert_quiet(&mut b, Duration::from_millis(500)).await;
    assert!(read_by_b.is_empty(), "b read again what a had committed");

    // Each now reads only its own partitions; a commit of a partition a no longer owns is
    // skipped.
    publisher
        .publish(users.iter().map(|u| pair(u, "s", 2)).collect())
        .await
        .expect("publish");
    let want = |owned: &[i32]| owned.iter().copied().collect::<BTreeSet<i32>>();
    let got_a = read_until(&mut a, LONG, |m| m.len() >= owned_a.len()).await;
    let got_b = read_until(&mut b, LONG, |m| m.len() >= owned_b.len()).await;
    let parts = |v: &[userseg_usecase::Message<Position>]| {
        v.iter()
            .map(|m| m.position.partition)
            .collect::<BTreeSet<i32>>()
    };
    assert_eq!(parts(&got_a), want(&owned_a));
    assert_eq!(parts(&got_b), want(&owned_b));
    let mut stale: Vec<Position> = got_a.iter().map(|m| m.position).collect();
    stale.extend(got_b.iter().map(|m| m.position));
    a.commit(stale).await.expect("commit");
    let committed = group_offsets(&cfg, 4).await;
    for p in 0..4 {
        let expected = if owned_a.contains(&p) { 2 } else { 1 };
        assert_eq!(committed[&p], Offset::Offset(expected), "partition {p}");
    }
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keeps_the_member_and_loses_nothing() {
    let mut cfg = config("idle", 1);
    cfg.session_timeout = Duration::from_secs(6);
    cfg.max_poll_interval = Duration::from_secs(6);
    let publisher = setup(&cfg).await;
    for i in 0..5 {
        publisher
            .publish(vec![pair("idler", "s", i)])
            .await
            .expect("publish");
    }
    let mut source = KafkaSource::new(&cfg).expect("source");
    let first = read_until(&mut source, LONG, |m| m.len() >= 2).await;
    // Idle longer than max.poll.interval while more arrives: the member must stay in the
    // group (it keeps polling) and hand out everything afterwards, in order, once.
    for i in 5..10 {
        publisher
            .publish(vec![pair("idler", "s", i)])
            .await
            .expect("publish");
    }
    source.idle(Duration::from_secs(8)).await;
    assert_eq!(source.assigned_partitions().expect("assignment"), vec![0]);
    let rest = read_until(&mut source, LONG, |m| first.len() + m.len() >= 10).await;
    let offsets: Vec<i64> = first
        .iter()
        .chain(&rest)
        .map(|m| m.position.offset)
        .collect();
    assert_eq!(offsets, (0..10).collect::<Vec<i64>>());
    assert_quiet(&mut source, Duration::from_millis(500)).await;
    source.close().await;
}

/// Idle periods that start and stop (or are cut short) many times while plenty of messages
/// are queued must neither lose nor skip any message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_and_cancelled_idles_lose_nothing() {
    let cfg = config("idlestress", 3);
    let publisher = setup(&cfg).await;
    let total: usize = 3000;
    for chunk in 0..30 {
        let pairs: Vec<Pair> = (0..100)
            .map(|i| {
                pair(
                    &format!("u{}", chunk * 100 + i),
                    "s",
                    (chunk * 100 + i) as i64,
                )
            })
            .collect();
        publisher.publish(pairs).await.expect("publish");
    }
    let mut source = KafkaSource::new(&cfg).expect("source");
    let mut seen: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
    let mut users = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + LONG;
    let mut round = 0u64;
    while users.len() < total {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {total} users seen",
            users.len()
        );
        round += 1;
        for _ in 0..3 {
            match tokio::time::timeout(Duration::from_millis(200), source.next()).await {
                Ok(Ok(Some(m))) => {
                    seen.entry(m.position.partition)
                        .or_default()
                        .push(m.position.offset);
                    if let Content::Pairs(p) = m.content {
                        users.extend(p.into_iter().map(|p| p.user_id));
                    }
                }
                Ok(Ok(None)) => panic!("source closed"),
                Ok(Err(e)) => panic!("source error {e}"),
                Err(_) => break,
            }
        }
        // Idle, sometimes cut short by a shorter timeout (as when a write completes).
        let cut = if round.is_multiple_of(2) { 5 } else { 50 };
        let _ = tokio::time::timeout(
            Duration::from_millis(cut),
            source.idle(Duration::from_millis(30)),
        )
        .await;
    }
    for (partition, offsets) in &seen {
        let mut sorted = offsets.clone();
        sorted.dedup();
        let expected: Vec<i64> = (0..sorted.len() as i64).collect();
        assert_eq!(sorted, expected, "partition {partition}: offsets skipped");
    }
    source.close().await;
}

/// `KafkaSource::assignment` follows the rebalances: everything for a lone member, a disjoint
/// split once a second one joined (a member's revoked partitions leave its set only once it
/// handed them over), everything again when the second one leaves, nothing once closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_assignment_watch_follows_rebalances() {
    let cfg = config("assignwatch", 4);
    let _publisher = setup(&cfg).await;
    let all: BTreeSet<i32> = (0..4).collect();
    let mut a = KafkaSource::new(&cfg).expect("source a");
    let mut watch_a = a.assignment();
    assert!(watch_a.borrow().is_empty(), "nothing owned before joining");
    // Poll until the watch says a owns everything (nothing to read: idle keeps polling).
    let deadline = tokio::time::Instant::now() + LONG;
    while **watch_a.borrow_and_update() != all {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never got all partitions"
        );
        a.idle(Duration::from_millis(100)).await;
    }
    assert_eq!(
        a.assigned_partitions().expect("assignment"),
        vec![0, 1, 2, 3]
    );

    let mut b = KafkaSource::new(&cfg).expect("source b");
    let watch_b = b.assignment();
    let deadline = tokio::time::Instant::now() + LONG;
    let (owned_a, owned_b) = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the members never split the partitions: a {:?}, b {:?}",
            watch_a.borrow(),
            watch_b.borrow()
        );
        // A member revoking with nothing handed out hands over at once on `next`.
        let _ = tokio::join!(
            tokio::time::timeout(Duration::from_millis(100), a.next()),
            tokio::time::timeout(Duration::from_millis(100), b.next())
        );
        let (sa, sb) = (watch_a.borrow().clone(), watch_b.borrow().clone());
        // Never both owning one partition.
        assert!(sa.is_disjoint(&sb), "a {sa:?} and b {sb:?} overlap");
        if !sa.is_empty() && !sb.is_empty() && sa.len() + sb.len() == 4 {
            break (sa, sb);
        }
    };
    let union: BTreeSet<i32> = owned_a.union(&owned_b).copied().collect();
    assert_eq!(union, all);
    let as_vec = |s: &BTreeSet<i32>| s.iter().copied().collect::<Vec<i32>>();
    assert_eq!(a.assigned_partitions().expect("a"), as_vec(&owned_a));
    assert_eq!(b.assigned_partitions().expect("b"), as_vec(&owned_b));
    assert!(watch_a.has_changed().expect("sender alive"));

    // b leaves: a owns everything again, and b's watch is empty.
    b.close().await;
    assert!(watch_b.borrow().is_empty(), "a closed member owns nothing");
    let deadline = tokio::time::Instant::now() + LONG;
    while **watch_a.borrow() != all {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a never got b's partitions back"
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), a.next()).await;
    }
    a.close().await;
}
