//! The segment store on ClickHouse: [`SegmentWriter`] and [`SegmentCounter`] over the tables of
//! the embedded migrations, and partition retention.

use std::sync::Arc;

use async_trait::async_trait;
use userseg_domain::{Pair, UnixSeconds, UserDeletion, Window};
use userseg_usecase::{Mode, PortError, SegmentCount, SegmentCounter, SegmentWriter};

use crate::client::{quote_ident, quote_string, rowbinary, ClickHouseClient, Timer};
use crate::config::ClickHouseConfig;
use crate::error::ClickHouseError;
use crate::migrate::{current_version, latest_version};

const DAY: i64 = 86_400;
/// ClickHouse refuses an INSERT block touching more than `max_partitions_per_insert_block`
/// (default 100) partitions, with `TOO_MANY_PARTS`; a write spanning more days is split below it.
const MAX_DAYS_PER_INSERT: i64 = 90;

/// The tables that retention drops day partitions from.
pub const PARTITIONED_TABLES: &[&str] = &["pairs", "agg_day", "pairs_by_user"];

/// A day partition removed by [`ClickHouseStore::drop_expired_partitions`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedPartition {
    pub table: &'static str,
    /// ClickHouse's partition id, `YYYYMMDD` (UTC day).
    pub partition_id: String,
    /// Start of that day, in Unix seconds.
    pub day_start: UnixSeconds,
}

/// The ClickHouse segment store. Cheap to share: wrap it in an `Arc` and hand it out as both
/// writer and counter.
#[derive(Clone, Debug)]
pub struct ClickHouseStore {
    client: ClickHouseClient,
    database: String,
    db: String,
    window: Window,
    max_rows_per_insert: usize,
    /// How long [`delete_users`](SegmentWriter::delete_users) waits for its mutation.
    pub(crate) mutation_timeout: std::time::Duration,
    /// What history pruning remembers, see `history.rs`.
    pub(crate) history: Arc<crate::history::PruneState>,
    /// On a cluster, every node's local database ([`ClickHouseConfig::nodes`]): deletions,
    /// retention and history pruning run there.
    pub(crate) nodes: Vec<ClickHouseStore>,
}

/// The lower bound of live event times at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// Everything is live (the bound is before 1970).
    Always,
    /// Live iff ts is at least this (a non-negative time that fits DateTime).
    From(u32),
    /// Nothing can be live (the bound is past DateTime's range, year 2106).
    Never,
}

pub(crate) fn since(bound: i64) -> Since {
    if bound <= 0 {
        Since::Always
    } else {
        u32::try_from(bound).map_or(Since::Never, Since::From)
    }
}

impl ClickHouseStore {
    /// Validates the config and builds the store; does not connect (see
    /// [`check_ready`](SegmentCounter::check_ready)). The schema must have been created with
    /// [`migrate`](crate::migrate).
    pub fn new(config: ClickHouseConfig, window: Window) -> Result<Self, ClickHouseError> {
        let client = ClickHouseClient::new(&config)?;
        let nodes = config
            .node_configs()
            .into_iter()
            .map(|node| ClickHouseStore::new(node, window))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClickHouseStore {
            nodes,
            client,
            db: quote_ident(&config.database),
            database: config.database,
            window,
            max_rows_per_insert: config.max_rows_per_insert,
            mutation_timeout: crate::delete::DEFAULT_MUTATION_TIMEOUT,
            history: Arc::default(),
        })
    }

    /// How long a user deletion waits for ClickHouse to apply its mutation before it fails
    /// (transiently; the retry waits for the same mutation instead of issuing another).
    /// Default [`DEFAULT_MUTATION_TIMEOUT`](crate::DEFAULT_MUTATION_TIMEOUT).
    pub fn with_mutation_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.mutation_timeout = timeout;
        self
    }

    pub fn window(&self) -> Window {
        self.window
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The underlying HTTP client.
    pub fn client(&self) -> &ClickHouseClient {
        &self.client
    }

    /// Is this the cluster database of a cluster ([`ClickHouseConfig::nodes`])? Exact reads
    /// then sum per-shard answers.
    pub(crate) fn on_cluster(&self) -> bool {
        !self.nodes.is_empty()
    }

    /// The quoted database name, for SQL text.
    pub(crate) fn db(&self) -> &str {
        &self.db
    }

    pub(crate) fn window_secs(&self) -> i64 {
        // Window is bounded to 10 years, so this fits.
        i64::try_from(self.window.secs()).unwrap_or(i64::MAX)
    }

    /// Inserts pairs, in as few INSERTs as the row and partition limits allow.
    pub async fn insert_pairs(&self, pairs: &[Pair]) -> Result<(), ClickHouseError> {
        if pairs.is_empty() {
            return Ok(());
        }
        if let Some(p) = pairs.iter().find(|p| u32::try_from(p.ts).is_err()) {
            return Err(ClickHouseError::Unstorable(format!(
                "ts {} of user {:?} in segment {:?} is outside 1970..2106, the range of ClickHouse's DateTime",
                p.ts, p.user_id, p.segment
            )));
        }
        let (min_ts, max_ts) = pairs.iter().fold((i64::MAX, i64::MIN), |(lo, hi), p| {
            (lo.min(p.ts), hi.max(p.ts))
        });
        if max_ts.div_euclid(DAY) - min_ts.div_euclid(DAY) < MAX_DAYS_PER_INSERT {
            for chunk in pairs.chunks(self.max_rows_per_insert) {
                self.insert_chunk(chunk.iter()).await?;
            }
            return Ok(());
        }
        // A long backfill: sort by time and cut so that no INSERT spans too many days.
        let mut sorted: Vec<&Pair> = pairs.iter().collect();
        sorted.sort_unstable_by_key(|p| p.ts);
        let mut start = 0;
        while start < sorted.len() {
            let first_day = sorted[start].ts.div_euclid(DAY);
            let mut end = start;
            while end < sorted.len()
                && end - start < self.max_rows_per_insert
                && sorted[end].ts.div_euclid(DAY) - first_day < MAX_DAYS_PER_INSERT
            {
                end += 1;
            }
            self.insert_chunk(sorted[start..end].iter().copied())
                .await?;
            start = end;
        }
        Ok(())
    }

    async fn insert_chunk<'a>(
        &self,
        pairs: impl ExactSizeIterator<Item = &'a Pair>,
    ) -> Result<(), ClickHouseError> {
        let rows = pairs.len();
        let mut body = Vec::with_capacity(rows * 48);
        for p in pairs {
            rowbinary::put_string(&mut body, &p.segment);
            rowbinary::put_string(&mut body, &p.user_id);
            // Range checked by insert_pairs.
            rowbinary::put_u32(&mut body, u32::try_from(p.ts).unwrap_or(0));
        }
        let bytes = body.len();
        let timer = Timer::start();
        self.client
            .insert(
                &format!(
                    "INSERT INTO {}.pairs (segment, user_id, ts) FORMAT RowBinary",
                    self.db
                ),
                body,
            )
            .await?;
        let elapsed = timer.elapsed();
        metrics::counter!("userseg_clickhouse_insert_rows_total").increment(rows as u64);
        metrics::counter!("userseg_clickhouse_inserts_total").increment(1);
        metrics::histogram!("userseg_clickhouse_insert_seconds").record(elapsed);
        tracing::debug!(
            database = %self.database,
            rows,
            bytes,
            elapsed_ms = elapsed.as_millis() as u64,
            "inserted pairs"
        );
        Ok(())
    }

    /// Runs a read and records its latency.
    pub(crate) async fn timed_query(
        &self,
        sql: &str,
        labelled: &'static str,
        mode: Mode,
    ) -> Result<(bytes::Bytes, std::time::Duration), ClickHouseError> {
        let timer = Timer::start();
        let body = self.client.query(sql).await?;
        let elapsed = timer.elapsed();
        metrics::histogram!(
            "userseg_clickhouse_query_seconds",
            "query" => labelled,
            "mode" => mode_label(mode)
        )
        .record(elapsed);
        Ok((body, elapsed))
    }

    pub(crate) async fn query_counts(
        &self,
        sql: String,
        labelled: &'static str,
        mode: Mode,
    ) -> Result<Vec<SegmentCount>, ClickHouseError> {
        let (body, elapsed) = self.timed_query(&sql, labelled, mode).await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut out = Vec::new();
        while !r.is_empty() {
            let segment = r.string().map_err(ClickHouseError::Decode)?;
            let users = r.u64().map_err(ClickHouseError::Decode)?;
            if users > 0 {
                out.push(SegmentCount { segment, users });
            }
        }
        // ClickHouse orders Strings bytewise, as Rust does; sort anyway so the contract holds
        // whatever the server's collation.
        out.sort_unstable_by(|a, b| a.segment.cmp(&b.segment));
        tracing::debug!(
            database = %self.database,
            query = labelled,
            mode = mode_label(mode),
            segments = out.len(),
            elapsed_ms = elapsed.as_millis() as u64,
            "counted"
        );
        Ok(out)
    }

    pub(crate) async fn query_one(
        &self,
        sql: String,
        labelled: &'static str,
        mode: Mode,
    ) -> Result<u64, ClickHouseError> {
        let (body, elapsed) = self.timed_query(&sql, labelled, mode).await?;
        let mut r = rowbinary::Reader::new(&body);
        let users = if r.is_empty() {
            0
        } else {
            r.u64().map_err(ClickHouseError::Decode)?
        };
        if !r.is_empty() {
            return Err(ClickHouseError::Decode(
                "a single-count query returned more than one value".into(),
            ));
        }
        tracing::debug!(
            database = %self.database,
            query = labelled,
            mode = mode_label(mode),
            users,
            elapsed_ms = elapsed.as_millis() as u64,
            "counted"
        );
        Ok(users)
    }

    /// Distinct users of `segment` whose latest ts is after `at - window`, exactly.
    pub async fn count_exact(
        &self,
        segment: &str,
        at: UnixSeconds,
    ) -> Result<u64, ClickHouseError> {
        if self.on_cluster() {
            let after = match since(at.saturating_sub(self.window_secs())) {
                Since::Never => return Ok(0),
                Since::Always => None,
                Since::From(lo) => Some(lo),
            };
            let sql = crate::analytics::sql::count_per_shard(&self.db, segment, after);
            return self.query_one(sql, "count", Mode::Exact).await;
        }
        let time = match since(at.saturating_sub(self.window_secs())) {
            Since::Never => return Ok(0),
            Since::Always => String::new(),
            Since::From(lo) => format!(" AND ts > toDateTime({lo})"),
        };
        let sql = format!(
            "SELECT toUInt64(uniqExact(user_id)) FROM {db}.pairs WHERE segment = {seg}{time} FORMAT RowBinary",
            db = self.db,
            seg = quote_string(segment),
        );
        self.query_one(sql, "count", Mode::Exact).await
    }

    /// Every segment with live users at `at`, exactly.
    pub async fn count_all_exact(
        &self,
        at: UnixSeconds,
    ) -> Result<Vec<SegmentCount>, ClickHouseError> {
        if self.on_cluster() {
            let after = match since(at.saturating_sub(self.window_secs())) {
                Since::Never => return Ok(Vec::new()),
                Since::Always => None,
                Since::From(lo) => Some(lo),
            };
            let sql = crate::analytics::sql::count_all_per_shard(&self.db, after);
            return self.query_counts(sql, "count_all", Mode::Exact).await;
        }
        let time = match since(at.saturating_sub(self.window_secs())) {
            Since::Never => return Ok(Vec::new()),
            Since::Always => String::new(),
            Since::From(lo) => format!(" WHERE ts > toDateTime({lo})"),
        };
        let sql = format!(
            "SELECT segment, toUInt64(uniqExact(user_id)) FROM {db}.pairs{time} \
             GROUP BY segment ORDER BY segment FORMAT RowBinary",
            db = self.db,
        );
        self.query_counts(sql, "count_all", Mode::Exact).await
    }

    /// A `UNION ALL` of the sketches live at `at` (optionally of one segment): the stored day
    /// sketches of the days wholly inside the window, and a sketch computed from the pairs of
    /// its first, partial day. With `segment` it yields a `users` column, without it `segment,
    /// users` rows. `None` when nothing can be live.
    fn sketch_sources(&self, at: UnixSeconds, segment: Option<&str>) -> Option<String> {
        let db = &self.db;
        let (seg_where, seg_col, group) = match segment {
            Some(s) => (format!("segment = {} AND ", quote_string(s)), "", ""),
            None => (String::new(), "segment, ", " GROUP BY segment"),
        };
        match since(at.saturating_sub(self.window_secs())) {
            Since::Never => None,
            Since::Always => Some(format!(
                "SELECT {seg_col}users FROM {db}.agg_day WHERE {seg_where}1"
            )),
            Since::From(lo) => {
                let raw = format!(
                    "SELECT {seg_col}uniqCombinedState(user_id) AS users FROM {db}.pairs \
                     WHERE {seg_where}ts > toDateTime({lo})"
                );
                // Day buckets starting after `lo` hold only live pairs.
                let first_day = ceil_to(i64::from(lo) + 1, DAY);
                Some(match u32::try_from(first_day) {
                    Ok(d) => format!(
                        "SELECT {seg_col}users FROM {db}.agg_day WHERE {seg_where}bucket >= toDateTime({d}) \
                         UNION ALL \
                         {raw} AND ts < toDateTime({d}){group}"
                    ),
                    // The last day of 2106: no whole day is left.
                    Err(_) => format!("{raw}{group}"),
                })
            }
        }
    }

    /// Approximate distinct users of `segment` at `at`, from the sketches.
    pub async fn count_approx(
        &self,
        segment: &str,
        at: UnixSeconds,
    ) -> Result<u64, ClickHouseError> {
        let Some(sources) = self.sketch_sources(at, Some(segment)) else {
            return Ok(0);
        };
        let sql =
            format!("SELECT toUInt64(uniqCombinedMerge(users)) FROM ({sources}) FORMAT RowBinary");
        self.query_one(sql, "count", Mode::Approx).await
    }

    /// Approximate counts of every segment at `at`, from the sketches.
    pub async fn count_all_approx(
        &self,
        at: UnixSeconds,
    ) -> Result<Vec<SegmentCount>, ClickHouseError> {
        let Some(sources) = self.sketch_sources(at, None) else {
            return Ok(Vec::new());
        };
        let sql = format!(
            "SELECT segment, toUInt64(uniqCombinedMerge(users)) AS n FROM ({sources}) \
             GROUP BY segment HAVING n > 0 ORDER BY segment FORMAT RowBinary"
        );
        self.query_counts(sql, "count_all", Mode::Approx).await
    }

    /// Is the server up, and is the schema at the version this binary needs?
    pub async fn ready(&self) -> Result<(), ClickHouseError> {
        let version = current_version(&self.client, &self.database).await?;
        let latest = latest_version();
        if version < latest {
            return Err(ClickHouseError::Migration(format!(
                "database {} is at schema version {version}, this binary needs {latest}: run `userseg migrate`",
                self.database
            )));
        }
        Ok(())
    }

    /// Drops every day partition of `pairs` and the sketch tables whose whole day has
    /// expired at `now` (its last second is at or before `now - window`). ClickHouse 18.16 has
    /// no TTL, so the service calls this periodically. Counts never change: queries already
    /// ignore expired rows, and only partitions holding nothing but expired rows are dropped.
    ///
    /// On a cluster it drops them on every node's local database (the Distributed tables of
    /// the cluster database have no partitions).
    pub async fn drop_expired_partitions(
        &self,
        now: UnixSeconds,
    ) -> Result<Vec<DroppedPartition>, ClickHouseError> {
        if !self.nodes.is_empty() {
            let mut all = Vec::new();
            for node in &self.nodes {
                all.extend(Box::pin(node.drop_expired_partitions(now)).await?);
            }
            return Ok(all);
        }
        let horizon = now.saturating_sub(self.window_secs());
        let tables = PARTITIONED_TABLES
            .iter()
            .map(|t| quote_string(t))
            .collect::<Vec<_>>()
            .join(", ");
        let body = self
            .client
            .query(&format!(
                "SELECT table, partition_id FROM system.parts \
                 WHERE database = {} AND active AND table IN ({tables}) \
                 GROUP BY table, partition_id ORDER BY table, partition_id FORMAT RowBinary",
                quote_string(&self.database)
            ))
            .await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut expired = Vec::new();
        while !r.is_empty() {
            let table = r.string().map_err(ClickHouseError::Decode)?;
            let partition_id = r.string().map_err(ClickHouseError::Decode)?;
            let Some(table) = PARTITIONED_TABLES.iter().copied().find(|t| *t == table) else {
                continue;
            };
            let Some(day_start) = day_of_partition_id(&partition_id) else {
                tracing::warn!(database = %self.database, table, partition_id = %partition_id, "skipping a partition whose id is not a yyyymmdd day");
                continue;
            };
            if day_start + DAY - 1 <= horizon {
                expired.push(DroppedPartition {
                    table,
                    partition_id,
                    day_start,
                });
            }
        }
        for p in &expired {
            // The id was checked to be eight digits; quote it all the same.
            self.client
                .execute(&format!(
                    "ALTER TABLE {}.{} DROP PARTITION ID {}",
                    self.db,
                    quote_ident(p.table),
                    quote_string(&p.partition_id)
                ))
                .await?;
            metrics::counter!("userseg_clickhouse_dropped_partitions_total", "table" => p.table)
                .increment(1);
            tracing::info!(
                database = %self.database,
                table = p.table,
                partition_id = %p.partition_id,
                day_start = p.day_start,
                "dropped expired partition"
            );
        }
        Ok(expired)
    }
}

/// The smallest multiple of `unit` at or after `t` (`t` non-negative).
fn ceil_to(t: i64, unit: i64) -> i64 {
    t.div_euclid(unit) * unit + if t.rem_euclid(unit) == 0 { 0 } else { unit }
}

pub(crate) fn mode_label(mode: Mode) -> &'static str {
    match mode {
        Mode::Exact => "exact",
        Mode::Approx => "approx",
    }
}

/// `YYYYMMDD` → the Unix time of that UTC day's start.
pub(crate) fn day_of_partition_id(id: &str) -> Option<UnixSeconds> {
    if id.len() != 8 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = id[0..4].parse().ok()?;
    let m: i64 = id[4..6].parse().ok()?;
    let d: i64 = id[6..8].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, m, d) * DAY)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

pub(crate) fn port_error(op: &'static str, e: ClickHouseError) -> PortError {
    metrics::counter!("userseg_clickhouse_errors_total", "op" => op, "kind" => e.kind())
        .increment(1);
    if e.is_misconfiguration() {
        tracing::error!(op, error = %e, "clickhouse is misconfigured or not migrated");
    } else {
        tracing::warn!(op, error = %e, kind = e.kind(), "clickhouse request failed");
    }
    e.into()
}

#[async_trait]
impl SegmentWriter for ClickHouseStore {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        self.insert_pairs(&pairs)
            .await
            .map_err(|e| port_error("write", e))
    }

    async fn delete_users(&self, deletion: UserDeletion) -> Result<(), PortError> {
        // On a cluster, each node deletes its own users' rows and rebuilds its own sketches
        // (a deletion cannot go through Distributed tables); each step is idempotent, so a
        // retry after a node failed redoes nothing the others finished.
        if !self.nodes.is_empty() {
            for node in &self.nodes {
                node.delete_user_ids(deletion.user_ids())
                    .await
                    .map_err(|e| port_error("delete_users", e))?;
            }
            return Ok(());
        }
        self.delete_user_ids(deletion.user_ids())
            .await
            .map_err(|e| port_error("delete_users", e))
    }
}

#[async_trait]
impl SegmentCounter for ClickHouseStore {
    async fn count(
        &self,
        segment: &str,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(u64, bool), PortError> {
        match mode {
            Mode::Exact => self.count_exact(segment, at).await.map(|n| (n, true)),
            Mode::Approx => self.count_approx(segment, at).await.map(|n| (n, false)),
        }
        .map_err(|e| port_error("count", e))
    }

    async fn count_all(
        &self,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError> {
        match mode {
            Mode::Exact => self.count_all_exact(at).await.map(|l| (l, true)),
            Mode::Approx => self.count_all_approx(at).await.map(|l| (l, false)),
        }
        .map_err(|e| port_error("count_all", e))
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        self.ready().await.map_err(|e| match e {
            // Not migrated yet: the service should stay unready, not give up.
            ClickHouseError::Migration(m) => PortError::Transient(m),
            e => port_error("check_ready", e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ids_are_utc_days() {
        assert_eq!(day_of_partition_id("19700101"), Some(0));
        assert_eq!(day_of_partition_id("20251124"), Some(1_763_942_400));
        assert_eq!(day_of_partition_id("20240229"), Some(1_709_164_800));
        assert_eq!(day_of_partition_id("2025112"), None);
        assert_eq!(day_of_partition_id("2025-11-"), None);
        assert_eq!(day_of_partition_id("20251324"), None);
        assert_eq!(day_of_partition_id("tuple()"), None);
    }

    #[test]
    fn since_clamps_to_datetime_range() {
        assert!(matches!(since(-5), Since::Always));
        assert!(matches!(since(0), Since::Always));
        assert!(matches!(since(7), Since::From(7)));
        assert!(matches!(since(i64::from(u32::MAX) + 1), Since::Never));
    }

    fn store() -> ClickHouseStore {
        ClickHouseStore::new(
            ClickHouseConfig::default().with_database("d"),
            Window::from_secs(14 * DAY as u64).unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn sketches_cover_the_window_once() {
        let s = store();
        // at - window = 1_000_000_030: pairs with ts > 1_000_000_030 before the first whole
        // day 1_000_080_000 are read raw, later ones from the day sketches.
        let at = 1_000_000_030 + 14 * DAY;
        let sql = s.sketch_sources(at, Some("x")).unwrap();
        assert_eq!(
            sql,
            "SELECT users FROM `d`.agg_day WHERE segment = 'x' AND bucket >= toDateTime(1000080000) \
             UNION ALL \
             SELECT uniqCombinedState(user_id) AS users FROM `d`.pairs \
             WHERE segment = 'x' AND ts > toDateTime(1000000030) AND ts < toDateTime(1000080000)"
        );
        // A day-aligned bound: that day is expired, the next is whole.
        let sql = s.sketch_sources(1_000_080_000 + 14 * DAY, None).unwrap();
        assert_eq!(
            sql,
            "SELECT segment, users FROM `d`.agg_day WHERE bucket >= toDateTime(1000166400) \
             UNION ALL \
             SELECT segment, uniqCombinedState(user_id) AS users FROM `d`.pairs \
             WHERE ts > toDateTime(1000080000) AND ts < toDateTime(1000166400) GROUP BY segment"
        );
        // Early times: every day sketch.
        assert_eq!(
            s.sketch_sources(1000, None).unwrap(),
            "SELECT segment, users FROM `d`.agg_day WHERE 1"
        );
        assert!(s.sketch_sources(i64::MAX, None).is_none());
        let late = s
            .sketch_sources(i64::from(u32::MAX) - 10 + 14 * DAY, Some("x"))
            .unwrap();
        assert!(!late.contains("agg_day"), "{late}");
    }

    #[test]
    fn ceil_to_rounds_up() {
        assert_eq!(ceil_to(0, 60), 0);
        assert_eq!(ceil_to(1, 60), 60);
        assert_eq!(ceil_to(60, 60), 60);
        assert_eq!(ceil_to(86_399, DAY), DAY);
    }
}
