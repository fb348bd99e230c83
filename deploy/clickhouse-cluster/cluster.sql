-- The cluster database: Distributed tables with the names the crate uses, over the local
-- tables of every node. Run on EVERY node (each node needs its own copy of these tables; with
-- ZooKeeper/Keeper, `ON CLUSTER {cluster}` after each table name does it in one go), after the
-- local tables exist (local.sql: the crate's migrations, or local-replicated.sql).
--
-- Placeholders (README.md): {db} the local database, {cdb} the cluster database (identifiers,
-- e.g. userseg and userseg_cluster), {db_name} the local database as a string literal
-- ('userseg'), {cluster} the cluster name of remote_servers (e.g. userseg).
--
-- ES points at the cluster database (CLICKHOUSE_DATABASE = the cluster database, any node):
-- its INSERT into pairs is routed by cityHash64(user_id), so every user lives on exactly one
-- shard, and the local materialized views of that shard fill its agg_day and pairs_by_user.
-- Give ES's user insert_distributed_sync = 1, so an INSERT returns once every shard has its
-- rows (otherwise the rows wait in a queue on the node's disk and a lost node loses them).
CREATE DATABASE IF NOT EXISTS {cdb};

CREATE TABLE IF NOT EXISTS {cdb}.pairs AS {db}.pairs
ENGINE = Distributed({cluster}, {db_name}, 'pairs', cityHash64(user_id));

CREATE TABLE IF NOT EXISTS {cdb}.pairs_by_user AS {db}.pairs_by_user
ENGINE = Distributed({cluster}, {db_name}, 'pairs_by_user', cityHash64(user_id));

-- Read only: sketches are made on each shard by its view; no sharding key, so an INSERT into
-- it fails instead of spreading sketches at random.
CREATE TABLE IF NOT EXISTS {cdb}.agg_day AS {db}.agg_day
ENGINE = Distributed({cluster}, {db_name}, 'agg_day');

-- A count sample (one tick) lands whole on one shard, so it stays one INSERT into one part.
CREATE TABLE IF NOT EXISTS {cdb}.history AS {db}.history
ENGINE = Distributed({cluster}, {db_name}, 'history', cityHash64(tick));

-- The change feed's exit marks: read as max(at) per partition over every shard.
CREATE TABLE IF NOT EXISTS {cdb}.change_marks AS {db}.change_marks
ENGINE = Distributed({cluster}, {db_name}, 'change_marks', partition);

-- ES's readiness check reads the schema version here: the versions every node recorded.
CREATE TABLE IF NOT EXISTS {cdb}.schema_migrations AS {db}.schema_migrations
ENGINE = Distributed({cluster}, {db_name}, 'schema_migrations');
