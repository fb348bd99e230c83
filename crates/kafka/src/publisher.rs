//! [`KafkaPublisher`]: the pair log on Kafka.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::Producer;
use userseg_domain::{Pair, UserDeletion};
use userseg_proto::v1::LogPair;
use userseg_usecase::{PairPublisher, PortError};

use crate::codec::{encode_chunks, encode_deletion_chunks, into_log_pair, Encoded};
use crate::config::KafkaConfig;
use crate::error::{kind_label, SetupError};
use crate::metadata::topic_partitions;
use crate::partitioner::partition_for;
use crate::producer::{ProducerHandle, Record};

/// Publishes pairs to KAFKA_TOPIC. Pairs are grouped by partition with Kafka's default murmur2
/// partitioner on `user_id` (so one user always lands in one partition, as with a Java client
/// keying by user id); each partition gets one `PairBatch` message per request (split only if
/// it would exceed `max_message_bytes`), keyed by the user id of its first pair.
///
/// `publish` resolves `Ok` only after the broker acknowledged every message of the request
/// (`acks=all`, one request in flight); otherwise it fails within `ack_timeout`: `Transient` when
/// the broker is unreachable or slow, `Overloaded` when the local producer queue is full,
/// `Permanent` when the broker refuses the record itself.
#[derive(Clone)]
pub struct KafkaPublisher {
    inner: Arc<Inner>,
}

struct Inner {
    producer: ProducerHandle,
    partitions: Mutex<Option<PartitionCount>>,
    refreshing: AtomicBool,
}

#[derive(Clone, Copy, Debug)]
struct PartitionCount {
    count: i32,
    fetched: Instant,
    /// Set after a produce error that hints at changed metadata.
    stale: bool,
}

impl KafkaPublisher {
    /// Validates the configuration and creates the producer. Connects lazily: use
    /// [`PairPublisher::check_ready`] to see whether the broker answers.
    pub fn new(config: &KafkaConfig) -> Result<Self, SetupError> {
        Ok(KafkaPublisher {
            inner: Arc::new(Inner {
                producer: ProducerHandle::new(config, "publisher")?,
                partitions: Mutex::new(None),
                refreshing: AtomicBool::new(false),
            }),
        })
    }

    pub fn topic(&self) -> &str {
        &self.inner.producer.config().topic
    }

    /// Waits (at most `timeout`) until every enqueued message was delivered or failed; call it on
    /// shutdown.
    pub async fn flush(&self, timeout: Duration) -> Result<(), PortError> {
        self.inner.producer.flush(timeout).await
    }

    /// The topic's partition count, fetched from the broker now (within KAFKA_METADATA_TIMEOUT).
    pub async fn partition_count(&self) -> Result<i32, PortError> {
        let timeout = self.inner.config().metadata_timeout;
        self.inner.fetch_partitions(timeout).await
    }

    /// The partition count of the topic as last fetched (for diagnostics and tests).
    pub fn cached_partitions(&self) -> Option<i32> {
        self.inner.cache().map(|c| c.count)
    }
}

impl Inner {
    fn config(&self) -> &KafkaConfig {
        self.producer.config()
    }

    fn cache(&self) -> Option<PartitionCount> {
        *self.partitions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mark_stale(&self) {
        if let Some(c) = self
            .partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            c.stale = true;
        }
    }

    /// Fetches the topic's partition count from the broker (blocking call, off the async
    /// workers) and caches it.
    async fn fetch_partitions(&self, timeout: Duration) -> Result<i32, PortError> {
        let producer = self.producer.get();
        let topic = self.config().topic.clone();
        let count = tokio::task::spawn_blocking(move || -> Result<i32, PortError> {
            let partitions = topic_partitions(producer.client(), &topic, timeout)?;
            i32::try_from(partitions.len()).map_err(|_| {
                PortError::Transient(format!("kafka topic {topic} has too many partitions"))
            })
        })
        .await
        .map_err(|e| PortError::Transient(format!("fetching kafka metadata: {e}")))??;
        let previous = {
            let mut cache = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .replace(PartitionCount {
                    count,
                    fetched: Instant::now(),
                    stale: false,
                })
                .map(|c| c.count)
        };
        if previous != Some(count) {
            tracing::info!(
                topic = %self.config().topic,
                partitions = count,
                previous = ?previous,
                "kafka topic partition count"
            );
            metrics::gauge!("userseg_kafka_topic_partitions", "topic" => self.config().topic.clone())
                .set(f64::from(count));
        }
        Ok(count)
    }

    /// The partition count to publish with: the cached one (refreshed in the background once it
    /// is old or suspect), or, the first time, one fetched now within the ack timeout.
    async fn partitions(self: &Arc<Self>) -> Result<i32, PortError> {
        match self.cache() {
            Some(c) => {
                if (c.stale || c.fetched.elapsed() >= self.config().metadata_refresh)
                    && !self.refreshing.swap(true, Ordering::AcqRel)
                {
                    let inner = self.clone();
                    tokio::spawn(async move {
                        let timeout = inner.config().metadata_timeout;
                        if let Err(e) = inner.fetch_partitions(timeout).await {
                            tracing::warn!(error = %e, "refreshing the kafka partition count failed");
                        }
                        inner.refreshing.store(false, Ordering::Release);
                    });
                }
                Ok(c.count)
            }
            None => {
                let timeout = self
                    .config()
                    .metadata_timeout
                    .min(self.config().ack_timeout);
                self.fetch_partitions(timeout).await
            }
        }
    }

    async fn publish(self: &Arc<Self>, pairs: Vec<Pair>) -> Result<(usize, usize), PortError> {
        let partitions = self.partitions().await?;
        let mut groups: Vec<Vec<LogPair>> = (0..partitions).map(|_| Vec::new()).collect();
        for p in pairs {
            let partition = partition_for(p.user_id.as_bytes(), partitions);
            groups[partition as usize].push(into_log_pair(p));
        }
        let max = self.config().max_message_bytes;
        self.deliver(groups, |group| encode_chunks(group, max))
            .await
    }

    /// One deletion record per partition holding the users of that partition (split only if
    /// it would exceed `max_message_bytes`), keyed like their pairs.
    async fn publish_deletion(
        self: &Arc<Self>,
        deletion: UserDeletion,
    ) -> Result<(usize, usize), PortError> {
        let partitions = self.partitions().await?;
        let mut groups: Vec<Vec<String>> = (0..partitions).map(|_| Vec::new()).collect();
        for id in deletion.into_user_ids() {
            let partition = partition_for(id.as_bytes(), partitions);
            groups[partition as usize].push(id);
        }
        let max = self.config().max_message_bytes;
        self.deliver(groups, |group| encode_deletion_chunks(group, max))
            .await
    }

    /// Encodes each partition's group and produces it to that partition; resolves once every
    /// message was acknowledged. Returns (messages, bytes).
    async fn deliver<T>(
        &self,
        groups: Vec<Vec<T>>,
        encode: impl Fn(Vec<T>) -> Vec<Encoded>,
    ) -> Result<(usize, usize), PortError> {
        let mut records = Vec::new();
        let mut bytes = 0;
        for (partition, group) in groups.into_iter().enumerate() {
            if group.is_empty() {
                continue;
            }
            for chunk in encode(group) {
                bytes += chunk.value.len();
                records.push(Record {
                    partition: Some(partition as i32),
                    key: Some(chunk.key),
                    value: chunk.value,
                    headers: None,
                });
            }
        }
        let messages = records.len();
        match self
            .producer
            .deliver(&self.config().topic, records, "publishing to kafka")
            .await
        {
            Ok(_) => Ok((messages, bytes)),
            Err(failure) => {
                if matches!(
                    failure.code,
                    Some(
                        RDKafkaErrorCode::UnknownPartition
                            | RDKafkaErrorCode::UnknownTopic
                            | RDKafkaErrorCode::UnknownTopicOrPartition
                    )
                ) {
                    self.mark_stale();
                }
                Err(failure.error)
            }
        }
    }

    /// Bounds `work` (a metadata lookup and a delivery, each bounded) by the ack timeout.
    async fn bounded<F>(&self, work: F) -> Result<(usize, usize), PortError>
    where
        F: std::future::Future<Output = Result<(usize, usize), PortError>>,
    {
        let bound = self.config().ack_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, work).await {
            Ok(result) => result,
            Err(_) => Err(PortError::Transient(format!(
                "publishing to kafka: no acknowledgement within {:?}",
                self.config().ack_timeout
            ))),
        }
    }
}

#[async_trait]
impl PairPublisher for KafkaPublisher {
    async fn publish(&self, pairs: Vec<Pair>) -> Result<(), PortError> {
        if pairs.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let count = pairs.len();
        let result = self.inner.bounded(self.inner.publish(pairs)).await;
        match result {
            Ok((messages, bytes)) => {
                metrics::counter!("userseg_kafka_published_messages_total")
                    .increment(messages as u64);
                metrics::counter!("userseg_kafka_published_pairs_total").increment(count as u64);
                metrics::counter!("userseg_kafka_published_bytes_total").increment(bytes as u64);
                metrics::histogram!("userseg_kafka_publish_seconds").record(started.elapsed());
                tracing::trace!(pairs = count, messages, bytes, "published pairs to kafka");
                Ok(())
            }
            Err(e) => {
                metrics::counter!("userseg_kafka_publish_failures_total", "kind" => kind_label(&e))
                    .increment(1);
                tracing::debug!(pairs = count, error = %e, "publishing to kafka failed");
                Err(e)
            }
        }
    }

    /// One version 2 record per partition touched (split by `max_message_bytes`), each keyed
    /// by its first user id, so that a user's deletion lands in the partition of its pairs,
    /// after the pairs acknowledged before it. Resolves like [`publish`](Self::publish): `Ok`
    /// only once the broker acknowledged every record (`acks=all`), within `ack_timeout`.
    async fn publish_deletion(&self, deletion: UserDeletion) -> Result<(), PortError> {
        let started = Instant::now();
        let users = deletion.len();
        let result = self
            .inner
            .bounded(self.inner.publish_deletion(deletion))
            .await;
        match result {
            Ok((messages, bytes)) => {
                metrics::counter!("userseg_kafka_published_messages_total")
                    .increment(messages as u64);
                metrics::counter!("userseg_kafka_published_bytes_total").increment(bytes as u64);
                metrics::histogram!("userseg_kafka_publish_seconds").record(started.elapsed());
                tracing::info!(users, messages, "published a user deletion to kafka");
                Ok(())
            }
            Err(e) => {
                metrics::counter!("userseg_kafka_publish_failures_total", "kind" => kind_label(&e))
                    .increment(1);
                tracing::warn!(users, error = %e, "publishing a user deletion to kafka failed");
                Err(e)
            }
        }
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        let producer = self.inner.producer.get();
        if let Some((code, reason)) = producer.client().fatal_error() {
            return Err(PortError::Transient(format!(
                "kafka producer fatal error {code}: {reason}"
            )));
        }
        self.inner
            .fetch_partitions(self.inner.config().metadata_timeout)
            .await
            .map(|_| ())
    }
}
