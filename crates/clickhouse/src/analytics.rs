//! [`SegmentAnalytics`] over the `pairs` table: per-user lookup, counts with a lookback, set
//! expressions, the overlap matrix and the streamed export, all exact to the second.
//!
//! A membership is live at `at` under a lookback `d` when its latest ts is after `at - d`; a
//! user has a row with `ts > at - d` for a membership iff its latest ts is after the bound, so
//! every query filters rows on `ts > bound` and is exact whatever the merge state (re-sent and
//! backfilled pairs leave extra rows that change nothing). Segment names and user ids only
//! reach SQL as literals escaped by [`quote_string`]; the statements themselves are built by
//! the pure functions of [`sql`], which the unit tests pin down.

use std::time::Instant;

use async_trait::async_trait;
use userseg_domain::{Expr, UnixSeconds, Within, MAX_USER_ID_BYTES};
use userseg_usecase::{
    Member, Membership, Mode, Overlap, PortError, SegmentAnalytics, SegmentCount,
};

use crate::client::rowbinary;
use crate::error::ClickHouseError;
use crate::rows::{
    check_after, stream_rows, string_at, u32_at, user_id_str, RowFormat, StreamError,
};
use crate::store::{port_error, since, ClickHouseStore, Since};

/// The SQL of every analytics read. `db` is the quoted database name, `after` the live bound
/// (`ts > after`; `None`: no bound, everything is live).
pub(crate) mod sql {
    use userseg_domain::Expr;

    use crate::client::quote_string;

    fn ts_filter(after: Option<u32>) -> String {
        match after {
            Some(lo) => format!("ts > toDateTime({lo})"),
            None => "1".into(),
        }
    }

    fn list(names: &[&str]) -> String {
        names
            .iter()
            .map(|s| quote_string(s))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(segment String, last_seen UInt32)` of the user's live memberships, by segment, from
    /// the copy of the pairs ordered by user.
    pub fn user_segments(db: &str, user_id: &str, after: Option<u32>) -> String {
        format!(
            "SELECT segment, toUInt32(max(ts)) FROM {db}.pairs_by_user \
             WHERE user_id = {user} AND {time} GROUP BY segment ORDER BY segment FORMAT RowBinary",
            user = quote_string(user_id),
            time = ts_filter(after),
        )
    }

    /// One `UInt64`: the live users of the segment.
    pub fn count(db: &str, segment: &str, after: Option<u32>) -> String {
        format!(
            "SELECT toUInt64(uniqExact(user_id)) FROM {db}.pairs \
             WHERE segment = {seg} AND {time} FORMAT RowBinary",
            seg = quote_string(segment),
            time = ts_filter(after),
        )
    }

    /// [`count`] on a cluster's Distributed tables: every user lives on one shard, so each
    /// shard counts its own users and the counts are summed (shards send numbers, not hash
    /// sets to merge).
    pub fn count_per_shard(db: &str, segment: &str, after: Option<u32>) -> String {
        format!(
            "SELECT toUInt64(sum(users)) FROM (SELECT uniqExact(user_id) AS users FROM {db}.pairs \
             WHERE segment = {seg} AND {time}) {NO_MERGE} FORMAT RowBinary",
            seg = quote_string(segment),
            time = ts_filter(after),
        )
    }

    /// [`count_all`] on a cluster, as [`count_per_shard`].
    pub fn count_all_per_shard(db: &str, after: Option<u32>) -> String {
        format!(
            "SELECT segment, toUInt64(sum(users)) FROM (SELECT segment, uniqExact(user_id) AS users \
             FROM {db}.pairs WHERE {time} GROUP BY segment) GROUP BY segment ORDER BY segment \
             {NO_MERGE} FORMAT RowBinary",
            time = ts_filter(after),
        )
    }

    /// Makes every shard of a cluster finish the aggregation over the Distributed table
    /// (`GROUP BY user_id` is complete on the user's shard) and send its rows as they are.
    pub const NO_MERGE: &str = "SETTINGS distributed_group_by_no_merge = 1";

    /// `sql` (ending with `FORMAT RowBinary`) with [`NO_MERGE`].
    pub fn no_merge(sql: &str) -> String {
        match sql.strip_suffix(" FORMAT RowBinary") {
            Some(q) => format!("{q} {NO_MERGE} FORMAT RowBinary"),
            None => format!("{sql} {NO_MERGE}"),
        }
    }

    /// `(segment String, users UInt64)` of every segment with live users, by segment.
    pub fn count_all(db: &str, after: Option<u32>) -> String {
        format!(
            "SELECT segment, toUInt64(uniqExact(user_id)) FROM {db}.pairs \
             WHERE {time} GROUP BY segment ORDER BY segment FORMAT RowBinary",
            time = ts_filter(after),
        )
    }

    /// The bit of each live row's segment among `names` (at most 64): bit `k` for
    /// `names[k]`, 0 for any other segment.
    fn segment_bit(names: &[&str]) -> String {
        let idx = format!("indexOf([{}], segment)", list(names));
        // idx is 1-based, 0 when absent: (idx + 63) % 64 is idx - 1 without underflow, and
        // the shifted value is 0 for an absent segment.
        format!("bitShiftLeft(toUInt64({idx} > 0), ({idx} + 63) % 64)")
    }

    /// Appends the alias definitions that evaluate `e` on a user's segment mask `m` (bit `k` =
    /// member of `names[k]`), one node per alias, and returns the alias of `e`. Every alias is a
    /// single function of earlier aliases, so the SQL text stays flat however deep the
    /// expression is nested (parsers limit the nesting depth they accept).
    fn compile(e: &Expr, names: &[&str], defs: &mut Vec<String>) -> String {
        let def = match e {
            Expr::Segment(s) => {
                let k = names.iter().position(|n| n == s).unwrap_or(0);
                format!("notEquals(bitAnd(m, {}), 0)", 1u64 << k)
            }
            Expr::Not(x) => format!("not({})", compile(x, names, defs)),
            Expr::And(v) | Expr::Or(v) => {
                let args: Vec<String> = v.iter().map(|x| compile(x, names, defs)).collect();
                let f = if matches!(e, Expr::And(_)) {
                    "and"
                } else {
                    "or"
                };
                format!("{f}({})", args.join(", "))
            }
        };
        let alias = format!("e{}", defs.len());
        defs.push(format!("{def} AS {alias}"));
        alias
    }

    /// One `UInt64`: the users `e` selects. Each live user's memberships among the segments of
    /// `e` become a bit mask `m` (one GROUP BY user over the rows of those segments), then `e`
    /// is evaluated on `m`. When `e` holds for a user in none of its segments (`NOT a`), the
    /// universe — every user with a live membership — takes part, so every live row is read.
    pub fn count_expr(db: &str, e: &Expr, after: Option<u32>) -> String {
        let names = e.segments();
        let mut defs = Vec::new();
        let root = compile(e, &names, &mut defs);
        let universe = e.matches(&|_| false);
        let rows = if universe {
            ts_filter(after)
        } else {
            format!("segment IN ({}) AND {}", list(&names), ts_filter(after))
        };
        format!(
            "SELECT toUInt64(countIf({root})) FROM (SELECT {defs} FROM \
             (SELECT groupBitOr({bit}) AS m FROM {db}.pairs WHERE {rows} GROUP BY user_id)) \
             FORMAT RowBinary",
            defs = defs.join(", "),
            bit = segment_bit(&names),
        )
    }

    /// `(i UInt8, j UInt8, users UInt64)` for `0 <= i <= j < names.len()`: the users in both
    /// `names[i]` and `names[j]`, pairs without users left out. Each live user's memberships
    /// among `names` become a mask `m` (as for expressions); users are counted by mask (a few
    /// thousand distinct masks for millions of users), and each mask's set bits `b` give the
    /// pairs it adds its count to. The answer is at most 64·65/2 rows whatever the data.
    pub fn overlap(db: &str, names: &[&str], after: Option<u32>) -> String {
        format!(
            "SELECT toUInt8(i), toUInt8(j), toUInt64(sum(c)) FROM \
             (SELECT i, arrayJoin(b) AS j, c FROM (SELECT arrayJoin(b) AS i, b, c FROM \
             (SELECT arrayFilter(k -> bitAnd(bitShiftRight(m, k), 1) = 1, range({n})) AS b, count() AS c FROM \
             (SELECT groupBitOr({bit}) AS m FROM {db}.pairs WHERE segment IN ({list}) AND {time} GROUP BY user_id) \
             GROUP BY m))) WHERE i <= j GROUP BY i, j FORMAT RowBinary",
            n = names.len(),
            bit = segment_bit(names),
            list = list(names),
            time = ts_filter(after),
        )
    }

    /// `(user_id String, last_seen UInt32)` of every live member of the segment, streamed.
    pub fn members(db: &str, segment: &str, after: Option<u32>) -> String {
        format!(
            "SELECT user_id, toUInt32(max(ts)) FROM {db}.pairs \
             WHERE segment = {seg} AND {time} GROUP BY user_id FORMAT RowBinary",
            seg = quote_string(segment),
            time = ts_filter(after),
        )
    }
}

/// `(user_id String, last_seen UInt32)` rows of an export.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemberRows {
    pub after: Option<u32>,
}

impl RowFormat for MemberRows {
    type Row = Member;
    const MAX_ROW_BYTES: usize = 10 + MAX_USER_ID_BYTES + 4;

    #[inline]
    fn split(&self, buf: &[u8]) -> Result<Option<(Member, usize)>, String> {
        let Some((user_id, pos)) = string_at(buf, 0, MAX_USER_ID_BYTES, "the user_id")? else {
            return Ok(None);
        };
        let Some(ts) = u32_at(buf, pos) else {
            return Ok(None);
        };
        let user_id = user_id_str(user_id)?;
        check_after(ts, self.after)?;
        Ok(Some((
            Member {
                user_id: user_id.to_owned(),
                last_seen: i64::from(ts),
            },
            pos + 4,
        )))
    }
}

impl ClickHouseStore {
    /// The live bound at `at` for a lookback of `within` (the window when `None`).
    fn live_since(&self, at: UnixSeconds, within: Option<Within>) -> Since {
        let lookback = within.map_or(self.window_secs(), |w| {
            i64::try_from(w.secs()).unwrap_or(i64::MAX)
        });
        since(at.saturating_sub(lookback))
    }

    async fn user_segments_query(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, ClickHouseError> {
        let after = match self.live_since(at, None) {
            Since::Never => return Ok(Vec::new()),
            Since::Always => None,
            Since::From(lo) => Some(lo),
        };
        let sql = sql::user_segments(self.db(), user_id, after);
        let (body, _) = self.timed_query(&sql, "user_segments", Mode::Exact).await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut out = Vec::new();
        while !r.is_empty() {
            let segment = r.string().map_err(ClickHouseError::Decode)?;
            let last_seen = i64::from(r.u32().map_err(ClickHouseError::Decode)?);
            out.push(Membership {
                segment,
                last_seen,
                expires_at: last_seen.saturating_add(self.window_secs()),
            });
        }
        out.sort_unstable_by(|a, b| a.segment.cmp(&b.segment));
        Ok(out)
    }

    async fn count_within_query(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, ClickHouseError> {
        let after = match self.live_since(at, within) {
            Since::Never => return Ok(0),
            Since::Always => None,
            Since::From(lo) => Some(lo),
        };
        let sql = if self.on_cluster() {
            sql::count_per_shard(self.db(), segment, after)
        } else {
            sql::count(self.db(), segment, after)
        };
        self.query_one(sql, "count", Mode::Exact).await
    }

    async fn count_all_within_query(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, ClickHouseError> {
        let after = match self.live_since(at, within) {
            Since::Never => return Ok(Vec::new()),
            Since::Always => None,
            Since::From(lo) => Some(lo),
        };
        let sql = if self.on_cluster() {
            sql::count_all_per_shard(self.db(), after)
        } else {
            sql::count_all(self.db(), after)
        };
        self.query_counts(sql, "count_all", Mode::Exact).await
    }

    async fn count_expr_query(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, ClickHouseError> {
        let after = match self.live_since(at, within) {
            Since::Never => return Ok(0),
            Since::Always => None,
            Since::From(lo) => Some(lo),
        };
        if expr.segments().len() > 64 {
            return Err(ClickHouseError::Unsupported(format!(
                "the expression names {} segments; at most 64 are supported",
                expr.segments().len()
            )));
        }
        let mut sql = sql::count_expr(self.db(), expr, after);
        if self.on_cluster() {
            sql = sql::no_merge(&sql);
        }
        self.query_one(sql, "count_expr", Mode::Exact).await
    }

    async fn overlap_query(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, ClickHouseError> {
        // The distinct names, and where each asked name is among them.
        let mut names: Vec<&str> = Vec::new();
        let index: Vec<usize> = segments
            .iter()
            .map(|s| match names.iter().position(|n| n == s) {
                Some(i) => i,
                None => {
                    names.push(s);
                    names.len() - 1
                }
            })
            .collect();
        if names.len() > 64 {
            return Err(ClickHouseError::Unsupported(format!(
                "an overlap of {} segments; at most 64 are supported",
                names.len()
            )));
        }
        let n = names.len();
        let mut both = vec![vec![0u64; n]; n];
        let after = match self.live_since(at, within) {
            Since::Never => None,
            Since::Always => Some(None),
            Since::From(lo) => Some(Some(lo)),
        };
        if let Some(after) = after {
            let mut sql = sql::overlap(self.db(), &names, after);
            if self.on_cluster() {
                sql = sql::no_merge(&sql);
            }
            let (body, _) = self.timed_query(&sql, "overlap", Mode::Exact).await?;
            let mut r = rowbinary::Reader::new(&body);
            while !r.is_empty() {
                let i = usize::from(r.u8().map_err(ClickHouseError::Decode)?);
                let j = usize::from(r.u8().map_err(ClickHouseError::Decode)?);
                let users = r.u64().map_err(ClickHouseError::Decode)?;
                if i >= n || j >= n {
                    return Err(ClickHouseError::Decode(format!(
                        "overlap returned segment indexes ({i}, {j}) outside 0..{n}"
                    )));
                }
                both[i][j] = users;
                both[j][i] = users;
            }
        }
        let both: Vec<Vec<u64>> = index
            .iter()
            .map(|&a| index.iter().map(|&b| both[a][b]).collect())
            .collect();
        Ok(Overlap {
            users: (0..index.len()).map(|k| both[k][k]).collect(),
            both,
        })
    }
}

fn analytics_error(op: &'static str) -> impl Fn(ClickHouseError) -> PortError {
    move |e| port_error(op, e)
}

#[async_trait]
impl SegmentAnalytics for ClickHouseStore {
    async fn user_segments(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, PortError> {
        self.user_segments_query(user_id, at)
            .await
            .map_err(analytics_error("user_segments"))
    }

    async fn count_within(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        self.count_within_query(segment, at, within)
            .await
            .map_err(analytics_error("count"))
    }

    async fn count_all_within(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        self.count_all_within_query(at, within)
            .await
            .map_err(analytics_error("count_all"))
    }

    async fn count_expr(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        self.count_expr_query(expr, at, within)
            .await
            .map_err(analytics_error("count_expr"))
    }

    async fn overlap(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, PortError> {
        self.overlap_query(segments, at, within)
            .await
            .map_err(analytics_error("overlap"))
    }

    async fn export_members(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: tokio::sync::mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let after = match self.live_since(at, within) {
            Since::Never => return Ok(0),
            Since::Always => None,
            Since::From(lo) => Some(lo),
        };
        let started = Instant::now();
        let mut sql = sql::members(self.db(), segment, after);
        if self.on_cluster() {
            sql = sql::no_merge(&sql);
        }
        let mut bytes = 0;
        let streamed = stream_rows(
            self.client(),
            &sql,
            MemberRows { after },
            chunk,
            &sink,
            &mut bytes,
        )
        .await;
        match streamed {
            Ok(done) => {
                metrics::counter!("userseg_clickhouse_export_rows_total").increment(done.rows);
                tracing::debug!(
                    database = %self.database(),
                    segment,
                    rows = done.rows,
                    bytes = done.bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "exported members"
                );
                Ok(done.rows)
            }
            Err(StreamError::Closed) => {
                tracing::debug!(
                    database = %self.database(),
                    segment,
                    bytes,
                    "member export stopped: the receiver was dropped"
                );
                Err(PortError::Transient("the export's receiver is gone".into()))
            }
            Err(StreamError::Malformed(message)) => {
                metrics::counter!("userseg_clickhouse_errors_total", "op" => "export", "kind" => "permanent")
                    .increment(1);
                tracing::error!(database = %self.database(), segment, bytes, error = %message, "member export failed");
                Err(PortError::Permanent(message))
            }
            Err(StreamError::Store(e)) => Err(port_error("export", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::rowbinary::{put_string, put_u32};
    use crate::rows::RowDecoder;

    fn e(q: &str) -> Expr {
        Expr::parse(q).unwrap()
    }

    #[test]
    fn lookups_and_counts_escape_their_names() {
        assert_eq!(
            sql::user_segments("`d`", "o'b\\", Some(7)),
            "SELECT segment, toUInt32(max(ts)) FROM `d`.pairs_by_user WHERE user_id = 'o\\'b\\\\' \
             AND ts > toDateTime(7) GROUP BY segment ORDER BY segment FORMAT RowBinary"
        );
        assert_eq!(
            sql::count("`d`", "x", None),
            "SELECT toUInt64(uniqExact(user_id)) FROM `d`.pairs WHERE segment = 'x' AND 1 FORMAT RowBinary"
        );
        assert_eq!(
            sql::members("`d`", "a'", Some(9)),
            "SELECT user_id, toUInt32(max(ts)) FROM `d`.pairs WHERE segment = 'a\\'' \
             AND ts > toDateTime(9) GROUP BY user_id FORMAT RowBinary"
        );
    }

    #[test]
    fn expressions_compile_to_flat_aliases() {
        let q = sql::count_expr("`d`", &e("a AND b AND NOT c"), Some(5));
        assert_eq!(
            q,
            "SELECT toUInt64(countIf(e4)) FROM (SELECT notEquals(bitAnd(m, 1), 0) AS e0, \
             notEquals(bitAnd(m, 2), 0) AS e1, notEquals(bitAnd(m, 4), 0) AS e2, not(e2) AS e3, \
             and(e0, e1, e3) AS e4 FROM (SELECT groupBitOr(bitShiftLeft(toUInt64(indexOf(['a', 'b', 'c'], segment) > 0), \
             (indexOf(['a', 'b', 'c'], segment) + 63) % 64)) AS m FROM `d`.pairs \
             WHERE segment IN ('a', 'b', 'c') AND ts > toDateTime(5) GROUP BY user_id)) FORMAT RowBinary"
        );
        // NOT a selects users outside a: every live row takes part.
        let q = sql::count_expr("`d`", &e("NOT a"), None);
        assert!(q.contains("FROM `d`.pairs WHERE 1 GROUP BY user_id"), "{q}");
        // A repeated name is one bit.
        let q = sql::count_expr("`d`", &e("a OR (b AND a)"), None);
        assert!(q.contains("indexOf(['a', 'b'], segment)"), "{q}");
        // 64 nested NOTs stay one level deep in the text.
        let deep = format!("{}a", "NOT ".repeat(63));
        let q = sql::count_expr("`d`", &e(&deep), None);
        assert!(!q.contains("not(not("), "{q}");
        assert!(q.contains("countIf(e63)"), "{q}");
        // The 64th distinct name gets the top bit.
        let wide: Vec<String> = (0..64).map(|i| format!("s{i}")).collect();
        let q = sql::count_expr("`d`", &e(&wide.join(" OR ")), None);
        assert!(q.contains(&format!("bitAnd(m, {})", 1u64 << 63)), "{q}");
    }

    #[test]
    fn overlap_counts_users_by_mask() {
        assert_eq!(
            sql::overlap("`d`", &["a", "b'"], Some(3)),
            "SELECT toUInt8(i), toUInt8(j), toUInt64(sum(c)) FROM (SELECT i, arrayJoin(b) AS j, c FROM \
             (SELECT arrayJoin(b) AS i, b, c FROM (SELECT arrayFilter(k -> bitAnd(bitShiftRight(m, k), 1) = 1, range(2)) AS b, \
             count() AS c FROM (SELECT groupBitOr(bitShiftLeft(toUInt64(indexOf(['a', 'b\\''], segment) > 0), \
             (indexOf(['a', 'b\\''], segment) + 63) % 64)) AS m FROM `d`.pairs WHERE segment IN ('a', 'b\\'') \
             AND ts > toDateTime(3) GROUP BY user_id) GROUP BY m))) WHERE i <= j GROUP BY i, j FORMAT RowBinary"
        );
    }

    #[test]
    fn member_rows_decode_across_chunks() {
        let mut body = Vec::new();
        let long = "é".repeat(128);
        for (u, ts) in [("u1", 10u32), (long.as_str(), 11), ("用户 '\\", 12)] {
            put_string(&mut body, u);
            put_u32(&mut body, ts);
        }
        for cut in 0..=body.len() {
            let mut d = RowDecoder::new(MemberRows { after: Some(9) });
            let mut out = Vec::new();
            for part in [&body[..cut], &body[cut..]] {
                let mut input = part;
                while let Some(m) = d.next_row(&mut input).unwrap() {
                    out.push(m);
                }
            }
            d.finish().unwrap();
            assert_eq!(out.len(), 3, "cut at {cut}");
            assert_eq!(out[1].user_id, long);
            assert_eq!(out[2].last_seen, 12);
        }
        // A ts at or before the bound cannot come from the export's query.
        let mut d = RowDecoder::new(MemberRows { after: Some(10) });
        let mut input = body.as_slice();
        assert!(d.next_row(&mut input).is_err());
        // Nor can an empty user id.
        let mut d = RowDecoder::new(MemberRows { after: None });
        let mut input: &[u8] = &[0, 1, 0, 0, 0];
        assert!(d.next_row(&mut input).is_err());
    }

    #[test]
    fn per_shard_forms_sum_the_shards() {
        assert_eq!(
            sql::count_per_shard("`d`", "a'", Some(9)),
            "SELECT toUInt64(sum(users)) FROM (SELECT uniqExact(user_id) AS users FROM `d`.pairs \
             WHERE segment = 'a\\'' AND ts > toDateTime(9)) \
             SETTINGS distributed_group_by_no_merge = 1 FORMAT RowBinary"
        );
        assert_eq!(
            sql::count_all_per_shard("`d`", None),
            "SELECT segment, toUInt64(sum(users)) FROM (SELECT segment, uniqExact(user_id) AS users \
             FROM `d`.pairs WHERE 1 GROUP BY segment) GROUP BY segment ORDER BY segment \
             SETTINGS distributed_group_by_no_merge = 1 FORMAT RowBinary"
        );
        assert_eq!(
            sql::no_merge("SELECT 1 FORMAT RowBinary"),
            "SELECT 1 SETTINGS distributed_group_by_no_merge = 1 FORMAT RowBinary"
        );
    }
}
