-- Approximate mode: uniqCombined sketches of the users seen per (segment, UTC day), per
-- (segment, UTC hour) and per (segment, UTC minute), filled by materialized views on every
-- insert into pairs. A count merges the day sketches wholly inside the window, the hour sketches
-- of its first partial day and the minute sketches of its first partial hour (at most
-- 15 + 23 + 59 sketches per segment for a 14-day window), so memberships expire less than 60 s
-- early and never late. Merging sketches is a set union, so re-sent pairs never inflate counts.
CREATE TABLE IF NOT EXISTS {db}.agg_minute
(
    segment String,
    bucket DateTime('UTC'),
    users AggregateFunction(uniqCombined, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (segment, bucket);

CREATE TABLE IF NOT EXISTS {db}.agg_hour
(
    segment String,
    bucket DateTime('UTC'),
    users AggregateFunction(uniqCombined, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (segment, bucket);

CREATE TABLE IF NOT EXISTS {db}.agg_day
(
    segment String,
    bucket DateTime('UTC'),
    users AggregateFunction(uniqCombined, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toDate(bucket)
ORDER BY (segment, bucket);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_minute_mv TO {db}.agg_minute
AS SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 60) * 60, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_hour_mv TO {db}.agg_hour
AS SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 3600) * 3600, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.agg_day_mv TO {db}.agg_day
AS SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

-- Backfill what pairs held before the views existed. Pairs inserted meanwhile may land twice;
-- sketches are unions, so that is harmless, and so is re-running this after a crash.
INSERT INTO {db}.agg_minute
SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 60) * 60, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

INSERT INTO {db}.agg_hour
SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 3600) * 3600, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;

INSERT INTO {db}.agg_day
SELECT
    segment,
    toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket,
    uniqCombinedState(user_id) AS users
FROM {db}.pairs
GROUP BY segment, bucket;
