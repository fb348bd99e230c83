-- Retention on a cluster: ClickHouse 18.16 has no TTL, and ES's periodic drop of expired day
-- partitions (ClickHouseStore::drop_expired_partitions) finds no partitions in the cluster
-- database (Distributed tables have none). So every node drops its own expired days: these
-- queries print the ALTER statements to run on that node, the same partitions the crate's
-- function drops on one server (a day partition whose last second is at or before
-- now - window, i.e. that holds nothing but expired rows). Hourly is plenty:
--
--   q=$(sed -n '/-- name: expired_partitions/,/;$/p' retention.sql | grep -v '^--' |
--       sed -e 's/{db}/userseg/g' -e "s/{db_name}/'userseg'/g" -e 's/{window}/1209600/g' -e 's/{now}/toUInt32(now())/g')
--   clickhouse-client --host NODE --format TSVRaw --query "$q" | clickhouse-client --host NODE --multiquery
--
-- Placeholders: {db} the local database (identifier), {db_name} the same as a string
-- literal, {window} ES's WINDOW in seconds, {history_retention} ES's history retention in
-- seconds, {now} Unix seconds (toUInt32(now())).
-- With ZooKeeper/Keeper, `ALTER TABLE … ON CLUSTER {cluster} DROP PARTITION ID '…'` on one
-- node does every node; on Replicated tables a drop on one replica reaches the others.

-- name: expired_partitions
SELECT concat('ALTER TABLE {db}.', table, ' DROP PARTITION ID ''', partition_id, ''';')
FROM system.parts
WHERE database = {db_name} AND active AND table IN ('pairs', 'agg_day', 'pairs_by_user')
    AND match(partition_id, '^[0-9]{8}$')
GROUP BY table, partition_id
HAVING toUInt32(toDateTime(toDate(concat(substring(partition_id, 1, 4), '-', substring(partition_id, 5, 2), '-',
                                         substring(partition_id, 7, 2))), 'UTC')) + 86399 <= {now} - {window}
ORDER BY table, partition_id;

-- name: expired_history_partitions
-- The count history's days older than its retention (ES's HistoryStore::prune does the same
-- on one server).
SELECT concat('ALTER TABLE {db}.history DROP PARTITION ID ''', partition_id, ''';')
FROM system.parts
WHERE database = {db_name} AND active AND table = 'history' AND match(partition_id, '^[0-9]{8}$')
GROUP BY partition_id
HAVING toUInt32(toDateTime(toDate(concat(substring(partition_id, 1, 4), '-', substring(partition_id, 5, 2), '-',
                                         substring(partition_id, 7, 2))), 'UTC')) + 86399 < {now} - {history_retention}
ORDER BY partition_id;
