//! Every metric family userseg exports, with its help text, its labels and the roles that
//! export it. At start-up each role describes and registers its families (with the label values
//! known in advance), so a scrape shows every family zero-valued before its first event.
//! docs/METRICS.md lists the same families; `tests/metrics.rs` compares the two through real
//! scrapes.

use userseg_api::HTTP_ROUTES;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Standalone,
    Uss,
    Es,
}

pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    /// Label names, each with the values registered at start-up (every combination is
    /// registered). A label whose values are only known at run time (a segment, a partition)
    /// has none: its family appears with its first value.
    pub labels: &'static [(&'static str, &'static [&'static str])],
    pub roles: &'static [Role],
}

use Kind::{Counter, Gauge, Histogram};
use Role::{Es, Standalone, Uss};

const ALL: &[Role] = &[Standalone, Uss, Es];
const STORE: &[Role] = &[Standalone, Es];
const INGEST: &[Role] = &[Standalone, Uss];
const S: &[Role] = &[Standalone];
const U: &[Role] = &[Uss];
const E: &[Role] = &[Es];

const PORT_KINDS: &[&str] = &["transient", "permanent", "overloaded"];
const GRPC_METHODS: &[&str] = &[
    "userseg.v1.Segments/Push",
    "userseg.v1.Segments/PushStream",
    "userseg.v1.Segments/Estimate",
    "userseg.v1.Segments/ListEstimates",
];

const fn f(
    name: &'static str,
    kind: Kind,
    roles: &'static [Role],
    labels: &'static [(&'static str, &'static [&'static str])],
    help: &'static str,
) -> Family {
    Family {
        name,
        kind,
        help,
        labels,
        roles,
    }
}

pub const FAMILIES: &[Family] = &[
    // --- requests (api) ---
    f("userseg_http_requests_total", Counter, ALL, &[("route", HTTP_ROUTES), ("status", &["200"])],
        "HTTP requests answered, by route template and status code."),
    f("userseg_http_request_duration_seconds", Histogram, ALL, &[("route", HTTP_ROUTES), ("status", &["200"])],
        "HTTP request duration until the response head, by route template and status code."),
    f("userseg_http_errors_total", Counter, ALL, &[("route", HTTP_ROUTES), ("code", &["invalid_argument"])],
        "HTTP requests answered with a 4xx or 5xx status, by route template and error code."),
    f("userseg_grpc_requests_total", Counter, ALL, &[("method", GRPC_METHODS), ("code", &["OK"])],
        "gRPC calls answered, by method and status code."),
    f("userseg_grpc_request_duration_seconds", Histogram, ALL, &[("method", GRPC_METHODS), ("code", &["OK"])],
        "gRPC call duration, by method and status code."),
    f("userseg_auth_failures_total", Counter, ALL,
        &[("reason", &["missing", "malformed", "unknown", "forbidden"])],
        "Requests refused by the API keys, by reason (no token, not a bearer token, unknown token, role missing)."),
    f("userseg_tls_handshake_failures_total", Counter, ALL,
        &[("reason", &["plaintext", "handshake", "timeout"])],
        "Connections to the TLS port that failed before a request, by reason."),
    f("userseg_reloads_total", Counter, ALL,
        &[("what", &["api_keys", "tls"]), ("result", &["ok", "error"])],
        "Reloads on SIGHUP of the keys file and of the TLS files, by outcome."),
    // --- ingest ---
    f("userseg_ingest_pairs_total", Counter, INGEST, &[],
        "Pairs accepted (durable in the log) by ingest."),
    f("userseg_ingest_rejected_requests_total", Counter, INGEST,
        &[("reason", &["invalid", "overloaded", "unavailable", "rejected"])],
        "Ingest requests refused, by reason."),
    f("userseg_ingest_publish_seconds", Histogram, INGEST, &[],
        "Time from receiving a validated request to the log's acknowledgement (WAL fsync or Kafka acks=all)."),
    // --- batch processor ---
    f("userseg_processor_pairs_written_total", Counter, STORE, &[],
        "Pairs written to the store by the batch processor."),
    f("userseg_processor_batches_written_total", Counter, STORE, &[],
        "Batches written to the store."),
    f("userseg_processor_batch_pairs", Histogram, STORE, &[],
        "Pairs per batch written to the store."),
    f("userseg_processor_write_seconds", Histogram, STORE, &[],
        "Duration of one successful batch write to the store."),
    f("userseg_processor_flushes_total", Counter, STORE, &[("reason", &["size", "interval", "drained", "deletion", "shutdown"])],
        "Batches flushed, by what triggered the flush."),
    f("userseg_processor_users_deleted_total", Counter, STORE, &[],
        "Users deleted (right to erasure) by applied deletions."),
    f("userseg_users_deleted_total", Counter, INGEST, &[],
        "Users named by acknowledged deletion requests (durable in the log; applied in log order)."),
    f("userseg_history_samples_total", Counter, STORE, &[],
        "Count samples of every segment taken for the history API (one per HISTORY_INTERVAL tick)."),
    f("userseg_history_bytes_total", Counter, S, &[],
        "Bytes appended to the history files in DATA_DIR/history."),
    f("userseg_changes_events_total", Counter, STORE, &[("reason", &["pair", "expired", "deleted"])],
        "Change feed events detected (standalone: appended to DATA_DIR/changes; ES: by its index once its start-up scan is done, all handed to the emitter), by reason (pair: entered; expired, deleted: exited)."),
    f("userseg_changes_bytes_total", Counter, S, &[],
        "Bytes appended to the change log in DATA_DIR/changes."),
    f("userseg_changes_write_failures_total", Counter, S, &[],
        "Appends to the change log that failed (kept in memory and written first by the next append; the batch is retried)."),
    f("userseg_changes_redacted_frames_total", Counter, S, &[],
        "Change log frames rewritten to erase the ids of deleted users (with the snapshot after a deletion)."),
    f("userseg_changes_subscribers", Gauge, STORE, &[],
        "Clients streaming GET /v1/changes right now."),
    f("userseg_changes_sent_total", Counter, STORE, &[],
        "Change feed events sent to clients (after their segment filter)."),
    f("userseg_changes_emitted_total", Counter, E, &[],
        "Change feed events this ES published to KAFKA_CHANGES_TOPIC (those of the partitions it owns)."),
    f("userseg_changes_replayed_total", Counter, E, &[],
        "Kept events of partitions this ES took over, published again on the handover (repeats carry the same id)."),
    f("userseg_changes_emit_failures_total", Counter, E, &[],
        "Publishes to KAFKA_CHANGES_TOPIC that failed (retried with backoff; the events stay in memory)."),
    f("userseg_changes_emit_pending", Gauge, E, &[],
        "Detected change events waiting for the emitter."),
    f("userseg_changes_emit_kept", Gauge, E, &[],
        "Change events of partitions owned by other ES, kept for a handover."),
    f("userseg_changes_caught_up_exits_total", Counter, E, &[],
        "Expired exits due while no ES emitted them (between a partition's exit mark and this ES's start), published at start."),
    f("userseg_changes_catch_up_failures_total", Counter, E, &[],
        "Starts of this ES that gave up, after 5 attempts, publishing the exits due while no ES emitted them (logged as an error)."),
    f("userseg_changes_mark_failures_total", Counter, E, &[],
        "Saves of the change feed's exit marks into ClickHouse that failed (retried at the next tick)."),
    f("userseg_processor_gate_wait_seconds", Histogram, E, &[],
        "Time a batch waited before its write for the change feed to publish its events (KAFKA_CHANGES_TOPIC)."),
    f("userseg_processor_applied_lag_seconds", Histogram, STORE, &[],
        "Ingest → applied lag: from the log making a message durable to its batch being written to the store."),
    f("userseg_processor_write_failures_total", Counter, STORE, &[("kind", &["transient", "permanent"])],
        "Failed batch writes, by kind (transient: store unavailable; permanent: rejected)."),
    f("userseg_processor_retries_total", Counter, STORE, &[("kind", &["transient", "permanent"])],
        "Batch writes retried after a failure, by kind."),
    f("userseg_processor_commit_failures_total", Counter, STORE, &[],
        "Position commits that failed after a successful write (the messages are redelivered)."),
    f("userseg_dead_letters_total", Counter, STORE, &[("kind", &["undecodable", "invalid_pair", "rejected_by_store"])],
        "Messages and batches dead-lettered, by kind."),
    // --- estimates ---
    f("userseg_estimate_seconds", Histogram, STORE, &[("scope", &["one", "all"])],
        "Duration of an estimate of one segment or of all segments."),
    f("userseg_segment_users", Gauge, STORE, &[("segment", &[])],
        "Users in each segment, sampled every 15 s (segments that emptied read 0)."),
    // --- standalone: write-ahead log, store, data dir ---
    f("userseg_wal_commit_seconds", Histogram, S, &[],
        "Duration of one group commit of the write-ahead log (write + fdatasync)."),
    f("userseg_wal_group_requests", Histogram, S, &[],
        "Requests made durable by one group commit."),
    f("userseg_wal_bytes_total", Counter, S, &[],
        "Bytes appended to the write-ahead log."),
    f("userseg_wal_overloaded_total", Counter, S, &[],
        "Ingest requests refused because MAX_INFLIGHT_PAIRS pairs were waiting to be applied."),
    f("userseg_wal_unapplied_bytes", Gauge, S, &[],
        "Write-ahead log bytes durable but not yet applied to the store (the standalone consumer lag)."),
    f("userseg_wal_disk_full_refusals_total", Counter, S, &[],
        "Ingest requests (pairs or user deletions) refused because the disk of DATA_DIR is full."),
    f("userseg_snapshot_seconds", Histogram, S, &[],
        "Duration of writing one snapshot."),
    f("userseg_snapshot_failures_total", Counter, S, &[("reason", &["disk_full", "error"])],
        "Snapshots that could not be written, by reason (the previous snapshot and the log are kept)."),
    f("userseg_embedded_live_pairs", Gauge, S, &[],
        "Live memberships in the standalone store."),
    f("userseg_embedded_users", Gauge, S, &[],
        "Distinct user ids in the standalone store's dictionary."),
    f("userseg_embedded_memory_bytes", Gauge, S, &[],
        "Memory held by the standalone store's members and dictionary."),
    f("userseg_embedded_expired_pairs_total", Counter, STORE, &[],
        "Expired memberships dropped from an in-memory store (standalone, or the ES index)."),
    f("userseg_data_dir_bytes", Gauge, S, &[],
        "Bytes of the files in DATA_DIR (log, snapshots, dead letters)."),
    // --- kafka ---
    f("userseg_kafka_published_messages_total", Counter, U, &[],
        "Messages published to the pair topic."),
    f("userseg_kafka_published_pairs_total", Counter, U, &[],
        "Pairs published to the pair topic."),
    f("userseg_kafka_published_bytes_total", Counter, U, &[],
        "Payload bytes published to the pair topic."),
    f("userseg_kafka_publish_seconds", Histogram, U, &[],
        "Time until the broker acknowledged one publish (acks=all)."),
    f("userseg_kafka_publish_failures_total", Counter, U, &[("kind", PORT_KINDS)],
        "Publishes that failed, by kind."),
    f("userseg_kafka_topic_partitions", Gauge, &[Uss, Es], &[("topic", &[])],
        "Partitions of the pair topic, as last read from the broker."),
    f("userseg_kafka_producer_replacements_total", Counter, &[Uss, Es], &[],
        "Kafka producers replaced after they became unusable."),
    f("userseg_kafka_consumed_messages_total", Counter, E, &[],
        "Messages consumed from the pair topic by the batch consumer."),
    f("userseg_kafka_consumed_pairs_total", Counter, E, &[],
        "Pairs consumed from the pair topic by the batch consumer."),
    f("userseg_kafka_invalid_messages_total", Counter, E, &[],
        "Consumed messages that could not be decoded or validated (dead-lettered)."),
    f("userseg_kafka_consumer_lag", Gauge, E, &[("partition", &[])],
        "Messages between the consumer group's position and the end of each assigned partition."),
    f("userseg_kafka_rebalances_total", Counter, E, &[("event", &["assign", "revoke", "error"])],
        "Consumer group rebalance events."),
    f("userseg_kafka_commits_total", Counter, E, &[],
        "Offset commits of the consumer group."),
    f("userseg_kafka_commits_skipped_total", Counter, E, &[],
        "Positions not committed because their partition had moved to another member."),
    f("userseg_kafka_dead_letters_total", Counter, E, &[("kind", &["undecodable", "invalid_pair", "rejected_by_store"])],
        "Messages written to the dead-letter topic, by kind."),
    f("userseg_kafka_dead_letter_failures_total", Counter, E, &[("kind", PORT_KINDS)],
        "Failed writes to the dead-letter topic, by kind."),
    // --- ES index ---
    f("userseg_index_serving", Gauge, E, &[],
        "1 when estimates come from the in-memory index, 0 while it loads (ClickHouse answers)."),
    f("userseg_index_lag_messages", Gauge, E, &[],
        "Messages between the index's follower and the end of the topic."),
    f("userseg_index_live_pairs", Gauge, E, &[],
        "Live memberships in the ES index."),
    f("userseg_index_users", Gauge, E, &[],
        "Distinct user ids in the ES index's dictionary."),
    f("userseg_index_memory_bytes", Gauge, E, &[],
        "Memory held by the ES index's members and dictionary."),
    f("userseg_index_scanned_pairs_total", Counter, E, &[],
        "Pairs loaded into the index from ClickHouse."),
    f("userseg_index_followed_pairs_total", Counter, E, &[],
        "Pairs applied to the index from the topic."),
    f("userseg_index_followed_deletions_total", Counter, E, &[],
        "User deletions the index's follower read from the topic (applied in log order)."),
    f("userseg_index_skipped_messages_total", Counter, E, &[],
        "Undecodable or invalid messages the index's follower skipped."),
    f("userseg_index_apply_errors_total", Counter, E, &[],
        "Failures applying pairs to the index."),
    f("userseg_index_shards", Gauge, E, &[],
        "Shards of the sharded index (ES_INDEX=partitioned) this ES holds, loaded or loading."),
    f("userseg_index_shards_loading", Gauge, E, &[],
        "Shards of the sharded index this ES holds that are still loading."),
    f("userseg_index_incomplete_reads_total", Counter, E, &[],
        "Reads of the sharded index (ES_INDEX=partitioned) refused as incomplete: a partition had no loaded shard on any ES."),
    // --- clickhouse ---
    f("userseg_clickhouse_inserts_total", Counter, E, &[],
        "INSERTs of pair batches into ClickHouse."),
    f("userseg_clickhouse_insert_rows_total", Counter, E, &[],
        "Rows inserted into ClickHouse."),
    f("userseg_clickhouse_insert_seconds", Histogram, E, &[],
        "Duration of one INSERT into ClickHouse."),
    f("userseg_clickhouse_query_seconds", Histogram, E,
        &[("query", &["count", "count_all", "user_segments", "count_expr", "overlap"]), ("mode", &["exact", "approx"])],
        "Duration of one count query in ClickHouse, by query and mode."),
    f("userseg_clickhouse_errors_total", Counter, E,
        &[("op", &["write", "count", "count_all", "check_ready", "scan", "user_segments", "count_expr", "overlap", "export", "delete_users", "history_record", "history_read", "history_prune", "history_last_tick"]), ("kind", &["transient", "permanent"])],
        "ClickHouse requests that failed, by operation and kind."),
    f("userseg_clickhouse_scan_rows_total", Counter, E, &[],
        "Live pairs streamed out of ClickHouse to load the index."),
    f("userseg_clickhouse_export_rows_total", Counter, E, &[],
        "Members streamed out of ClickHouse by member exports."),
    f("userseg_clickhouse_deleted_users_total", Counter, E, &[],
        "Users deleted from ClickHouse's tables (mutation done)."),
    f("userseg_clickhouse_delete_seconds", Histogram, E, &[],
        "Duration of one user deletion in ClickHouse: sketch rebuild and mutations awaited."),
    f("userseg_clickhouse_dropped_partitions_total", Counter, E, &[("table", userseg_clickhouse::PARTITIONED_TABLES)],
        "Expired day partitions dropped, by table."),
];

/// Bucket bounds of the latency histograms (seconds): 0.5 ms to 10 min.
pub const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0, 600.0,
];
/// Bucket bounds of `userseg_processor_batch_pairs`.
pub const BATCH_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    100.0,
    1_000.0,
    10_000.0,
    50_000.0,
    100_000.0,
    500_000.0,
    1_000_000.0,
    2_000_000.0,
];
/// Bucket bounds of `userseg_wal_group_requests`.
pub const GROUP_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0];

/// Describes and registers every family of `role` (every combination of its start-up label
/// values), so that each appears in the first scrape.
pub(crate) fn register(role: Role) {
    for fam in FAMILIES.iter().filter(|f| f.roles.contains(&role)) {
        match fam.kind {
            Counter => metrics::describe_counter!(fam.name, fam.help),
            Gauge => metrics::describe_gauge!(fam.name, fam.help),
            Histogram => metrics::describe_histogram!(fam.name, fam.help),
        }
        if fam.labels.iter().any(|(_, values)| values.is_empty()) {
            continue; // appears with its first run-time label value
        }
        for labels in combinations(fam.labels) {
            match fam.kind {
                Counter => {
                    metrics::counter!(fam.name, &labels).increment(0);
                }
                Gauge => {
                    // Registers without changing a value another task may already have set.
                    metrics::gauge!(fam.name, &labels).increment(0.0);
                }
                Histogram => {
                    let _ = metrics::histogram!(fam.name, &labels);
                }
            }
        }
    }
}

/// Every combination of the label values, as label sets.
fn combinations(
    labels: &'static [(&'static str, &'static [&'static str])],
) -> Vec<Vec<(&'static str, &'static str)>> {
    let mut out: Vec<Vec<(&'static str, &'static str)>> = vec![Vec::new()];
    for (name, values) in labels {
        out = out
            .into_iter()
            .flat_map(|set| {
                values.iter().map(move |v| {
                    let mut s = set.clone();
                    s.push((*name, *v));
                    s
                })
            })
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_well_formed() {
        let mut seen = std::collections::BTreeSet::new();
        for fam in FAMILIES {
            assert!(seen.insert(fam.name), "{} twice", fam.name);
            assert!(fam.name.starts_with("userseg_"), "{}", fam.name);
            assert!(!fam.roles.is_empty(), "{}", fam.name);
            assert_eq!(
                fam.kind == Counter,
                fam.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                fam.name
            );
        }
    }

    #[test]
    fn combinations_cover_every_value() {
        let sets = combinations(&[("a", &["1", "2"]), ("b", &["x", "y", "z"])]);
        assert_eq!(sets.len(), 6);
        assert!(sets.contains(&vec![("a", "2"), ("b", "z")]));
        assert_eq!(combinations(&[]), vec![Vec::new()]);
    }
}
