//! [`KafkaChangeLog`]: the change feed as a Kafka topic (KAFKA_CHANGES_TOPIC).
//!
//! Each event is one message keyed by its user id, in the partition Kafka's default partitioner
//! picks for that key ([`partition_for`]), so a user's events share a partition and stay in
//! order. The value is the event as JSON (`docs/CHANGES.md`, "Distributed mode"). A cursor
//! holds the next offset to read of every partition: `k` followed by the offsets of partitions
//! 0, 1, … joined by `.` (e.g. `k12.0.7`); an event's cursor is the position just after it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, FromClientConfigAndContext, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use tokio::time::Instant;
use userseg_domain::{ChangeEvent, ChangeReason};
use userseg_usecase::{ChangeBatch, ChangeLog, ChangeReadError, ChangeRecord, PortError};

use crate::config::{admin_config, group_offsets_config, KafkaConfig};
use crate::context::{forward_error, forward_log, LogContext};
use crate::error::port_error;
use crate::metadata::topic_partitions;
use crate::partitioner::partition_for;
use crate::producer::{ProducerHandle, Record};

/// Idle reading consumers kept for the next reads.
const POOL: usize = 8;
/// Uncompressed record batches of at most 64 KiB (some 300 events): a reader fetches whole
/// batches (it may start inside one) and holds them decompressed, so the batch size bounds what
/// each subscriber's reader holds (LZ4 batches of the pair producer's 1 MB held ~11 MB per
/// stalled client, `es_feed_needs_members_and_stalled_clients_stay_bounded`).
const PRODUCER_OVERRIDES: &[(&str, &str)] =
    &[("batch.size", "65536"), ("compression.type", "none")];
/// Events per produce call (bounds the producer's queue).
const APPEND_CHUNK: usize = 10_000;

/// The change feed on a Kafka topic; implements [`ChangeLog`].
///
/// `append` resolves once the broker acknowledged every event (`acks=all`); a failed append
/// may have written some of them (the caller retries: consumers drop repeats by id). Reads
/// assign a consumer outside any group to the cursor's offsets (consumers are pooled); they
/// never commit.
pub struct KafkaChangeLog {
    config: KafkaConfig,
    topic: String,
    partitions: i32,
    producer: ProducerHandle,
    lookup: Arc<BaseConsumer<ReaderContext>>,
    readers: Mutex<Vec<Pooled>>,
    /// The latest (low, high) watermarks and when they were fetched: every subscriber's read
    /// asks for them, and one fetch serves all the reads of [`WATERMARKS_FRESH`] (a thousand
    /// subscribers make one request per partition, not a thousand).
    marks: tokio::sync::Mutex<Option<(Instant, Arc<Watermarks>)>>,
}

/// The low and high watermarks of every partition.
#[derive(Debug)]
struct Watermarks {
    low: Vec<i64>,
    high: Vec<i64>,
}

/// How long fetched watermarks serve reads.
const WATERMARKS_FRESH: Duration = Duration::from_millis(50);

impl KafkaChangeLog {
    /// Creates `topic` unless it exists (KAFKA_PARTITIONS partitions, when `create`), then
    /// reads its partition count. Broker trouble is `Transient`.
    pub async fn open(config: &KafkaConfig, topic: &str, create: bool) -> Result<Self, PortError> {
        if create {
            create_topic(config, topic).await?;
        }
        let lookup: BaseConsumer<ReaderContext> =
            BaseConsumer::from_config_and_context(&group_offsets_config(config), ReaderContext)
                .map_err(|e| PortError::Permanent(format!("creating the kafka client: {e}")))?;
        let lookup = Arc::new(lookup);
        let (l, t, timeout) = (lookup.clone(), topic.to_string(), config.metadata_timeout);
        let ids = tokio::task::spawn_blocking(move || topic_partitions(l.client(), &t, timeout))
            .await
            .map_err(|e| PortError::Transient(format!("reading kafka metadata: {e}")))??;
        let partitions = ids.len() as i32;
        if ids.iter().enumerate().any(|(i, &p)| i as i32 != p) {
            return Err(PortError::Permanent(format!(
                "kafka topic {topic}: unexpected partition ids {ids:?}"
            )));
        }
        let producer = ProducerHandle::with_overrides(config, "changes", PRODUCER_OVERRIDES)
            .map_err(|e| PortError::Permanent(e.to_string()))?;
        Ok(KafkaChangeLog {
            config: config.clone(),
            topic: topic.to_string(),
            partitions,
            producer,
            lookup,
            readers: Mutex::new(Vec::new()),
            marks: tokio::sync::Mutex::new(None),
        })
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// How many partitions `topic` (another topic, e.g. the pair topic) has.
    pub async fn partitions_of(&self, topic: &str) -> Result<i32, PortError> {
        let (l, t, timeout) = (
            self.lookup.clone(),
            topic.to_string(),
            self.config.metadata_timeout,
        );
        let ids = tokio::task::spawn_blocking(move || topic_partitions(l.client(), &t, timeout))
            .await
            .map_err(|e| PortError::Transient(format!("reading kafka metadata: {e}")))??;
        Ok(ids.len() as i32)
    }

    /// The partition of `user_id`'s events.
    pub fn partition_of(&self, user_id: &str) -> i32 {
        partition_for(user_id.as_bytes(), self.partitions)
    }

    /// Low (`low = true`) or high watermarks of every partition.
    async fn watermarks(&self, low: bool) -> Result<Vec<i64>, PortError> {
        let w = self.both_watermarks(Duration::ZERO).await?;
        Ok(if low { w.low.clone() } else { w.high.clone() })
    }

    /// The watermarks, fetched unless those fetched last are younger than `fresh` (reads pass
    /// [`WATERMARKS_FRESH`]: one fetch serves every reader; concurrent callers wait for the
    /// one fetch in flight).
    async fn both_watermarks(&self, fresh: Duration) -> Result<Arc<Watermarks>, PortError> {
        let asked = Instant::now();
        let mut cached = self.marks.lock().await;
        if let Some((at, w)) = cached.as_ref() {
            // A fetch that began after this call did (the one it waited for), or fresh enough.
            if *at >= asked || at.elapsed() < fresh {
                return Ok(w.clone());
            }
        }
        let (lookup, topic, n) = (self.lookup.clone(), self.topic.clone(), self.partitions);
        let timeout = self.config.metadata_timeout;
        let started = Instant::now();
        let w = tokio::task::spawn_blocking(move || {
            let mut w = Watermarks {
                low: Vec::with_capacity(n.max(0) as usize),
                high: Vec::with_capacity(n.max(0) as usize),
            };
            for p in 0..n {
                let (lo, hi) = lookup
                    .fetch_watermarks(&topic, p, timeout)
                    .map_err(|e| port_error("fetching kafka watermarks", &e))?;
                w.low.push(lo.max(0));
                w.high.push(hi.max(0));
            }
            Ok::<_, PortError>(w)
        })
        .await
        .map_err(|e| PortError::Transient(format!("fetching kafka watermarks: {e}")))??;
        let w = Arc::new(w);
        *cached = Some((started, w.clone()));
        Ok(w)
    }

    /// The pooled consumer positioned at `pos` (the previous read ended there: the next read
    /// continues without reassigning), or a fresh one assigned at `pos`. A consumer is never
    /// reassigned: librdkafka's queue may still hold what it fetched for the old position.
    /// The second value says the reader is fresh (not continuing a previous read).
    fn reader(&self, pos: &[i64]) -> Result<(Pooled, bool), PortError> {
        {
            let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = pool.iter().position(|r| r.at == pos) {
                return Ok((pool.remove(i), false));
            }
        }
        let consumer: StreamConsumer<ReaderContext> =
            StreamConsumer::from_config_and_context(&reader_config(&self.config), ReaderContext)
                .map_err(|e| PortError::Permanent(format!("creating the kafka consumer: {e}")))?;
        let mut tpl = TopicPartitionList::new();
        for (p, &o) in pos.iter().enumerate() {
            tpl.add_partition_offset(&self.topic, p as i32, Offset::Offset(o))
                .map_err(|e| port_error("preparing the kafka assignment", &e))?;
        }
        consumer
            .assign(&tpl)
            .map_err(|e| port_error("assigning the kafka partitions", &e))?;
        Ok((
            Pooled {
                at: pos.to_vec(),
                eof_at: vec![-1; pos.len()],
                consumer,
            },
            true,
        ))
    }

    fn give_back(&self, r: Pooled) {
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(r);
        if pool.len() > POOL {
            let old = pool.remove(0);
            drop(pool);
            // Closing blocks: not on an async worker.
            std::thread::spawn(move || drop(old));
        }
    }

    async fn read_with(
        &self,
        r: &mut Pooled,
        max: usize,
        wait: Duration,
    ) -> Result<ChangeBatch, ChangeReadError> {
        let started = Instant::now();
        let wait_until = started + wait;
        // Where every partition ends now: the read returns once it has read up to there.
        let high = self.both_watermarks(WATERMARKS_FRESH).await?.high.clone();
        if r.at.iter().zip(&high).any(|(a, h)| a > h) {
            return Err(ChangeReadError::Malformed(format!(
                "{:?} is past the end of the change topic {}",
                encode_cursor(&r.at),
                self.topic
            )));
        }
        let fetch_bound = started + self.config.ack_timeout.max(Duration::from_secs(1));
        let mut records = Vec::new();
        while records.len() < max {
            // At the end of a partition: librdkafka said so at this position, and the broker
            // knew of nothing after it when the read began (an EOF alone could be old).
            let at_end = (0..r.at.len()).all(|p| r.at[p] >= high[p] && r.eof_at[p] == r.at[p]);
            let deadline = if at_end {
                if !records.is_empty() || Instant::now() >= wait_until {
                    break;
                }
                wait_until
            } else {
                fetch_bound.max(wait_until)
            };
            let m = match tokio::time::timeout_at(deadline, r.consumer.recv()).await {
                Err(_) => break,
                Ok(Err(KafkaError::PartitionEOF(p))) => {
                    if let Some(i) = usize::try_from(p).ok().filter(|&i| i < r.at.len()) {
                        r.eof_at[i] = r.at[i];
                    }
                    continue;
                }
                Ok(Err(KafkaError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    return Err(ChangeReadError::Expired(format!(
                        "the change topic {} no longer holds the events after this cursor",
                        self.topic
                    )))
                }
                Ok(Err(e)) => return Err(port_error("reading the change topic", &e).into()),
                Ok(Ok(m)) => m,
            };
            let (p, offset) = (m.partition() as usize, m.offset());
            let Some(next) = r.at.get_mut(p) else {
                continue;
            };
            if offset < *next {
                continue;
            }
            *next = offset + 1;
            match m.payload().map(decode_event) {
                Some(Ok(event)) => records.push(ChangeRecord {
                    cursor: encode_cursor(&r.at),
                    event,
                }),
                Some(Err(e)) => tracing::warn!(
                    topic = %self.topic, partition = p, offset, error = %e,
                    "skipped a message of the change topic that is not an event"
                ),
                None => {}
            }
        }
        Ok(ChangeBatch {
            records,
            next: encode_cursor(&r.at),
        })
    }
}

/// A reading consumer, positioned at `at`.
struct Pooled {
    at: Vec<i64>,
    /// Where librdkafka last reported the end of each partition (-1: not yet).
    eof_at: Vec<i64>,
    consumer: StreamConsumer<ReaderContext>,
}

impl Drop for KafkaChangeLog {
    fn drop(&mut self) {
        let pool = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|e| e.into_inner()));
        std::thread::spawn(move || drop(pool));
    }
}

async fn create_topic(config: &KafkaConfig, topic: &str) -> Result<(), PortError> {
    let admin: AdminClient<LogContext> =
        AdminClient::from_config_and_context(&admin_config(config), LogContext { client: "admin" })
            .map_err(|e| PortError::Permanent(format!("creating the kafka admin client: {e}")))?;
    let timeout = config.ack_timeout;
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let new = NewTopic::new(
        topic,
        config.partitions,
        TopicReplication::Fixed(config.replication_factor),
    );
    let outcome = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics([&new], &options),
    )
    .await;
    tokio::task::spawn_blocking(move || drop(admin));
    match outcome {
        Err(_) => Err(PortError::Transient(format!(
            "creating kafka topic {topic}: no answer within {timeout:?}"
        ))),
        Ok(Err(e)) => Err(port_error(&format!("creating kafka topic {topic}"), &e)),
        Ok(Ok(results)) => {
            for r in results {
                match r {
                    Ok(_) => tracing::info!(topic, "created the change topic"),
                    Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((_, code)) => {
                        return Err(PortError::Transient(format!(
                            "creating kafka topic {topic}: {code}"
                        )))
                    }
                }
            }
            Ok(())
        }
    }
}

/// The readers' consumer: partitions assigned explicitly (no group membership, never
/// commits), partition EOF events tell where each partition ends, and an offset the topic no longer
/// holds is an error (a cursor older than the retention) instead of a silent reset.
fn reader_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = group_offsets_config(config);
    c.set("group.id", format!("{}-changes-reader", config.group_id))
        .set("client.id", format!("{}-changes-reader", config.client_id))
        .set("auto.offset.reset", "error")
        .set("enable.partition.eof", "true")
        .set("fetch.wait.max.ms", "100")
        // A reader's memory, whether its client reads or not: at most 256 KiB queued and one
        // fetch of at most 256 KiB (librdkafka's defaults prefetch up to 100,000 messages and
        // fetch 50 MB at a time: a stalled SSE client held ~70 MB of ES's memory; now ~2–6 MB,
        // `es_feed_needs_members_and_stalled_clients_stay_bounded`).
        .set("queued.max.messages.kbytes", "256")
        .set("queued.min.messages", "1000")
        .set("fetch.max.bytes", "262144")
        .set("message.max.bytes", "262144")
        .set("max.partition.fetch.bytes", "65536");
    c
}

/// The first partition whose events after the cursor position `pos` are partly deleted
/// (retention moved its start, `low`, past the position): the cursor is too old.
fn first_deleted(pos: &[i64], low: &[i64]) -> Option<usize> {
    pos.iter().zip(low).position(|(p, l)| p < l)
}

fn encode_cursor(pos: &[i64]) -> String {
    let mut s = String::with_capacity(1 + pos.len() * 4);
    s.push('k');
    for (i, o) in pos.iter().enumerate() {
        if i > 0 {
            s.push('.');
        }
        s.push_str(&o.to_string());
    }
    s
}

fn parse_cursor(c: &str, partitions: i32) -> Result<Vec<i64>, ChangeReadError> {
    let bad = || ChangeReadError::Malformed(format!("{c:?} is not a cursor of this feed"));
    let rest = c.strip_prefix('k').ok_or_else(bad)?;
    let pos: Vec<i64> = rest
        .split('.')
        .map(|o| {
            if o.is_empty() || o.len() > 18 || !o.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            o.parse::<i64>().map_err(|_| bad())
        })
        .collect::<Result<_, _>>()?;
    if pos.len() != partitions as usize {
        return Err(bad());
    }
    Ok(pos)
}

/// The message value of an event.
pub fn encode_event(e: &ChangeEvent) -> Vec<u8> {
    serde_json::json!({
        "type": e.kind().as_str(),
        "user_id": e.user_id,
        "segment": e.segment,
        "ts": e.ts,
        "reason": e.reason.as_str(),
        "key": e.key,
        "id": e.id_hex(),
    })
    .to_string()
    .into_bytes()
}

/// Reads back [`encode_event`]; the id is recomputed from the fields.
pub fn decode_event(bytes: &[u8]) -> Result<ChangeEvent, String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).ok_or(format!("no {k}"));
    let i = |k: &str| v.get(k).and_then(|x| x.as_i64()).ok_or(format!("no {k}"));
    let reason = match s("reason")? {
        "pair" => ChangeReason::Pair,
        "expired" => ChangeReason::Expired,
        "deleted" => ChangeReason::Deleted,
        other => return Err(format!("unknown reason {other:?}")),
    };
    Ok(ChangeEvent::new(
        s("user_id")?,
        s("segment")?,
        reason,
        i("ts")?,
        i("key")?,
    ))
}

#[async_trait]
impl ChangeLog for KafkaChangeLog {
    async fn append(&self, events: Vec<ChangeEvent>) -> Result<(), PortError> {
        for chunk in events.chunks(APPEND_CHUNK) {
            let records = chunk
                .iter()
                .map(|e| Record {
                    partition: Some(self.partition_of(&e.user_id)),
                    key: Some(e.user_id.clone()),
                    value: encode_event(e),
                    headers: None,
                })
                .collect();
            self.producer
                .deliver(&self.topic, records, "writing change events to kafka")
                .await
                .map_err(|f| f.error)?;
        }
        // Reads after this append see it: the cached watermarks predate it.
        *self.marks.lock().await = None;
        Ok(())
    }

    async fn end(&self) -> Result<String, PortError> {
        Ok(encode_cursor(&self.watermarks(false).await?))
    }

    async fn start(&self) -> Result<String, PortError> {
        Ok(encode_cursor(&self.watermarks(true).await?))
    }

    async fn read(
        &self,
        after: &str,
        max: usize,
        wait: Duration,
    ) -> Result<ChangeBatch, ChangeReadError> {
        let pos = parse_cursor(after, self.partitions)?;
        let (mut reader, fresh) = self.reader(&pos)?;
        if fresh {
            let low = self.both_watermarks(WATERMARKS_FRESH).await?.low.clone();
            if let Some(p) = first_deleted(&pos, &low) {
                std::thread::spawn(move || drop(reader));
                return Err(ChangeReadError::Expired(format!(
                    "the change topic {} no longer holds the events after this cursor \
                     (partition {p} starts at offset {}, the cursor is at {})",
                    self.topic, low[p], pos[p]
                )));
            }
        }
        let out = self.read_with(&mut reader, max.max(1), wait).await;
        if out.is_ok() {
            self.give_back(reader);
        } else {
            std::thread::spawn(move || drop(reader));
        }
        out
    }
}

/// The readers' librdkafka callbacks: partition EOFs are how a read knows it has read
/// everything, not problems.
struct ReaderContext;

impl ClientContext for ReaderContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log("changes-reader", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        forward_error("changes-reader", &error, reason);
    }
}

impl ConsumerContext for ReaderContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_before_a_partitions_start_is_expired() {
        assert_eq!(first_deleted(&[5, 0, 7], &[0, 0, 0]), None);
        assert_eq!(
            first_deleted(&[5, 3, 7], &[5, 3, 7]),
            None,
            "at the start: all kept"
        );
        assert_eq!(first_deleted(&[5, 2, 7], &[0, 3, 8]), Some(1));
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_malformed() {
        let c = encode_cursor(&[12, 0, 7]);
        assert_eq!(c, "k12.0.7");
        assert_eq!(parse_cursor(&c, 3), Ok(vec![12, 0, 7]));
        for bad in [
            "", "k", "12.0.7", "k12.0", "k1.2.3.4", "k1..2", "k-1.0.0", "kx.0.0",
        ] {
            assert!(
                matches!(parse_cursor(bad, 3), Err(ChangeReadError::Malformed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn events_round_trip_with_their_ids() {
        for r in [
            ChangeReason::Pair,
            ChangeReason::Expired,
            ChangeReason::Deleted,
        ] {
            let e = ChangeEvent::new("user é \"1\"", "seg:1", r, 1_800_000_000, -5);
            let bytes = encode_event(&e);
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(v["id"], e.id_hex());
            assert_eq!(v["type"], e.kind().as_str());
            assert_eq!(decode_event(&bytes), Ok(e));
        }
        assert!(decode_event(b"{}").is_err());
        assert!(decode_event(b"not json").is_err());
    }
}
