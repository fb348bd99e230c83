//! Topic creation.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::FromClientConfigAndContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::{admin_config, KafkaConfig};
use crate::context::LogContext;
use crate::error::SetupError;

/// Creates the pair topic and the DLQ topic with `partitions` and `replication_factor` unless
/// they exist. Idempotent: a topic that already exists is left as it is (its partition count is
/// not changed). Fails within about `ack_timeout` when the broker cannot be reached.
pub async fn ensure_topics(config: &KafkaConfig) -> Result<(), SetupError> {
    let admin: AdminClient<LogContext> =
        AdminClient::from_config_and_context(&admin_config(config), LogContext { client: "admin" })
            .map_err(SetupError::Client)?;
    let timeout = config.ack_timeout;
    let options = AdminOptions::new()
        .request_timeout(Some(timeout))
        .operation_timeout(Some(timeout));
    let topics = [
        NewTopic::new(
            &config.topic,
            config.partitions,
            TopicReplication::Fixed(config.replication_factor),
        ),
        NewTopic::new(
            &config.dlq_topic,
            config.partitions,
            TopicReplication::Fixed(config.replication_factor),
        ),
    ];
    let outcome = tokio::time::timeout(
        timeout + Duration::from_secs(1),
        admin.create_topics(topics.iter(), &options),
    )
    .await;
    // Dropping the admin client joins its polling thread: keep that off the async workers.
    tokio::task::spawn_blocking(move || drop(admin));
    let results = match outcome {
        Err(_) => return Err(SetupError::Timeout(timeout)),
        Ok(Err(e)) => {
            return Err(SetupError::CreateTopic {
                topic: format!("{} and {}", config.topic, config.dlq_topic),
                reason: e.to_string(),
            })
        }
        Ok(Ok(results)) => results,
    };
    for result in results {
        match result {
            Ok(topic) => tracing::info!(
                topic,
                partitions = config.partitions,
                replication_factor = config.replication_factor,
                "created kafka topic"
            ),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic, "kafka topic already exists")
            }
            Err((topic, code)) => {
                return Err(SetupError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}
