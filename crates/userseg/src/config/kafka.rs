//! The Kafka settings of `uss` and `es`: each declared once, as a flag with its environment
//! variable, and validated into the adapters' typed [`KafkaConfig`]. Every error names the
//! variable to fix.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use userseg_kafka::{KafkaConfig, MESSAGE_OVERHEAD_BYTES};

use super::duration;

#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKER_URL", default_value = "localhost:9092")]
    pub kafka_broker_url: String,
    /// Topic of the pair log.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user-segments")]
    pub kafka_topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "KAFKA_DLQ_TOPIC", default_value = "user-segments-dlq")]
    pub kafka_dlq_topic: String,
    /// `client.id` prefix reported to the broker.
    #[arg(long, env = "KAFKA_CLIENT_ID", default_value = "userseg")]
    pub kafka_client_id: String,
    /// Partitions of the topics when userseg creates them.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics when userseg creates them.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    pub kafka_replication_factor: i32,
    /// Create missing topics at start.
    #[arg(long, env = "KAFKA_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_create_topics: bool,
    /// Longest wait for the broker to acknowledge a publish (then 503 / UNAVAILABLE).
    #[arg(long, env = "KAFKA_ACK_TIMEOUT", default_value = "10s")]
    pub kafka_ack_timeout: String,
    /// Producer linger (batching delay).
    #[arg(long, env = "KAFKA_LINGER", default_value = "5ms")]
    pub kafka_linger: String,
    /// Producer compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4")]
    pub kafka_compression: String,
    /// Largest record batch of one partition request, in bytes (`batch.size`).
    #[arg(long, env = "KAFKA_BATCH_BYTES", default_value_t = 1_000_000)]
    pub kafka_batch_bytes: usize,
    /// Messages in the local producer queue, at most; beyond it ingest answers 503.
    #[arg(long, env = "KAFKA_QUEUE_MAX_MESSAGES", default_value_t = 100_000)]
    pub kafka_queue_max_messages: usize,
    /// KiB in the local producer queue, at most; beyond it ingest answers 503.
    #[arg(long, env = "KAFKA_QUEUE_MAX_KBYTES", default_value_t = 256 * 1024)]
    pub kafka_queue_max_kbytes: usize,
    /// Largest encoded message value; bigger groups of pairs are split (stay below the broker's
    /// `message.max.bytes`).
    #[arg(long, env = "KAFKA_MAX_MESSAGE_BYTES", default_value_t = 900_000)]
    pub kafka_max_message_bytes: usize,
    /// Timeout of metadata requests (readiness, partition counts).
    #[arg(long, env = "KAFKA_METADATA_TIMEOUT", default_value = "3s")]
    pub kafka_metadata_timeout: String,
    /// How often the publisher refreshes the topic's partition count.
    #[arg(long, env = "KAFKA_METADATA_REFRESH", default_value = "60s")]
    pub kafka_metadata_refresh: String,
    /// Consumer prefetch bound in KiB (`queued.max.messages.kbytes`, `fetch.max.bytes`).
    #[arg(long, env = "KAFKA_PREFETCH_KBYTES", default_value_t = 16 * 1024)]
    pub kafka_prefetch_kbytes: usize,
    /// Consumer prefetch target in messages (`queued.min.messages`).
    #[arg(long, env = "KAFKA_PREFETCH_MESSAGES", default_value_t = 1_000)]
    pub kafka_prefetch_messages: usize,
    /// Consumer group session timeout: how long a dead member keeps its partitions.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT", default_value = "45s")]
    pub kafka_session_timeout: String,
    /// Longest time between two polls of the consumer before it leaves the group.
    #[arg(long, env = "KAFKA_MAX_POLL_INTERVAL", default_value = "300s")]
    pub kafka_max_poll_interval: String,
    /// Interval of librdkafka statistics (consumer lag gauges); 0s disables them.
    #[arg(long, env = "KAFKA_STATS_INTERVAL", default_value = "30s")]
    pub kafka_stats_interval: String,
    /// Extra librdkafka properties, key=value,key=value (e.g. security settings).
    #[arg(long, env = "KAFKA_EXTRA", default_value = "")]
    pub kafka_extra: String,
}

/// librdkafka stores most millisecond settings as a C int.
const MAX_MS: u128 = i32::MAX as u128;
/// librdkafka's upper bound of `linger.ms`.
const MAX_LINGER_MS: u128 = 900_000;
const MAX_INT: usize = i32::MAX as usize;

impl KafkaArgs {
    /// The validated settings; `group_id` is the consumer group (ES only).
    pub fn validate(&self, group_id: Option<&str>) -> Result<KafkaConfig> {
        let default = KafkaConfig::default();
        let group_id = group_id.map_or(default.group_id, str::to_owned);
        let c = KafkaConfig {
            brokers: brokers(&self.kafka_broker_url)?,
            topic: topic("KAFKA_TOPIC", &self.kafka_topic)?,
            dlq_topic: topic("KAFKA_DLQ_TOPIC", &self.kafka_dlq_topic)?,
            group_id: name("KAFKA_GROUP_ID", &group_id)?,
            client_id: name("KAFKA_CLIENT_ID", &self.kafka_client_id)?,
            partitions: int_in("KAFKA_PARTITIONS", self.kafka_partitions, 1, i32::MAX)?,
            replication_factor: int_in(
                "KAFKA_REPLICATION_FACTOR",
                self.kafka_replication_factor,
                1,
                i16::MAX as i32,
            )?,
            ack_timeout: ms_in("KAFKA_ACK_TIMEOUT", &self.kafka_ack_timeout, 100, MAX_MS)?,
            linger: ms_in("KAFKA_LINGER", &self.kafka_linger, 0, MAX_LINGER_MS)?,
            compression: self
                .kafka_compression
                .parse()
                .map_err(|e| anyhow::anyhow!("KAFKA_COMPRESSION: {e}"))?,
            batch_bytes: count_in("KAFKA_BATCH_BYTES", self.kafka_batch_bytes, 1, MAX_INT)?,
            queue_max_messages: count_in(
                "KAFKA_QUEUE_MAX_MESSAGES",
                self.kafka_queue_max_messages,
                1,
                MAX_INT,
            )?,
            queue_max_kbytes: count_in(
                "KAFKA_QUEUE_MAX_KBYTES",
                self.kafka_queue_max_kbytes,
                1,
                MAX_INT,
            )?,
            max_message_bytes: count_in(
                "KAFKA_MAX_MESSAGE_BYTES",
                self.kafka_max_message_bytes,
                4 * 1024,
                // librdkafka caps message.max.bytes at 1e9.
                1_000_000_000 - MESSAGE_OVERHEAD_BYTES,
            )?,
            metadata_timeout: ms_in(
                "KAFKA_METADATA_TIMEOUT",
                &self.kafka_metadata_timeout,
                10,
                MAX_MS,
            )?,
            metadata_refresh: ms_in(
                "KAFKA_METADATA_REFRESH",
                &self.kafka_metadata_refresh,
                1_000,
                MAX_MS,
            )?,
            // librdkafka: queued.max.messages.kbytes is 1..2097151; below 1 MiB a fetch could
            // not return a full default-sized message.
            prefetch_kbytes: count_in(
                "KAFKA_PREFETCH_KBYTES",
                self.kafka_prefetch_kbytes,
                1024,
                2_097_151,
            )?,
            prefetch_messages: count_in(
                "KAFKA_PREFETCH_MESSAGES",
                self.kafka_prefetch_messages,
                1,
                10_000_000,
            )?,
            session_timeout: ms_in(
                "KAFKA_SESSION_TIMEOUT",
                &self.kafka_session_timeout,
                1_000,
                3_600_000,
            )?,
            max_poll_interval: ms_in(
                "KAFKA_MAX_POLL_INTERVAL",
                &self.kafka_max_poll_interval,
                1_000,
                86_400_000,
            )?,
            stats_interval: match duration("KAFKA_STATS_INTERVAL", &self.kafka_stats_interval)? {
                d if d.is_zero() => d,
                _ => ms_in(
                    "KAFKA_STATS_INTERVAL",
                    &self.kafka_stats_interval,
                    10,
                    86_400_000,
                )?,
            },
            extra: extra(&self.kafka_extra)?,
        };
        if c.topic == c.dlq_topic {
            bail!(
                "KAFKA_DLQ_TOPIC: the dead-letter topic must differ from KAFKA_TOPIC (both are {:?})",
                c.topic
            );
        }
        if c.linger >= c.ack_timeout {
            bail!(
                "KAFKA_LINGER: must be shorter than KAFKA_ACK_TIMEOUT ({:?}), got {:?}",
                c.ack_timeout,
                c.linger
            );
        }
        if c.queue_max_kbytes.saturating_mul(1024) < c.max_message_bytes {
            bail!(
                "KAFKA_QUEUE_MAX_KBYTES: the producer queue ({} KiB) must hold at least one \
                 message of KAFKA_MAX_MESSAGE_BYTES ({} bytes)",
                c.queue_max_kbytes,
                c.max_message_bytes
            );
        }
        if c.max_poll_interval < c.session_timeout {
            bail!(
                "KAFKA_MAX_POLL_INTERVAL: must be at least KAFKA_SESSION_TIMEOUT ({:?}), got {:?}",
                c.session_timeout,
                c.max_poll_interval
            );
        }
        Ok(c)
    }
}

fn brokers(brokers: &str) -> Result<String> {
    let var = "KAFKA_BROKER_URL";
    if brokers.trim().is_empty() {
        bail!("{var}: is empty; set it to host:port[,host:port...]");
    }
    for entry in brokers.split(',') {
        let entry = entry.trim();
        // librdkafka accepts an optional protocol prefix such as PLAINTEXT:// or SSL://.
        let address = entry.split_once("://").map_or(entry, |(_, rest)| rest);
        let Some((host, port)) = address.rsplit_once(':') else {
            bail!("{var}: {entry:?} is not host:port");
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            bail!("{var}: {entry:?} has no valid host");
        }
        if !port.parse::<u16>().is_ok_and(|p| p > 0) {
            bail!("{var}: {entry:?} has no valid port (1..65535)");
        }
    }
    Ok(brokers.to_owned())
}

/// Kafka's topic name rules: 1..=249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub(crate) fn topic(var: &str, topic: &str) -> Result<String> {
    if topic.is_empty() {
        bail!("{var}: is empty");
    }
    if topic.len() > 249 {
        bail!(
            "{var}: is {} characters long; Kafka allows at most 249",
            topic.len()
        );
    }
    if topic == "." || topic == ".." {
        bail!("{var}: {topic:?} is not a legal topic name");
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        bail!("{var}: {topic:?} contains {c:?}; topic names allow only A-Z a-z 0-9 . _ -");
    }
    Ok(topic.to_owned())
}

fn name(var: &str, name: &str) -> Result<String> {
    if name.trim().is_empty() {
        bail!("{var}: is empty");
    }
    if name.len() > 255 {
        bail!(
            "{var}: is {} bytes long; at most 255 are allowed",
            name.len()
        );
    }
    if name.chars().any(char::is_control) {
        bail!("{var}: contains a control character");
    }
    Ok(name.to_owned())
}

fn ms_in(var: &str, value: &str, min_ms: u128, max_ms: u128) -> Result<Duration> {
    let d = duration(var, value)?;
    let ms = d.as_millis();
    if ms < min_ms || ms > max_ms {
        bail!(
            "{var}: must be between {:?} and {:?}, got {d:?}",
            Duration::from_millis(min_ms as u64),
            Duration::from_millis(max_ms as u64)
        );
    }
    Ok(d)
}

fn count_in(var: &str, n: usize, min: usize, max: usize) -> Result<usize> {
    if n < min || n > max {
        bail!("{var}: must be between {min} and {max}, got {n}");
    }
    Ok(n)
}

fn int_in(var: &str, n: i32, min: i32, max: i32) -> Result<i32> {
    if n < min || n > max {
        bail!("{var}: must be between {min} and {max}, got {n}");
    }
    Ok(n)
}

/// KAFKA_EXTRA: `key=value` items separated by commas (empty items are skipped).
fn extra(s: &str) -> Result<Vec<(String, String)>> {
    s.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => bail!("KAFKA_EXTRA: {item:?} is not key=value"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use userseg_kafka::Compression;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        k: KafkaArgs,
    }

    fn parse(args: &[&str]) -> Result<KafkaConfig> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v)?.k.validate(Some("g"))
    }

    fn err(args: &[&str]) -> String {
        match parse(args) {
            Ok(_) => panic!("{args:?} should fail"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn defaults_are_the_adapters_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(
            c,
            KafkaConfig {
                group_id: "g".into(),
                ..KafkaConfig::default()
            }
        );
        assert_eq!(c.compression, Compression::Lz4);
    }

    #[test]
    fn brokers() {
        for good in [
            "localhost:9092",
            "a:1,b:2",
            " a:1 , b:2 ",
            "PLAINTEXT://kafka-0.kafka:9092",
            "[::1]:9092",
        ] {
            assert!(parse(&["--kafka-broker-url", good]).is_ok(), "{good}");
        }
        for bad in [
            "",
            "   ",
            "localhost",
            "host:0",
            "host:99999",
            ":9092",
            "a:1,",
            "a b:1",
        ] {
            let e = err(&["--kafka-broker-url", bad]);
            assert!(e.starts_with("KAFKA_BROKER_URL: "), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&["--kafka-topic", ""], "KAFKA_TOPIC"),
            (&["--kafka-topic", "has space"], "KAFKA_TOPIC"),
            (&["--kafka-topic", ".."], "KAFKA_TOPIC"),
            (&["--kafka-dlq-topic", "bad/dlq"], "KAFKA_DLQ_TOPIC"),
            (&["--kafka-dlq-topic", "user-segments"], "KAFKA_DLQ_TOPIC"),
            (&["--kafka-client-id", " "], "KAFKA_CLIENT_ID"),
            (&["--kafka-partitions", "0"], "KAFKA_PARTITIONS"),
            (
                &["--kafka-replication-factor", "0"],
                "KAFKA_REPLICATION_FACTOR",
            ),
            (&["--kafka-ack-timeout", "10ms"], "KAFKA_ACK_TIMEOUT"),
            (&["--kafka-ack-timeout", "soon"], "KAFKA_ACK_TIMEOUT"),
            (&["--kafka-linger", "10s"], "KAFKA_LINGER"),
            (&["--kafka-linger", "1000s"], "KAFKA_LINGER"),
            (&["--kafka-compression", "brotli"], "KAFKA_COMPRESSION"),
            (&["--kafka-batch-bytes", "0"], "KAFKA_BATCH_BYTES"),
            (
                &["--kafka-queue-max-messages", "0"],
                "KAFKA_QUEUE_MAX_MESSAGES",
            ),
            (
                &["--kafka-queue-max-kbytes", "10"],
                "KAFKA_QUEUE_MAX_KBYTES",
            ),
            (
                &["--kafka-max-message-bytes", "100"],
                "KAFKA_MAX_MESSAGE_BYTES",
            ),
            (
                &["--kafka-metadata-timeout", "0s"],
                "KAFKA_METADATA_TIMEOUT",
            ),
            (
                &["--kafka-metadata-refresh", "10ms"],
                "KAFKA_METADATA_REFRESH",
            ),
            (
                &["--kafka-prefetch-kbytes", "3000000"],
                "KAFKA_PREFETCH_KBYTES",
            ),
            (
                &["--kafka-prefetch-messages", "0"],
                "KAFKA_PREFETCH_MESSAGES",
            ),
            (
                &["--kafka-session-timeout", "10ms"],
                "KAFKA_SESSION_TIMEOUT",
            ),
            (
                &["--kafka-max-poll-interval", "10s"],
                "KAFKA_MAX_POLL_INTERVAL",
            ),
            (&["--kafka-stats-interval", "1ms"], "KAFKA_STATS_INTERVAL"),
            (&["--kafka-extra", "novalue"], "KAFKA_EXTRA"),
            (&["--kafka-extra", "=x"], "KAFKA_EXTRA"),
        ];
        for (args, var) in cases {
            let e = err(args);
            assert!(e.starts_with(&format!("{var}: ")), "{args:?}: {e}");
        }
        let c = parse(&["--kafka-stats-interval", "0s"]).unwrap();
        assert_eq!(c.stats_interval, Duration::ZERO);
    }

    #[test]
    fn extra_parses() {
        let c = parse(&["--kafka-extra", "security.protocol=SSL, a = b ,,"]).unwrap();
        assert_eq!(
            c.extra,
            vec![
                ("security.protocol".into(), "SSL".into()),
                ("a".into(), "b".into())
            ]
        );
    }
}
