//! Validation of [`KafkaConfig`]: every error names the variable to fix.

use std::time::Duration;

use super::{vars, KafkaConfig};

/// A setting is invalid; `var` is the environment variable (and flag) that sets it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: &'static str,
    pub message: String,
}

impl ConfigError {
    pub fn new(var: &'static str, message: impl Into<String>) -> Self {
        ConfigError {
            var,
            message: message.into(),
        }
    }
}

/// librdkafka stores most millisecond settings as a C int.
const MAX_MS: u128 = i32::MAX as u128;
/// librdkafka's upper bound of `linger.ms`.
const MAX_LINGER_MS: u128 = 900_000;
/// Room left in `message.max.bytes` for the key, headers and record framing.
pub(crate) const MESSAGE_OVERHEAD_BYTES: usize = 16 * 1024;

impl KafkaConfig {
    /// Checks every setting; the error names the first offending variable.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_brokers(&self.brokers)?;
        validate_topic(vars::TOPIC, &self.topic)?;
        validate_topic(vars::DLQ_TOPIC, &self.dlq_topic)?;
        if self.topic == self.dlq_topic {
            return Err(ConfigError::new(
                vars::DLQ_TOPIC,
                format!(
                    "the dead-letter topic must differ from KAFKA_TOPIC (both are {:?})",
                    self.topic
                ),
            ));
        }
        validate_name(vars::GROUP_ID, &self.group_id)?;
        validate_name(vars::CLIENT_ID, &self.client_id)?;
        if self.partitions < 1 {
            return Err(ConfigError::new(
                vars::PARTITIONS,
                format!("must be at least 1, got {}", self.partitions),
            ));
        }
        if !(1..=i16::MAX as i32).contains(&self.replication_factor) {
            return Err(ConfigError::new(
                vars::REPLICATION_FACTOR,
                format!(
                    "must be between 1 and {}, got {}",
                    i16::MAX,
                    self.replication_factor
                ),
            ));
        }
        validate_ms(vars::ACK_TIMEOUT, self.ack_timeout, 100, MAX_MS)?;
        validate_ms(vars::LINGER, self.linger, 0, MAX_LINGER_MS)?;
        if self.linger >= self.ack_timeout {
            return Err(ConfigError::new(
                vars::LINGER,
                format!(
                    "must be shorter than KAFKA_ACK_TIMEOUT ({:?}), got {:?}",
                    self.ack_timeout, self.linger
                ),
            ));
        }
        validate_count(vars::BATCH_BYTES, self.batch_bytes, 1, i32::MAX as usize)?;
        validate_count(
            vars::QUEUE_MAX_MESSAGES,
            self.queue_max_messages,
            1,
            i32::MAX as usize,
        )?;
        validate_count(
            vars::QUEUE_MAX_KBYTES,
            self.queue_max_kbytes,
            1,
            i32::MAX as usize,
        )?;
        validate_count(
            vars::MAX_MESSAGE_BYTES,
            self.max_message_bytes,
            4 * 1024,
            // librdkafka caps message.max.bytes at 1e9.
            1_000_000_000 - MESSAGE_OVERHEAD_BYTES,
        )?;
        if self.queue_max_kbytes.saturating_mul(1024) < self.max_message_bytes {
            return Err(ConfigError::new(
                vars::QUEUE_MAX_KBYTES,
                format!(
                    "the producer queue ({} KiB) must hold at least one message of \
                     KAFKA_MAX_MESSAGE_BYTES ({} bytes)",
                    self.queue_max_kbytes, self.max_message_bytes
                ),
            ));
        }
        validate_ms(vars::METADATA_TIMEOUT, self.metadata_timeout, 10, MAX_MS)?;
        validate_ms(vars::METADATA_REFRESH, self.metadata_refresh, 1_000, MAX_MS)?;
        // librdkafka: queued.max.messages.kbytes is 1..2097151; below 1 MiB a fetch could not
        // return a full default-sized message.
        validate_count(vars::PREFETCH_KBYTES, self.prefetch_kbytes, 1024, 2_097_151)?;
        validate_count(
            vars::PREFETCH_MESSAGES,
            self.prefetch_messages,
            1,
            10_000_000,
        )?;
        validate_ms(
            vars::SESSION_TIMEOUT,
            self.session_timeout,
            1_000,
            3_600_000,
        )?;
        validate_ms(
            vars::MAX_POLL_INTERVAL,
            self.max_poll_interval,
            1_000,
            86_400_000,
        )?;
        if self.max_poll_interval < self.session_timeout {
            return Err(ConfigError::new(
                vars::MAX_POLL_INTERVAL,
                format!(
                    "must be at least KAFKA_SESSION_TIMEOUT ({:?}), got {:?}",
                    self.session_timeout, self.max_poll_interval
                ),
            ));
        }
        if !self.stats_interval.is_zero() {
            validate_ms(vars::STATS_INTERVAL, self.stats_interval, 10, 86_400_000)?;
        }
        for (key, _) in &self.extra {
            if key.trim().is_empty() {
                return Err(ConfigError::new(vars::EXTRA, "a property name is empty"));
            }
        }
        Ok(())
    }
}

fn validate_brokers(brokers: &str) -> Result<(), ConfigError> {
    let var = vars::BROKERS;
    if brokers.trim().is_empty() {
        return Err(ConfigError::new(
            var,
            "is empty; set it to host:port[,host:port...]",
        ));
    }
    for entry in brokers.split(',') {
        let entry = entry.trim();
        // librdkafka accepts an optional protocol prefix such as PLAINTEXT:// or SSL://.
        let address = entry.split_once("://").map_or(entry, |(_, rest)| rest);
        let Some((host, port)) = address.rsplit_once(':') else {
            return Err(ConfigError::new(var, format!("{entry:?} is not host:port")));
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(ConfigError::new(
                var,
                format!("{entry:?} has no valid host"),
            ));
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => {
                return Err(ConfigError::new(
                    var,
                    format!("{entry:?} has no valid port (1..65535)"),
                ))
            }
        }
    }
    Ok(())
}

/// Kafka's topic name rules: 1..=249 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
fn validate_topic(var: &'static str, topic: &str) -> Result<(), ConfigError> {
    if topic.is_empty() {
        return Err(ConfigError::new(var, "is empty"));
    }
    if topic.len() > 249 {
        return Err(ConfigError::new(
            var,
            format!(
                "is {} characters long; Kafka allows at most 249",
                topic.len()
            ),
        ));
    }
    if topic == "." || topic == ".." {
        return Err(ConfigError::new(
            var,
            format!("{topic:?} is not a legal topic name"),
        ));
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(ConfigError::new(
            var,
            format!("{topic:?} contains {c:?}; topic names allow only A-Z a-z 0-9 . _ -"),
        ));
    }
    Ok(())
}

fn validate_name(var: &'static str, name: &str) -> Result<(), ConfigError> {
    if name.trim().is_empty() {
        return Err(ConfigError::new(var, "is empty"));
    }
    if name.len() > 255 {
        return Err(ConfigError::new(
            var,
            format!("is {} bytes long; at most 255 are allowed", name.len()),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ConfigError::new(var, "contains a control character"));
    }
    Ok(())
}

fn validate_ms(
    var: &'static str,
    d: Duration,
    min_ms: u128,
    max_ms: u128,
) -> Result<(), ConfigError> {
    let ms = d.as_millis();
    if ms < min_ms || ms > max_ms {
        return Err(ConfigError::new(
            var,
            format!(
                "must be between {:?} and {:?}, got {d:?}",
                Duration::from_millis(min_ms as u64),
                Duration::from_millis(max_ms as u64)
            ),
        ));
    }
    Ok(())
}

fn validate_count(var: &'static str, n: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if n < min || n > max {
        return Err(ConfigError::new(
            var,
            format!("must be between {min} and {max}, got {n}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;

    fn ok() -> KafkaConfig {
        KafkaConfig::new("127.0.0.1:9092")
    }

    fn err_var(c: &KafkaConfig) -> &'static str {
        c.validate().expect_err("expected a validation error").var
    }

    #[test]
    fn defaults_are_valid() {
        assert_eq!(KafkaConfig::default().validate(), Ok(()));
        assert_eq!(ok().validate(), Ok(()));
        let c = KafkaConfig::default();
        assert_eq!(c.topic, "user-segments");
        assert_eq!(c.dlq_topic, "user-segments-dlq");
        assert_eq!(c.partitions, 6);
        assert_eq!(c.replication_factor, 1);
        assert_eq!(c.ack_timeout, Duration::from_secs(10));
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
            let c = KafkaConfig::new(good);
            assert_eq!(c.validate(), Ok(()), "{good}");
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
            let c = KafkaConfig::new(bad);
            let e = c.validate().expect_err(bad);
            assert_eq!(e.var, "KAFKA_BROKER_URL", "{bad}");
            assert!(e.to_string().starts_with("KAFKA_BROKER_URL: "), "{e}");
        }
    }

    #[test]
    fn topics() {
        let mut c = ok();
        c.topic = String::new();
        assert_eq!(err_var(&c), "KAFKA_TOPIC");
        c.topic = "has space".into();
        assert_eq!(err_var(&c), "KAFKA_TOPIC");
        c.topic = "x".repeat(250);
        assert_eq!(err_var(&c), "KAFKA_TOPIC");
        c.topic = "..".into();
        assert_eq!(err_var(&c), "KAFKA_TOPIC");
        c.topic = "ok.topic_name-1".into();
        assert_eq!(c.validate(), Ok(()));
        c.dlq_topic = "bad/dlq".into();
        assert_eq!(err_var(&c), "KAFKA_DLQ_TOPIC");
        c.dlq_topic = c.topic.clone();
        let e = c.validate().unwrap_err();
        assert_eq!(e.var, "KAFKA_DLQ_TOPIC");
        assert!(e.message.contains("must differ"), "{e}");
    }

    #[test]
    fn group_and_client() {
        let mut c = ok();
        c.group_id = " ".into();
        assert_eq!(err_var(&c), "KAFKA_GROUP_ID");
        c.group_id = "g\n".into();
        assert_eq!(err_var(&c), "KAFKA_GROUP_ID");
        c.group_id = "g".into();
        c.client_id = String::new();
        assert_eq!(err_var(&c), "KAFKA_CLIENT_ID");
    }

    #[test]
    fn numbers_and_durations() {
        let mut c = ok();
        c.partitions = 0;
        assert_eq!(err_var(&c), "KAFKA_PARTITIONS");

        let mut c = ok();
        c.replication_factor = 0;
        assert_eq!(err_var(&c), "KAFKA_REPLICATION_FACTOR");

        let mut c = ok();
        c.ack_timeout = Duration::from_millis(10);
        assert_eq!(err_var(&c), "KAFKA_ACK_TIMEOUT");

        let mut c = ok();
        c.linger = Duration::from_secs(10);
        assert_eq!(err_var(&c), "KAFKA_LINGER");
        c.linger = Duration::from_secs(1000);
        assert_eq!(err_var(&c), "KAFKA_LINGER");

        let mut c = ok();
        c.max_message_bytes = 100;
        assert_eq!(err_var(&c), "KAFKA_MAX_MESSAGE_BYTES");

        let mut c = ok();
        c.queue_max_kbytes = 10;
        assert_eq!(err_var(&c), "KAFKA_QUEUE_MAX_KBYTES");

        let mut c = ok();
        c.queue_max_messages = 0;
        assert_eq!(err_var(&c), "KAFKA_QUEUE_MAX_MESSAGES");

        let mut c = ok();
        c.prefetch_kbytes = 3_000_000;
        assert_eq!(err_var(&c), "KAFKA_PREFETCH_KBYTES");

        let mut c = ok();
        c.max_poll_interval = Duration::from_secs(10);
        assert_eq!(err_var(&c), "KAFKA_MAX_POLL_INTERVAL");

        let mut c = ok();
        c.metadata_timeout = Duration::ZERO;
        assert_eq!(err_var(&c), "KAFKA_METADATA_TIMEOUT");

        let mut c = ok();
        c.stats_interval = Duration::ZERO;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn compression_parses() {
        assert_eq!("LZ4".parse::<Compression>(), Ok(Compression::Lz4));
        assert_eq!("zstd".parse::<Compression>(), Ok(Compression::Zstd));
        assert_eq!("none".parse::<Compression>(), Ok(Compression::None));
        let e = "brotli".parse::<Compression>().unwrap_err();
        assert_eq!(e.var, "KAFKA_COMPRESSION");
    }

    #[test]
    fn extra_parses() {
        assert_eq!(
            KafkaConfig::parse_extra("security.protocol=SSL, a = b ,,"),
            Ok(vec![
                ("security.protocol".into(), "SSL".into()),
                ("a".into(), "b".into())
            ])
        );
        assert_eq!(KafkaConfig::parse_extra(""), Ok(vec![]));
        assert_eq!(
            KafkaConfig::parse_extra("novalue").unwrap_err().var,
            "KAFKA_EXTRA"
        );
        assert_eq!(
            KafkaConfig::parse_extra("=x").unwrap_err().var,
            "KAFKA_EXTRA"
        );
    }
}
