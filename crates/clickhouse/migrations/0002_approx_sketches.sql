-- Approximate mode: a uniqCombined sketch of the users seen per (segment, UTC day), filled by a
-- materialized view on every insert into pairs. An approximate count merges the sketches of the
-- days wholly inside the window with a sketch computed on the fly from the pairs of the window's
-- first, partial day (ts > at - window), so expiry stays exact to the second and at most
-- window/day + 1 stored sketches are merged per segment. Merging sketches is a set union, so
-- re-sent pairs never inflate counts.
CREATE TABLE IF NOT EXISTS {db}.agg_day
(
    segment String,
    bucket DateTime('UTC'),
    users AggregateFunction(uniqCombined, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (segment, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_day_mv TO {db}.agg_day
AS SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

-- Backfill what pairs held before the view existed. Pairs inserted meanwhile may land twice:
-- sketches are unions, so that is harmless, and so is re-running this after a crash.
INSERT INTO {db}.agg_day
SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;
