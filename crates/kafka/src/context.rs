//! librdkafka callbacks for producers and the admin client: logs and global errors go to
//! tracing (target `librdkafka`) instead of the `log` crate.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::KafkaError;

pub(crate) fn forward_log(client: &str, level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg
        | RDKafkaLogLevel::Alert
        | RDKafkaLogLevel::Critical
        | RDKafkaLogLevel::Error => {
            tracing::error!(target: "librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
            tracing::info!(target: "librdkafka", client, facility, "{message}")
        }
        RDKafkaLogLevel::Debug => {
            tracing::debug!(target: "librdkafka", client, facility, "{message}")
        }
    }
}

/// Global client errors are mostly connection trouble that librdkafka retries by itself (the
/// failed calls report it too), so they are warnings.
pub(crate) fn forward_error(client: &str, error: &KafkaError, reason: &str) {
    tracing::warn!(target: "librdkafka", client, error = %error, reason, "kafka client error");
}

/// The context of producers and the admin client.
#[derive(Clone, Debug)]
pub(crate) struct LogContext {
    pub client: &'static str,
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(self.client, level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(self.client, &error, reason);
    }
}
