-- Segment count history: one row per (segment, tick) holding the segment's users at that tick,
-- plus one row with the empty segment name per tick (an impossible segment name) that marks
-- the tick as sampled, so a segment absent from a sample reads as 0 users. A sample is one
-- INSERT (one part), so it is seen whole or not at all.
-- Several samplers may record the same tick: reads group by tick and take max(users), so
-- duplicates are never seen whatever the merge state, and ReplacingMergeTree(users) keeps that
-- same row (the largest) when parts merge. Day partitions are the unit of retention.
CREATE TABLE IF NOT EXISTS {db}.history
(
    segment String,
    tick DateTime('UTC'),
    users UInt64
)
ENGINE = ReplacingMergeTree(users)
PARTITION BY toDate(tick)
ORDER BY (segment, tick);
