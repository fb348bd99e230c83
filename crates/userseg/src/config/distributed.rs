//! The settings of the distributed roles, `uss`, `es` and `migrate`, validated once into typed
//! configuration.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use userseg_clickhouse::ClickHouseConfig;
use userseg_kafka::KafkaConfig;
use userseg_usecase::{BatchConfig, HistoryConfig};

use super::{
    duration, BatchArgs, ClickHouseArgs, HistoryArgs, KafkaArgs, ServiceArgs, ServiceConfig,
};

#[derive(Args, Debug, Clone)]
pub struct UssArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

/// `userseg uss`: the API, publishing to Kafka.
#[derive(Debug, Clone)]
pub struct UssConfig {
    pub service: ServiceConfig,
    pub kafka: KafkaConfig,
    /// Create the topics at start when they are missing (KAFKA_CREATE_TOPICS).
    pub create_topics: bool,
}

impl UssArgs {
    pub fn validate(&self) -> Result<UssConfig> {
        Ok(UssConfig {
            service: self.service.validate()?,
            kafka: self.kafka.validate(None)?,
            create_topics: self.kafka.kafka_create_topics,
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct EsArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group of the estimation services.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "userseg-es")]
    pub kafka_group_id: String,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    /// How long an estimate is served from cache (0s disables the cache).
    #[arg(long, env = "ESTIMATE_CACHE_TTL", default_value = "1s")]
    pub estimate_cache_ttl: String,
    /// How often expired day partitions are dropped.
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "1h")]
    pub retention_interval: String,
    /// Keep an exact in-memory index of the live pairs (loaded from ClickHouse at start, then
    /// kept current from the topic) and answer estimates from it; ClickHouse answers until it
    /// has loaded. About 15 bytes of memory per live pair. `true`: every ES holds all of it;
    /// `partitioned`: each ES holds the partitions its group member owns and asks ES_PEERS for
    /// the rest; `false`: no index, ClickHouse answers.
    #[arg(long, env = "ES_INDEX", default_value = "true")]
    pub es_index: String,
    /// With ES_INDEX=partitioned: the base URLs of the estimation services of the group
    /// (`http://host:port,…`; listing this ES too is harmless).
    #[arg(long, env = "ES_PEERS", default_value = "")]
    pub es_peers: String,
    /// With ES_INDEX=partitioned: the bearer token sent to ES_PEERS (a key with the `members`
    /// role, when the peers have API keys on).
    #[arg(long, env = "ES_PEER_TOKEN")]
    pub es_peer_token: Option<String>,
    /// Segment count history, sampled into ClickHouse (several ES sample the same ticks).
    #[command(flatten)]
    pub history: HistoryArgs,
    /// Topic of the change feed (users entering and leaving segments, docs/CHANGES.md): each
    /// ES publishes the events of the partitions it owns and serves `GET /v1/changes` from it.
    /// Unset or empty: no feed.
    #[arg(long, env = "KAFKA_CHANGES_TOPIC")]
    pub kafka_changes_topic: Option<String>,
}

/// `userseg es`: the batch consumer into ClickHouse and the estimates.
#[derive(Debug, Clone)]
pub struct EsConfig {
    pub service: ServiceConfig,
    pub batch: BatchConfig,
    pub kafka: KafkaConfig,
    pub create_topics: bool,
    pub clickhouse: ClickHouseConfig,
    pub estimate_cache_ttl: Duration,
    pub retention_interval: Duration,
    /// Answer estimates from the in-memory index (ES_INDEX).
    pub index: IndexMode,
    /// ES_PEERS, ES_PEER_TOKEN (partitioned index only).
    pub peers: Vec<String>,
    pub peer_token: Option<String>,
    /// HISTORY_INTERVAL, HISTORY_RETENTION.
    pub history: HistoryConfig,
    /// KAFKA_CHANGES_TOPIC: the change feed's topic, when on.
    pub changes_topic: Option<String>,
}

impl EsArgs {
    pub fn validate(&self) -> Result<EsConfig> {
        let service = self.service.validate()?;
        let batch = self.batch.validate(100_000, Duration::from_secs(30))?;
        let kafka = self.kafka.validate(Some(&self.kafka_group_id))?;
        let clickhouse = self.clickhouse.validate()?;
        let estimate_cache_ttl = duration("ESTIMATE_CACHE_TTL", &self.estimate_cache_ttl)?;
        let retention_interval = duration("RETENTION_INTERVAL", &self.retention_interval)?;
        if retention_interval < Duration::from_secs(1) {
            bail!("RETENTION_INTERVAL: must be at least 1s");
        }
        let changes_topic = match self.kafka_changes_topic.as_deref() {
            None | Some("") => None,
            Some(t) => {
                let t = super::kafka::topic("KAFKA_CHANGES_TOPIC", t)?;
                if t == kafka.topic || t == kafka.dlq_topic {
                    bail!(
                        "KAFKA_CHANGES_TOPIC: must differ from KAFKA_TOPIC and KAFKA_DLQ_TOPIC, got {t:?}"
                    );
                }
                Some(t)
            }
        };
        let index = match self.es_index.as_str() {
            "true" => IndexMode::Full,
            "false" => IndexMode::Off,
            "partitioned" => IndexMode::Partitioned,
            other => bail!("ES_INDEX: {other:?} is none of true, false, partitioned"),
        };
        let peers = parse_peers(&self.es_peers)?;
        if index == IndexMode::Partitioned && peers.is_empty() {
            bail!("ES_PEERS: ES_INDEX=partitioned needs the base URLs of the group's ES (http://host:port,...)");
        }
        Ok(EsConfig {
            changes_topic,
            service,
            batch,
            kafka,
            create_topics: self.kafka.kafka_create_topics,
            clickhouse,
            estimate_cache_ttl,
            retention_interval,
            index,
            peers,
            peer_token: self.es_peer_token.clone().filter(|t| !t.is_empty()),
            history: self.history.validate()?,
        })
    }
}

/// ES_INDEX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexMode {
    /// No index: ClickHouse answers.
    Off,
    /// Every ES holds every live pair.
    Full,
    /// Each ES holds the partitions it owns and asks its peers for the rest.
    Partitioned,
}

/// ES_PEERS: comma-separated `http(s)://host:port` base URLs, without a trailing slash.
fn parse_peers(text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for raw in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let url = raw.trim_end_matches('/');
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"));
        match rest {
            Some(host) if !host.is_empty() && !host.contains('/') => out.push(url.to_string()),
            _ => bail!("ES_PEERS: {raw:?} is not a base URL like http://host:port"),
        }
    }
    Ok(out)
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

impl MigrateArgs {
    pub fn validate(&self) -> Result<ClickHouseConfig> {
        self.clickhouse.validate()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        es: EsArgs,
    }

    fn parse(args: &[&str]) -> Result<EsConfig> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v)?.es.validate()
    }

    #[test]
    fn es_batches_default_to_clickhouse_sized_inserts() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.batch.batch_size, 100_000);
        assert_eq!(c.batch.flush_interval, Duration::from_secs(30));
        let c = parse(&["--batch-size", "500"]).unwrap();
        assert_eq!(c.batch.batch_size, 500);
        let e = parse(&["--batch-size", "0"]).unwrap_err().to_string();
        assert!(e.contains("BATCH_SIZE"), "{e}");
    }

    #[test]
    fn the_change_topic_is_off_unless_set_and_must_be_a_distinct_topic() {
        assert_eq!(parse(&[]).unwrap().changes_topic, None);
        assert_eq!(
            parse(&["--kafka-changes-topic", ""]).unwrap().changes_topic,
            None
        );
        let c = parse(&["--kafka-changes-topic", "user-changes"]).unwrap();
        assert_eq!(c.changes_topic.as_deref(), Some("user-changes"));
        for bad in ["bad/topic", "user-segments", "user-segments-dlq"] {
            let e = parse(&["--kafka-changes-topic", bad])
                .unwrap_err()
                .to_string();
            assert!(e.contains("KAFKA_CHANGES_TOPIC"), "{bad}: {e}");
        }
    }
}
