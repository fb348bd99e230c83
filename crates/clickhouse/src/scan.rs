//! [`LiveScan`] over ClickHouse: streams the live rows of `pairs` as RowBinary and decodes them
//! incrementally, so an index can bootstrap from a table of any size in bounded memory.
//!
//! ClickHouse answers `200 OK` as soon as the first rows are ready; a failure after that (memory
//! limit, a killed query) can only show as `Code: NNN, e.displayText() = DB::Exception: ...`
//! appended to the rows. Such text, or any other garbage, does not decode as rows of valid pairs
//! (a segment name cannot hold a space, lengths are bounded, every `ts` must be after the scan's
//! bound), and a body that ends inside a row is truncated: either way the scan fails instead of
//! returning partial data as if it were complete.

use std::time::Instant;

use async_trait::async_trait;
use userseg_domain::{
    validate_segment, validate_user_id, Pair, UnixSeconds, MAX_SEGMENT_CHARS, MAX_USER_ID_BYTES,
};
use userseg_usecase::{LiveScan, PortError};

use crate::client::{looks_like_exception, quote_ident, ResponseStream};
use crate::error::ClickHouseError;
use crate::store::ClickHouseStore;

/// The longest row a valid pair can encode to: two varint lengths (2 bytes each for these
/// limits, but a varint may take up to 10), the two strings, and the `DateTime` (UInt32).
const MAX_ROW_BYTES: usize = 10 + MAX_SEGMENT_CHARS + 10 + MAX_USER_ID_BYTES + 4;
/// How much of a body that fails to decode is read and kept to explain the failure.
const MAX_TAIL_BYTES: usize = 4096;
/// The longest part of a failing body quoted in an error message.
const MAX_QUOTED_BYTES: usize = 2048;
/// Cap on the capacity reserved up front for one chunk, whatever `chunk_pairs` says.
const MAX_CHUNK_RESERVE: usize = 65_536;

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

/// A body that does not decode as rows of valid pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Malformed {
    /// Index of the row that fails (how many rows decoded before it).
    pub row: u64,
    /// Byte offset of that row in the body.
    pub offset: u64,
    pub reason: String,
    /// The body from the start of that row on, as much of it as was at hand (at most
    /// [`MAX_TAIL_BYTES`]).
    pub tail: Vec<u8>,
}

/// One row, borrowed from the buffer it was split off.
struct RawRow<'a> {
    segment: &'a [u8],
    user_id: &'a [u8],
    ts: u32,
    len: usize,
}

/// Reads a varint at `pos`: `Ok(None)` when `buf` ends first.
#[inline]
fn varint(buf: &[u8], pos: usize) -> Result<Option<(u64, usize)>, String> {
    // Lengths here are below 128 nearly always: one byte.
    match buf.get(pos) {
        None => return Ok(None),
        Some(&b) if b < 0x80 => return Ok(Some((u64::from(b), pos + 1))),
        Some(_) => {}
    }
    let mut v = 0u64;
    for (i, shift) in (0..64).step_by(7).enumerate() {
        let Some(&b) = buf.get(pos + i) else {
            return Ok(None);
        };
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(Some((v, pos + i + 1)));
        }
    }
    Err("a string length (varint) is longer than 10 bytes".into())
}

/// Reads a length-prefixed string at `pos` of at most `max` bytes: `Ok(None)` when `buf` ends
/// first. A longer length fails at once, so a garbled length never makes the decoder wait for
/// (and buffer) megabytes.
#[inline]
fn string_at<'a>(
    buf: &'a [u8],
    pos: usize,
    max: usize,
    what: &str,
) -> Result<Option<(&'a [u8], usize)>, String> {
    let Some((len, start)) = varint(buf, pos)? else {
        return Ok(None);
    };
    if len > max as u64 {
        return Err(format!(
            "{what} is {len} bytes long, more than the {max} a stored pair can have"
        ));
    }
    // len <= max, so it fits usize and the sum cannot overflow.
    let end = start + len as usize;
    Ok(buf.get(start..end).map(|s| (s, end)))
}

/// Splits one `(segment String, user_id String, ts DateTime)` row off the front of `buf`:
/// `Ok(None)` when `buf` holds only part of it.
#[inline]
fn split_row(buf: &[u8]) -> Result<Option<RawRow<'_>>, String> {
    let Some((segment, pos)) = string_at(buf, 0, MAX_SEGMENT_CHARS, "the segment")? else {
        return Ok(None);
    };
    let Some((user_id, pos)) = string_at(buf, pos, MAX_USER_ID_BYTES, "the user_id")? else {
        return Ok(None);
    };
    let Some(ts) = buf.get(pos..pos + 4) else {
        return Ok(None);
    };
    let ts = u32::from_le_bytes([ts[0], ts[1], ts[2], ts[3]]);
    Ok(Some(RawRow {
        segment,
        user_id,
        ts,
        len: pos + 4,
    }))
}

/// Turns a row into a pair, checking what every stored pair satisfies: UTF-8 strings, a valid
/// segment name and user id, and (when the scan has a bound) a `ts` after it.
#[inline]
fn to_pair(raw: &RawRow<'_>, after: Option<u32>) -> Result<Pair, String> {
    let segment =
        std::str::from_utf8(raw.segment).map_err(|e| format!("the segment is not utf-8: {e}"))?;
    // Nearly every name passes this subset of the domain's rule, which is quicker to check; the
    // rest get the full check (and its message).
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
    if raw.segment.is_empty() || !raw.segment.iter().all(plain) {
        validate_segment(segment).map_err(|e| format!("invalid segment {segment:?}: {e}"))?;
    }
    let user_id =
        std::str::from_utf8(raw.user_id).map_err(|e| format!("the user_id is not utf-8: {e}"))?;
    validate_user_id(user_id).map_err(|e| format!("invalid user_id {user_id:?}: {e}"))?;
    if let Some(lo) = after {
        if raw.ts <= lo {
            return Err(format!("ts {} is not after the scan's bound {lo}", raw.ts));
        }
    }
    Ok(Pair {
        user_id: user_id.to_owned(),
        segment: segment.to_owned(),
        ts: i64::from(raw.ts),
    })
}

/// Decodes a RowBinary body of `(segment, user_id, ts)` rows fed in chunks of any size, cut
/// anywhere. Only a row split between two chunks is copied (into a buffer of at most
/// [`MAX_ROW_BYTES`] that is reused); every other row is decoded in place.
#[derive(Debug, Default)]
pub(crate) struct PairDecoder {
    /// The start of a row that the previous chunk ended inside.
    carry: Vec<u8>,
    /// Every decoded ts must be after this.
    after: Option<u32>,
    rows: u64,
    /// Offset in the body of the next row.
    offset: u64,
}

impl PairDecoder {
    /// A decoder that also checks that every `ts` is after `after`.
    pub(crate) fn new(after: Option<u32>) -> Self {
        PairDecoder {
            carry: Vec::with_capacity(MAX_ROW_BYTES),
            after,
            rows: 0,
            offset: 0,
        }
    }

    /// Rows decoded so far.
    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    fn malformed(&self, reason: String, head: &[u8], rest: &[u8]) -> Malformed {
        let mut tail = Vec::with_capacity((head.len() + rest.len()).min(MAX_TAIL_BYTES));
        tail.extend_from_slice(&head[..head.len().min(MAX_TAIL_BYTES)]);
        let room = MAX_TAIL_BYTES - tail.len();
        tail.extend_from_slice(&rest[..rest.len().min(room)]);
        Malformed {
            row: self.rows,
            offset: self.offset,
            reason,
            tail,
        }
    }

    /// Decodes the next pair from `input` (the unread part of the current chunk), advancing it.
    /// `Ok(None)` once `input` is used up; a row cut at its end is kept for the next chunk.
    #[inline]
    pub(crate) fn next_pair(&mut self, input: &mut &[u8]) -> Result<Option<Pair>, Malformed> {
        if !self.carry.is_empty() {
            return self.next_pair_carried(input);
        }
        let buf = *input;
        if buf.is_empty() {
            return Ok(None);
        }
        match split_row(buf) {
            Ok(Some(raw)) => match to_pair(&raw, self.after) {
                Ok(pair) => {
                    *input = &buf[raw.len..];
                    self.rows += 1;
                    self.offset += raw.len as u64;
                    Ok(Some(pair))
                }
                Err(reason) => Err(self.malformed(reason, buf, &[])),
            },
            Ok(None) => {
                self.carry.extend_from_slice(buf);
                *input = &[];
                Ok(None)
            }
            Err(reason) => Err(self.malformed(reason, buf, &[])),
        }
    }

    /// Completes the row the previous chunk ended inside.
    #[cold]
    fn next_pair_carried(&mut self, input: &mut &[u8]) -> Result<Option<Pair>, Malformed> {
        let buf = *input;
        let held = self.carry.len();
        // A valid row is at most MAX_ROW_BYTES long, and the carry is a strict prefix of one.
        let take = buf.len().min(MAX_ROW_BYTES.saturating_sub(held));
        self.carry.extend_from_slice(&buf[..take]);
        match split_row(&self.carry) {
            Ok(Some(raw)) => match to_pair(&raw, self.after) {
                Ok(pair) => {
                    // The row ends past what was held before this chunk: it was incomplete.
                    let used = raw.len - held;
                    *input = &buf[used..];
                    self.rows += 1;
                    self.offset += raw.len as u64;
                    self.carry.clear();
                    Ok(Some(pair))
                }
                Err(reason) => Err(self.malformed(reason, &self.carry, &buf[take..])),
            },
            Ok(None) if take == buf.len() => {
                *input = &[];
                Ok(None)
            }
            Ok(None) => Err(self.malformed(
                format!("a row is longer than {MAX_ROW_BYTES} bytes"),
                &self.carry,
                &buf[take..],
            )),
            Err(reason) => Err(self.malformed(reason, &self.carry, &buf[take..])),
        }
    }

    /// Checks that the body did not end inside a row.
    pub(crate) fn finish(&self) -> Result<(), Malformed> {
        if self.carry.is_empty() {
            Ok(())
        } else {
            Err(self.malformed(
                format!(
                    "the body ends inside a row ({} bytes of it arrived)",
                    self.carry.len()
                ),
                &self.carry,
                &[],
            ))
        }
    }
}

/// Quotes bytes of a body for an error message: printable ASCII as is, other bytes as `\xNN`,
/// at most `max` bytes of them.
fn quote_bytes(bytes: &[u8], max: usize) -> String {
    let cut = bytes.len().min(max);
    let mut s = String::with_capacity(cut + 3);
    for &b in &bytes[..cut] {
        if (0x20..0x7f).contains(&b) {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    if cut < bytes.len() {
        s.push_str("...");
    }
    s
}

/// The text of an exception appended to a body: as UTF-8 (lossy), control characters (a
/// stack trace's line breaks) as spaces, at most [`MAX_QUOTED_BYTES`].
fn exception_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len().min(MAX_QUOTED_BYTES) + 3);
    for c in text.trim().chars() {
        if out.len() + c.len_utf8() > MAX_QUOTED_BYTES {
            out.push_str("...");
            break;
        }
        out.push(if c.is_control() { ' ' } else { c });
    }
    out
}

/// Why a scan stopped early.
enum ScanError {
    /// ClickHouse is unreachable, answered an error, or reported one in the middle of the body.
    Store(ClickHouseError),
    /// The body is not rows of valid pairs.
    Malformed(String),
    /// The receiver was dropped.
    Closed,
}

impl From<ClickHouseError> for ScanError {
    fn from(e: ClickHouseError) -> Self {
        ScanError::Store(e)
    }
}

/// Counts of a finished scan.
struct Scanned {
    rows: u64,
    bytes: u64,
}

impl ClickHouseStore {
    async fn scan(
        &self,
        at: UnixSeconds,
        chunk_pairs: usize,
        sink: &tokio::sync::mpsc::Sender<Vec<Pair>>,
        body_bytes: &mut u64,
    ) -> Result<Scanned, ScanError> {
        let window_secs = i64::try_from(self.window().secs()).unwrap_or(i64::MAX);
        let Some(sql) = scan_sql(&quote_ident(self.database()), at, window_secs) else {
            return Ok(Scanned { rows: 0, bytes: 0 });
        };
        let after = match since(at.saturating_sub(window_secs)) {
            Since::After(lo) => Some(lo),
            Since::Always | Since::Never => None,
        };
        let chunk_pairs = chunk_pairs.max(1);
        let new_chunk = || Vec::with_capacity(chunk_pairs.min(MAX_CHUNK_RESERVE));
        let mut body = self.client().query_stream(&sql).await?;
        let mut decoder = PairDecoder::new(after);
        let mut chunk = new_chunk();
        let mut sent = 0u64;
        loop {
            *body_bytes = body.bytes_read();
            let Some(data) = body.next_chunk().await? else {
                break;
            };
            let mut input: &[u8] = &data;
            loop {
                match decoder.next_pair(&mut input) {
                    Ok(Some(pair)) => {
                        chunk.push(pair);
                        if chunk.len() >= chunk_pairs {
                            sent += send(sink, std::mem::replace(&mut chunk, new_chunk())).await?;
                        }
                    }
                    Ok(None) => break,
                    Err(m) => return Err(explain(m, &mut body).await),
                }
            }
        }
        *body_bytes = body.bytes_read();
        if let Err(m) = decoder.finish() {
            return Err(explain(m, &mut body).await);
        }
        if !chunk.is_empty() {
            sent += send(sink, chunk).await?;
        }
        debug_assert_eq!(sent, decoder.rows());
        Ok(Scanned {
            rows: sent,
            bytes: body.bytes_read(),
        })
    }
}

async fn send(
    sink: &tokio::sync::mpsc::Sender<Vec<Pair>>,
    chunk: Vec<Pair>,
) -> Result<u64, ScanError> {
    let n = chunk.len() as u64;
    sink.send(chunk).await.map_err(|_| ScanError::Closed)?;
    metrics::counter!("userseg_clickhouse_scan_rows_total").increment(n);
    Ok(n)
}

/// Turns a decoding failure into the error to report: the exception ClickHouse appended to the
/// body when there is one (read a little further to get its whole text), else a malformed body.
async fn explain(mut m: Malformed, body: &mut ResponseStream) -> ScanError {
    while m.tail.len() < MAX_TAIL_BYTES {
        match body.next_chunk().await {
            Ok(Some(more)) => {
                let room = MAX_TAIL_BYTES - m.tail.len();
                m.tail.extend_from_slice(&more[..more.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    if let Some(code) = looks_like_exception(&m.tail) {
        let at = m.tail.windows(6).position(|w| w == b"Code: ").unwrap_or(0);
        return ScanError::Store(ClickHouseError::Server {
            status: 200,
            code: Some(code),
            message: format!(
                "the scan failed after {} rows: {}",
                m.row,
                exception_text(&m.tail[at..])
            ),
        });
    }
    ScanError::Malformed(format!(
        "malformed RowBinary from clickhouse at row {} (byte {} of the body): {}; the body there: \"{}\"",
        m.row,
        m.offset,
        m.reason,
        quote_bytes(&m.tail, 64)
    ))
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
        match self.scan(at, chunk_pairs, &sink, &mut bytes).await {
            Ok(done) => {
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
            Err(ScanError::Closed) => {
                tracing::info!(
                    database = %self.database(),
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "live pair scan stopped: the receiver was dropped"
                );
                Err(PortError::Transient("index closed".into()))
            }
            Err(ScanError::Malformed(message)) => {
                metrics::counter!("userseg_clickhouse_errors_total", "op" => "scan", "kind" => "permanent")
                    .increment(1);
                tracing::error!(database = %self.database(), bytes, error = %message, "live pair scan failed");
                Err(PortError::Permanent(message))
            }
            Err(ScanError::Store(e)) => {
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
    use crate::client::rowbinary::{put_string, put_u32};

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
        let mut d = PairDecoder::new(after);
        let mut out = Vec::new();
        for chunk in chunks {
            let mut input = *chunk;
            while let Some(p) = d.next_pair(&mut input)? {
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
            let mut d = PairDecoder::new(None);
            let mut input = body.as_slice();
            let mut ends = vec![0];
            while d.next_pair(&mut input).unwrap().is_some() {
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
            m.reason.contains("not after the scan's bound 5"),
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

    #[test]
    fn quoting_escapes_and_cuts() {
        assert_eq!(quote_bytes(b"a'b\n\xff", 10), "a'b\\x0a\\xff");
        assert_eq!(quote_bytes(b"abcdef", 3), "abc...");
        assert_eq!(
            exception_text(b"Code: 1. DB::Exception: x\n0. trace\n"),
            "Code: 1. DB::Exception: x 0. trace"
        );
        let long = exception_text(&[b'a'; MAX_QUOTED_BYTES + 1]);
        assert!(long.ends_with("...") && long.len() == MAX_QUOTED_BYTES + 3);
    }
}
