-- The pairs again, ordered by user: a user's memberships (GET /v1/users/{id}/segments) read a
-- few granules per day partition instead of the user_id column of the whole window. Filled by
-- a materialized view on every insert into pairs; same engine, partitioning and exactness rule
-- as pairs (a membership is live iff some row has ts > at - window), so duplicate rows never
-- change an answer. Retention drops its day partitions with those of pairs; a user deletion
-- mutates both tables.
CREATE TABLE IF NOT EXISTS {db}.pairs_by_user
(
    user_id String,
    segment String,
    ts DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ts)
PARTITION BY toDate(ts)
ORDER BY (user_id, segment);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.pairs_by_user_mv TO {db}.pairs_by_user
AS SELECT user_id, segment, ts FROM {db}.pairs;

-- Backfill what pairs held before the view existed. Rows inserted meanwhile may land twice:
-- harmless (the latest ts of each membership is what is read), and so is re-running this.
INSERT INTO {db}.pairs_by_user (user_id, segment, ts)
SELECT user_id, segment, ts FROM {db}.pairs;
