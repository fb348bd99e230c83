//! A minimal client for ClickHouse's HTTP interface, plus the RowBinary encoding it uses.
//!
//! Data never goes into SQL text: inserts send rows in a RowBinary body, reads come back as
//! RowBinary. The only values put into SQL are integers this crate formats, validated
//! identifiers, and string literals escaped by [`quote_string`].

use std::time::{Duration, Instant};

use bytes::Bytes;
use reqwest::{StatusCode, Url};

use crate::config::{check_database_name, ClickHouseConfig};
use crate::error::{parse_exception_code, ClickHouseError};

/// Longest error body kept in an error message.
const MAX_ERROR_BODY: usize = 2048;

/// A cheap-to-clone handle on one ClickHouse server's HTTP interface.
#[derive(Clone, Debug)]
pub struct ClickHouseClient {
    http: reqwest::Client,
    /// Like `http` but without the whole-request timeout, for streamed reads that may outlast
    /// it; [`ResponseStream`] bounds every wait for a chunk instead.
    stream_http: reqwest::Client,
    request_timeout: Duration,
    base: Url,
    ping_url: Url,
    user: String,
    password: String,
    max_execution_secs: u64,
}

impl ClickHouseClient {
    /// Builds the HTTP client; does not connect. The database name must be a plain
    /// identifier (it goes into SQL text).
    pub fn new(config: &ClickHouseConfig) -> Result<Self, ClickHouseError> {
        check_database_name(&config.database).map_err(ClickHouseError::Config)?;
        let base = Url::parse(&config.addr)
            .map_err(|e| ClickHouseError::Config(format!("address {:?}: {e}", config.addr)))?;
        // Relative, so a base URL behind a path prefix (`http://proxy/ch/`) keeps it.
        let ping_url = base
            .join("ping")
            .map_err(|e| ClickHouseError::Config(format!("address {:?}: {e}", config.addr)))?;
        let roots = match &config.ca_pem {
            Some(pem) => reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| ClickHouseError::Config(format!("CA certificates: {e}")))?,
            None => Vec::new(),
        };
        let build = |timeout: Option<Duration>| {
            let mut builder = reqwest::Client::builder()
                .connect_timeout(config.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(2)); // below the server's keep_alive_timeout (3 s)
            for cert in &roots {
                builder = builder.add_root_certificate(cert.clone());
            }
            if let Some(t) = timeout {
                builder = builder.timeout(t);
            }
            builder.build().map_err(|e| ClickHouseError::Unreachable {
                addr: config.addr.clone(),
                detail: format!("cannot build the http client: {e}"),
            })
        };
        let http = build(Some(config.request_timeout))?;
        let stream_http = build(None)?;
        Ok(ClickHouseClient {
            http,
            stream_http,
            request_timeout: config.request_timeout,
            base,
            ping_url,
            user: config.user.clone(),
            password: config.password.clone(),
            max_execution_secs: config.request_timeout.as_secs().max(1),
        })
    }

    /// The server's address, for messages.
    pub fn addr(&self) -> &str {
        self.base.as_str()
    }

    fn unreachable(&self, e: reqwest::Error) -> ClickHouseError {
        let what = if e.is_timeout() {
            "timed out"
        } else if e.is_connect() {
            "cannot connect"
        } else {
            "request failed"
        };
        // The full source chain holds the useful part ("Connection refused").
        let mut detail = format!("{what}: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            detail.push_str(": ");
            detail.push_str(&s.to_string());
            source = s.source();
        }
        ClickHouseError::Unreachable {
            addr: self.base.to_string(),
            detail,
        }
    }

    /// `GET /ping`: is the server up?
    pub async fn ping(&self) -> Result<(), ClickHouseError> {
        let url = self.ping_url.clone();
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        self.read_ok(resp).await.map(|_| ())
    }

    /// Runs a statement that returns nothing useful (DDL, `INSERT ... SELECT`).
    pub async fn execute(&self, sql: &str) -> Result<(), ClickHouseError> {
        self.post(&[], sql.as_bytes().to_vec()).await?;
        recording::execute(sql);
        Ok(())
    }

    /// Runs a query and returns its whole body. The server buffers the result before answering
    /// (`wait_end_of_query`), so an error in the middle of a query is an error status, never a
    /// truncated 200.
    pub async fn query(&self, sql: &str) -> Result<Bytes, ClickHouseError> {
        let body = self.query_buffered(sql).await?;
        if recording::active() {
            self.record_query(sql, &body).await;
        }
        Ok(body)
    }

    async fn query_buffered(&self, sql: &str) -> Result<Bytes, ClickHouseError> {
        let max = self.max_execution_secs.to_string();
        self.post(
            &[
                ("wait_end_of_query", "1"),
                ("max_execution_time", max.as_str()),
            ],
            sql.as_bytes().to_vec(),
        )
        .await
    }

    /// Records a query with its answer, and the answer as text (for comparing rows whatever
    /// their order); a query that is streamed is run once more, buffered, for its answer.
    async fn record_query(&self, sql: &str, body: &Bytes) {
        let text = match sql.strip_suffix(" FORMAT RowBinary") {
            Some(q) => self
                .query_buffered(&format!("{q} FORMAT TabSeparated"))
                .await
                .ok()
                .map(|b| String::from_utf8_lossy(&b).into_owned()),
            None => None,
        };
        recording::query(sql, body, text);
    }

    /// Sends `insert` (e.g. `INSERT INTO db.t (a, b) FORMAT RowBinary`) with `body` as its data.
    pub async fn insert(&self, insert: &str, body: Vec<u8>) -> Result<(), ClickHouseError> {
        let data = recording::active().then(|| body.clone());
        self.post(&[("query", insert)], body).await?;
        if let Some(data) = data {
            recording::insert(insert, data);
        }
        Ok(())
    }

    /// Runs a query and streams its body: the server answers as soon as the first rows are
    /// ready, so a read of any size is never buffered whole, neither here nor on the server.
    ///
    /// No whole-request timeout applies: waiting for the response headers, and then for each
    /// chunk of the body, is bounded by the configured request timeout, so a long read that
    /// keeps flowing (or that the caller reads slowly) is never cut off. No server-side
    /// `max_execution_time` is set either, for the same reason. Like every request here, it
    /// asks for no compression (on 18.16, compressed responses made SELECTs come back empty).
    ///
    /// The status is checked before returning, but an error that happens once the server has
    /// started sending rows can only come as text appended to the body (ClickHouse has already
    /// sent `200 OK`): the caller's decoder must recognise a body that does not parse, see
    /// [`looks_like_exception`].
    pub async fn query_stream(&self, sql: &str) -> Result<ResponseStream, ClickHouseError> {
        if recording::active() {
            if let Ok(body) = self.query_buffered(sql).await {
                self.record_query(sql, &body).await;
            }
        }
        let url = self.url(&[]);
        let body = Bytes::from(sql.as_bytes().to_vec());
        let sent = tokio::time::timeout(
            self.request_timeout,
            self.send(&self.stream_http, &url, &body),
        )
        .await;
        let resp = match sent {
            Ok(resp) => resp?,
            Err(_) => {
                return Err(ClickHouseError::Unreachable {
                    addr: self.base.to_string(),
                    detail: format!("timed out: no response within {:?}", self.request_timeout),
                })
            }
        };
        if resp.status() != StatusCode::OK {
            // An error body is short; still bound the wait, this client has no timeout.
            return match tokio::time::timeout(self.request_timeout, self.read_ok(resp)).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => Err(ClickHouseError::Decode(
                    "a non-200 response was read as a success".into(),
                )),
                Err(_) => Err(ClickHouseError::Unreachable {
                    addr: self.base.to_string(),
                    detail: format!(
                        "timed out reading an error response after {:?}",
                        self.request_timeout
                    ),
                }),
            };
        }
        Ok(ResponseStream::start(resp, self))
    }

    fn url(&self, params: &[(&str, &str)]) -> Url {
        let mut url = self.base.clone();
        if url.path().is_empty() {
            url.set_path("/");
        }
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        url
    }

    async fn post(&self, params: &[(&str, &str)], body: Vec<u8>) -> Result<Bytes, ClickHouseError> {
        let url = self.url(params);
        let body = Bytes::from(body);
        let resp = self.send(&self.http, &url, &body).await?;
        self.read_ok(resp).await
    }

    /// POSTs `body` to `url`, retrying once on a stale pooled connection.
    async fn send(
        &self,
        http: &reqwest::Client,
        url: &Url,
        body: &Bytes,
    ) -> Result<reqwest::Response, ClickHouseError> {
        let mut retried = false;
        loop {
            let sent = http
                .post(url.clone())
                .basic_auth(&self.user, Some(&self.password))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) => return Ok(resp),
                // A pooled keep-alive connection the server closed just as it was reused fails
                // without a timeout or a connect error. Every request this crate sends is
                // idempotent, so one immediate retry on a fresh connection is safe.
                Err(e) if !retried && !e.is_timeout() && !e.is_connect() => {
                    tracing::debug!(error = %e, "request failed on a pooled connection; retrying once");
                    retried = true;
                }
                Err(e) => return Err(self.unreachable(e)),
            }
        }
    }

    async fn read_ok(&self, resp: reqwest::Response) -> Result<Bytes, ClickHouseError> {
        let status = resp.status();
        let header_code = resp
            .headers()
            .get("x-clickhouse-exception-code")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u32>().ok());
        let body = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        if status == StatusCode::OK {
            return Ok(body);
        }
        let text = String::from_utf8_lossy(&body);
        let code = header_code.or_else(|| parse_exception_code(&text));
        let mut message = text.trim().to_string();
        if message.len() > MAX_ERROR_BODY {
            let mut cut = MAX_ERROR_BODY;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str("...");
        }
        if message.is_empty() {
            message = status.canonical_reason().unwrap_or("no body").to_string();
        }
        Err(ClickHouseError::Server {
            status: status.as_u16(),
            code,
            message,
        })
    }
}

/// How much a [`ResponseStream`]'s reader task reads ahead before it waits for the caller (on
/// top of one batch already handed over).
const MAX_READ_AHEAD_BYTES: usize = 256 * 1024;

/// What a [`ResponseStream`]'s reader task hands over.
enum ReadAhead {
    Chunks(Vec<Bytes>),
    End,
    Failed(ClickHouseError),
}

/// The body of a [`ClickHouseClient::query_stream`] response, read chunk by chunk as the
/// network delivers it. Dropping it closes the connection, which cancels the query.
///
/// A task reads the body ahead of the caller, about 256 KiB at most, and hands
/// the chunks over in batches: ClickHouse 18.16 sends HTTP chunks of 4 KiB, and waiting for each
/// one in turn while the caller decodes the previous one cost a switch between threads per
/// chunk, which made a scan three times slower than reading the body.
#[derive(Debug)]
pub struct ResponseStream {
    batches: tokio::sync::mpsc::Receiver<ReadAhead>,
    current: std::vec::IntoIter<Bytes>,
    reader: tokio::task::JoinHandle<()>,
    addr: String,
    bytes: u64,
    finished: bool,
}

impl std::fmt::Debug for ReadAhead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadAhead::Chunks(c) => write!(f, "Chunks({})", c.len()),
            ReadAhead::End => write!(f, "End"),
            ReadAhead::Failed(e) => write!(f, "Failed({e})"),
        }
    }
}

impl ResponseStream {
    fn start(resp: reqwest::Response, client: &ClickHouseClient) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let reader = tokio::spawn(read_ahead(resp, client.clone(), tx));
        ResponseStream {
            batches: rx,
            current: Vec::new().into_iter(),
            reader,
            addr: client.base.to_string(),
            bytes: 0,
            finished: false,
        }
    }

    /// The next chunk of the body, or `None` at its end. Silence from the server for longer
    /// than the request timeout, or a connection that breaks, is
    /// [`ClickHouseError::Unreachable`]; however long the caller takes between two calls is not
    /// counted.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClickHouseError> {
        loop {
            if let Some(chunk) = self.current.next() {
                self.bytes += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if self.finished {
                return Ok(None);
            }
            match self.batches.recv().await {
                Some(ReadAhead::Chunks(batch)) => self.current = batch.into_iter(),
                Some(ReadAhead::End) => self.finished = true,
                Some(ReadAhead::Failed(e)) => {
                    self.finished = true;
                    return Err(e);
                }
                // Never a normal end: that is `End`.
                None => {
                    self.finished = true;
                    return Err(ClickHouseError::Unreachable {
                        addr: self.addr.clone(),
                        detail: format!("the response reader stopped after {} bytes", self.bytes),
                    });
                }
            }
        }
    }

    /// How many bytes of the body were read so far.
    pub fn bytes_read(&self) -> u64 {
        self.bytes
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Reads `resp` into `tx` in batches: whatever arrived while the receiver was busy, up to
/// [`MAX_READ_AHEAD_BYTES`].
async fn read_ahead(
    mut resp: reqwest::Response,
    client: ClickHouseClient,
    tx: tokio::sync::mpsc::Sender<ReadAhead>,
) {
    let timeout = client.request_timeout;
    let mut batch: Vec<Bytes> = Vec::new();
    let mut held = 0usize;
    let mut total = 0u64;
    let end = loop {
        tokio::select! {
            biased;
            permit = tx.reserve(), if !batch.is_empty() => {
                let Ok(permit) = permit else { return };
                permit.send(ReadAhead::Chunks(std::mem::take(&mut batch)));
                held = 0;
            }
            // Read on only while there is room; a reserve that never completes (a receiver
            // that stopped reading) holds the reader, and the body, back.
            next = tokio::time::timeout(timeout, resp.chunk()), if held < MAX_READ_AHEAD_BYTES => {
                match next {
                    Ok(Ok(Some(chunk))) => {
                        held += chunk.len();
                        total += chunk.len() as u64;
                        batch.push(chunk);
                    }
                    Ok(Ok(None)) => break ReadAhead::End,
                    Ok(Err(e)) => break ReadAhead::Failed(client.unreachable(e)),
                    Err(_) => {
                        break ReadAhead::Failed(ClickHouseError::Unreachable {
                            addr: client.base.to_string(),
                            detail: format!(
                                "timed out: no data for {timeout:?} after {total} bytes of the response"
                            ),
                        })
                    }
                }
            }
        }
    };
    if !batch.is_empty() && tx.send(ReadAhead::Chunks(batch)).await.is_err() {
        return;
    }
    let _ = tx.send(end).await;
}

/// Does `tail` (bytes of a RowBinary body from where decoding failed) look like the text
/// ClickHouse appends to a body when a query fails after it has started sending rows
/// (`Code: 241, e.displayText() = DB::Exception: ...` on 18.x, `Code: 241. DB::Exception: ...`
/// on current versions)? Returns the exception code when it does.
pub fn looks_like_exception(tail: &[u8]) -> Option<u32> {
    let at = tail.windows(6).position(|w| w == b"Code: ")?;
    let text = String::from_utf8_lossy(&tail[at..]);
    let code = parse_exception_code(&text)?;
    text.contains("Exception").then_some(code)
}

/// Times an operation for a histogram.
pub(crate) struct Timer(Instant);

impl Timer {
    pub(crate) fn start() -> Self {
        Timer(Instant::now())
    }
    pub(crate) fn elapsed(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Quotes a string as a ClickHouse string literal: `'` and `\` are backslash-escaped, and every
/// control character becomes `\xHH`, so no input can end the literal or hide in a log line.
pub fn quote_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02X}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Quotes an identifier that the caller has already validated as `[A-Za-z_][A-Za-z0-9_]*`.
pub(crate) fn quote_ident(ident: &str) -> String {
    debug_assert!(ident.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    format!("`{ident}`")
}

/// Appends values in ClickHouse's RowBinary encoding.
pub(crate) mod rowbinary {
    pub fn put_string(buf: &mut Vec<u8>, s: &str) {
        put_varint(buf, s.len() as u64);
        buf.extend_from_slice(s.as_bytes());
    }

    pub fn put_u32(buf: &mut Vec<u8>, v: u32) {
        buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn put_u64(buf: &mut Vec<u8>, v: u64) {
        buf.extend_from_slice(&v.to_le_bytes());
    }

    fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        buf.push(v as u8);
    }

    /// Reads RowBinary values off a response body.
    pub struct Reader<'a> {
        buf: &'a [u8],
    }

    impl<'a> Reader<'a> {
        pub fn new(buf: &'a [u8]) -> Self {
            Reader { buf }
        }

        pub fn is_empty(&self) -> bool {
            self.buf.is_empty()
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.buf.len() < n {
                return Err(format!(
                    "rowbinary: needed {n} more bytes, {} left",
                    self.buf.len()
                ));
            }
            let (head, tail) = self.buf.split_at(n);
            self.buf = tail;
            Ok(head)
        }

        pub fn u64(&mut self) -> Result<u64, String> {
            let b = self.take(8)?;
            let mut a = [0u8; 8];
            a.copy_from_slice(b);
            Ok(u64::from_le_bytes(a))
        }

        pub fn u8(&mut self) -> Result<u8, String> {
            Ok(self.take(1)?[0])
        }

        pub fn u32(&mut self) -> Result<u32, String> {
            let b = self.take(4)?;
            let mut a = [0u8; 4];
            a.copy_from_slice(b);
            Ok(u32::from_le_bytes(a))
        }

        fn varint(&mut self) -> Result<u64, String> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let b = self.take(1)?[0];
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err("rowbinary: varint longer than 10 bytes".into())
        }

        pub fn string(&mut self) -> Result<String, String> {
            let len = usize::try_from(self.varint()?)
                .map_err(|_| "rowbinary: string length overflows".to_string())?;
            let bytes = self.take(len)?;
            String::from_utf8(bytes.to_vec())
                .map_err(|e| format!("rowbinary: string is not utf-8: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rowbinary::*;
    use super::*;

    #[test]
    fn quoting_escapes_everything_that_could_end_a_literal() {
        assert_eq!(quote_string("plain"), "'plain'");
        assert_eq!(quote_string("o'brien"), r"'o\'brien'");
        assert_eq!(quote_string(r"back\slash"), r"'back\\slash'");
        assert_eq!(quote_string("\\'"), r"'\\\''");
        assert_eq!(quote_string("a\nb\0c\u{7f}"), r"'a\x0Ab\x00c\x7F'");
        assert_eq!(quote_string("用户 é"), "'用户 é'");
        assert_eq!(quote_ident("userseg_1"), "`userseg_1`");
    }

    #[test]
    fn rowbinary_round_trip() {
        let mut buf = Vec::new();
        let long = "é".repeat(200); // 400 bytes: a two-byte varint
        put_string(&mut buf, "");
        put_string(&mut buf, &long);
        put_u32(&mut buf, 1_763_942_400);
        buf.extend_from_slice(&42u64.to_le_bytes());
        let mut r = Reader::new(&buf);
        assert_eq!(r.string().unwrap(), "");
        assert_eq!(r.string().unwrap(), long);
        assert_eq!(r.u32().unwrap(), 1_763_942_400);
        assert_eq!(r.u64().unwrap(), 42);
        assert!(r.is_empty());
        assert!(r.u64().is_err());
        assert!(Reader::new(&[0x05, b'a']).string().is_err());
        assert!(Reader::new(&[0x01, 0xff]).string().is_err());
    }
}

/// Every statement this crate sends, recorded in order while a [`Recording`](recording::Recording)
/// is alive, with what the server answered: `tests/statements.rs` records them on the test
/// server (ClickHouse 18.16) and `scripts/chdb_check.py` replays them on a current ClickHouse
/// (`make chdb-check`). Off, it costs one atomic load per request.
#[doc(hidden)]
pub mod recording {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    /// One statement sent to the server.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Statement {
        /// DDL and `INSERT ... SELECT`: no answer.
        Execute { sql: String },
        /// `INSERT ... FORMAT RowBinary` with its rows.
        Insert { sql: String, data: Vec<u8> },
        /// A read: its answer, and the same read's answer as TabSeparated text (when it ends
        /// with `FORMAT RowBinary`).
        Query {
            sql: String,
            answer: Vec<u8>,
            text: Option<String>,
        },
    }

    static ACTIVE: AtomicBool = AtomicBool::new(false);
    static LOG: Mutex<Vec<Statement>> = Mutex::new(Vec::new());

    /// Records every statement of this process until dropped (one at a time per process).
    pub struct Recording(());

    impl Recording {
        pub fn start() -> Recording {
            lock().clear();
            ACTIVE.store(true, Ordering::SeqCst);
            Recording(())
        }

        /// The statements recorded so far (and clears them).
        pub fn take(&self) -> Vec<Statement> {
            std::mem::take(&mut *lock())
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            ACTIVE.store(false, Ordering::SeqCst);
            lock().clear();
        }
    }

    fn lock() -> std::sync::MutexGuard<'static, Vec<Statement>> {
        LOG.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn active() -> bool {
        ACTIVE.load(Ordering::Relaxed)
    }

    fn push(s: Statement) {
        if active() {
            lock().push(s);
        }
    }

    pub(crate) fn execute(sql: &str) {
        push(Statement::Execute { sql: sql.into() });
    }

    pub(crate) fn insert(sql: &str, data: Vec<u8>) {
        push(Statement::Insert {
            sql: sql.into(),
            data,
        });
    }

    pub(crate) fn query(sql: &str, answer: &[u8], text: Option<String>) {
        push(Statement::Query {
            sql: sql.into(),
            answer: answer.to_vec(),
            text,
        });
    }
}
