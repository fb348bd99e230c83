//! `GET /v1/changes`: the change feed as Server-Sent Events or NDJSON, streamed from the
//! change log in bounded chunks (a client that stops reading stops the reading: the server
//! holds at most one chunk for it).

use axum::body::{Body, Bytes};
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use userseg_usecase::{ChangeRecord, ChangeStream, ChangesError};
use utoipa::ToSchema;

use crate::analytics_http::{param, query_params, ErrorBody};
use crate::{ApiError, ApiState};

impl From<ChangesError> for ApiError {
    fn from(e: ChangesError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

/// One event of the feed (an SSE `data:` line, or an NDJSON line).
#[derive(Serialize, ToSchema)]
pub(crate) struct ChangeLine {
    /// `entered` or `exited`.
    #[serde(rename = "type")]
    kind: &'static str,
    user_id: String,
    segment: String,
    /// Unix seconds. `entered`: the membership's latest ts; `expired`: when it ended
    /// (`last_seen + window`); both rounded to the store's time bucket (at most 60 s).
    /// `deleted`: when the deletion was applied.
    ts: i64,
    /// `pair` (entered), `expired` or `deleted` (exited).
    reason: &'static str,
    /// Deterministic: the same change detected again has the same id (drop repeats by it).
    id: String,
    /// Resume after this event with `after=` (SSE: the `id:` field, sent back by browsers as
    /// `Last-Event-ID`).
    cursor: String,
}

impl From<ChangeRecord> for ChangeLine {
    fn from(r: ChangeRecord) -> Self {
        ChangeLine {
            kind: r.event.kind().as_str(),
            id: r.event.id_hex(),
            user_id: r.event.user_id,
            segment: r.event.segment,
            ts: r.event.ts,
            reason: r.event.reason.as_str(),
            cursor: r.cursor,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Sse,
    Ndjson,
}

fn format(params: &[(String, String)], headers: &HeaderMap) -> Result<Format, ApiError> {
    match param(params, "format") {
        Some("sse") => return Ok(Format::Sse),
        Some("ndjson") => return Ok(Format::Ndjson),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "format={other:?}: use sse or ndjson"
            )))
        }
        None => {}
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    Ok(
        if accept.contains("application/x-ndjson") && !accept.contains("text/event-stream") {
            Format::Ndjson
        } else {
            Format::Sse
        },
    )
}

fn encode(records: Vec<ChangeRecord>, format: Format) -> Bytes {
    let mut out = Vec::with_capacity(records.len() * 160);
    for r in records {
        let line = ChangeLine::from(r);
        if format == Format::Sse {
            out.extend_from_slice(b"id: ");
            out.extend_from_slice(line.cursor.as_bytes());
            out.extend_from_slice(b"\ndata: ");
        }
        // Serializing strings and integers cannot fail.
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.extend_from_slice(if format == Format::Sse {
                b"\n\n"
            } else {
                b"\n"
            });
        }
    }
    Bytes::from(out)
}

/// Users entering and leaving segments, streamed: Server-Sent Events (`Accept:
/// text/event-stream`, the default) or NDJSON (`Accept: application/x-ndjson` or
/// `format=ndjson`). Without `after` (or `Last-Event-ID`) the stream starts at the end of the
/// log: only changes from now on. Needs the `members` role.
#[utoipa::path(
    get,
    path = "/v1/changes",
    tag = "analytics",
    params(
        ("segments" = Option<String>, Query, description = "Only these segments (comma-separated); all when absent", example = "sports,news"),
        ("after" = Option<String>, Query, description = "Resume after this cursor (an event's `cursor`); the SSE `Last-Event-ID` header takes precedence", example = "0"),
        ("format" = Option<String>, Query, description = "`sse` or `ndjson` (overrides Accept)", example = "ndjson"),
    ),
    responses(
        (status = 200, description = "A stream that does not end: SSE events (`id:` = cursor, `data:` = the event; a `: heartbeat` comment every 15 s), or NDJSON lines", content_type = "text/event-stream", body = ChangeLine,
         example = json!({"type": "entered", "user_id": "u1", "segment": "sports", "ts": 1764000000, "reason": "pair", "id": "9f2c4e1a0b3d5f67", "cursor": "1234"})),
        (status = 400, description = "A malformed cursor, an invalid segment name or format", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "malformed cursor: \"x\" is not a cursor of this feed; pass a cursor this feed sent (an event's `cursor`, or the SSE `id`)"}})),
        (status = 410, description = "The cursor is older than CHANGES_RETENTION", body = ErrorBody,
         example = json!({"error": {"code": "gone", "message": "the cursor is older than the change log's retention (the oldest cursor kept is 8388608); resume with no `after` (from now) and recompute what was missed"}})),
    )
)]
pub(crate) async fn changes(
    State(state): State<ApiState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let feed = state
        .changes
        .as_ref()
        .ok_or_else(|| ApiError::not_served("the change feed"))?;
    let params = query_params(query.as_deref(), &["segments", "after", "format"])?;
    let format = format(&params, &headers)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid("Last-Event-ID is not text"))
        })
        .transpose()?;
    let after = last_event_id.or(param(&params, "after"));
    let stream: ChangeStream = feed.open(param(&params, "segments"), after).await?;
    metrics::gauge!("userseg_changes_subscribers").increment(1.0);
    struct Subscriber(ChangeStream);
    impl Drop for Subscriber {
        fn drop(&mut self) {
            metrics::gauge!("userseg_changes_subscribers").decrement(1.0);
        }
    }
    let body = futures::stream::unfold(Subscriber(stream), move |mut sub| async move {
        match sub.0.next().await {
            Ok(records) if records.is_empty() => {
                let beat = match format {
                    Format::Sse => Bytes::from_static(b": heartbeat\n\n"),
                    // NDJSON has no comments: nothing to send, read again.
                    Format::Ndjson => Bytes::new(),
                };
                Some((Ok::<Bytes, std::io::Error>(beat), sub))
            }
            Ok(records) => {
                metrics::counter!("userseg_changes_sent_total").increment(records.len() as u64);
                Some((Ok(encode(records, format)), sub))
            }
            Err(e) => {
                // Cut the body: the client sees a failed transfer and resumes by cursor.
                tracing::warn!(error = %e, "change feed read failed");
                Some((Err(std::io::Error::other(e.to_string())), sub))
            }
        }
    });
    let content_type = match format {
        Format::Sse => "text/event-stream",
        Format::Ndjson => "application/x-ndjson",
    };
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
