//! [`HistoryStore`] on the `history` table (migration 3): the count samples every ES takes,
//! kept without duplicates however many ES record the same tick.
//!
//! A sample of tick `t` is one INSERT of `('', t, n)` (the tick marker; `n` = segments in the
//! sample) and `(segment, t, users)` for each segment with users. Reads group by tick and take
//! `max(users)`, so duplicates written by several samplers are never seen, merged or not.
//! Retention drops whole day partitions; ticks of a partly pruned day are hidden from reads by
//! the bound the last [`prune`](HistoryStore::prune) of this process gave (a restarted process
//! learns it again at its first sample, a minute later at most by default).

use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use userseg_domain::UnixSeconds;
use userseg_usecase::{HistoryPoint, HistoryStore, PortError, SegmentCount};

use crate::client::{quote_string, rowbinary};
use crate::error::ClickHouseError;
use crate::store::{port_error, ClickHouseStore};

const DAY: i64 = 86_400;

/// What pruning remembers between calls.
#[derive(Debug)]
pub(crate) struct PruneState {
    /// Reads hide ticks before this: the latest prune bound.
    floor: AtomicI64,
    /// Day partitions ending at or before this day's start have been dropped; `prune` looks
    /// at `system.parts` again only once its bound passes a new day.
    dropped_through: AtomicI64,
}

impl Default for PruneState {
    fn default() -> Self {
        PruneState {
            floor: AtomicI64::new(i64::MIN),
            dropped_through: AtomicI64::new(i64::MIN),
        }
    }
}

/// The SQL of the history store; `db` is the quoted database name.
pub(crate) mod sql {
    use crate::client::quote_string;

    pub fn insert(db: &str) -> String {
        format!("INSERT INTO {db}.history (segment, tick, users) FORMAT RowBinary")
    }

    /// `(k Int64, tick UInt32, users UInt64)`: for each step `k` holding samples of ticks in
    /// `[lo, hi]`, its latest tick and the segment's users then (0 when the sample lacks it).
    pub fn read(db: &str, segment: &str, from: i64, lo: u32, hi: u32, step: u64) -> String {
        let seg = quote_string(segment);
        format!(
            "SELECT intDiv(toInt64(toUInt32(tick)) - ({from}), {step}) AS k, toUInt32(max(tick)), \
             argMax(u, tick) FROM (SELECT tick, max(if(segment = {seg} AND segment != '', users, toUInt64(0))) AS u \
             FROM {db}.history WHERE segment IN ('', {seg}) AND tick >= toDateTime({lo}) \
             AND tick <= toDateTime({hi}) GROUP BY tick) GROUP BY k ORDER BY k FORMAT RowBinary"
        )
    }

    /// At most one `UInt32`: the latest tick at or after `lo`.
    pub fn last_tick(db: &str, lo: u32) -> String {
        format!(
            "SELECT toUInt32(tick) FROM {db}.history WHERE segment = '' AND tick >= toDateTime({lo}) \
             ORDER BY tick DESC LIMIT 1 FORMAT RowBinary"
        )
    }

    /// `String` partition ids of `history`.
    pub fn partitions(database: &str) -> String {
        format!(
            "SELECT DISTINCT partition_id FROM system.parts WHERE database = {} \
             AND table = 'history' AND active FORMAT RowBinary",
            quote_string(database)
        )
    }
}

/// Clamps a time to `DateTime`'s range.
fn clamp_u32(t: i64) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

impl ClickHouseStore {
    fn history_floor(&self) -> u32 {
        clamp_u32(self.history.floor.load(Ordering::Relaxed))
    }

    async fn record_sample(
        &self,
        at: UnixSeconds,
        counts: &[SegmentCount],
    ) -> Result<(), ClickHouseError> {
        let tick = u32::try_from(at).map_err(|_| {
            ClickHouseError::Unstorable(format!(
                "history tick {at} is outside 1970..2106, the range of ClickHouse's DateTime"
            ))
        })?;
        let mut body = Vec::with_capacity(16 + counts.len() * 32);
        rowbinary::put_string(&mut body, "");
        rowbinary::put_u32(&mut body, tick);
        rowbinary::put_u64(&mut body, counts.len() as u64);
        for c in counts
            .iter()
            .filter(|c| c.users > 0 && !c.segment.is_empty())
        {
            rowbinary::put_string(&mut body, &c.segment);
            rowbinary::put_u32(&mut body, tick);
            rowbinary::put_u64(&mut body, c.users);
        }
        self.client().insert(&sql::insert(self.db()), body).await
    }

    async fn read_history(
        &self,
        segment: &str,
        from: UnixSeconds,
        to: UnixSeconds,
        step: u64,
    ) -> Result<Vec<HistoryPoint>, ClickHouseError> {
        let step = step.max(1);
        let lo = from.max(i64::from(self.history_floor())).max(0);
        if to < lo || lo > i64::from(u32::MAX) {
            return Ok(Vec::new());
        }
        let q = sql::read(self.db(), segment, from, clamp_u32(lo), clamp_u32(to), step);
        let body = self.client().query(&q).await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut out = Vec::new();
        while !r.is_empty() {
            let _k = r.u64().map_err(ClickHouseError::Decode)?;
            let ts = i64::from(r.u32().map_err(ClickHouseError::Decode)?);
            let users = r.u64().map_err(ClickHouseError::Decode)?;
            out.push(HistoryPoint { ts, users });
        }
        Ok(out)
    }

    async fn prune_history(&self, before: UnixSeconds) -> Result<(), ClickHouseError> {
        self.history.floor.fetch_max(before, Ordering::Relaxed);
        // Days whose every second is before `before` go whole.
        let last_whole_day = before.div_euclid(DAY) - 1;
        if self.history.dropped_through.load(Ordering::Relaxed) >= last_whole_day {
            return Ok(());
        }
        // On a cluster, every node drops its own (the Distributed table has no partitions);
        // reads go through this store, which hides the pruned ticks by its floor.
        if !self.nodes.is_empty() {
            for node in &self.nodes {
                Box::pin(node.prune_history(before)).await?;
            }
            self.history
                .dropped_through
                .fetch_max(last_whole_day, Ordering::Relaxed);
            return Ok(());
        }
        let body = self
            .client()
            .query(&sql::partitions(self.database()))
            .await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut expired = Vec::new();
        while !r.is_empty() {
            let id = r.string().map_err(ClickHouseError::Decode)?;
            match crate::store::day_of_partition_id(&id) {
                Some(start) if start.div_euclid(DAY) <= last_whole_day => expired.push(id),
                _ => {}
            }
        }
        for id in expired {
            self.client()
                .execute(&format!(
                    "ALTER TABLE {}.history DROP PARTITION ID {}",
                    self.db(),
                    quote_string(&id)
                ))
                .await?;
            tracing::info!(database = %self.database(), partition_id = %id, "dropped expired history partition");
        }
        self.history
            .dropped_through
            .fetch_max(last_whole_day, Ordering::Relaxed);
        Ok(())
    }

    async fn last_history_tick(&self) -> Result<Option<UnixSeconds>, ClickHouseError> {
        let body = self
            .client()
            .query(&sql::last_tick(self.db(), self.history_floor()))
            .await?;
        let mut r = rowbinary::Reader::new(&body);
        if r.is_empty() {
            return Ok(None);
        }
        Ok(Some(i64::from(r.u32().map_err(ClickHouseError::Decode)?)))
    }
}

#[async_trait]
impl HistoryStore for ClickHouseStore {
    async fn record(&self, at: UnixSeconds, counts: &[SegmentCount]) -> Result<(), PortError> {
        self.record_sample(at, counts)
            .await
            .map_err(|e| port_error("history_record", e))
    }

    async fn read(
        &self,
        segment: &str,
        from: UnixSeconds,
        to: UnixSeconds,
        step: u64,
    ) -> Result<Vec<HistoryPoint>, PortError> {
        self.read_history(segment, from, to, step)
            .await
            .map_err(|e| port_error("history_read", e))
    }

    async fn prune(&self, before: UnixSeconds) -> Result<(), PortError> {
        self.prune_history(before)
            .await
            .map_err(|e| port_error("history_prune", e))
    }

    async fn last_tick(&self) -> Result<Option<UnixSeconds>, PortError> {
        self.last_history_tick()
            .await
            .map_err(|e| port_error("history_last_tick", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_group_by_tick_then_by_step() {
        assert_eq!(
            sql::read("`d`", "a'", -5, 0, 100, 60),
            "SELECT intDiv(toInt64(toUInt32(tick)) - (-5), 60) AS k, toUInt32(max(tick)), argMax(u, tick) \
             FROM (SELECT tick, max(if(segment = 'a\\'' AND segment != '', users, toUInt64(0))) AS u \
             FROM `d`.history WHERE segment IN ('', 'a\\'') AND tick >= toDateTime(0) \
             AND tick <= toDateTime(100) GROUP BY tick) GROUP BY k ORDER BY k FORMAT RowBinary"
        );
        assert_eq!(clamp_u32(-1), 0);
        assert_eq!(clamp_u32(i64::MAX), u32::MAX);
    }
}
