//! Errors: setting an adapter up ([`SetupError`]) and the mapping of librdkafka errors onto the
//! port error kinds.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use userseg_usecase::PortError;

/// Why an adapter could not be created or the topics could not be ensured.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("creating the kafka client: {0}")]
    Client(#[source] KafkaError),
    #[error("subscribing to topic {topic}: {source}")]
    Subscribe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("creating topic {topic}: {reason}")]
    CreateTopic { topic: String, reason: String },
    #[error("kafka did not answer within {0:?}")]
    Timeout(Duration),
}

/// Error codes that mean "this input is refused for good": retrying the same bytes fails again.
fn is_permanent(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidRecord
            | RDKafkaErrorCode::InvalidArgument
            | RDKafkaErrorCode::BadMessage
            | RDKafkaErrorCode::MessageBatchTooLarge
    )
}

/// Maps a librdkafka error to a port error: a full local queue is `Overloaded`, a refused
/// record `Permanent`, everything else (broker down, timeouts, leader changes, rebalances)
/// `Transient`.
pub(crate) fn port_error(what: &str, e: &KafkaError) -> PortError {
    match e.rdkafka_error_code() {
        Some(RDKafkaErrorCode::QueueFull) => {
            PortError::Overloaded(format!("{what}: the local kafka producer queue is full"))
        }
        Some(code) if is_permanent(code) => PortError::Permanent(format!("{what}: {e}")),
        _ => PortError::Transient(format!("{what}: {e}")),
    }
}

/// The metric label of a port error.
pub(crate) fn kind_label(e: &PortError) -> &'static str {
    match e {
        PortError::Transient(_) => "transient",
        PortError::Permanent(_) => "permanent",
        PortError::Overloaded(_) => "overloaded",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert!(matches!(
            port_error("publish", &e),
            PortError::Overloaded(_)
        ));
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut);
        assert!(matches!(port_error("publish", &e), PortError::Transient(_)));
        let e = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(matches!(port_error("publish", &e), PortError::Permanent(_)));
        let e = KafkaError::MetadataFetch(RDKafkaErrorCode::AllBrokersDown);
        assert!(matches!(
            port_error("metadata", &e),
            PortError::Transient(_)
        ));
        let e = KafkaError::Canceled;
        assert!(matches!(port_error("publish", &e), PortError::Transient(_)));
    }
}
