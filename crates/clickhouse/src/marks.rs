//! The distributed change feed's side of the store of record: [`ExitMarks`] on the
//! `change_marks` table (migration 5), and the memberships whose latest pair falls in a time
//! band, which a starting estimation service turns into the exits due while no ES ran.

use std::collections::BTreeMap;

use async_trait::async_trait;
use userseg_domain::{Pair, UnixSeconds};
use userseg_usecase::{ExitMarks, PortError};

use crate::client::rowbinary;
use crate::error::ClickHouseError;
use crate::store::{port_error, ClickHouseStore};

/// The SQL; `db` is the quoted database name.
pub(crate) mod sql {
    pub fn insert(db: &str) -> String {
        format!("INSERT INTO {db}.change_marks (partition, at) FORMAT RowBinary")
    }

    /// `(partition UInt32, at UInt32)`: each partition's latest mark.
    pub fn load(db: &str) -> String {
        format!(
            "SELECT partition, toUInt32(max(at)) FROM {db}.change_marks GROUP BY partition \
             ORDER BY partition FORMAT RowBinary"
        )
    }

    /// `(segment String, user_id String, ts UInt32)`: each membership with a pair in
    /// `(after, through]`, with its latest ts there.
    pub fn latest_in(db: &str, after: u32, through: u32) -> String {
        format!(
            "SELECT segment, user_id, toUInt32(max(ts)) FROM {db}.pairs \
             WHERE ts > toDateTime({after}) AND ts <= toDateTime({through}) \
             GROUP BY segment, user_id FORMAT RowBinary"
        )
    }
}

fn to_u32(t: UnixSeconds) -> u32 {
    u32::try_from(t.max(0)).unwrap_or(u32::MAX)
}

impl ClickHouseStore {
    /// Every membership with a pair whose ts is in `(after, through]`, as a pair carrying its
    /// latest ts in that band (a later pair outside the band is not looked at: the caller knows
    /// which memberships are live). Memory grows with the band's memberships.
    pub async fn latest_in(
        &self,
        after: UnixSeconds,
        through: UnixSeconds,
    ) -> Result<Vec<Pair>, PortError> {
        if through <= after {
            return Ok(Vec::new());
        }
        let sql = sql::latest_in(self.db(), to_u32(after), to_u32(through));
        let body = self
            .client()
            .query(&sql)
            .await
            .map_err(|e| port_error("reading the memberships of a time band", e))?;
        let mut r = rowbinary::Reader::new(&body);
        let mut out = Vec::new();
        while !r.is_empty() {
            let decode = |e: String| port_error("decoding a time band", ClickHouseError::Decode(e));
            let segment = r.string().map_err(decode)?;
            let user_id = r.string().map_err(decode)?;
            let ts = i64::from(r.u32().map_err(decode)?);
            out.push(Pair {
                user_id,
                segment,
                ts,
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl ExitMarks for ClickHouseStore {
    async fn load(&self) -> Result<BTreeMap<i32, UnixSeconds>, PortError> {
        let body = self
            .client()
            .query(&sql::load(self.db()))
            .await
            .map_err(|e| port_error("reading the exit marks", e))?;
        let mut r = rowbinary::Reader::new(&body);
        let mut out = BTreeMap::new();
        while !r.is_empty() {
            let decode =
                |e: String| port_error("decoding the exit marks", ClickHouseError::Decode(e));
            let partition = r.u32().map_err(decode)?;
            let at = r.u32().map_err(decode)?;
            if let Ok(p) = i32::try_from(partition) {
                out.insert(p, i64::from(at));
            }
        }
        Ok(out)
    }

    async fn save(&self, marks: &BTreeMap<i32, UnixSeconds>) -> Result<(), PortError> {
        let mut body = Vec::with_capacity(marks.len() * 8);
        for (p, at) in marks {
            let Ok(p) = u32::try_from(*p) else {
                continue;
            };
            rowbinary::put_u32(&mut body, p);
            rowbinary::put_u32(&mut body, to_u32(*at));
        }
        if body.is_empty() {
            return Ok(());
        }
        self.client()
            .insert(&sql::insert(self.db()), body)
            .await
            .map_err(|e| port_error("saving the exit marks", e))
    }
}
