//! Translation of a [`KafkaConfig`] into librdkafka client properties.

use std::time::Duration;

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::ClientConfig;

use super::{KafkaConfig, MESSAGE_OVERHEAD_BYTES};

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// librdkafka only produces the log lines its level lets through, so match the level of the
/// tracing subscriber for the `librdkafka` target (capped at info: debug is very chatty and is
/// enabled explicitly with the `debug` property through KAFKA_EXTRA).
fn log_level() -> RDKafkaLogLevel {
    if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::WARN) {
        RDKafkaLogLevel::Warning
    } else {
        RDKafkaLogLevel::Error
    }
}

/// Settings shared by every client. Operator extras are applied first so that the settings
/// below, which the delivery guarantees depend on, always win.
fn common(config: &KafkaConfig, role: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (key, value) in &config.extra {
        c.set(key, value);
    }
    c.set("bootstrap.servers", &config.brokers)
        .set("client.id", format!("{}-{role}", config.client_id))
        .set("socket.keepalive.enable", "true")
        .set_log_level(log_level());
    c
}

/// The producer of pairs and dead letters: durable (`acks=all`), ordered per partition (one
/// request in flight per connection, so a retry is sent before anything later), bounded in time
/// (`message.timeout.ms` = ack timeout) and in memory (the local queue bounds).
///
/// Not idempotent: an idempotent producer whose messages time out (the broker away for longer
/// than the ack timeout) bumps its epoch without telling the broker, and tansu 0.6.0's sqlite
/// storage panics on the next produce of that epoch and serves no produce request until it is
/// restarted (docs/RELIABILITY.md, "Broker restart"). A retry may write a record twice, next to
/// itself; consumers apply records idempotently, so a duplicate changes no count.
pub(crate) fn producer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = common(config, "producer");
    let request_timeout = config.ack_timeout.min(Duration::from_secs(30));
    c.set("acks", "all")
        .set("enable.idempotence", "false")
        .set("max.in.flight.requests.per.connection", "1")
        .set("compression.type", config.compression.as_str())
        .set("linger.ms", ms(config.linger))
        .set("batch.size", config.batch_bytes.to_string())
        .set("batch.num.messages", "100000")
        .set(
            "queue.buffering.max.messages",
            config.queue_max_messages.to_string(),
        )
        .set(
            "queue.buffering.max.kbytes",
            config.queue_max_kbytes.to_string(),
        )
        .set(
            "message.max.bytes",
            (config.max_message_bytes + MESSAGE_OVERHEAD_BYTES).to_string(),
        )
        .set("message.timeout.ms", ms(config.ack_timeout))
        .set("request.timeout.ms", ms(request_timeout))
        .set(
            "socket.connection.setup.timeout.ms",
            ms(request_timeout.max(Duration::from_secs(1))),
        )
        .set("retry.backoff.ms", "100")
        .set("retry.backoff.max.ms", "1000")
        // Topics are created explicitly (ensure_topics), never as a side effect of a produce.
        .set("allow.auto.create.topics", "false");
    c
}

/// Bounds what a consumer fetches ahead of the application (memory and messages).
fn bounded_prefetch(c: &mut ClientConfig, config: &KafkaConfig) {
    c.set(
        "queued.max.messages.kbytes",
        config.prefetch_kbytes.to_string(),
    )
    .set("queued.min.messages", config.prefetch_messages.to_string())
    .set(
        "fetch.max.bytes",
        (config.prefetch_kbytes * 1024).to_string(),
    );
}

/// The consumer of the batch processor: offsets are stored and committed only by
/// `KafkaSource::commit`, prefetching is bounded.
pub(crate) fn consumer_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = common(config, "consumer");
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", ms(config.session_timeout))
        .set("max.poll.interval.ms", ms(config.max_poll_interval))
        .set("allow.auto.create.topics", "false");
    bounded_prefetch(&mut c, config);
    if !config.stats_interval.is_zero() {
        c.set("statistics.interval.ms", ms(config.stats_interval));
    }
    c
}

/// The client that reads, once, what the consumer group KAFKA_GROUP_ID has committed (and the
/// topic's metadata and watermarks) for the log follower. It carries the group's id only to
/// query its offsets: it never subscribes, so it never joins the group, and never commits.
pub(crate) fn group_offsets_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = common(config, "follower-offsets");
    c.set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false");
    c
}

/// The log follower's consumer: partitions are assigned explicitly (no group membership, a
/// group id of its own that is never committed to), partition EOF events tell when it has caught
/// up, and prefetching is bounded like the batch processor's.
pub(crate) fn follower_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = common(config, "follower");
    c.set("group.id", format!("{}-follower", config.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "true")
        .set("allow.auto.create.topics", "false");
    bounded_prefetch(&mut c, config);
    if !config.stats_interval.is_zero() {
        c.set("statistics.interval.ms", ms(config.stats_interval));
    }
    c
}

/// The admin client of `ensure_topics`.
pub(crate) fn admin_config(config: &KafkaConfig) -> ClientConfig {
    let mut c = common(config, "admin");
    c.set(
        "socket.connection.setup.timeout.ms",
        ms(config.ack_timeout.max(Duration::from_secs(1))),
    );
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;

    #[test]
    fn producer_properties() {
        let mut k = KafkaConfig::new("b:1");
        k.compression = Compression::Zstd;
        k.ack_timeout = Duration::from_secs(7);
        k.extra = vec![("acks".into(), "0".into()), ("debug".into(), "msg".into())];
        let c = producer_config(&k);
        assert_eq!(c.get("bootstrap.servers"), Some("b:1"));
        // Extras never weaken the guarantees.
        assert_eq!(c.get("acks"), Some("all"));
        assert_eq!(c.get("debug"), Some("msg"));
        assert_eq!(c.get("enable.idempotence"), Some("false"));
        assert_eq!(c.get("max.in.flight.requests.per.connection"), Some("1"));
        assert_eq!(c.get("compression.type"), Some("zstd"));
        assert_eq!(c.get("message.timeout.ms"), Some("7000"));
        assert_eq!(c.get("request.timeout.ms"), Some("7000"));
    }

    #[test]
    fn consumer_properties() {
        let k = KafkaConfig::new("b:1");
        let c = consumer_config(&k);
        assert_eq!(c.get("group.id"), Some("userseg-processor"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("16384"));
    }

    #[test]
    fn follower_properties() {
        let k = KafkaConfig::new("b:1");
        let c = follower_config(&k);
        assert_eq!(c.get("group.id"), Some("userseg-processor-follower"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
        assert_eq!(c.get("enable.partition.eof"), Some("true"));
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("16384"));
        let c = group_offsets_config(&k);
        assert_eq!(c.get("group.id"), Some("userseg-processor"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }
}
