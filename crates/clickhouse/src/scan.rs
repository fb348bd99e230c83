//! [`LiveScan`] over ClickHouse: streams the live rows of `pairs` as RowBinary and decodes them
//! incrementally (see [`crate::rows`]), so an index can bootstrap from a table of any size in
//! bounded memory.
//!
//! A body that is not rows of valid pairs (a segment name cannot hold a space, lengths are
//! bounded, every `ts` must be after the scan's bound), such as an exception ClickHouse appended
//! after it had started sending rows, or a body that ends inside a row, fails the scan instead
//! of returning partial data as if it were complete.

use std::time::Instant;

use async_trait::async_trait;
use userseg_domain::{Pair, UnixSeconds, MAX_SEGMENT_CHARS, MAX_USER_ID_BYTES};
use userseg_usecase::{LiveScan, PortError};

use crate::client::quote_ident;
use crate::rows::{
    check_after, segment_str, stream_rows, string_at, u32_at, user_id_str, RowFormat, StreamError,
};
use crate::store::ClickHouseStore;

/// The longest row a valid pair can encode to: two varint lengths (2 bytes each for these
/// limits, but a varint may take up to 10), the two strings, and the `DateTime` (UInt32).
const MAX_ROW_BYTES: usize = 10 + MAX_SEGMENT_CHARS + 10 + MAX_USER_ID_BYTES + 4;

/// The lower bound of live event times, as in the store: `ts > bound` is live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Since {
    /// Everything is live (the bound is before 1970).
    Always,
    /// Live iff ts is after this.
    After(u32),
    /// Nothing can be live (the bound is past DateTime's range, year 2106).
    Never,
}

fn since(bound: i64) -> Since {
    if bound <= 0 {
        Since::Always
    } else {
        u32::try_from(bound).map_or(Since::Never, Since::After)
    }
}

/// The `SELECT` of the scan, or `None` when nothing can be live.
fn scan_sql(db: &str, at: UnixSeconds, window_secs: i64) -> Option<String> {
    let filter = match since(at.saturating_sub(window_secs)) {
        Since::Never => return None,
        Since::Always => String::new(),
        Since::After(lo) => format!(" WHERE ts > toDateTime({lo})"),
    };
    Some(format!(
        "SELECT segment, user_id, ts FROM {db}.pairs{filter} FORMAT RowBinary"
    ))
}

/// `(segment String, user_id String, ts DateTime)` rows of valid pairs, each `ts` after `after`
/// when the scan has a bound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PairRows {
    pub after: Option<u32>,
}

impl RowFormat for PairRows {
    type Row = Pair;
    const MAX_ROW_BYTES: usize = MAX_ROW_BYTES;

    #[inline]
    fn split(&self, buf: &[u8]) -> Result<Option<(Pair, usize)>, String> {
        let Some((segment, pos)) = string_at(buf, 0, MAX_SEGMENT_CHARS, "the segment")? else {
            return Ok(None);
        };
        let Some((user_id, pos)) = string_at(buf, pos, MAX_USER_ID_BYTES, "the user_id")? else {
            return Ok(None);
        };
        let Some(ts) = u32_at(buf, pos) else {
            return Ok(None);
        };
        let segment = segment_str(segment)?;
        let user_id = user_id_str(user_id)?;
        check_after(ts, self.after)?;
        Ok(Some((
            Pair {
                user_id: user_id.to_owned(),
                segment: segment.to_owned(),
                ts: i64::from(ts),
            },
            pos + 4,
        )))
    }
}

#[async_trait]
impl LiveScan for ClickHouseStore {
    async fn scan_live(
        &self,
        at: UnixSeconds,
        chunk_pairs: usize,
        sink: tokio::sync::mpsc::Sender<Vec<Pair>>,
    ) -> Result<u64, PortError> {
        let started = Instant::now();
        let mut bytes = 0;
        let window_secs = i64::try_from(self.window().secs()).unwrap_or(i64::MAX);
        let Some(sql) = scan_sql(&quote_ident(self.database()), at, window_secs) else {
            return Ok(0);
        };
        let after = match since(at.saturating_sub(window_secs)) {
            Since::After(lo) => Some(lo),
            Since::Always | Since::Never => None,
        };
        let scanned = stream_rows(
            self.client(),
            &sql,
            PairRows { after },
            chunk_pairs,
            &sink,
            &mut bytes,
        )
        .await;
        match scanned {
            Ok(done) => {
                metrics::counter!("userseg_clickhouse_scan_rows_total").increment(done.rows);
                tracing::info!(
                    database = %self.database(),
                    at,
                    rows = done.rows,
                    bytes = done.bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "scanned live pairs"
                );
                Ok(done.rows)
            }
            Err(StreamError::Closed) => {
                tracing::info!(
                    database = %self.database(),
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "live pair scan stopped: the receiver was dropped"
                );
                Err(PortError::Transient("index closed".into()))
            }
            Err(StreamError::Malformed(message)) => {
                metrics::counter!("userseg_clickhouse_errors_total", "op" => "scan", "kind" => "permanent")
                    .increment(1);
                tracing::error!(database = %self.database(), bytes, error = %message, "live pair scan failed");
                Err(PortError::Permanent(message))
            }
            Err(StreamError::Store(e)) => {
                metrics::counter!("userseg_clickhouse_errors_total", "op" => "scan", "kind" => e.kind())
                    .increment(1);
                tracing::warn!(database = %self.database(), bytes, error = %e, kind = e.kind(), "live pair scan failed");
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::looks_like_exception;
    use crate::client::rowbinary::{put_string, put_u32};
    use crate::rows::{Malformed, RowDecoder};

    type PairDecoder = RowDecoder<PairRows>;

    fn encode(rows: &[(&str, &str, u32)]) -> Vec<u8> {
        let mut buf = Vec::new();
        for (segment, user, ts) in rows {
            put_string(&mut buf, segment);
            put_string(&mut buf, user);
            put_u32(&mut buf, *ts);
        }
        buf
    }

    fn pair(segment: &str, user: &str, ts: u32) -> Pair {
        Pair {
            user_id: user.into(),
            segment: segment.into(),
            ts: i64::from(ts),
        }
    }

    /// Feeds `chunks` in order and finishes; the pairs, or the first failure.
    fn decode(after: Option<u32>, chunks: &[&[u8]]) -> Result<Vec<Pair>, Malformed> {
        let mut d = PairDecoder::new(PairRows { after });
        let mut out = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while let Some(p) = d.next_row(&mut input)? {
                out.push(p);
            }
            assert!(input.is_empty());
        }
        d.finish()?;
        assert_eq!(d.rows(), out.len() as u64);
        Ok(out)
    }

    fn sample() -> (Vec<u8>, Vec<Pair>) {
        let long_user = "é".repeat(128); // 256 bytes: the longest user id, a 2-byte varint
        let long_segment = "s".repeat(MAX_SEGMENT_CHARS);
        let rows = [
            ("seg-1", "user-1", 1_700_000_001),
            ("a", "用户", 1_700_000_002),
            (long_segment.as_str(), long_user.as_str(), u32::MAX),
            ("x.y:z_-", "u", 1_700_000_003),
        ];
        let expected = rows.iter().map(|(s, u, t)| pair(s, u, *t)).collect();
        (encode(&rows), expected)
    }

    #[test]
    fn decodes_whole_bodies() {
        let (body, expected) = sample();
        assert_eq!(decode(Some(1_700_000_000), &[&body]).unwrap(), expected);
        assert_eq!(decode(None, &[&body]).unwrap(), expected);
        assert_eq!(decode(None, &[]).unwrap(), vec![]);
        assert_eq!(decode(None, &[&[], &[]]).unwrap(), vec![]);
    }

    #[test]
    fn rows_split_at_every_byte_boundary() {
        let (body, expected) = sample();
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(decode(None, &[a, b]).unwrap(), expected, "cut at {cut}");
        }
        // Two cuts: a row spread over three chunks, or a cut right after a carried row ends.
        for i in 0..=body.len() {
            for j in i..=body.len() {
                let chunks = [&body[..i], &body[i..j], &body[j..]];
                assert_eq!(decode(None, &chunks).unwrap(), expected, "cuts at {i}, {j}");
            }
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(decode(None, &bytes).unwrap(), expected);
    }

    #[test]
    fn a_truncated_body_is_an_error_at_every_cut() {
        let (body, _) = sample();
        let ends: Vec<usize> = {
            // Row boundaries: truncating there is undetectable, and legitimately complete.
            let mut d = PairDecoder::new(PairRows { after: None });
            let mut input = body.as_slice();
            let mut ends = vec![0];
            while d.next_row(&mut input).unwrap().is_some() {
                ends.push(body.len() - input.len());
            }
            ends
        };
        for cut in 0..body.len() {
            let r = decode(None, &[&body[..cut]]);
            if ends.contains(&cut) {
                assert!(r.is_ok(), "cut at row boundary {cut}");
            } else {
                let m = r.expect_err("truncated");
                assert!(m.reason.contains("ends inside a row"), "{}", m.reason);
            }
        }
    }

    #[test]
    fn an_appended_exception_is_recognised() {
        let (mut body, _) = sample();
        body.extend_from_slice(
            b"Code: 395, e.displayText() = DB::Exception: Value passed to 'throwIf' function is non zero, e.what() = DB::Exception\n",
        );
        for cut in 0..=body.len() {
            let m = decode(None, &[&body[..cut], &body[cut..]]).expect_err("garbled tail");
            assert_eq!(m.row, 4, "cut at {cut}");
            assert_eq!(looks_like_exception(&m.tail), Some(395), "cut at {cut}");
        }
        // Short texts end inside the "row" they seem to start.
        let mut short = encode(&[("s", "u", 5)]);
        short.extend_from_slice(b"Code: 241. DB::Exception: Memory limit exceeded");
        let m = decode(None, &[&short]).expect_err("short tail");
        assert_eq!(m.row, 1);
        assert!(m.reason.contains("ends inside a row"), "{}", m.reason);
        assert_eq!(looks_like_exception(&m.tail), Some(241));
    }

    #[test]
    fn garbage_is_an_error() {
        let ok = encode(&[("s", "u", 5)]);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (encode(&[("bad segment", "u", 5)]), "invalid segment"),
            (encode(&[("", "u", 5)]), "invalid segment"),
            (encode(&[("s", "", 5)]), "invalid user_id"),
            (encode(&[("s", "a\nb", 5)]), "invalid user_id"),
            (vec![1, 0xff, 1, b'u', 0, 0, 0, 0], "not utf-8"),
            (vec![1, b's', 1, 0xc3, 0, 0, 0, 0], "not utf-8"),
            (vec![129, 1], "more than the 128"),
            (vec![1, b's', 0x81, 0x02], "more than the 256"),
            (vec![0xff; 12], "longer than 10 bytes"),
        ];
        for (garbage, why) in cases {
            let mut body = ok.clone();
            body.extend_from_slice(&garbage);
            for cut in 0..=body.len() {
                let m = decode(None, &[&body[..cut], &body[cut..]]).expect_err(why);
                assert!(m.reason.contains(why), "{why}: {}", m.reason);
                assert_eq!((m.row, m.offset), (1, ok.len() as u64), "{why}");
                assert_eq!(looks_like_exception(&m.tail), None);
            }
        }
        // A ts at or before the bound cannot come from the scan's query.
        let m = decode(Some(5), &[&ok]).expect_err("old ts");
        assert!(
            m.reason.contains("not after the query's bound 5"),
            "{}",
            m.reason
        );
        assert!(decode(Some(4), &[&ok]).is_ok());
    }

    #[test]
    fn the_query_bounds_ts_like_the_counts() {
        let db = "`d`";
        assert_eq!(
            scan_sql(db, 1_000_000_100, 100).unwrap(),
            "SELECT segment, user_id, ts FROM `d`.pairs WHERE ts > toDateTime(1000000000) FORMAT RowBinary"
        );
        assert_eq!(
            scan_sql(db, 50, 100).unwrap(),
            "SELECT segment, user_id, ts FROM `d`.pairs FORMAT RowBinary"
        );
        assert_eq!(
            scan_sql(db, 100, 100).unwrap(),
            "SELECT segment, user_id, ts FROM `d`.pairs FORMAT RowBinary"
        );
        assert!(scan_sql(db, i64::from(u32::MAX) + 101, 100).is_none());
        assert!(scan_sql(db, i64::MAX, 100).is_none());
        assert!(scan_sql(db, i64::MIN, 100).is_some());
        assert_eq!(since(1), Since::After(1));
    }
}
