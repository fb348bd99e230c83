//! Topic metadata lookups shared by the publisher and the follower.

use std::time::Duration;

use rdkafka::client::{Client, ClientContext};
use rdkafka::error::RDKafkaErrorCode;
use userseg_usecase::PortError;

use crate::error::port_error;

/// The partition ids of `topic`, sorted (blocking call, bounded by `timeout`). A topic the
/// broker does not list, reports an error for, or gives no partitions is `Transient`: it may
/// still be being created.
pub(crate) fn topic_partitions<C: ClientContext>(
    client: &Client<C>,
    topic: &str,
    timeout: Duration,
) -> Result<Vec<i32>, PortError> {
    let metadata = client
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| port_error("fetching kafka metadata", &e))?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(PortError::Transient(format!(
            "kafka metadata does not list topic {topic}"
        )));
    };
    if let Some(err) = t.error() {
        return Err(PortError::Transient(format!(
            "kafka topic {topic}: {}",
            RDKafkaErrorCode::from(err)
        )));
    }
    let mut partitions: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
    if partitions.is_empty() {
        return Err(PortError::Transient(format!(
            "kafka topic {topic} has no partitions"
        )));
    }
    partitions.sort_unstable();
    Ok(partitions)
}
