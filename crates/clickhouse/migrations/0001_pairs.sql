-- One row per (segment, user_id, UTC day of ts), keeping the latest ts of that day once parts
-- merge. Counting is exact whatever the merge state: a user is live at `at` iff it has ANY row
-- with ts > at - window (the latest ts is newer than a bound iff some ts is), so duplicates
-- left by re-sends or backfills never change uniqExact(user_id).
-- Day partitions let retention drop whole expired days (18.16 has no TTL clause).
CREATE TABLE IF NOT EXISTS {db}.pairs
(
    segment String,
    user_id String,
    ts DateTime('UTC')
)
ENGINE = ReplacingMergeTree(ts)
PARTITION BY toDate(ts)
ORDER BY (segment, user_id);
