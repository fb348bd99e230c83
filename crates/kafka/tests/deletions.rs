//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh): user
//! deletions on the pair log. Records of the format before deletions existed still decode; a
//! deletion lands, one record per partition, in the partitions of its users' pairs; the source
//! and the follower hand it out in log order with those pairs, and the batch processor applies
//! it in that order; a rebalance never lets a late write of the previous owner land after the
//! new owner applied a later deletion.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rdkafka::message::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use userseg_domain::{Pair, Record, UserDeletion};
use userseg_kafka::{
    decode_record, partition_for, KafkaConfig, KafkaDeadLetters, KafkaFollower, KafkaSource,
    Position,
};
use userseg_usecase::{
    BatchConfig, BatchProcessor, Content, Followed, LogFollower, Message, PairPublisher,
    PairSource, PortError, SegmentWriter,
};

const LONG: Duration = Duration::from_secs(60);

/// A pair batch exactly as the writers before deletions existed encoded it: `u1` in `sports`
/// at 1764000000 and `用户/1` in `news` at 1764000060.
const OLD_RECORD: &[u8] = &[
    0x08, 0x01, 0x12, 0x12, 0x0a, 0x02, 0x75, 0x31, 0x12, 0x06, 0x73, 0x70, 0x6f, 0x72, 0x74, 0x73,
    0x18, 0x80, 0x82, 0x92, 0xc9, 0x06, 0x12, 0x16, 0x0a, 0x08, 0xe7, 0x94, 0xa8, 0xe6, 0x88, 0xb7,
    0x2f, 0x31, 0x12, 0x04, 0x6e, 0x65, 0x77, 0x73, 0x18, 0xbc, 0x82, 0x92, 0xc9, 0x06,
];

fn deletion(users: &[String]) -> UserDeletion {
    UserDeletion::new(users.to_vec()).expect("valid ids")
}

fn deleted(messages: &[Message<Position>]) -> Vec<String> {
    messages
        .iter()
        .flat_map(|m| match &m.content {
            Content::Delete(d) => d.user_ids().to_vec(),
            _ => Vec::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_records_still_decode_and_deletions_land_in_their_users_partitions() {
    let mut cfg = config("deletion-format", 3);
    cfg.max_message_bytes = 20_000;
    let publisher = setup(&cfg).await;
    raw_producer(&cfg)
        .send(
            FutureRecord::<str, _>::to(&cfg.topic)
                .partition(0)
                .key("u1")
                .payload(OLD_RECORD),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .expect("send the old record");
    // A small deletion (one record per partition) and one large enough to be split.
    let small: Vec<String> = (0..30).map(|i| format!("gone-{i}")).collect();
    let large: Vec<String> = (0..3000)
        .map(|i| format!("a-rather-long-user-id-number-{i:06}"))
        .collect();
    publisher
        .publish_deletion(deletion(&small))
        .await
        .expect("publish a deletion");
    publisher
        .publish_deletion(deletion(&large))
        .await
        .expect("publish a large deletion");

    // The batch processor's source decodes both formats.
    let total = small.len() + large.len();
    let mut source = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut source, LONG, |m| {
        m.iter().any(|m| matches!(m.content, Content::Pairs(_))) && deleted(m).len() >= total
    })
    .await;
    source.close().await;

    // On the topic: version 2 records, keyed by their first id, each holding only users of
    // its partition, within the size limit, the ids in request order.
    let raw = read_raw(&cfg, &cfg.topic, 3, got.len()).await;
    let mut by_partition: BTreeMap<i32, Vec<String>> = BTreeMap::new();
    let mut records = 0;
    for m in &raw {
        let value = m.payload().expect("a value");
        let Record::DeleteUsers(d) = decode_record(value).expect("decodes") else {
            assert_eq!(value, OLD_RECORD);
            continue;
        };
        records += 1;
        assert!(value.len() <= cfg.max_message_bytes, "{}", value.len());
        assert_eq!(
            m.key(),
            Some(d.user_ids()[0].as_bytes()),
            "keyed by the first id"
        );
        for id in d.user_ids() {
            assert_eq!(partition_for(id.as_bytes(), 3), m.partition(), "{id}");
        }
        by_partition
            .entry(m.partition())
            .or_default()
            .extend(d.into_user_ids());
    }
    assert!(
        records > 3 + 3,
        "the large deletion was split: {records} records"
    );
    for (p, ids) in &by_partition {
        let expected: Vec<String> = small
            .iter()
            .chain(&large)
            .filter(|id| partition_for(id.as_bytes(), 3) == *p)
            .cloned()
            .collect();
        assert_eq!(ids, &expected, "partition {p}");
    }

    let pairs: Vec<Pair> = got
        .iter()
        .flat_map(|m| match &m.content {
            Content::Pairs(p) => p.clone(),
            Content::Invalid { reason, .. } => panic!("invalid: {reason}"),
            Content::Delete(_) => Vec::new(),
        })
        .collect();
    assert_eq!(
        pairs,
        vec![
            pair("u1", "sports", 1_764_000_000),
            pair("用户/1", "news", 1_764_000_060)
        ]
    );
    let mut all_deleted = deleted(&got);
    all_deleted.sort();
    let mut expected: Vec<String> = small.iter().chain(&large).cloned().collect();
    expected.sort();
    assert_eq!(all_deleted, expected);
}

/// One operation a store was asked for, by which member.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Write(&'static str, Vec<Pair>),
    Delete(&'static str, Vec<String>),
}

/// A store that records every operation, in order, for all members.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Op>>>);

impl Recorder {
    fn ops(&self) -> Vec<Op> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn member(&self, member: &'static str) -> Arc<MemberStore> {
        Arc::new(MemberStore {
            member,
            ops: self.clone(),
        })
    }

    /// The operations that concern `user`, in order: its pairs' segments written, or "DELETE".
    fn history_of(&self, user: &str) -> Vec<String> {
        let mut out = Vec::new();
        for op in self.ops() {
            match op {
                Op::Write(_, pairs) => out.extend(
                    pairs
                        .iter()
                        .filter(|p| p.user_id == user)
                        .map(|p| p.segment.clone()),
                ),
                Op::Delete(_, ids) if ids.iter().any(|u| u == user) => out.push("DELETE".into()),
                Op::Delete(..) => {}
            }
        }
        out
    }
}

struct MemberStore {
    member: &'static str,
    ops: Recorder,
}

#[async_trait::async_trait]
impl SegmentWriter for MemberStore {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        let op = Op::Write(self.member, pairs.to_vec());
        self.ops
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
        Ok(())
    }

    async fn delete_users(&self, d: UserDeletion) -> Result<(), PortError> {
        let op = Op::Delete(self.member, d.into_user_ids());
        self.ops
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
        Ok(())
    }
}

/// A processor over `source` writing to `store`; returns its task and its stop token.
fn run_processor<S: PairSource>(
    cfg: &KafkaConfig,
    store: Arc<MemberStore>,
    source: S,
    flush_interval: Duration,
) -> (tokio::task::JoinHandle<S>, CancellationToken) {
    let processor = BatchProcessor::new(
        store,
        Arc::new(KafkaDeadLetters::new(cfg).expect("dead letters")),
        BatchConfig {
            batch_size: 10_000,
            flush_interval,
            ..BatchConfig::default()
        },
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { processor.run(source, stop).await }
    });
    (task, stop)
}

async fn until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_between_pairs_of_a_user_is_applied_in_log_order() {
    let cfg = config("deletion-order", 2);
    let publisher = Arc::new(setup(&cfg).await);
    let user = "racing-user".to_string();
    // Other users' pairs are published meanwhile, into both partitions.
    let noise = tokio::spawn({
        let publisher = publisher.clone();
        async move {
            for i in 0..40 {
                let pairs = (0..10)
                    .map(|j| pair(&format!("other-{j}"), &format!("n{i}"), i))
                    .collect();
                publisher.publish(pairs).await.expect("publish noise");
            }
        }
    });
    // The user's pairs, each acknowledged before the next request; the deletion in between.
    for i in 0..10 {
        publisher
            .publish(vec![pair(&user, &format!("before-{i}"), 1)])
            .await
            .expect("publish");
    }
    publisher
        .publish_deletion(deletion(std::slice::from_ref(&user)))
        .await
        .expect("publish the deletion");
    for i in 0..10 {
        publisher
            .publish(vec![pair(&user, &format!("after-{i}"), 2)])
            .await
            .expect("publish");
    }
    noise.await.expect("noise");
    let before: Vec<String> = (0..10).map(|i| format!("before-{i}")).collect();
    let after: Vec<String> = (0..10).map(|i| format!("after-{i}")).collect();
    let expected: Vec<String> = before
        .iter()
        .cloned()
        .chain(["DELETE".to_string()])
        .chain(after.iter().cloned())
        .collect();

    // The index's follower, opened before anything is committed, reads from the start.
    let mut follower = KafkaFollower::open(&cfg).await.expect("follower");

    // The batch processor: the pairs before the deletion are written, then the deletion, then
    // the pairs after it.
    let store = Recorder::default();
    let source = KafkaSource::new(&cfg).expect("source");
    let (task, stop) = run_processor(&cfg, store.member("a"), source, Duration::from_millis(100));
    until("every operation of the user", LONG, || {
        store.history_of(&user).len() >= expected.len()
    })
    .await;
    assert_eq!(store.history_of(&user), expected);
    stop.cancel();
    task.await.expect("processor").close().await;

    // The follower hands the same order out.
    let mut seen: Vec<String> = Vec::new();
    let deadline = Instant::now() + LONG;
    while seen.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, follower.next()).await {
            Ok(Ok(Followed::Pairs(p))) => seen.extend(
                p.into_iter()
                    .filter(|p| p.user_id == user)
                    .map(|p| p.segment),
            ),
            Ok(Ok(Followed::Delete(d))) => {
                assert_eq!(d.user_ids(), std::slice::from_ref(&user));
                seen.push("DELETE".into());
            }
            Ok(Ok(Followed::CaughtUp)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "follower error; retrying"),
            Err(_) => panic!("the follower handed out only {seen:?}"),
        }
    }
    assert_eq!(seen, expected);
}

/// A source that reports what it hands out (to know that a processor has read a message it
/// has not written yet).
struct Observed {
    inner: KafkaSource,
    handed: Arc<Mutex<Vec<Position>>>,
}

impl PairSource for Observed {
    type Position = Position;

    async fn next(&mut self) -> Result<Option<Message<Position>>, PortError> {
        let m = self.inner.next().await?;
        if let Some(m) = &m {
            self.handed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(m.position);
        }
        Ok(m)
    }

    async fn commit(&mut self, positions: Vec<Position>) -> Result<(), PortError> {
        self.inner.commit(positions).await
    }

    async fn idle(&mut self, pause: Duration) {
        self.inner.idle(pause).await
    }

    fn is_drained(&self) -> bool {
        self.inner.is_drained()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_never_lets_a_late_write_land_after_the_new_owners_deletion() {
    let cfg = config("deletion-rebalance", 2);
    let publisher = setup(&cfg).await;
    let user = "moving-user".to_string();
    publisher
        .publish(vec![pair(&user, "before", 1)])
        .await
        .expect("publish");
    // Member a reads the pair and holds it: its flush interval is far away.
    let flush_interval = Duration::from_secs(600);
    let store = Recorder::default();
    let handed_a: Arc<Mutex<Vec<Position>>> = Arc::default();
    let source_a = Observed {
        inner: KafkaSource::new(&cfg).expect("source a"),
        handed: handed_a.clone(),
    };
    let (task_a, stop_a) = run_processor(&cfg, store.member("a"), source_a, flush_interval);
    until("a reads the pair", LONG, || {
        !handed_a
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    })
    .await;
    assert!(store.ops().is_empty(), "nothing written yet");

    // Member b joins: a must write and commit the pair before its partitions move, long before
    // its flush interval.
    let started = Instant::now();
    let source_b = KafkaSource::new(&cfg).expect("source b");
    let (task_b, stop_b) = run_processor(&cfg, store.member("b"), source_b, flush_interval);
    until("a writes what it holds", LONG, || {
        store.history_of(&user) == ["before"]
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(matches!(&store.ops()[0], Op::Write("a", _)));

    // Whoever owns the user's partition now applies its deletion, then a later pair: the pair
    // before the deletion is never written again, by either member.
    publisher
        .publish_deletion(deletion(std::slice::from_ref(&user)))
        .await
        .expect("publish the deletion");
    publisher
        .publish(vec![pair(&user, "after", 2)])
        .await
        .expect("publish");
    // A deletion of a neighbour (same partition) makes its owner write the later pair now.
    let neighbour = (0..)
        .map(|i| format!("neighbour-{i}"))
        .find(|n| partition_for(n.as_bytes(), 2) == partition_for(user.as_bytes(), 2))
        .expect("a neighbour");
    publisher
        .publish_deletion(deletion(std::slice::from_ref(&neighbour)))
        .await
        .expect("publish the neighbour's deletion");
    until("the deletion and the later pair", LONG, || {
        store.history_of(&neighbour) == ["DELETE"]
    })
    .await;
    stop_a.cancel();
    stop_b.cancel();
    let (a, b) = tokio::join!(task_a, task_b);
    a.expect("processor a").inner.close().await;
    b.expect("processor b").close().await;
    assert_eq!(store.history_of(&user), ["before", "DELETE", "after"]);
    let members: BTreeSet<&str> = store
        .ops()
        .iter()
        .map(|op| match op {
            Op::Write(m, _) | Op::Delete(m, _) => *m,
        })
        .collect();
    tracing::info!(?members, "members that wrote");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_deletion_is_dead_lettered_as_a_record_of_the_log() {
    use rdkafka::message::Headers;
    use userseg_usecase::{DeadLetter, DeadLetterKind, DeadLetterSink, DeadPayload};

    let cfg = config("deletion-dlq", 1);
    setup(&cfg).await;
    let ids: Vec<String> = vec!["gone/1".into(), "用户".into()];
    let sink = KafkaDeadLetters::new(&cfg).expect("sink");
    sink.send(DeadLetter {
        payload: DeadPayload::Deletion(deletion(&ids)),
        reason: "refused".into(),
        kind: DeadLetterKind::RejectedByStore,
        attempts: 4,
    })
    .await
    .expect("dead letter");
    let letters = read_raw(&cfg, &cfg.dlq_topic, 1, 1).await;
    // The value can be produced back to the pair log as it is.
    assert_eq!(
        decode_record(letters[0].payload().expect("value")),
        Ok(Record::DeleteUsers(deletion(&ids)))
    );
    let headers: BTreeMap<String, String> = letters[0]
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    let v = String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned();
                    (h.key.to_string(), v)
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(headers["userseg-kind"], "rejected_by_store");
    assert_eq!(headers["userseg-users"], "2");
    assert_eq!(headers["userseg-attempts"], "4");
}
