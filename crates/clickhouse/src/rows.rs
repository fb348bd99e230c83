//! Streamed RowBinary reads: an incremental decoder for rows fed in network chunks cut anywhere,
//! and the loop that streams a query's rows into a bounded channel in chunks.
//!
//! ClickHouse answers `200 OK` as soon as the first rows are ready; a failure after that (memory
//! limit, a killed query) can only show as `Code: NNN, e.displayText() = DB::Exception: ...`
//! appended to the rows. Every [`RowFormat`] checks what a valid row satisfies (UTF-8, valid
//! names and ids, bounded lengths, times after the query's bound), so such text, or any other
//! garbage, does not decode; and a body that ends inside a row is truncated. Either way the
//! stream fails instead of returning partial data as if it were complete.

use userseg_domain::{validate_segment, validate_user_id};

use crate::client::{looks_like_exception, ClickHouseClient, ResponseStream};
use crate::error::ClickHouseError;

/// How much of a body that fails to decode is read and kept to explain the failure.
pub(crate) const MAX_TAIL_BYTES: usize = 4096;
/// The longest part of a failing body quoted in an error message.
const MAX_QUOTED_BYTES: usize = 2048;
/// Cap on the capacity reserved up front for one chunk, whatever the caller's chunk size says.
const MAX_CHUNK_RESERVE: usize = 65_536;

/// The shape of the rows of one streamed query.
pub(crate) trait RowFormat {
    type Row;
    /// The longest encoding of a valid row.
    const MAX_ROW_BYTES: usize;
    /// Splits one row off the front of `buf`: `Ok(Some((row, bytes used)))`, `Ok(None)` when
    /// `buf` holds only part of a row, `Err(why)` when the bytes are not a valid row.
    fn split(&self, buf: &[u8]) -> Result<Option<(Self::Row, usize)>, String>;
}

/// A body that does not decode as valid rows.
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

/// Reads a varint at `pos`: `Ok(None)` when `buf` ends first.
#[inline]
pub(crate) fn varint(buf: &[u8], pos: usize) -> Result<Option<(u64, usize)>, String> {
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
pub(crate) fn string_at<'a>(
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

/// Reads a little-endian `UInt32` (a `DateTime`) at `pos`: `None` when `buf` ends first.
#[inline]
pub(crate) fn u32_at(buf: &[u8], pos: usize) -> Option<u32> {
    let b = buf.get(pos..pos + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// A segment name as stored: UTF-8 and valid.
#[inline]
pub(crate) fn segment_str(raw: &[u8]) -> Result<&str, String> {
    let segment = std::str::from_utf8(raw).map_err(|e| format!("the segment is not utf-8: {e}"))?;
    // Nearly every name passes this subset of the domain's rule, which is quicker to check; the
    // rest get the full check (and its message).
    let plain = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-');
    if raw.is_empty() || !raw.iter().all(plain) {
        validate_segment(segment).map_err(|e| format!("invalid segment {segment:?}: {e}"))?;
    }
    Ok(segment)
}

/// A user id as stored: UTF-8 and valid.
#[inline]
pub(crate) fn user_id_str(raw: &[u8]) -> Result<&str, String> {
    let user_id = std::str::from_utf8(raw).map_err(|e| format!("the user_id is not utf-8: {e}"))?;
    validate_user_id(user_id).map_err(|e| format!("invalid user_id {user_id:?}: {e}"))?;
    Ok(user_id)
}

/// Checks a decoded time against the query's bound (`ts > after`).
#[inline]
pub(crate) fn check_after(ts: u32, after: Option<u32>) -> Result<(), String> {
    match after {
        Some(lo) if ts <= lo => Err(format!("ts {ts} is not after the query's bound {lo}")),
        _ => Ok(()),
    }
}

/// Decodes a RowBinary body of `F`'s rows fed in chunks of any size, cut anywhere. Only a row
/// split between two chunks is copied (into a buffer of at most `F::MAX_ROW_BYTES` that is
/// reused); every other row is decoded in place.
#[derive(Debug)]
pub(crate) struct RowDecoder<F> {
    format: F,
    /// The start of a row that the previous chunk ended inside.
    carry: Vec<u8>,
    rows: u64,
    /// Offset in the body of the next row.
    offset: u64,
}

impl<F: RowFormat> RowDecoder<F> {
    pub(crate) fn new(format: F) -> Self {
        RowDecoder {
            format,
            carry: Vec::with_capacity(F::MAX_ROW_BYTES),
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

    /// Decodes the next row from `input` (the unread part of the current chunk), advancing it.
    /// `Ok(None)` once `input` is used up; a row cut at its end is kept for the next chunk.
    #[inline]
    pub(crate) fn next_row(&mut self, input: &mut &[u8]) -> Result<Option<F::Row>, Malformed> {
        if !self.carry.is_empty() {
            return self.next_row_carried(input);
        }
        let buf = *input;
        if buf.is_empty() {
            return Ok(None);
        }
        match self.format.split(buf) {
            Ok(Some((row, len))) => {
                *input = &buf[len..];
                self.rows += 1;
                self.offset += len as u64;
                Ok(Some(row))
            }
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
    fn next_row_carried(&mut self, input: &mut &[u8]) -> Result<Option<F::Row>, Malformed> {
        let buf = *input;
        let held = self.carry.len();
        // A valid row is at most MAX_ROW_BYTES long, and the carry is a strict prefix of one.
        let take = buf.len().min(F::MAX_ROW_BYTES.saturating_sub(held));
        self.carry.extend_from_slice(&buf[..take]);
        match self.format.split(&self.carry) {
            Ok(Some((row, len))) => {
                // The row ends past what was held before this chunk: it was incomplete.
                let used = len - held;
                *input = &buf[used..];
                self.rows += 1;
                self.offset += len as u64;
                self.carry.clear();
                Ok(Some(row))
            }
            Ok(None) if take == buf.len() => {
                *input = &[];
                Ok(None)
            }
            Ok(None) => Err(self.malformed(
                format!("a row is longer than {} bytes", F::MAX_ROW_BYTES),
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
pub(crate) fn quote_bytes(bytes: &[u8], max: usize) -> String {
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
pub(crate) fn exception_text(bytes: &[u8]) -> String {
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

/// Why a stream stopped early.
pub(crate) enum StreamError {
    /// ClickHouse is unreachable, answered an error, or reported one in the middle of the body.
    Store(ClickHouseError),
    /// The body is not valid rows.
    Malformed(String),
    /// The receiver was dropped.
    Closed,
}

impl From<ClickHouseError> for StreamError {
    fn from(e: ClickHouseError) -> Self {
        StreamError::Store(e)
    }
}

/// Counts of a finished stream.
pub(crate) struct Streamed {
    pub rows: u64,
    pub bytes: u64,
}

/// Runs `sql` (a `SELECT … FORMAT RowBinary` of `format`'s rows) and sends its rows to `sink` in
/// chunks of at most `chunk_rows`, as they arrive: memory stays bounded by the chunk size, the
/// channel's capacity and the client's read-ahead, whatever the result's size. `body_bytes`
/// follows the bytes read, for the caller's log line when the stream fails.
pub(crate) async fn stream_rows<F: RowFormat>(
    client: &ClickHouseClient,
    sql: &str,
    format: F,
    chunk_rows: usize,
    sink: &tokio::sync::mpsc::Sender<Vec<F::Row>>,
    body_bytes: &mut u64,
) -> Result<Streamed, StreamError> {
    let chunk_rows = chunk_rows.max(1);
    let new_chunk = || Vec::with_capacity(chunk_rows.min(MAX_CHUNK_RESERVE));
    let mut body = client.query_stream(sql).await?;
    let mut decoder = RowDecoder::new(format);
    let mut chunk = new_chunk();
    let mut sent = 0u64;
    loop {
        *body_bytes = body.bytes_read();
        let Some(data) = body.next_chunk().await? else {
            break;
        };
        let mut input: &[u8] = &data;
        loop {
            match decoder.next_row(&mut input) {
                Ok(Some(row)) => {
                    chunk.push(row);
                    if chunk.len() >= chunk_rows {
                        let full = std::mem::replace(&mut chunk, new_chunk());
                        sent += full.len() as u64;
                        sink.send(full).await.map_err(|_| StreamError::Closed)?;
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
        sent += chunk.len() as u64;
        sink.send(chunk).await.map_err(|_| StreamError::Closed)?;
    }
    debug_assert_eq!(sent, decoder.rows());
    Ok(Streamed {
        rows: sent,
        bytes: body.bytes_read(),
    })
}

/// Turns a decoding failure into the error to report: the exception ClickHouse appended to the
/// body when there is one (read a little further to get its whole text), else a malformed body.
async fn explain(mut m: Malformed, body: &mut ResponseStream) -> StreamError {
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
        return StreamError::Store(ClickHouseError::Server {
            status: 200,
            code: Some(code),
            message: format!(
                "the query failed after {} rows: {}",
                m.row,
                exception_text(&m.tail[at..])
            ),
        });
    }
    StreamError::Malformed(format!(
        "malformed RowBinary from clickhouse at row {} (byte {} of the body): {}; the body there: \"{}\"",
        m.row,
        m.offset,
        m.reason,
        quote_bytes(&m.tail, 64)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
