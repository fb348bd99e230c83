-- The reads of ES on the cluster database (cluster.sql), where they differ from the crate's
-- single-server SQL (crates/clickhouse/src/store.rs, src/analytics.rs). Every user lives on
-- exactly one shard (pairs is sharded by cityHash64(user_id)), so a per-user aggregation is
-- complete on its shard and exact counts are SUMS of the shards' counts:
-- `distributed_group_by_no_merge = 1` makes each shard finish its GROUP BY and send its
-- result rows (numbers, or one row per user) instead of partial hash sets to merge.
--
-- ES sends these forms when it knows the nodes (CLICKHOUSE_NODES: src/analytics.rs
-- count_per_shard, count_all_per_shard, no_merge). Its single-server statements are also
-- correct on the cluster database (the initiator merges the shards' partial states: same
-- answers, more memory and data moved; tested).
--
-- Placeholders: {cdb} the cluster database; {segment}, {user}, {a}, {b}, {c} string literals
-- ('sports'); {bound} Unix seconds, a row is live iff ts > bound (at - window, or at - within);
-- {first_day} the first UTC day start after {bound} (approximate counts only).
-- crates/clickhouse/tests/cluster.rs runs every query below on a 2-shard cluster and
-- compares it with the single-server answer on the same pairs.

-- name: count_exact
-- One segment, exactly: the sum of the shards' distinct users.
SELECT toUInt64(sum(users)) FROM
(
    SELECT uniqExact(user_id) AS users FROM {cdb}.pairs
    WHERE segment = {segment} AND ts > toDateTime({bound})
)
SETTINGS distributed_group_by_no_merge = 1;

-- name: count_all_exact
-- Every segment with live users, exactly (segments without any are absent).
SELECT segment, toUInt64(sum(users)) FROM
(
    SELECT segment, uniqExact(user_id) AS users FROM {cdb}.pairs
    WHERE ts > toDateTime({bound}) GROUP BY segment
)
GROUP BY segment ORDER BY segment
SETTINGS distributed_group_by_no_merge = 1;

-- name: count_approx
-- One segment, from the sketches: unchanged. The stored day sketches of all shards and the
-- sketch of the window's partial first day, made on each shard, merge at the initiator into
-- one union (a sketch of a day cannot be counted per shard apart from the partial day's
-- sketch of the same shard without counting a user twice).
SELECT toUInt64(uniqCombinedMerge(users)) FROM
(
    SELECT users FROM {cdb}.agg_day WHERE segment = {segment} AND bucket >= toDateTime({first_day})
    UNION ALL
    SELECT uniqCombinedState(user_id) AS users FROM {cdb}.pairs
    WHERE segment = {segment} AND ts > toDateTime({bound}) AND ts < toDateTime({first_day})
);

-- name: count_all_approx
-- Every segment, from the sketches: unchanged.
SELECT segment, toUInt64(uniqCombinedMerge(users)) AS n FROM
(
    SELECT segment, users FROM {cdb}.agg_day WHERE bucket >= toDateTime({first_day})
    UNION ALL
    SELECT segment, uniqCombinedState(user_id) AS users FROM {cdb}.pairs
    WHERE ts > toDateTime({bound}) AND ts < toDateTime({first_day}) GROUP BY segment
)
GROUP BY segment HAVING n > 0 ORDER BY segment;

-- name: user_segments
-- One user's live memberships: unchanged (the user's rows are on one shard; 18.16 asks every
-- shard, current versions skip the others with optimize_skip_unused_shards = 1).
SELECT segment, toUInt32(max(ts)) FROM {cdb}.pairs_by_user
WHERE user_id = {user} AND ts > toDateTime({bound})
GROUP BY segment ORDER BY segment;

-- name: count_expr
-- A set expression, here `a AND b AND NOT c` (the crate compiles any expression to this
-- shape, src/analytics.rs): each shard builds the segment mask of each of its users, the
-- shards' rows are concatenated without a merge, the expression is counted on them.
SELECT toUInt64(countIf(e4)) FROM
(
    SELECT notEquals(bitAnd(m, 1), 0) AS e0, notEquals(bitAnd(m, 2), 0) AS e1,
           notEquals(bitAnd(m, 4), 0) AS e2, not(e2) AS e3, and(e0, e1, e3) AS e4
    FROM
    (
        SELECT groupBitOr(bitShiftLeft(toUInt64(indexOf([{a}, {b}, {c}], segment) > 0),
                                       (indexOf([{a}, {b}, {c}], segment) + 63) % 64)) AS m
        FROM {cdb}.pairs
        WHERE segment IN ({a}, {b}, {c}) AND ts > toDateTime({bound})
        GROUP BY user_id
    )
)
SETTINGS distributed_group_by_no_merge = 1;

-- name: overlap
-- The overlap matrix of a, b, c: users in both of each pair (i <= j) of them. Masks as
-- above, per shard; counted by mask at the initiator.
SELECT toUInt8(i), toUInt8(j), toUInt64(sum(c)) FROM
(
    SELECT i, arrayJoin(b) AS j, c FROM
    (
        SELECT arrayJoin(b) AS i, b, c FROM
        (
            SELECT arrayFilter(k -> bitAnd(bitShiftRight(m, k), 1) = 1, range(3)) AS b, count() AS c FROM
            (
                SELECT groupBitOr(bitShiftLeft(toUInt64(indexOf([{a}, {b}, {c}], segment) > 0),
                                               (indexOf([{a}, {b}, {c}], segment) + 63) % 64)) AS m
                FROM {cdb}.pairs
                WHERE segment IN ({a}, {b}, {c}) AND ts > toDateTime({bound})
                GROUP BY user_id
            )
            GROUP BY m
        )
    )
)
WHERE i <= j GROUP BY i, j ORDER BY i, j
SETTINGS distributed_group_by_no_merge = 1;

-- name: export_members
-- A segment's live members with their latest ts, streamed: each shard sends its complete
-- rows, no merge at the initiator (in no defined order: with this setting an ORDER BY would
-- only sort within each shard's part).
SELECT user_id, toUInt32(max(ts)) FROM {cdb}.pairs
WHERE segment = {segment} AND ts > toDateTime({bound})
GROUP BY user_id
SETTINGS distributed_group_by_no_merge = 1;
