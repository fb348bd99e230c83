//! The consumer's librdkafka callbacks: logs, rebalances (revocations deferred until what was
//! read is committed; committed offsets of revoked partitions forgotten), statistics (consumer
//! lag gauges).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::TopicPartitionList;

use crate::context::{forward_error, forward_log};

/// The partitions of the topic this member owns (see [`KafkaSource::assignment`](super::KafkaSource::assignment)).
pub(crate) type Assignment = Arc<BTreeSet<i32>>;

/// State shared by the source and its callbacks.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The partitions of the topic this member owns: a partition is added when it is
    /// assigned, removed once it is given up (a deferred revocation only when carried out).
    pub assignment: AssignmentWatch,
    /// Per partition, the highest offset this member committed since it was assigned the
    /// partition; commits never move backwards from it.
    pub committed: Mutex<HashMap<i32, i64>>,
    /// A revocation the group asked for and this member has not carried out yet: it waits
    /// until everything handed out of the source was written and committed (see
    /// [`KafkaSource`](super::KafkaSource)).
    pub revoking: Mutex<Option<Revoking>>,
    /// `revoking` is set (read without the lock on every poll).
    pub revoke_pending: AtomicBool,
    /// The consumer is being closed: revocations are carried out at once.
    pub closing: AtomicBool,
}

/// A deferred revocation.
#[derive(Debug)]
pub(crate) struct Revoking {
    pub partitions: TopicPartitionList,
    /// Incremental (cooperative) rebalancing: only these partitions go; else all of them.
    pub cooperative: bool,
    pub since: Instant,
}

/// A `watch` channel of the assignment (the sender keeps no receiver alive itself).
#[derive(Debug)]
pub(crate) struct AssignmentWatch(tokio::sync::watch::Sender<Assignment>);

impl Default for AssignmentWatch {
    fn default() -> Self {
        AssignmentWatch(tokio::sync::watch::Sender::new(Arc::default()))
    }
}

impl AssignmentWatch {
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Assignment> {
        self.0.subscribe()
    }

    /// Adds `partitions` (incremental assignment) or replaces the set with them (eager).
    pub fn assign(&self, partitions: &[i32], incremental: bool) {
        self.0.send_if_modified(|set| {
            let next: BTreeSet<i32> = if incremental {
                set.iter().chain(partitions).copied().collect()
            } else {
                partitions.iter().copied().collect()
            };
            let changed = next != **set;
            if changed {
                *set = Arc::new(next);
            }
            changed
        });
    }

    /// Removes `partitions` (incremental revocation) or everything (eager).
    pub fn revoke(&self, partitions: &[i32], incremental: bool) {
        self.0.send_if_modified(|set| {
            let next: BTreeSet<i32> = if incremental {
                set.iter()
                    .copied()
                    .filter(|p| !partitions.contains(p))
                    .collect()
            } else {
                BTreeSet::new()
            };
            let changed = next != **set;
            if changed {
                *set = Arc::new(next);
            }
            changed
        });
    }
}

impl Shared {
    pub fn revoke_pending(&self) -> bool {
        self.revoke_pending.load(Ordering::Acquire)
    }

    /// Forgets what this member committed on `revoked` and zeroes their lag gauges.
    pub fn forget(&self, revoked: &[i32]) {
        let mut committed = self.committed.lock().unwrap_or_else(|e| e.into_inner());
        for p in revoked {
            committed.remove(p);
            metrics::gauge!("userseg_kafka_consumer_lag", "partition" => p.to_string()).set(0.0);
        }
    }
}

/// Gives up the partitions of a revocation (`incremental_unassign` or `unassign`).
pub(crate) fn unassign<C: Consumer<X>, X: ConsumerContext>(
    consumer: &C,
    partitions: &TopicPartitionList,
    cooperative: bool,
) {
    let result = if cooperative {
        consumer.incremental_unassign(partitions)
    } else {
        consumer.unassign()
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "giving up revoked kafka partitions failed");
    }
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

/// The partitions of `topic` in `tpl`, sorted.
pub(crate) fn topic_partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    let mut v: Vec<i32> = tpl
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
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
    /// Assignments are taken at once. A revocation is deferred while the processor holds
    /// messages it read but has not written and committed: the member calls `unassign` only
    /// then ([`KafkaSource`](super::KafkaSource) does, from `next`), so the partition's next
    /// owner, which starts at the committed offsets, never races a late write of this member
    /// (a stale pair landing after the new owner applied a later deletion of that user).
    /// Meanwhile the group waits (up to `max.poll.interval.ms`). A revocation while closing,
    /// of a lost assignment, or of nothing, is carried out at once.
    fn rebalance(
        &self,
        base_consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            base_consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let result = if cooperative {
                    base_consumer.incremental_assign(tpl)
                } else {
                    base_consumer.assign(tpl)
                };
                match result {
                    Err(e) => {
                        tracing::warn!(topic = %self.topic, error = %e, "taking assigned kafka partitions failed");
                    }
                    Ok(()) => self
                        .shared
                        .assignment
                        .assign(&topic_partitions(tpl, &self.topic), cooperative),
                }
                self.post_rebalance(base_consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let revoked = partitions(tpl);
                metrics::counter!("userseg_kafka_rebalances_total", "event" => "revoke")
                    .increment(1);
                let lost = base_consumer.assignment_lost();
                if self.shared.closing.load(Ordering::Acquire) || lost || revoked.is_empty() {
                    if lost {
                        tracing::warn!(
                            topic = %self.topic,
                            partitions = ?revoked,
                            "kafka partitions lost (this member was out of the group too long); their uncommitted messages go to the next owner"
                        );
                    } else {
                        tracing::info!(topic = %self.topic, partitions = ?revoked, "kafka partitions revoked");
                    }
                    self.shared.forget(&revoked);
                    unassign(base_consumer, tpl, cooperative);
                    self.shared
                        .assignment
                        .revoke(&topic_partitions(tpl, &self.topic), cooperative);
                    return;
                }
                tracing::info!(
                    topic = %self.topic,
                    partitions = ?revoked,
                    "kafka partitions revoked; handing them over once what was read is written and committed"
                );
                *self
                    .shared
                    .revoking
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Revoking {
                    partitions: tpl.clone(),
                    cooperative,
                    since: Instant::now(),
                });
                self.shared.revoke_pending.store(true, Ordering::Release);
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                tracing::warn!(topic = %self.topic, error = %code, "kafka rebalance failed");
                metrics::counter!("userseg_kafka_rebalances_total", "event" => "error")
                    .increment(1);
                self.shared.forget(&partitions(tpl));
                unassign(base_consumer, tpl, cooperative);
                self.shared
                    .assignment
                    .revoke(&topic_partitions(tpl, &self.topic), cooperative);
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
