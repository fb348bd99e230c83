//! [`KafkaSource`]: the batch processor's view of the pair topic, as a member of the consumer
//! group KAFKA_GROUP_ID.

mod context;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use rdkafka::config::FromClientConfigAndContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::{Offset, TopicPartitionList};
use userseg_domain::Record;
use userseg_usecase::{Content, InvalidReason, Message, PairSource, PortError};

use crate::codec::decode_record;
use crate::config::{consumer_config, KafkaConfig};
use crate::error::{port_error, SetupError};
use context::{Shared, SourceContext};

/// Where a message sits in the topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// Where an invalid message came from, so that the dead-letter sink can name it in headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// Remembers the origin of the last invalid messages the source handed out. Give it to
/// [`crate::KafkaDeadLetters::with_provenance`] and dead letters of raw payloads carry their
/// source topic, partition and offset. Matching is by payload content.
#[derive(Clone, Debug, Default)]
pub struct Provenance(Arc<Mutex<VecDeque<(u64, Origin)>>>);

/// Invalid messages are dead-lettered right after they are read, so a short memory suffices.
const PROVENANCE_CAPACITY: usize = 256;

fn fingerprint(payload: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

impl Provenance {
    fn record(&self, payload: &[u8], origin: Origin) {
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= PROVENANCE_CAPACITY {
            q.pop_front();
        }
        q.push_back((fingerprint(payload), origin));
    }

    /// The origin of a payload the source reported as invalid (oldest match first), forgotten
    /// once returned.
    pub fn take(&self, payload: &[u8]) -> Option<Origin> {
        let key = fingerprint(payload);
        let mut q = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let at = q.iter().position(|(k, _)| *k == key)?;
        q.remove(at).map(|(_, o)| o)
    }
}

/// Most bytes of messages buffered while idling.
const IDLE_BUFFER_BYTES: usize = 32 << 20;

fn approx_bytes(m: &Message<Position>) -> usize {
    match &m.content {
        Content::Pairs(pairs) => pairs
            .iter()
            .map(|p| p.user_id.len() + p.segment.len() + 64)
            .sum(),
        Content::Invalid { payload, .. } => payload.len() + 128,
        Content::Delete(d) => d.user_ids().iter().map(|u| u.len() + 32).sum(),
    }
}

/// Consumes KAFKA_TOPIC in the consumer group KAFKA_GROUP_ID with manual offset management:
/// nothing is committed automatically, [`PairSource::commit`] commits synchronously (on a
/// blocking thread) the highest offset + 1 per partition, and only for partitions this member
/// still owns. After a rebalance the new owner therefore re-reads the revoked partitions from
/// their last committed offset: messages this member read but had not committed are delivered
/// again, which is safe because store writes are idempotent.
///
/// Must be created inside a tokio runtime.
pub struct KafkaSource {
    /// Only `None` once dropped (the consumer is closed on a separate thread).
    consumer: Option<Arc<StreamConsumer<SourceContext>>>,
    shared: Arc<Shared>,
    topic: String,
    /// Messages read while idling, handed out before new ones.
    pending: VecDeque<Message<Position>>,
    /// Approximate size of `pending`.
    pending_bytes: usize,
    provenance: Provenance,
    /// Messages handed out by `next`, and positions the processor has since committed (or
    /// tried to: a write is done once it commits). Equal when the processor holds nothing
    /// unwritten: only then is a deferred revocation carried out.
    handed: u64,
    settled: u64,
    /// The position of the last message handed out.
    last_handed: Option<Position>,
    /// The empty message that makes the processor flush was sent for the pending revocation.
    flush_marker_sent: bool,
}

impl KafkaSource {
    /// Creates the consumer and subscribes to the topic. Joining
    /// the group happens in the background while `next` is polled.
    pub fn new(config: &KafkaConfig) -> Result<Self, SetupError> {
        let shared = Arc::new(Shared::default());
        let context = SourceContext {
            topic: config.topic.clone(),
            shared: shared.clone(),
        };
        let consumer: StreamConsumer<SourceContext> =
            StreamConsumer::from_config_and_context(&consumer_config(config), context)
                .map_err(SetupError::Client)?;
        consumer
            .subscribe(&[&config.topic])
            .map_err(|source| SetupError::Subscribe {
                topic: config.topic.clone(),
                source,
            })?;
        tracing::info!(topic = %config.topic, group = %config.group_id, "kafka consumer subscribed");
        Ok(KafkaSource {
            consumer: Some(Arc::new(consumer)),
            shared,
            topic: config.topic.clone(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            provenance: Provenance::default(),
            handed: 0,
            settled: 0,
            last_handed: None,
            flush_marker_sent: false,
        })
    }

    /// The origins of invalid messages, for [`crate::KafkaDeadLetters::with_provenance`].
    pub fn provenance(&self) -> Provenance {
        self.provenance.clone()
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The partitions of the topic this member owns, as a `watch` updated from the rebalance
    /// callback: a partition appears when it is assigned and disappears once this member has
    /// given it up (a revocation is deferred until what was read from it is committed, see
    /// above, and shows here only then; a lost assignment or closing shows at once).
    /// Empty before the member joined the group and after it closed.
    pub fn assignment(&self) -> tokio::sync::watch::Receiver<Arc<BTreeSet<i32>>> {
        self.shared.assignment.subscribe()
    }

    /// The partitions of the topic currently assigned to this member, sorted.
    pub fn assigned_partitions(&self) -> Result<Vec<i32>, PortError> {
        let tpl = self
            .consumer()
            .assignment()
            .map_err(|e| port_error("reading the kafka assignment", &e))?;
        let mut v: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// Leaves the group now (instead of when dropped), so its partitions move to the other
    /// members without waiting for the session timeout. Uncommitted messages are redelivered.
    pub async fn close(mut self) {
        if let Some(consumer) = self.consumer.take() {
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || close(consumer, &shared)).await;
        }
    }

    /// Carries out the pending revocation (the processor holds nothing unwritten): gives the
    /// partitions up, forgets what was committed on them and drops the messages of theirs
    /// read while idling (the next owner reads them from the committed offsets).
    async fn hand_over(&mut self) {
        let Some(revoking) = self
            .shared
            .revoking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            self.shared.revoke_pending.store(false, Ordering::Release);
            return;
        };
        let revoked: HashSet<i32> = revoking
            .partitions
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect();
        let mut list: Vec<i32> = revoked.iter().copied().collect();
        list.sort_unstable();
        let ours = context::topic_partitions(&revoking.partitions, &self.topic);
        let cooperative = revoking.cooperative;
        if let Some(consumer) = self.consumer.clone() {
            let partitions = revoking.partitions;
            let _ = tokio::task::spawn_blocking(move || {
                context::unassign(consumer.as_ref(), &partitions, cooperative)
            })
            .await;
        }
        self.shared.assignment.revoke(&ours, cooperative);
        self.shared.forget(&list);
        let before = self.pending.len();
        self.pending
            .retain(|m| !revoked.contains(&m.position.partition));
        self.pending_bytes = self.pending.iter().map(approx_bytes).sum();
        self.flush_marker_sent = false;
        self.shared.revoke_pending.store(false, Ordering::Release);
        tracing::info!(
            topic = %self.topic,
            partitions = ?list,
            held_ms = revoking.since.elapsed().as_millis() as u64,
            dropped_idle_messages = before - self.pending.len(),
            "handed revoked kafka partitions over, everything read from them committed"
        );
    }

    /// Counts a message handed out of `next`.
    fn hand(&mut self, m: Message<Position>) -> Message<Position> {
        self.handed += 1;
        self.last_handed = Some(m.position);
        m
    }

    fn consumer(&self) -> &StreamConsumer<SourceContext> {
        match &self.consumer {
            Some(c) => c,
            None => unreachable!("the consumer is only taken when the source is dropped"),
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            // Closing leaves the group and blocks until done: keep it off the async workers.
            let shared = self.shared.clone();
            std::thread::spawn(move || close(consumer, &shared));
        }
    }
}

/// Closes the consumer (blocking): revocations are no longer deferred, and a deferred one is
/// carried out first (closing waits for it otherwise).
fn close(consumer: Arc<StreamConsumer<SourceContext>>, shared: &Shared) {
    shared.closing.store(true, Ordering::Release);
    let pending = shared
        .revoking
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(r) = pending {
        context::unassign(consumer.as_ref(), &r.partitions, r.cooperative);
    }
    drop(consumer);
    shared.assignment.revoke(&[], false);
}

/// Turns a Kafka message into what the processor consumes.
fn convert(topic: &str, provenance: &Provenance, m: &BorrowedMessage<'_>) -> Message<Position> {
    let position = Position {
        partition: m.partition(),
        offset: m.offset(),
    };
    let decoded = match m.payload() {
        None => Err((
            InvalidReason::Undecodable("the message has no value".into()),
            Vec::new(),
        )),
        Some(bytes) => decode_record(bytes).map_err(|e| (e.into(), bytes.to_vec())),
    };
    metrics::counter!("userseg_kafka_consumed_messages_total").increment(1);
    let content = match decoded {
        Ok(Record::Pairs(pairs)) => {
            metrics::counter!("userseg_kafka_consumed_pairs_total").increment(pairs.len() as u64);
            Content::Pairs(pairs)
        }
        Ok(Record::DeleteUsers(d)) => {
            tracing::info!(
                topic,
                partition = position.partition,
                offset = position.offset,
                users = d.len(),
                "consumed a user deletion"
            );
            Content::Delete(d)
        }
        Err((reason, payload)) => {
            tracing::warn!(
                topic,
                partition = position.partition,
                offset = position.offset,
                %reason,
                "invalid message in the pair log"
            );
            metrics::counter!("userseg_kafka_invalid_messages_total").increment(1);
            provenance.record(
                &payload,
                Origin {
                    topic: topic.to_string(),
                    partition: position.partition,
                    offset: position.offset,
                },
            );
            Content::Invalid { payload, reason }
        }
    };
    let logged_at = m
        .timestamp()
        .to_millis()
        .and_then(|ms| u64::try_from(ms).ok())
        .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
    Message {
        position,
        content,
        logged_at,
    }
}

/// The highest offset + 1 to commit per partition.
fn commit_offsets(positions: &[Position]) -> BTreeMap<i32, i64> {
    let mut next: BTreeMap<i32, i64> = BTreeMap::new();
    for p in positions {
        let e = next.entry(p.partition).or_insert(p.offset + 1);
        *e = (*e).max(p.offset + 1);
    }
    next
}

fn commit_blocking(
    consumer: &StreamConsumer<SourceContext>,
    shared: &Shared,
    topic: &str,
    offsets: BTreeMap<i32, i64>,
) -> Result<(), PortError> {
    let assignment = consumer
        .assignment()
        .map_err(|e| port_error("reading the kafka assignment", &e))?;
    let lost = consumer.assignment_lost();
    let assigned: HashSet<i32> = assignment
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut not_owned = Vec::new();
    {
        let committed = shared.committed.lock().unwrap_or_else(|e| e.into_inner());
        for (&partition, &next) in &offsets {
            if lost || !assigned.contains(&partition) {
                not_owned.push(partition);
                continue;
            }
            if committed.get(&partition).is_some_and(|&c| c >= next) {
                continue; // already committed as far (a redelivered message): never go back
            }
            tpl.add_partition_offset(topic, partition, Offset::Offset(next))
                .map_err(|e| port_error("preparing the kafka commit", &e))?;
        }
    }
    if !not_owned.is_empty() {
        tracing::info!(
            topic,
            partitions = ?not_owned,
            "not committing partitions this consumer no longer owns; their new owner reads them again"
        );
        metrics::counter!("userseg_kafka_commits_skipped_total").increment(not_owned.len() as u64);
    }
    if tpl.count() == 0 {
        return Ok(());
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .map_err(|e| port_error("committing kafka offsets", &e))?;
    let mut committed = shared.committed.lock().unwrap_or_else(|e| e.into_inner());
    for e in tpl.elements() {
        if let Offset::Offset(o) = e.offset() {
            let c = committed.entry(e.partition()).or_insert(o);
            *c = (*c).max(o);
        }
    }
    metrics::counter!("userseg_kafka_commits_total").increment(1);
    tracing::trace!(topic, offsets = ?offsets, "committed kafka offsets");
    Ok(())
}

impl PairSource for KafkaSource {
    type Position = Position;

    fn partition_offset(position: &Position) -> Option<(i32, i64)> {
        Some((position.partition, position.offset))
    }

    /// Cancel-safe: the awaits are librdkafka's cancel-safe `recv`, handing revoked partitions
    /// over (done at most once), and waiting forever; a message is converted synchronously
    /// once received.
    ///
    /// While a revocation is pending no message is handed out: once everything handed out is
    /// committed the partitions are given up and reading goes on; until then, if the processor
    /// holds unwritten messages, one empty message (at the last position handed out, which
    /// commits nothing new) is handed out so that, the source being drained, the processor
    /// writes and commits them now instead of at its flush timer.
    async fn next(&mut self) -> Result<Option<Message<Position>>, PortError> {
        loop {
            if self.shared.revoke_pending() {
                if self.settled >= self.handed {
                    self.hand_over().await;
                    continue;
                }
                if !self.flush_marker_sent {
                    self.flush_marker_sent = true;
                    if let Some(position) = self.last_handed {
                        let marker = Message {
                            position,
                            content: Content::Pairs(Vec::new()),
                            logged_at: None,
                        };
                        return Ok(Some(self.hand(marker)));
                    }
                }
                // The processor comes back once its write is done and committed.
                std::future::pending::<()>().await;
            }
            if let Some(m) = self.pending.pop_front() {
                self.pending_bytes = self.pending_bytes.saturating_sub(approx_bytes(&m));
                return Ok(Some(self.hand(m)));
            }
            let Some(consumer) = self.consumer.clone() else {
                return Ok(None);
            };
            let shared = self.shared.clone();
            let mut recv = pin!(consumer.recv());
            // A revocation is seen inside `recv` (librdkafka calls back while polling): stop
            // there, and hand nothing more out.
            let received = std::future::poll_fn(|cx| {
                if shared.revoke_pending() {
                    return Poll::Ready(None);
                }
                recv.as_mut().poll(cx).map(Some)
            })
            .await;
            match received {
                None => continue,
                Some(Ok(m)) => {
                    let msg = convert(&self.topic, &self.provenance, &m);
                    drop(m);
                    return Ok(Some(self.hand(msg)));
                }
                Some(Err(e)) => return Err(port_error("consuming from kafka", &e)),
            }
        }
    }

    /// True while a revocation waits for the processor: it should write what it holds now.
    fn is_drained(&self) -> bool {
        self.shared.revoke_pending()
    }

    async fn commit(&mut self, positions: Vec<Position>) -> Result<(), PortError> {
        // Written, whether or not the commit succeeds: an uncommitted message is read again by
        // whoever owns its partition next, and writing it again is harmless.
        self.settled += positions.len() as u64;
        let offsets = commit_offsets(&positions);
        if offsets.is_empty() {
            return Ok(());
        }
        let Some(consumer) = self.consumer.clone() else {
            return Err(PortError::Transient("the kafka consumer is closed".into()));
        };
        let shared = self.shared.clone();
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || commit_blocking(&consumer, &shared, &topic, offsets))
            .await
            .map_err(|e| PortError::Transient(format!("committing kafka offsets: {e}")))?
    }

    /// Hands nothing out for `pause` but keeps polling the consumer, so it keeps its group
    /// membership (heartbeats, `max.poll.interval.ms`) and serves rebalances; what arrives
    /// meanwhile is kept for `next`.
    async fn idle(&mut self, pause: Duration) {
        // Keep polling so the member stays in its group (max.poll.interval), but hand nothing
        // out: what arrives waits in `pending`, bounded by IDLE_BUFFER_BYTES; past that the
        // consumer is simply not polled until the pause ends. Partitions are deliberately not
        // paused: pausing and resuming under load was seen to skip prefetched messages.
        let deadline = tokio::time::Instant::now() + pause;
        loop {
            if self.pending_bytes >= IDLE_BUFFER_BYTES {
                tokio::time::sleep_until(deadline).await;
                break;
            }
            let Some(consumer) = &self.consumer else {
                break;
            };
            match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_) => break,
                Ok(Ok(m)) => {
                    let msg = convert(&self.topic, &self.provenance, &m);
                    drop(m);
                    self.pending_bytes += approx_bytes(&msg);
                    self.pending.push_back(msg);
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "kafka consumer error while idle");
                    // Errors are reported once per state change; do not spin on a repeated one.
                    let step = tokio::time::Instant::now() + Duration::from_millis(100);
                    tokio::time::sleep_until(step.min(deadline)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_offsets_take_the_max_plus_one_per_partition() {
        let p = |partition, offset| Position { partition, offset };
        let got = commit_offsets(&[p(0, 5), p(1, 2), p(0, 3), p(0, 9), p(1, 1)]);
        assert_eq!(got, BTreeMap::from([(0, 10), (1, 3)]));
        assert!(commit_offsets(&[]).is_empty());
    }

    #[test]
    fn provenance_matches_by_payload() {
        let prov = Provenance::default();
        let origin = |offset| Origin {
            topic: "t".into(),
            partition: 1,
            offset,
        };
        prov.record(b"abc", origin(7));
        prov.record(b"xyz", origin(8));
        assert_eq!(prov.take(b"nope"), None);
        assert_eq!(prov.take(b"xyz"), Some(origin(8)));
        assert_eq!(prov.take(b"xyz"), None);
        assert_eq!(prov.take(b"abc"), Some(origin(7)));
        for i in 0..(PROVENANCE_CAPACITY as i64 + 10) {
            prov.record(&i.to_le_bytes(), origin(i));
        }
        assert_eq!(prov.take(&0i64.to_le_bytes()), None);
        assert_eq!(
            prov.take(&200i64.to_le_bytes()).map(|o| o.offset),
            Some(200)
        );
    }
}
