//! [`KafkaFollower`]: reads the whole pair topic outside any consumer group, from the offsets
//! the batch processors' group has committed, to keep an in-memory index up to date.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message as _};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use userseg_domain::{Pair, Record, UserDeletion};
use userseg_usecase::{Followed, LogFollower, PortError};

use crate::codec::decode_record;
use crate::config::{follower_config, group_offsets_config, KafkaConfig};
use crate::context::{forward_error, forward_log};
use crate::error::port_error;
use crate::metadata::topic_partitions;

/// Consecutive messages that are already fetched are merged into one [`Followed::Pairs`] of at
/// most about this many pairs (a single bigger message is handed out whole).
const MERGE_PAIRS: usize = 50_000;

/// Follows the pair topic KAFKA_TOPIC (every partition) without joining any consumer group and
/// without ever committing, starting from the offsets the batch processors' group
/// (KAFKA_GROUP_ID) had committed when [`KafkaFollower::open`] ran.
///
/// Why the committed offsets: the batch processor commits an offset only after ClickHouse
/// confirmed every pair before it. So a scan of ClickHouse taken *after* `open`, combined with
/// what the follower reads from these offsets on, misses no pair: whatever is before the offsets
/// is in the scan, whatever is after them is followed. Pairs in both (committed after `open`,
/// or written but not yet committed) are applied twice, which is harmless since a membership
/// keeps the latest ts.
///
/// Deletions are handed out as [`Followed::Delete`] in log order: the pairs read before a
/// deletion are handed out before it, those after it after it (the index applies them in that
/// order, so a user's deletion removes exactly its pairs logged before it).
///
/// [`Followed::CaughtUp`] is handed out once, the first time the follower has read, on every
/// partition, up to the high watermark it saw at `open` (at once when there was nothing to
/// read). Messages that cannot be decoded, or hold an invalid pair, are skipped (logged and
/// counted in `userseg_index_skipped_messages_total`): the batch processor dead-letters them, so
/// the store never has their pairs either. `userseg_index_lag_messages` reports
/// [`LogFollower::lag`].
pub struct KafkaFollower {
    /// Only `None` once dropped (the consumer is closed on a separate thread).
    consumer: Option<StreamConsumer<FollowerContext>>,
    progress: Progress,
    /// A consumer error seen while merging messages, reported by the next call.
    deferred: Option<PortError>,
    /// A deletion read after pairs that were handed out first: the next call hands it out,
    /// with its (partition, offset).
    deletion: Option<(UserDeletion, (i32, i64))>,
}

/// Where the follower stands on each partition.
#[derive(Debug)]
struct Progress {
    topic: String,
    partitions: BTreeMap<i32, PartitionProgress>,
    /// Partitions not yet read up to their high watermark at open.
    behind: usize,
    caught_up_sent: bool,
    /// The latest high watermarks librdkafka reported in its statistics.
    highs: Arc<Mutex<HashMap<i32, i64>>>,
    /// Where the deletion `take` returned last was.
    last_deletion: (i32, i64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PartitionProgress {
    /// The next offset to read.
    next: i64,
    /// The high watermark when the follower was opened.
    high_at_open: i64,
    caught_up: bool,
}

/// What `open` learns about one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Start {
    partition: i32,
    /// The group's committed offset, if any.
    committed: Option<i64>,
    low: i64,
    high: i64,
}

impl Progress {
    fn new(topic: String, starts: &[Start], highs: Arc<Mutex<HashMap<i32, i64>>>) -> Self {
        let partitions: BTreeMap<i32, PartitionProgress> = starts
            .iter()
            .map(|s| {
                // A committed offset below the log start (deleted by retention) makes the
                // consumer reset to the earliest offset.
                let next = s.committed.map_or(s.low, |c| c.max(s.low));
                (
                    s.partition,
                    PartitionProgress {
                        next,
                        high_at_open: s.high,
                        caught_up: next >= s.high,
                    },
                )
            })
            .collect();
        let behind = partitions.values().filter(|p| !p.caught_up).count();
        Progress {
            topic,
            partitions,
            behind,
            caught_up_sent: false,
            highs,
            last_deletion: (-1, -1),
        }
    }

    /// Has caught up but not said so yet.
    fn catching_up_now(&self) -> bool {
        !self.caught_up_sent && self.behind == 0
    }

    fn advance(&mut self, partition: i32, next: i64) {
        if let Some(p) = self.partitions.get_mut(&partition) {
            p.next = p.next.max(next);
            if !p.caught_up && p.next >= p.high_at_open {
                p.caught_up = true;
                self.behind -= 1;
                tracing::debug!(
                    topic = %self.topic,
                    partition,
                    next = p.next,
                    behind = self.behind,
                    "a partition of the pair log caught up"
                );
            }
        }
    }

    /// The partition was read to its end (an end at least as far as the one seen at open).
    fn eof(&mut self, partition: i32) {
        let at_open = self.partitions.get(&partition).map(|p| p.high_at_open);
        if let Some(high) = at_open {
            self.advance(partition, high);
        }
    }

    /// Records the message's position and appends its pairs to `out`; a deletion is returned
    /// instead (it ends the merge: the pairs before it are handed out first). Invalid messages
    /// are skipped.
    fn take(&mut self, m: &BorrowedMessage<'_>, out: &mut Vec<Pair>) -> Option<UserDeletion> {
        let (partition, offset) = (m.partition(), m.offset());
        self.advance(partition, offset.saturating_add(1));
        let decoded = match m.payload() {
            None | Some([]) => Err("the message is empty".to_string()),
            Some(bytes) => decode_record(bytes).map_err(|e| e.to_string()),
        };
        match decoded {
            Ok(Record::Pairs(pairs)) if out.is_empty() => *out = pairs,
            Ok(Record::Pairs(pairs)) => out.extend(pairs),
            Ok(Record::DeleteUsers(d)) => {
                self.last_deletion = (partition, offset);
                return Some(d);
            }
            Err(reason) => {
                tracing::warn!(
                    topic = %self.topic,
                    partition,
                    offset,
                    %reason,
                    "skipping an invalid message of the pair log"
                );
                metrics::counter!("userseg_index_skipped_messages_total").increment(1);
            }
        }
        None
    }

    fn lag(&self) -> Option<u64> {
        let highs = self.highs.lock().unwrap_or_else(|e| e.into_inner());
        let mut lag: u64 = 0;
        for (partition, p) in &self.partitions {
            if p.next < 0 {
                return None;
            }
            let high = highs
                .get(partition)
                .copied()
                .unwrap_or(-1)
                .max(p.high_at_open);
            lag = lag.saturating_add(u64::try_from(high - p.next).unwrap_or(0));
        }
        Some(lag)
    }

    fn report_lag(&self) {
        if let Some(lag) = self.lag() {
            metrics::gauge!("userseg_index_lag_messages").set(lag as f64);
        }
    }
}

impl KafkaFollower {
    /// Reads the topic's partitions, the offsets the group KAFKA_GROUP_ID committed (without
    /// joining it) and the high watermarks, then assigns every partition to a consumer of its
    /// own at the committed offset (at the beginning where nothing is committed). Broker trouble
    /// (unreachable, timeouts, unknown topic) is `Transient`; an invalid configuration
    /// `Permanent`.
    pub async fn open(config: &KafkaConfig) -> Result<Self, PortError> {
        Self::open_partitions(config, None).await
    }

    /// As [`open`](Self::open), following only `partitions` (those the topic has) — one shard
    /// of the sharded index; `None` follows them all. [`Followed::CaughtUp`] then means these
    /// partitions were read to their high watermark at open.
    pub async fn open_partitions(
        config: &KafkaConfig,
        partitions: Option<&[i32]>,
    ) -> Result<Self, PortError> {
        let only: Option<Vec<i32>> = partitions.map(<[i32]>::to_vec);
        let highs: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
        let lookup: BaseConsumer<FollowerContext> = BaseConsumer::from_config_and_context(
            &group_offsets_config(config),
            FollowerContext::new(&config.topic, Arc::default()),
        )
        .map_err(|e| PortError::Permanent(format!("creating the kafka client: {e}")))?;
        let topic = config.topic.clone();
        let timeout = config.metadata_timeout;
        let starts = tokio::task::spawn_blocking(move || {
            let starts = read_starts(&lookup, &topic, timeout, only.as_deref());
            drop(lookup);
            starts
        })
        .await
        .map_err(|e| PortError::Transient(format!("reading the committed kafka offsets: {e}")))??;

        let consumer: StreamConsumer<FollowerContext> = StreamConsumer::from_config_and_context(
            &follower_config(config),
            FollowerContext::new(&config.topic, highs.clone()),
        )
        .map_err(|e| PortError::Permanent(format!("creating the kafka consumer: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        for s in &starts {
            let offset = s.committed.map_or(Offset::Beginning, Offset::Offset);
            tpl.add_partition_offset(&config.topic, s.partition, offset)
                .map_err(|e| port_error("preparing the kafka assignment", &e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| port_error("assigning the kafka partitions", &e))?;

        let progress = Progress::new(config.topic.clone(), &starts, highs);
        tracing::info!(
            topic = %config.topic,
            group = %config.group_id,
            partitions = starts.len(),
            committed = ?starts.iter().map(|s| (s.partition, s.committed)).collect::<Vec<_>>(),
            lag = ?progress.lag(),
            "following the pair log from the group's committed offsets"
        );
        progress.report_lag();
        Ok(KafkaFollower {
            consumer: Some(consumer),
            progress,
            deferred: None,
            deletion: None,
        })
    }

    pub fn topic(&self) -> &str {
        &self.progress.topic
    }
}

impl Drop for KafkaFollower {
    fn drop(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            // Closing the consumer blocks until done: keep it off the async workers.
            std::thread::spawn(move || drop(consumer));
        }
    }
}

/// The topic's partitions with the group's committed offset and the watermarks of each
/// (blocking calls, each bounded by `timeout`).
fn read_starts(
    lookup: &BaseConsumer<FollowerContext>,
    topic: &str,
    timeout: Duration,
    only: Option<&[i32]>,
) -> Result<Vec<Start>, PortError> {
    let mut partitions = topic_partitions(lookup.client(), topic, timeout)?;
    if let Some(only) = only {
        partitions.retain(|p| only.contains(p));
    }

    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        tpl.add_partition(topic, p);
    }
    let committed = lookup
        .committed_offsets(tpl, timeout)
        .map_err(|e| port_error("reading the committed kafka offsets", &e))?;
    let mut by_partition: HashMap<i32, Option<i64>> = HashMap::new();
    for e in committed.elements_for_topic(topic) {
        e.error().map_err(|err| {
            port_error(
                &format!(
                    "reading the committed kafka offset of partition {}",
                    e.partition()
                ),
                &err,
            )
        })?;
        let offset = match e.offset() {
            Offset::Offset(o) if o >= 0 => Some(o),
            _ => None,
        };
        by_partition.insert(e.partition(), offset);
    }

    partitions
        .into_iter()
        .map(|partition| {
            let (low, high) = lookup
                .fetch_watermarks(topic, partition, timeout)
                .map_err(|e| port_error("fetching kafka watermarks", &e))?;
            Ok(Start {
                partition,
                committed: by_partition.get(&partition).copied().flatten(),
                low: low.max(0),
                high: high.max(0),
            })
        })
        .collect()
}

impl LogFollower for KafkaFollower {
    /// Cancel-safe: the only await is librdkafka's cancel-safe `recv`; everything after it
    /// (decoding, merging the messages already fetched) runs without yielding.
    async fn next(&mut self) -> Result<Followed, PortError> {
        if let Some((d, _)) = self.deletion.take() {
            return Ok(Followed::Delete(d));
        }
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let Some(consumer) = &self.consumer else {
            return Err(PortError::Transient("the kafka follower is closed".into()));
        };
        let progress = &mut self.progress;
        loop {
            if progress.catching_up_now() {
                progress.caught_up_sent = true;
                tracing::info!(topic = %progress.topic, lag = ?progress.lag(), "caught up with the pair log");
                progress.report_lag();
                return Ok(Followed::CaughtUp);
            }
            let mut pairs = Vec::new();
            let mut deletion = match consumer.recv().await {
                Ok(m) => progress.take(&m, &mut pairs),
                Err(KafkaError::PartitionEOF(p)) => {
                    progress.eof(p);
                    continue;
                }
                Err(e) => return Err(port_error("following the pair log", &e)),
            };
            // Merge what is already fetched, never waiting for more, up to a deletion.
            let mut cx = Context::from_waker(Waker::noop());
            while deletion.is_none() && pairs.len() < MERGE_PAIRS && !progress.catching_up_now() {
                let mut recv = pin!(consumer.recv());
                match recv.as_mut().poll(&mut cx) {
                    Poll::Ready(Ok(m)) => deletion = progress.take(&m, &mut pairs),
                    Poll::Ready(Err(KafkaError::PartitionEOF(p))) => progress.eof(p),
                    Poll::Ready(Err(e)) => {
                        self.deferred = Some(port_error("following the pair log", &e));
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            if let Some(d) = deletion {
                metrics::counter!("userseg_index_followed_deletions_total").increment(1);
                progress.report_lag();
                if pairs.is_empty() {
                    return Ok(Followed::Delete(d));
                }
                // The pairs read before the deletion go first; the deletion on the next call.
                self.deletion = Some((d, progress.last_deletion));
                return Ok(Followed::Pairs(pairs));
            }
            if !pairs.is_empty() {
                progress.report_lag();
                return Ok(Followed::Pairs(pairs));
            }
            if let Some(e) = self.deferred.take() {
                return Err(e);
            }
        }
    }

    fn lag(&self) -> Option<u64> {
        self.progress.lag()
    }

    /// The next offset of each partition, except that a deletion read but not handed out yet
    /// is not past.
    fn positions(&self) -> Vec<(i32, i64)> {
        let held = self.deletion.as_ref().map(|(_, at)| *at);
        self.progress
            .partitions
            .iter()
            .map(|(p, at)| match held {
                Some((hp, ho)) if hp == *p => (*p, at.next.min(ho)),
                _ => (*p, at.next),
            })
            .collect()
    }
}

/// The follower's librdkafka callbacks: logs, and statistics for the current high watermarks.
struct FollowerContext {
    topic: String,
    highs: Arc<Mutex<HashMap<i32, i64>>>,
}

impl FollowerContext {
    fn new(topic: &str, highs: Arc<Mutex<HashMap<i32, i64>>>) -> Self {
        FollowerContext {
            topic: topic.to_string(),
            highs,
        }
    }
}

impl ClientContext for FollowerContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log("follower", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // librdkafka reports each partition EOF as an error event, which rdkafka hands to this
        // callback as well as to `recv`: it is how the follower notices it caught up, not a
        // problem.
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            tracing::trace!(topic = %self.topic, reason, "kafka partition eof");
            return;
        }
        forward_error("follower", &error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<Statistics>(statistics) {
            Ok(s) => self.stats(s),
            Err(e) => tracing::debug!(error = %e, "unreadable librdkafka statistics"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        let mut highs = self.highs.lock().unwrap_or_else(|e| e.into_inner());
        for (&partition, p) in &topic.partitions {
            // -1 is librdkafka's internal UA partition; offsets below 0 are unknown.
            if partition >= 0 && p.hi_offset >= 0 {
                let h = highs.entry(partition).or_insert(p.hi_offset);
                *h = (*h).max(p.hi_offset);
            }
        }
    }
}

impl ConsumerContext for FollowerContext {}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(partition: i32, committed: Option<i64>, low: i64, high: i64) -> Start {
        Start {
            partition,
            committed,
            low,
            high,
        }
    }

    #[test]
    fn progress_starts_at_the_committed_offsets() {
        let highs: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
        let mut p = Progress::new(
            "t".into(),
            &[
                start(0, Some(5), 0, 10),
                start(1, None, 2, 4),
                start(2, Some(7), 0, 7),
                start(3, Some(1), 3, 3),
            ],
            highs.clone(),
        );
        assert_eq!(p.behind, 2);
        assert_eq!(p.lag(), Some(5 + 2));
        assert!(!p.catching_up_now());
        p.advance(0, 10);
        assert_eq!(p.behind, 1);
        p.advance(0, 3); // never backwards
        assert_eq!(p.partitions[&0].next, 10);
        highs.lock().unwrap_or_else(|e| e.into_inner()).insert(1, 9);
        assert_eq!(p.lag(), Some(7));
        p.eof(1);
        assert_eq!(p.behind, 0);
        assert!(p.catching_up_now());
        assert_eq!(p.lag(), Some(5));
        p.caught_up_sent = true;
        assert!(!p.catching_up_now());
        p.eof(42); // unknown partitions are ignored
    }

    #[test]
    fn nothing_to_read_is_caught_up_at_once() {
        let p = Progress::new(
            "t".into(),
            &[start(0, None, 0, 0), start(1, Some(3), 0, 3)],
            Arc::default(),
        );
        assert!(p.catching_up_now());
        assert_eq!(p.lag(), Some(0));
    }
}
