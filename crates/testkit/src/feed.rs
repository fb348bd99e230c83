//! A client of `GET /v1/changes`: reads the NDJSON or SSE stream as it arrives and parses its
//! events (the same reader for every test of the change feed, standalone or on ES).

use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// One event as the client got it: its cursor (SSE `id:`, NDJSON `cursor`) and the JSON.
#[derive(Clone, Debug)]
pub struct FeedEvent {
    pub cursor: String,
    pub event: Value,
}

/// A streaming subscription. The format follows the response's content type.
pub struct Feed {
    resp: reqwest::Response,
    sse: bool,
    /// Whether events are parsed and kept (else only counted: for streams of many MB).
    keep: bool,
    buf: Vec<u8>,
    /// The events so far, in stream order (when kept).
    pub events: Vec<FeedEvent>,
    /// Events received so far (kept or not).
    pub count: usize,
    /// Body bytes received so far.
    pub bytes: usize,
}

impl Feed {
    /// Reads `resp` (a 200 answer of `GET /v1/changes`) as a feed; panics on another status
    /// or content type.
    pub async fn new(resp: reqwest::Response) -> Feed {
        let status = resp.status();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        if status != 200 {
            let body = resp.text().await.unwrap_or_default();
            panic!("GET /v1/changes: {status} {body}");
        }
        let sse = match ct.as_str() {
            "text/event-stream" => true,
            "application/x-ndjson" => false,
            other => panic!("GET /v1/changes answered content-type {other:?}"),
        };
        Feed {
            resp,
            sse,
            keep: true,
            buf: Vec::new(),
            events: Vec::new(),
            count: 0,
            bytes: 0,
        }
    }

    /// Counts events without parsing or keeping them.
    pub fn counting_only(mut self) -> Feed {
        self.keep = false;
        self
    }

    pub fn is_sse(&self) -> bool {
        self.sse
    }

    /// Reads until `done(events)` holds; panics after `secs` (naming `what`) or if the stream
    /// ends.
    pub async fn until(&mut self, what: &str, secs: u64, done: impl Fn(&Feed) -> bool) {
        if !self.read_until(secs, &done).await {
            panic!(
                "{what}: not after {secs} s ({} events: {:#?})",
                self.count, self.events
            );
        }
    }

    /// Reads until at least `n` events arrived in all; panics after `secs`.
    pub async fn until_count(&mut self, n: usize, secs: u64) -> &[FeedEvent] {
        self.until(&format!("{n} events"), secs, |f| f.count >= n)
            .await;
        &self.events
    }

    /// Reads until `done` holds or `secs` pass; says whether it holds.
    pub async fn read_until(&mut self, secs: u64, done: impl Fn(&Feed) -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return false,
                Ok(chunk) => {
                    let chunk = chunk
                        .expect("reading the feed")
                        .expect("the feed's stream ended");
                    self.push(&chunk);
                }
            }
        }
        true
    }

    /// Reads for `d`, returning every event that arrived so far.
    pub async fn for_a_while(&mut self, d: Duration) -> &[FeedEvent] {
        let deadline = Instant::now() + d;
        while let Ok(Ok(Some(chunk))) = tokio::time::timeout_at(deadline, self.resp.chunk()).await {
            self.push(&chunk);
        }
        &self.events
    }

    /// The events' JSON, in stream order.
    pub fn values(&self) -> Vec<Value> {
        self.events.iter().map(|e| e.event.clone()).collect()
    }

    fn push(&mut self, chunk: &[u8]) {
        self.bytes += chunk.len();
        self.buf.extend_from_slice(chunk);
        let sep: &[u8] = if self.sse { b"\n\n" } else { b"\n" };
        while let Some(at) = self.buf.windows(sep.len()).position(|w| w == sep) {
            let block: Vec<u8> = self.buf.drain(..at + sep.len()).collect();
            let block = std::str::from_utf8(&block).expect("the feed is UTF-8");
            if self.sse {
                self.sse_block(block);
            } else if !block.trim().is_empty() {
                self.count += 1;
                if self.keep {
                    let event: Value = serde_json::from_str(block.trim())
                        .unwrap_or_else(|e| panic!("{e}: {block:?}"));
                    let cursor = event["cursor"]
                        .as_str()
                        .unwrap_or_else(|| panic!("no cursor: {event}"))
                        .to_string();
                    self.events.push(FeedEvent { cursor, event });
                }
            }
        }
    }

    /// One SSE block: `id:` and `data:` lines (comments `:` are keep-alives).
    fn sse_block(&mut self, block: &str) {
        let mut id = None;
        let mut data = None;
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(v);
            } else {
                assert!(
                    line.is_empty() || line.starts_with(':'),
                    "unexpected SSE line {line:?}"
                );
            }
        }
        let Some(data) = data else { return };
        self.count += 1;
        if !self.keep {
            return;
        }
        let event: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data:?}"));
        let cursor = id.expect("every SSE event has an id");
        assert_eq!(event["cursor"], cursor.as_str(), "{block}");
        self.events.push(FeedEvent { cursor, event });
    }
}
