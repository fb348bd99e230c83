//! Kafka settings: a plain struct with defaults ([`KafkaConfig`]), its validation
//! ([`KafkaConfig::validate`], in `validate.rs`) and the translation into librdkafka client
//! properties (`build.rs`).
//!
//! The binary owns the command line; [`vars`] holds the environment variable names it uses, so
//! that validation errors name what the operator has to fix.

mod build;
mod validate;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub(crate) use build::{
    admin_config, consumer_config, follower_config, group_offsets_config, producer_config,
};
pub use validate::ConfigError;

/// The environment variables (and flags) the binary reads each setting from; validation errors
/// name them.
pub mod vars {
    pub const BROKERS: &str = "KAFKA_BROKER_URL";
    pub const TOPIC: &str = "KAFKA_TOPIC";
    pub const DLQ_TOPIC: &str = "KAFKA_DLQ_TOPIC";
    pub const GROUP_ID: &str = "KAFKA_GROUP_ID";
    pub const CLIENT_ID: &str = "KAFKA_CLIENT_ID";
    pub const PARTITIONS: &str = "KAFKA_PARTITIONS";
    pub const REPLICATION_FACTOR: &str = "KAFKA_REPLICATION_FACTOR";
    pub const ACK_TIMEOUT: &str = "KAFKA_ACK_TIMEOUT";
    pub const LINGER: &str = "KAFKA_LINGER";
    pub const COMPRESSION: &str = "KAFKA_COMPRESSION";
    pub const BATCH_BYTES: &str = "KAFKA_BATCH_BYTES";
    pub const QUEUE_MAX_MESSAGES: &str = "KAFKA_QUEUE_MAX_MESSAGES";
    pub const QUEUE_MAX_KBYTES: &str = "KAFKA_QUEUE_MAX_KBYTES";
    pub const MAX_MESSAGE_BYTES: &str = "KAFKA_MAX_MESSAGE_BYTES";
    pub const METADATA_TIMEOUT: &str = "KAFKA_METADATA_TIMEOUT";
    pub const METADATA_REFRESH: &str = "KAFKA_METADATA_REFRESH";
    pub const PREFETCH_KBYTES: &str = "KAFKA_PREFETCH_KBYTES";
    pub const PREFETCH_MESSAGES: &str = "KAFKA_PREFETCH_MESSAGES";
    pub const SESSION_TIMEOUT: &str = "KAFKA_SESSION_TIMEOUT";
    pub const MAX_POLL_INTERVAL: &str = "KAFKA_MAX_POLL_INTERVAL";
    pub const STATS_INTERVAL: &str = "KAFKA_STATS_INTERVAL";
    pub const EXTRA: &str = "KAFKA_EXTRA";
}

/// Compression of produced record batches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Compression {
    None,
    Gzip,
    Snappy,
    #[default]
    Lz4,
    Zstd,
}

impl Compression {
    /// The librdkafka `compression.type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Snappy => "snappy",
            Compression::Lz4 => "lz4",
            Compression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Compression {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(ConfigError::new(
                vars::COMPRESSION,
                format!("unknown compression {other:?}; use one of none, gzip, snappy, lz4, zstd"),
            )),
        }
    }
}

/// Everything the Kafka adapters need. Build it with [`KafkaConfig::new`] (or `Default`) and
/// override fields; every constructor in this crate calls [`KafkaConfig::validate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]` (KAFKA_BROKER_URL).
    pub brokers: String,
    /// The pair log topic (KAFKA_TOPIC).
    pub topic: String,
    /// The dead-letter topic (KAFKA_DLQ_TOPIC).
    pub dlq_topic: String,
    /// The consumer group of the batch processors (KAFKA_GROUP_ID).
    pub group_id: String,
    /// `client.id` reported to the broker (KAFKA_CLIENT_ID).
    pub client_id: String,
    /// Partitions of topics that [`crate::ensure_topics`] creates (KAFKA_PARTITIONS).
    pub partitions: i32,
    /// Replication factor of topics that [`crate::ensure_topics`] creates
    /// (KAFKA_REPLICATION_FACTOR).
    pub replication_factor: i32,
    /// Upper bound for a publish (or dead letter) to be acknowledged by the broker; after it the
    /// call fails with `PortError::Transient` (KAFKA_ACK_TIMEOUT, librdkafka
    /// `message.timeout.ms`).
    pub ack_timeout: Duration,
    /// How long the producer waits to fill a batch (KAFKA_LINGER, `linger.ms`).
    pub linger: Duration,
    /// KAFKA_COMPRESSION, `compression.type`.
    pub compression: Compression,
    /// Largest record batch per partition request (KAFKA_BATCH_BYTES, `batch.size`).
    pub batch_bytes: usize,
    /// Bound of the local producer queue in messages; a full queue makes publish fail with
    /// `PortError::Overloaded` (KAFKA_QUEUE_MAX_MESSAGES, `queue.buffering.max.messages`).
    pub queue_max_messages: usize,
    /// Bound of the local producer queue in KiB (KAFKA_QUEUE_MAX_KBYTES,
    /// `queue.buffering.max.kbytes`).
    pub queue_max_kbytes: usize,
    /// Largest encoded `PairBatch` value; bigger per-partition groups are split into several
    /// messages. Must stay below the broker's `message.max.bytes` (KAFKA_MAX_MESSAGE_BYTES).
    pub max_message_bytes: usize,
    /// Timeout of metadata requests (readiness checks, partition counts) (KAFKA_METADATA_TIMEOUT).
    pub metadata_timeout: Duration,
    /// How often the cached partition count of the topic is refreshed (KAFKA_METADATA_REFRESH).
    pub metadata_refresh: Duration,
    /// Consumer prefetch bound in KiB per partition (KAFKA_PREFETCH_KBYTES,
    /// `queued.max.messages.kbytes`).
    pub prefetch_kbytes: usize,
    /// Consumer prefetch target in messages per partition (KAFKA_PREFETCH_MESSAGES,
    /// `queued.min.messages`).
    pub prefetch_messages: usize,
    /// Consumer group session timeout (KAFKA_SESSION_TIMEOUT, `session.timeout.ms`).
    pub session_timeout: Duration,
    /// Longest time between two polls before the consumer leaves the group
    /// (KAFKA_MAX_POLL_INTERVAL, `max.poll.interval.ms`).
    pub max_poll_interval: Duration,
    /// Interval of librdkafka statistics (consumer lag gauges); zero disables them
    /// (KAFKA_STATS_INTERVAL, `statistics.interval.ms`).
    pub stats_interval: Duration,
    /// Extra librdkafka properties applied to every client, e.g. `security.protocol=SASL_SSL`
    /// (KAFKA_EXTRA as `key=value,key=value`).
    pub extra: Vec<(String, String)>,
}

pub const DEFAULT_TOPIC: &str = "user-segments";
pub const DEFAULT_DLQ_TOPIC: &str = "user-segments-dlq";
pub const DEFAULT_GROUP_ID: &str = "userseg-processor";

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "localhost:9092".into(),
            topic: DEFAULT_TOPIC.into(),
            dlq_topic: DEFAULT_DLQ_TOPIC.into(),
            group_id: DEFAULT_GROUP_ID.into(),
            client_id: "userseg".into(),
            partitions: 6,
            replication_factor: 1,
            ack_timeout: Duration::from_secs(10),
            linger: Duration::from_millis(5),
            compression: Compression::Lz4,
            batch_bytes: 1_000_000,
            queue_max_messages: 100_000,
            queue_max_kbytes: 256 * 1024,
            max_message_bytes: 900_000,
            metadata_timeout: Duration::from_secs(3),
            metadata_refresh: Duration::from_secs(60),
            prefetch_kbytes: 16 * 1024,
            prefetch_messages: 1_000,
            session_timeout: Duration::from_secs(45),
            max_poll_interval: Duration::from_secs(300),
            stats_interval: Duration::from_secs(30),
            extra: Vec::new(),
        }
    }
}

impl KafkaConfig {
    /// The defaults with the given bootstrap servers.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            ..KafkaConfig::default()
        }
    }

    /// Parses KAFKA_EXTRA: `key=value` items separated by commas (empty items are skipped).
    pub fn parse_extra(s: &str) -> Result<Vec<(String, String)>, ConfigError> {
        s.split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| match item.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    Ok((k.trim().to_string(), v.trim().to_string()))
                }
                _ => Err(ConfigError::new(
                    vars::EXTRA,
                    format!("{item:?} is not key=value"),
                )),
            })
            .collect()
    }
}
