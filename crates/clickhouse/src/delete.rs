//! User deletion (the right to erasure) on ClickHouse.
//!
//! [`SegmentWriter::delete_users`](userseg_usecase::SegmentWriter::delete_users) returns only
//! once the users count nowhere, exactly or approximately, and their rows are gone from `pairs`:
//!
//! 1. find the UTC days on which `pairs` holds rows of these users (none: nothing to do);
//! 2. rebuild the `agg_day` sketches of those days without them: build the day's sketches from
//!    `pairs` (`user_id NOT IN …`) into a staging table, swap the day's partition in with
//!    `ALTER TABLE agg_day REPLACE PARTITION … FROM` (atomic), then insert the same sketches
//!    once more straight into `agg_day`. The second insert catches pairs that other writers
//!    added to that day between the build and the swap (their view-made sketches were swapped
//!    out); sketches are unions, so it never inflates anything;
//! 3. delete the rows: `ALTER TABLE pairs DELETE WHERE user_id IN (…)`, a mutation, and wait
//!    until `system.mutations` reports every mutation of `pairs` done. A mutation rewrites only
//!    the parts that existed when it was issued, so pairs written after the call returned count
//!    again as usual.
//!
//! Each step is idempotent. A failure or a timeout is transient: the retry finds the days
//! again from the rows still present (the rebuild of step 2 always ends before step 3 starts),
//! waits for a mutation still running instead of issuing a second one when it has removed the
//! rows meanwhile. Nothing of step 3 can be lost: rows are either still there (and found) or
//! gone.

use std::time::{Duration, Instant};

use crate::client::{quote_string, rowbinary};
use crate::error::ClickHouseError;
use crate::store::ClickHouseStore;

/// How long a deletion waits for its mutation by default.
pub const DEFAULT_MUTATION_TIMEOUT: Duration = Duration::from_secs(600);

const DAY: i64 = 86_400;

/// The SQL of a deletion; `db` is the quoted database name, `ids` the quoted, comma-separated
/// user ids.
pub(crate) mod sql {
    /// `UInt32` day numbers (Unix days) on which `pairs` holds rows of the users.
    pub fn days_of_users(db: &str, ids: &str) -> String {
        format!(
            "SELECT DISTINCT toUInt32(intDiv(toUInt32(ts), 86400)) FROM {db}.pairs \
             WHERE user_id IN ({ids}) FORMAT RowBinary"
        )
    }

    /// The sketches of one day's pairs, leaving the users out, into `table`.
    pub fn sketch_day_into(db: &str, table: &str, day_start: i64, ids: &str) -> String {
        format!(
            "INSERT INTO {db}.{table} (segment, bucket, users) \
             SELECT segment, toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket, \
             uniqCombinedState(user_id) AS users FROM {db}.pairs \
             WHERE ts >= toDateTime({day_start}) AND ts < toDateTime({next}) AND user_id NOT IN ({ids}) \
             GROUP BY segment, bucket",
            next = day_start + super::DAY,
        )
    }

    pub fn delete_rows(db: &str, ids: &str) -> String {
        format!("ALTER TABLE {db}.pairs DELETE WHERE user_id IN ({ids})")
    }

    /// One `UInt64`: the mutations of `pairs` not yet done.
    pub fn pending_mutations(database: &str) -> String {
        format!(
            "SELECT toUInt64(count()) FROM system.mutations \
             WHERE database = {} AND table = 'pairs' AND is_done = 0 FORMAT RowBinary",
            crate::client::quote_string(database)
        )
    }
}

/// `YYYYMMDD`, ClickHouse's partition id for a `toDate` partition, of a Unix day number.
pub(crate) fn partition_id(day: i64) -> String {
    // H. Hinnant's civil_from_days.
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}{m:02}{d:02}")
}

/// Settings for a statement holding a long list of literals: ClickHouse parses at most
/// `max_query_size` bytes of a query (256 KiB by default; 10,000 user ids take up to ~2.6 MB).
fn size_setting(sql_len: usize) -> String {
    (sql_len + 4096).max(262_144).to_string()
}

impl ClickHouseStore {
    /// See the module documentation.
    pub(crate) async fn delete_user_ids(&self, user_ids: &[String]) -> Result<(), ClickHouseError> {
        if user_ids.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + self.mutation_timeout;
        let ids = user_ids
            .iter()
            .map(|u| quote_string(u))
            .collect::<Vec<_>>()
            .join(", ");
        let days = self.days_of_users(&ids).await?;
        if days.is_empty() {
            tracing::debug!(database = %self.database(), users = user_ids.len(), "deleted users held no rows");
            return Ok(());
        }
        for &day in &days {
            self.rebuild_day_sketches(day, &ids, user_ids).await?;
        }
        // A mutation left running by an earlier attempt that timed out: let it finish, and do
        // not issue another (each rewrites the parts of the table) when it removed the rows.
        if self.pending_mutations().await? > 0 {
            self.wait_mutations(deadline).await?;
            if self.days_of_users(&ids).await?.is_empty() {
                return Ok(());
            }
        }
        let delete = sql::delete_rows(self.db(), &ids);
        let size = size_setting(delete.len());
        self.client()
            .execute_with(&delete, &[("max_query_size", size.as_str())])
            .await?;
        self.wait_mutations(deadline).await?;
        metrics::counter!("userseg_clickhouse_deleted_users_total")
            .increment(user_ids.len() as u64);
        metrics::histogram!("userseg_clickhouse_delete_seconds").record(started.elapsed());
        tracing::info!(
            database = %self.database(),
            users = user_ids.len(),
            days = days.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "deleted users"
        );
        Ok(())
    }

    async fn days_of_users(&self, ids: &str) -> Result<Vec<i64>, ClickHouseError> {
        let q = sql::days_of_users(self.db(), ids);
        let size = size_setting(q.len());
        let body = self
            .client()
            .query_with(&q, &[("max_query_size", size.as_str())])
            .await?;
        let mut r = rowbinary::Reader::new(&body);
        let mut days = Vec::new();
        while !r.is_empty() {
            days.push(i64::from(r.u32().map_err(ClickHouseError::Decode)?));
        }
        days.sort_unstable();
        Ok(days)
    }

    /// Replaces the `agg_day` partition of `day` by sketches of its pairs without the users.
    async fn rebuild_day_sketches(
        &self,
        day: i64,
        ids: &str,
        user_ids: &[String],
    ) -> Result<(), ClickHouseError> {
        let db = self.db();
        // One staging table per deletion (the same name when it is retried).
        let mut crc = crc32fast::Hasher::new();
        for u in user_ids {
            crc.update(u.as_bytes());
            crc.update(&[0]);
        }
        let stage = format!("agg_day_rebuild_{:08x}_{day}", crc.finalize());
        let client = self.client();
        let build = sql::sketch_day_into(db, &stage, day * DAY, ids);
        let size = size_setting(build.len());
        let settings = [("max_query_size", size.as_str())];
        client
            .execute(&format!("DROP TABLE IF EXISTS {db}.{stage}"))
            .await?;
        client
            .execute(&format!("CREATE TABLE {db}.{stage} AS {db}.agg_day"))
            .await?;
        let swapped = async {
            client.execute_with(&build, &settings).await?;
            let partition = quote_string(&partition_id(day));
            let body = client
                .query(&format!(
                    "SELECT toUInt64(count()) FROM system.parts WHERE database = {} \
                     AND table = {} AND active FORMAT RowBinary",
                    quote_string(self.database()),
                    quote_string(&stage)
                ))
                .await?;
            let parts = rowbinary::Reader::new(&body)
                .u64()
                .map_err(ClickHouseError::Decode)?;
            if parts > 0 {
                client
                    .execute(&format!(
                        "ALTER TABLE {db}.agg_day REPLACE PARTITION ID {partition} FROM {db}.{stage}"
                    ))
                    .await?;
            } else {
                // No one else had pairs that day.
                client
                    .execute(&format!(
                        "ALTER TABLE {db}.agg_day DROP PARTITION ID {partition}"
                    ))
                    .await?;
            }
            // Pairs other writers added meanwhile (see the module documentation).
            client
                .execute_with(&sql::sketch_day_into(db, "agg_day", day * DAY, ids), &settings)
                .await
        }
        .await;
        let dropped = client
            .execute(&format!("DROP TABLE IF EXISTS {db}.{stage}"))
            .await;
        swapped?;
        dropped
    }

    async fn pending_mutations(&self) -> Result<u64, ClickHouseError> {
        let body = self
            .client()
            .query(&sql::pending_mutations(self.database()))
            .await?;
        rowbinary::Reader::new(&body)
            .u64()
            .map_err(ClickHouseError::Decode)
    }

    /// Polls `system.mutations` until no mutation of `pairs` is pending, or the deadline.
    async fn wait_mutations(&self, deadline: Instant) -> Result<(), ClickHouseError> {
        let mut pause = Duration::from_millis(5);
        loop {
            let pending = self.pending_mutations().await?;
            if pending == 0 {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ClickHouseError::MutationTimeout(format!(
                    "{pending} mutation(s) of {}.pairs still running after {:?}; the deletion is retried",
                    self.database(),
                    self.mutation_timeout
                )));
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ids_are_utc_dates() {
        assert_eq!(partition_id(0), "19700101");
        assert_eq!(partition_id(1_763_942_400 / DAY), "20251124");
        assert_eq!(partition_id(1_709_164_800 / DAY), "20240229");
        assert_eq!(partition_id(i64::from(u32::MAX) / DAY), "21060207");
    }

    #[test]
    fn statements() {
        assert_eq!(
            sql::delete_rows("`d`", "'a', 'b\\''"),
            "ALTER TABLE `d`.pairs DELETE WHERE user_id IN ('a', 'b\\'')"
        );
        assert_eq!(
            sql::sketch_day_into("`d`", "agg_day", 86_400, "'a'"),
            "INSERT INTO `d`.agg_day (segment, bucket, users) SELECT segment, \
             toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket, \
             uniqCombinedState(user_id) AS users FROM `d`.pairs WHERE ts >= toDateTime(86400) \
             AND ts < toDateTime(172800) AND user_id NOT IN ('a') GROUP BY segment, bucket"
        );
        assert_eq!(size_setting(10), "262144");
        assert_eq!(size_setting(1_000_000), "1004096");
    }
}
