//! User deletion (the right to erasure) on ClickHouse.
//!
//! [`SegmentWriter::delete_users`](userseg_usecase::SegmentWriter::delete_users) returns only
//! once the users count nowhere, exactly or approximately, and their rows are gone from `pairs`:
//!
//! 0. the user ids go into a small table of their own, `delete_batch_<hash of the ids>`
//!    (`ENGINE = Log`), sent as RowBinary: no id ever appears in SQL text, and statements stay
//!    short whatever the ids (ClickHouse 18.16 takes seconds to analyse a literal list of
//!    10,000 ids, and a mutation's text, kept in its `mutation_*.txt` file, would keep the ids
//!    on disk long after the deletion);
//! 1. find the UTC days on which `pairs` holds rows of these users (none: nothing to delete);
//! 2. rebuild the `agg_day` sketches of those days without them: build the day's sketches from
//!    `pairs` (`user_id NOT IN (SELECT user_id FROM batch)`) into a staging table, swap the
//!    day's partition in with `ALTER TABLE agg_day REPLACE PARTITION … FROM` (atomic), then
//!    insert the same sketches once more straight into `agg_day`. The second insert catches
//!    pairs that other writers added to that day between the build and the swap (their
//!    view-made sketches were swapped out); sketches are unions, so it never inflates anything;
//! 3. delete the rows: `ALTER TABLE pairs DELETE WHERE user_id IN (SELECT user_id FROM
//!    batch)`, a mutation, and the same on `pairs_by_user` (the copy ordered by user), and wait
//!    until `system.mutations` reports every mutation of both done; then drop the batch table. A mutation rewrites only the parts that existed when it
//!    was issued, so pairs written after the call returned count again as usual.
//!
//! Each step is idempotent. A failure or a timeout is transient: the retry (same ids, same
//! batch table) finds the days again from the rows still present (the rebuild of step 2 always
//! ends before step 3 starts), and waits for a mutation still running instead of issuing a
//! second one when that removed the rows meanwhile. The batch table is dropped only once no
//! mutation of `pairs` or `pairs_by_user` is pending, since a running mutation reads it.

use std::time::{Duration, Instant};

use crate::client::{quote_string, rowbinary};
use crate::error::ClickHouseError;
use crate::store::ClickHouseStore;

/// How long a deletion waits for its mutation by default.
pub const DEFAULT_MUTATION_TIMEOUT: Duration = Duration::from_secs(600);

const DAY: i64 = 86_400;

/// The SQL of a deletion; `db` is the quoted database name, `batch` the name of the table
/// holding the ids.
pub(crate) mod sql {
    pub fn create_batch(db: &str, batch: &str) -> String {
        format!("CREATE TABLE IF NOT EXISTS {db}.{batch} (user_id String) ENGINE = Log")
    }

    pub fn insert_batch(db: &str, batch: &str) -> String {
        format!("INSERT INTO {db}.{batch} (user_id) FORMAT RowBinary")
    }

    pub fn count_batch(db: &str, batch: &str) -> String {
        format!("SELECT toUInt64(count()) FROM {db}.{batch} FORMAT RowBinary")
    }

    /// `UInt32` day numbers (Unix days) on which `pairs` holds rows of the users.
    pub fn days_of_users(db: &str, batch: &str) -> String {
        format!(
            "SELECT DISTINCT toUInt32(intDiv(toUInt32(ts), 86400)) FROM {db}.pairs \
             WHERE user_id IN (SELECT user_id FROM {db}.{batch}) FORMAT RowBinary"
        )
    }

    /// The sketches of one day's pairs, leaving the users out, into `table`.
    pub fn sketch_day_into(db: &str, table: &str, day_start: i64, batch: &str) -> String {
        format!(
            "INSERT INTO {db}.{table} (segment, bucket, users) \
             SELECT segment, toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket, \
             uniqCombinedState(user_id) AS users FROM {db}.pairs \
             WHERE ts >= toDateTime({day_start}) AND ts < toDateTime({next}) \
             AND user_id NOT IN (SELECT user_id FROM {db}.{batch}) GROUP BY segment, bucket",
            next = day_start + super::DAY,
        )
    }

    /// One `UInt64`: rows of the users in `table`.
    pub fn count_users(db: &str, table: &str, batch: &str) -> String {
        format!(
            "SELECT toUInt64(count()) FROM {db}.{table} \
             WHERE user_id IN (SELECT user_id FROM {db}.{batch}) FORMAT RowBinary"
        )
    }

    pub fn delete_rows(db: &str, table: &str, batch: &str) -> String {
        format!(
            "ALTER TABLE {db}.{table} DELETE WHERE user_id IN (SELECT user_id FROM {db}.{batch})"
        )
    }

    /// One `UInt64`: the mutations of `pairs` and `pairs_by_user` not yet done.
    pub fn pending_mutations(database: &str) -> String {
        format!(
            "SELECT toUInt64(count()) FROM system.mutations WHERE database = {} \
             AND table IN ('pairs', 'pairs_by_user') AND is_done = 0 FORMAT RowBinary",
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

/// The batch table's name: 96 bits of hash of the ids (FNV-1a 64 and CRC-32), the same for a
/// retry of the same deletion, distinct for different deletions.
pub(crate) fn batch_table(user_ids: &[String]) -> String {
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    let mut crc = crc32fast::Hasher::new();
    for u in user_ids {
        for &b in u.as_bytes().iter().chain(&[0u8]) {
            fnv = (fnv ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        crc.update(u.as_bytes());
        crc.update(&[0]);
    }
    format!("delete_batch_{fnv:016x}{:08x}", crc.finalize())
}

impl ClickHouseStore {
    /// See the module documentation.
    pub(crate) async fn delete_user_ids(&self, user_ids: &[String]) -> Result<(), ClickHouseError> {
        if user_ids.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let deadline = started + self.mutation_timeout;
        let batch = batch_table(user_ids);
        self.fill_batch(&batch, user_ids).await?;
        // A mutation left running by an earlier attempt that timed out: once it is done, do not
        // issue another (each rewrites the parts of its table) if it removed the rows. Asked
        // before the rows are looked for, so a mutation finishing in between is not missed.
        let pending = self.pending_mutations().await? > 0;
        let days = self.days_of_users(&batch).await?;
        let by_user = self.holds_users("pairs_by_user", &batch).await?;
        if !days.is_empty() {
            for &day in &days {
                self.rebuild_day_sketches(day, &batch).await?;
            }
        }
        if !days.is_empty() || by_user {
            let (in_pairs, in_by_user) = if pending {
                self.wait_mutations(deadline).await?;
                (
                    !self.days_of_users(&batch).await?.is_empty(),
                    self.holds_users("pairs_by_user", &batch).await?,
                )
            } else {
                (!days.is_empty(), by_user)
            };
            for (table, holds) in [("pairs", in_pairs), ("pairs_by_user", in_by_user)] {
                if holds {
                    self.client()
                        .execute(&sql::delete_rows(self.db(), table, &batch))
                        .await?;
                }
            }
        }
        // Always: no mutation may still read the batch table when it is dropped.
        self.wait_mutations(deadline).await?;
        self.client()
            .execute(&format!("DROP TABLE IF EXISTS {}.{batch}", self.db()))
            .await?;
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

    /// Makes sure the batch table holds exactly the ids (a retry finds it filled).
    async fn fill_batch(&self, batch: &str, user_ids: &[String]) -> Result<(), ClickHouseError> {
        let db = self.db();
        let client = self.client();
        client.execute(&sql::create_batch(db, batch)).await?;
        let held = self.scalar(&sql::count_batch(db, batch)).await?;
        if held == user_ids.len() as u64 {
            return Ok(());
        }
        if held > 0 {
            // A fill that failed half-way; no mutation was issued on it (that waits for a
            // complete fill), so it can go.
            client
                .execute(&format!("DROP TABLE IF EXISTS {db}.{batch}"))
                .await?;
            client.execute(&sql::create_batch(db, batch)).await?;
        }
        let mut body = Vec::with_capacity(user_ids.iter().map(|u| u.len() + 2).sum());
        for u in user_ids {
            rowbinary::put_string(&mut body, u);
        }
        client.insert(&sql::insert_batch(db, batch), body).await?;
        let held = self.scalar(&sql::count_batch(db, batch)).await?;
        if held != user_ids.len() as u64 {
            return Err(ClickHouseError::Decode(format!(
                "the deletion table {batch} holds {held} ids, not {}",
                user_ids.len()
            )));
        }
        Ok(())
    }

    async fn scalar(&self, sql: &str) -> Result<u64, ClickHouseError> {
        let body = self.client().query(sql).await?;
        rowbinary::Reader::new(&body)
            .u64()
            .map_err(ClickHouseError::Decode)
    }

    async fn holds_users(&self, table: &str, batch: &str) -> Result<bool, ClickHouseError> {
        Ok(self
            .scalar(&sql::count_users(self.db(), table, batch))
            .await?
            > 0)
    }

    async fn days_of_users(&self, batch: &str) -> Result<Vec<i64>, ClickHouseError> {
        let body = self
            .client()
            .query(&sql::days_of_users(self.db(), batch))
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
    async fn rebuild_day_sketches(&self, day: i64, batch: &str) -> Result<(), ClickHouseError> {
        let db = self.db();
        let stage = format!("{batch}_sketches_{day}");
        let client = self.client();
        client
            .execute(&format!("DROP TABLE IF EXISTS {db}.{stage}"))
            .await?;
        client
            .execute(&format!("CREATE TABLE {db}.{stage} AS {db}.agg_day"))
            .await?;
        let swapped = async {
            client
                .execute(&sql::sketch_day_into(db, &stage, day * DAY, batch))
                .await?;
            let partition = quote_string(&partition_id(day));
            let parts = self
                .scalar(&format!(
                    "SELECT toUInt64(count()) FROM system.parts WHERE database = {} \
                     AND table = {} AND active FORMAT RowBinary",
                    quote_string(self.database()),
                    quote_string(&stage)
                ))
                .await?;
            if parts > 0 {
                client
                    .execute(&format!(
                        "ALTER TABLE {db}.agg_day REPLACE PARTITION ID {partition} FROM {db}.{stage}"
                    ))
                    .await?;
            } else {
                // Nobody else had pairs that day.
                client
                    .execute(&format!(
                        "ALTER TABLE {db}.agg_day DROP PARTITION ID {partition}"
                    ))
                    .await?;
            }
            // Pairs other writers added meanwhile (see the module documentation).
            client
                .execute(&sql::sketch_day_into(db, "agg_day", day * DAY, batch))
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
        self.scalar(&sql::pending_mutations(self.database())).await
    }

    /// Polls `system.mutations` until no mutation of `pairs` or `pairs_by_user` is pending, or
    /// the deadline.
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
                    "{pending} mutation(s) of {}.pairs and pairs_by_user still running after {:?}; the deletion is retried",
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
    fn batch_tables_are_named_by_the_ids() {
        let a = batch_table(&["a".into(), "b".into()]);
        assert_eq!(a.len(), "delete_batch_".len() + 24);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_eq!(a, batch_table(&["a".into(), "b".into()]));
        assert_ne!(a, batch_table(&["ab".into()]));
        assert_ne!(a, batch_table(&["b".into(), "a".into()]));
    }

    #[test]
    fn statements_name_the_batch_table_not_the_ids() {
        assert_eq!(
            sql::delete_rows("`d`", "pairs", "delete_batch_x"),
            "ALTER TABLE `d`.pairs DELETE WHERE user_id IN (SELECT user_id FROM `d`.delete_batch_x)"
        );
        assert_eq!(
            sql::sketch_day_into("`d`", "agg_day", 86_400, "b"),
            "INSERT INTO `d`.agg_day (segment, bucket, users) SELECT segment, \
             toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket, \
             uniqCombinedState(user_id) AS users FROM `d`.pairs WHERE ts >= toDateTime(86400) \
             AND ts < toDateTime(172800) AND user_id NOT IN (SELECT user_id FROM `d`.b) GROUP BY segment, bucket"
        );
    }
}
