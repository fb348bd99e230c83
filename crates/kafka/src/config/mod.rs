//! Kafka settings: a plain typed struct with defaults ([`KafkaConfig`]) and its translation
//! into librdkafka client properties (`build.rs`).
//!
//! The binary owns the settings: it declares each one once (a flag with its environment
//! variable), validates it and hands the adapters a [`KafkaConfig`]; this crate knows no
//! variable names.

mod build;

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

pub(crate) use build::{
    admin_config, consumer_config, follower_config, group_offsets_config, producer_config,
};

/// Room left in `message.max.bytes` for the key, headers and record framing.
pub const MESSAGE_OVERHEAD_BYTES: usize = 16 * 1024;

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

/// A compression name that is not one of `none`, `gzip`, `snappy`, `lz4`, `zstd`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown compression {0:?}; use one of none, gzip, snappy, lz4, zstd")]
pub struct UnknownCompression(pub String);

impl FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Ok(Compression::None),
            "gzip" => Ok(Compression::Gzip),
            "snappy" => Ok(Compression::Snappy),
            "lz4" => Ok(Compression::Lz4),
            "zstd" => Ok(Compression::Zstd),
            other => Err(UnknownCompression(other.to_string())),
        }
    }
}

/// Everything the Kafka adapters need. Build it with [`KafkaConfig::new`] (or `Default`) and
/// override fields. The binary validates every field before it builds one (its flags, in
/// `crates/userseg/src/config/kafka.rs`, say which values are allowed); the adapters trust it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// The pair log topic.
    pub topic: String,
    /// The dead-letter topic.
    pub dlq_topic: String,
    /// The consumer group of the batch processors.
    pub group_id: String,
    /// `client.id` reported to the broker.
    pub client_id: String,
    /// Partitions of topics that [`crate::ensure_topics`] creates.
    pub partitions: i32,
    /// Replication factor of topics that [`crate::ensure_topics`] creates.
    pub replication_factor: i32,
    /// Upper bound for a publish (or dead letter) to be acknowledged by the broker; after it the
    /// call fails with `PortError::Transient` (librdkafka `message.timeout.ms`).
    pub ack_timeout: Duration,
    /// How long the producer waits to fill a batch (`linger.ms`).
    pub linger: Duration,
    /// Codec of produced record batches (`compression.type`).
    pub compression: Compression,
    /// Largest record batch per partition request (`batch.size`).
    pub batch_bytes: usize,
    /// Bound of the local producer queue in messages; a full queue makes publish fail with
    /// `PortError::Overloaded` (`queue.buffering.max.messages`).
    pub queue_max_messages: usize,
    /// Bound of the local producer queue in KiB (`queue.buffering.max.kbytes`).
    pub queue_max_kbytes: usize,
    /// Largest encoded `PairBatch` value; bigger per-partition groups are split into several
    /// messages. Must stay below the broker's `message.max.bytes`.
    pub max_message_bytes: usize,
    /// Timeout of metadata requests (readiness checks, partition counts).
    pub metadata_timeout: Duration,
    /// How often the cached partition count of the topic is refreshed.
    pub metadata_refresh: Duration,
    /// Consumer prefetch bound in KiB per partition
    /// (`queued.max.messages.kbytes`).
    pub prefetch_kbytes: usize,
    /// Consumer prefetch target in messages per partition
    /// (`queued.min.messages`).
    pub prefetch_messages: usize,
    /// Consumer group session timeout (`session.timeout.ms`).
    pub session_timeout: Duration,
    /// Longest time between two polls before the consumer leaves the group
    /// (`max.poll.interval.ms`).
    pub max_poll_interval: Duration,
    /// Interval of librdkafka statistics (consumer lag gauges); zero disables them
    /// (`statistics.interval.ms`).
    pub stats_interval: Duration,
    /// Extra librdkafka properties applied to every client, e.g. `security.protocol=SASL_SSL`
    /// (as `key=value,key=value`).
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
}
