-- The local tables of a REPLICATED cluster (ZooKeeper or ClickHouse Keeper, and the macros
-- {shard} and {replica} on every node): the crate's migrations 1 to 4
-- (crates/clickhouse/migrations/) with Replicated* engines, created on every node by
-- ON CLUSTER. Same columns, partitions, keys and views as on one server; only the engines
-- differ. Run once, on any node, then cluster.sql on every node.
--
-- Placeholders (README.md): {db} the local database (identifier, e.g. userseg), {db_path} the
-- same name as it appears in ZooKeeper paths (e.g. userseg), {cluster} the cluster name.
-- {shard} and {replica} are ClickHouse's own macros and stay as they are.
CREATE DATABASE IF NOT EXISTS {db} ON CLUSTER {cluster};

-- Migration 1.
CREATE TABLE IF NOT EXISTS {db}.pairs ON CLUSTER {cluster}
(
    segment String,
    user_id String,
    ts DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db_path}/pairs', '{replica}', ts)
PARTITION BY toDate(ts)
ORDER BY (segment, user_id);

-- Migration 2. Each shard's view sketches the users of that shard; the sketches of all shards
-- merge into the union (users are disjoint across shards).
CREATE TABLE IF NOT EXISTS {db}.agg_day ON CLUSTER {cluster}
(
    segment String,
    bucket DateTime('UTC'),
    users AggregateFunction(uniqCombined, String)
)
ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/{db_path}/agg_day', '{replica}')
PARTITION BY toDate(bucket)
ORDER BY (segment, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_day_mv ON CLUSTER {cluster} TO {db}.agg_day
AS SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

-- Migration 3.
CREATE TABLE IF NOT EXISTS {db}.history ON CLUSTER {cluster}
(
    segment String,
    tick DateTime('UTC'),
    users UInt64
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db_path}/history', '{replica}', users)
PARTITION BY toDate(tick)
ORDER BY (segment, tick);

-- Migration 4.
CREATE TABLE IF NOT EXISTS {db}.pairs_by_user ON CLUSTER {cluster}
(
    user_id String,
    segment String,
    ts DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db_path}/pairs_by_user', '{replica}', ts)
PARTITION BY toDate(ts)
ORDER BY (user_id, segment);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.pairs_by_user_mv ON CLUSTER {cluster} TO {db}.pairs_by_user
AS SELECT user_id, segment, ts FROM {db}.pairs;

-- Migration 5.
CREATE TABLE IF NOT EXISTS {db}.change_marks ON CLUSTER {cluster}
(
    partition UInt32,
    at DateTime('UTC')
)
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{db_path}/change_marks', '{replica}', at)
ORDER BY partition;

-- The versions above, as `userseg migrate` records them (the checksums are the CRC-32 of the
-- crate's migration files, which `migrate` compares): `userseg migrate` against a node then
-- has nothing to do, and ES's readiness check passes. One table for the whole cluster (no
-- {shard} in its path), so this one INSERT reaches every node.
CREATE TABLE IF NOT EXISTS {db}.schema_migrations ON CLUSTER {cluster}
(version UInt32, name String, checksum UInt32, applied_at DateTime('UTC'))
ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{db_path}/schema_migrations', '{replica}', applied_at)
ORDER BY version;

INSERT INTO {db}.schema_migrations (version, name, checksum, applied_at) VALUES
(1, 'pairs', 1623105226, now()),
(2, 'approx_sketches', 745426140, now()),
(3, 'history', 3515347053, now()),
(4, 'pairs_by_user', 3253053621, now()),
(5, 'change_marks', 1881679031, now());
