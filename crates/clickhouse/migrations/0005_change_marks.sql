-- The distributed change feed's exit marks: per pair-log partition, the time up to which the
-- `expired` exits of that partition's users are published (the partition's emitting ES saves
-- it every few seconds). A starting ES publishes the exits due between a partition's mark and
-- its start, so exits due while no ES ran are late, never lost. Marks only rise: reads take
-- max(at), and ReplacingMergeTree(at) keeps that row when parts merge.
CREATE TABLE IF NOT EXISTS {db}.change_marks
(
    partition UInt32,
    at DateTime('UTC')
)
ENGINE = ReplacingMergeTree(at)
ORDER BY partition;
