//! The consumer's librdkafka callbacks: logs, rebalances (logged, committed offsets of revoked
//! partitions forgotten), statistics (consumer lag gauges).

use std::collections::HashMap;
use std::sync::Mutex;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::TopicPartitionList;

use crate::context::{forward_error, forward_log};

/// State shared by the source and its callbacks.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Per partition, the highest offset this member committed since it was assigned the
    /// partition; commits never move backwards from it.
    pub committed: Mutex<HashMap<i32, i64>>,
}

pub(crate) struct SourceContext {
    pub topic: String,
    pub shared: std::sync::Arc<Shared>,
}

fn partitions(tpl: &TopicPartitionList) -> Vec<i32> {
    let mut v: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
    v.sort_unstable();
    v
}

impl ClientContext for SourceContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log("consumer", level, facility, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        forward_error("consumer", &error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        match serde_json::from_slice::<Statistics>(statistics) {
            Ok(s) => self.stats(s),
            Err(e) => tracing::debug!(error = %e, "unreadable librdkafka statistics"),
        }
    }

    fn stats(&self, statistics: Statistics) {
        let Some(topic) = statistics.topics.get(&self.topic) else {
            return;
        };
        for (&partition, p) in &topic.partitions {
            // -1 is librdkafka's internal UA partition; offsets below 0 are unknown.
            if partition < 0 || !p.desired {
                continue;
            }
            if let Some(lag) = commit_lag(p) {
                tracing::trace!(partition, lag, "kafka consumer lag");
                metrics::gauge!("userseg_kafka_consumer_lag", "partition" => partition.to_string())
                    .set(lag as f64);
            }
        }
    }
}

/// Messages of an assigned partition not yet committed by the group: librdkafka's
/// `consumer_lag` (end offset - committed offset), or, before the first commit, everything
/// from the log start (the group starts at the earliest offset).
fn commit_lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.consumer_lag >= 0 {
        return Some(p.consumer_lag);
    }
    let end = if p.ls_offset >= 0 {
        p.ls_offset
    } else {
        p.hi_offset
    };
    if end >= 0 && p.committed_offset < 0 && p.lo_offset >= 0 {
        return Some((end - p.lo_offset).max(0));
    }
    None
}

impl ConsumerContext for SourceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let revoked = partitions(tpl);
                tracing::info!(
                    topic = %self.topic,
                    partitions = ?revoked,
                    "kafka partitions revoked; their uncommitted messages go to the next owner"
                );
                let mut committed = self
                    .shared
                    .committed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                for p in &revoked {
                    committed.remove(p);
                    metrics::gauge!("userseg_kafka_consumer_lag", "partition" => p.to_string())
                        .set(0.0);
                }
                metrics::counter!("userseg_kafka_rebalances_total", "event" => "revoke")
                    .increment(1);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.topic, error = %e, "kafka rebalance failed");
                metrics::counter!("userseg_kafka_rebalances_total", "event" => "error")
                    .increment(1);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::info!(
                topic = %self.topic,
                partitions = ?partitions(tpl),
                "kafka partitions assigned"
            );
            metrics::counter!("userseg_kafka_rebalances_total", "event" => "assign").increment(1);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        if let Err(e) = result {
            tracing::debug!(error = %e, partitions = ?partitions(offsets), "kafka offset commit callback failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::statistics::Partition;

    fn partition(lag: i64, lo: i64, ls: i64, hi: i64, committed: i64) -> Partition {
        Partition {
            consumer_lag: lag,
            lo_offset: lo,
            ls_offset: ls,
            hi_offset: hi,
            committed_offset: committed,
            ..Partition::default()
        }
    }

    #[test]
    fn lag_counts_what_the_group_has_not_committed() {
        // librdkafka knows it (something was committed).
        assert_eq!(commit_lag(&partition(7, 0, 10, 10, 3)), Some(7));
        // Nothing committed yet: everything from the log start.
        assert_eq!(commit_lag(&partition(-1, 4, 10, 10, -1001)), Some(6));
        assert_eq!(commit_lag(&partition(-1, 0, -1001, 12, -1001)), Some(12));
        // Offsets not known yet.
        assert_eq!(commit_lag(&partition(-1, -1001, -1001, -1001, -1001)), None);
    }
}
