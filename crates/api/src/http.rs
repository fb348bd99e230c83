//! The HTTP/JSON API.

use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use userseg_domain::{ErrorKind, RawPair, Within};
use userseg_usecase::Mode;
use utoipa::ToSchema;

use crate::analytics_http::{analytics, param, path_param, query_params, within_param, ErrorBody};
use crate::{ApiError, ApiState};

pub(crate) fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/pairs", post(push))
        .route("/v1/segments", get(list))
        .route("/v1/segments/{segment}", get(one))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::openapi::serve))
        .with_state(state.clone())
        .merge(crate::analytics_http::routes(state))
}

pub(crate) async fn not_found(req: Request) -> Response {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PushBody {
    pairs: Vec<JsonPair>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPair {
    user_id: String,
    segment: String,
    #[serde(default)]
    ts: Option<i64>,
}

impl From<JsonPair> for RawPair {
    fn from(p: JsonPair) -> Self {
        RawPair {
            user_id: p.user_id,
            segment: p.segment,
            ts: p.ts,
        }
    }
}

enum Format {
    Json,
    NdJson,
}

fn format_of(headers: &HeaderMap) -> Result<Format, ApiError> {
    let Some(ct) = headers.get(header::CONTENT_TYPE) else {
        return Ok(Format::Json);
    };
    let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
    let media = ct.split(';').next().unwrap_or("").trim();
    match media {
        // curl -d sends x-www-form-urlencoded unless told otherwise; the body is still JSON.
        "" | "application/json" | "application/x-www-form-urlencoded" => Ok(Format::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(Format::NdJson),
        other => Err(ApiError::new(
            ErrorKind::Unsupported,
            format!(
                "unsupported content type {other:?}; send application/json or application/x-ndjson"
            ),
        )),
    }
}

/// Bodies are read as sent: one with a `content-encoding` other than `identity` (gzip, zstd...)
/// is refused before it is read, so no body is ever inflated past MAX_REQUEST_BYTES.
pub(crate) fn check_encoding(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(enc) = headers.get(header::CONTENT_ENCODING) else {
        return Ok(());
    };
    let enc = enc.to_str().unwrap_or("?").trim().to_ascii_lowercase();
    if enc.is_empty() || enc == "identity" {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorKind::Unsupported,
        format!("content-encoding {enc:?} is not supported; send the body uncompressed"),
    ))
}

fn too_large(max: usize) -> ApiError {
    ApiError::new(
        ErrorKind::PayloadTooLarge,
        format!("the request body is larger than the limit of {max} bytes (MAX_REQUEST_BYTES)"),
    )
}

/// The pair index in a serde path like `pairs[3].ts`.
fn index_in_path(path: &str) -> Option<usize> {
    let rest = path.strip_prefix("pairs[")?;
    rest[..rest.find(']')?].parse().ok()
}

pub(crate) fn parse_json(bytes: &[u8]) -> Result<Vec<RawPair>, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let body: PushBody = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let index = index_in_path(&path);
        let inner = e.into_inner();
        let msg = if path == "." || path.is_empty() {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body at {path}: {inner}")
        };
        ApiError::invalid(msg).with_index(index)
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    Ok(body.pairs.into_iter().map(RawPair::from).collect())
}

pub(crate) fn parse_ndjson(bytes: &[u8], max_pairs: usize) -> Result<Vec<RawPair>, ApiError> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        if out.len() == max_pairs {
            return Err(ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("the request holds more than {max_pairs} pairs; at most {max_pairs} are allowed per request"),
            ));
        }
        let pair: JsonPair = serde_json::from_slice(line).map_err(|e| {
            let mut err = ApiError::invalid(format!("line {}: invalid pair: {e}", i + 1))
                .with_index(Some(out.len()));
            err.line = Some(i + 1);
            err
        })?;
        out.push(pair.into());
    }
    Ok(out)
}

#[derive(Serialize, ToSchema)]
pub(crate) struct AcceptedBody {
    /// Pairs made durable.
    accepted: usize,
}

/// A push body (or send NDJSON, one pair per line, with `content-type: application/x-ndjson`).
#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PushSchema {
    pairs: Vec<PairSchema>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub(crate) struct PairSchema {
    /// 1-256 bytes of UTF-8, no control characters.
    user_id: String,
    /// 1-128 characters of [A-Za-z0-9_.:-].
    segment: String,
    /// Unix seconds; absent = time of receipt; at most 5 minutes ahead, younger than the window.
    ts: Option<i64>,
}

/// Pushes pairs, all or nothing; answers once every pair is durable.
#[utoipa::path(
    post,
    path = "/v1/pairs",
    tag = "ingest",
    request_body(content = PushSchema, example = json!({"pairs": [{"user_id": "u5", "segment": "sports"}, {"user_id": "u6", "segment": "news"}]})),
    responses(
        (status = 200, description = "Durable", body = AcceptedBody, example = json!({"accepted": 2})),
        (status = 400, description = "An invalid pair (its index), malformed JSON/NDJSON", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "index": 0, "message": "pair 0: segment contains ' ' at position 2; only A-Z a-z 0-9 _ . : - are allowed"}})),
        (status = 413, description = "Too many pairs or bytes", body = ErrorBody,
         example = json!({"error": {"code": "payload_too_large", "message": "the request holds 100001 pairs; at most 100000 are allowed per request"}})),
        (status = 415, description = "Content type other than JSON / NDJSON, or a compressed body (content-encoding)", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "unsupported content type \"text/csv\"; send application/json or application/x-ndjson"}})),
        (status = 503, description = "Overloaded or a dependency is unreachable (retry-after)", body = ErrorBody,
         example = json!({"error": {"code": "overloaded", "message": "1000000 pairs are waiting to be applied; try again shortly"}})),
    )
)]
pub(crate) async fn push(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<AcceptedBody>, ApiError> {
    let ingest = state
        .ingest
        .as_ref()
        .ok_or_else(|| ApiError::not_served("ingest"))?;
    let format = format_of(&headers)?;
    check_encoding(&headers)?;
    let max = state.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let (bytes, _permit) = read_body(&state, body, max).await?;
    let raw = match format {
        Format::Json => parse_json(&bytes)?,
        Format::NdJson => parse_ndjson(&bytes, ingest.limits().max_pairs_per_request)?,
    };
    let accepted = ingest.push(raw).await?;
    Ok(Json(AcceptedBody { accepted }))
}

/// Reads a body of at most `max` bytes, taking room in the in-flight budget
/// (`ApiState::inflight_bytes`) for each chunk as it arrives, and holding it until the
/// request is answered. Room is never reserved ahead for bytes not yet received: a client that
/// declares a large body and stalls (slowly, or on many HTTP/2 streams at once) holds only what
/// it sent, so it cannot starve other clients of the budget.
async fn read_body(
    state: &ApiState,
    body: Body,
    max: usize,
) -> Result<(bytes::Bytes, Option<tokio::sync::OwnedSemaphorePermit>), ApiError> {
    use futures::StreamExt as _;
    let overloaded = || {
        ApiError::new(
            ErrorKind::Overloaded,
            "too many request bytes in flight; try again shortly",
        )
    };
    let deadline = tokio::time::Instant::now() + state.overload_wait;
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut buf = bytes::BytesMut::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::invalid(format!("could not read the request body: {e}")))?;
        if buf.len() + chunk.len() > max {
            return Err(too_large(max));
        }
        if chunk.is_empty() {
            continue;
        }
        // chunk.len() <= max <= u32::MAX (MAX_REQUEST_BYTES is bounded by the config).
        let n = u32::try_from(chunk.len()).map_err(|_| too_large(max))?;
        let permit =
            tokio::time::timeout_at(deadline, state.inflight_bytes.clone().acquire_many_owned(n))
                .await
                .map_err(|_| overloaded())?
                .map_err(|_| ApiError::new(ErrorKind::Unavailable, "shutting down"))?;
        match &mut held {
            Some(h) => h.merge(permit),
            None => held = Some(permit),
        }
        buf.extend_from_slice(&chunk);
    }
    Ok((buf.freeze(), held))
}

fn mode_of(query: Option<&str>) -> Result<Mode, ApiError> {
    let params = query_params(query, &["mode", "within"])?;
    match param(&params, "mode") {
        None | Some("exact") => Ok(Mode::Exact),
        Some("approx") => Ok(Mode::Approx),
        Some(other) => Err(ApiError::invalid(format!(
            "mode must be exact or approx, not {other:?}"
        ))),
    }
}

/// The estimation use case (when this process serves estimates), the requested mode, and the
/// lookback (`within`), which the analytics use case answers.
fn estimation<'a>(
    state: &'a ApiState,
    query: Option<&str>,
) -> Result<(&'a userseg_usecase::Estimation, Mode, Option<Within>), ApiError> {
    let est = state
        .estimation
        .as_ref()
        .ok_or_else(|| ApiError::not_served("estimates"))?;
    let mode = mode_of(query)?;
    let params = query_params(query, &["mode", "within"])?;
    let within = match param(&params, "within") {
        None => None,
        Some(_) => within_param(analytics(state)?, &params)?,
    };
    Ok((est, mode, within))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct EstimateBody {
    segment: String,
    users: u64,
    exact: bool,
    window_seconds: u64,
    /// The lookback used (the window when `within` is absent).
    within_seconds: u64,
    as_of: i64,
}

/// Users in one segment now.
#[utoipa::path(
    get,
    path = "/v1/segments/{segment}",
    tag = "estimates",
    params(
        ("segment" = String, Path, description = "Segment name", example = "sports"),
        ("mode" = Option<String>, Query, description = "`exact` (default) or `approx` (ClickHouse sketches; the index and standalone answer exactly)", example = "exact"),
        ("within" = Option<String>, Query, description = "Only memberships newer than now - within: `90m`, `36h`, `7d`; 0 < within <= WINDOW", example = "1d"),
    ),
    responses(
        (status = 200, description = "The count", body = EstimateBody,
         example = json!({"segment": "sports", "users": 2, "exact": true, "window_seconds": 1209600, "within_seconds": 86400, "as_of": 1764000123})),
        (status = 400, description = "Invalid segment, mode or within", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid within: \"7x\" is not a duration; write a number and a unit (s, m, h, d, w) such as 90m, 36h or 7d"}})),
    )
)]
pub(crate) async fn one(
    State(state): State<ApiState>,
    segment: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<EstimateBody>, ApiError> {
    let segment = path_param(segment)?;
    let (est, mode, within) = estimation(&state, query.as_deref())?;
    if let Some(w) = within {
        let a = analytics(&state)?;
        let c = a.count_segment(&segment, Some(w)).await?;
        return Ok(Json(EstimateBody {
            segment: c.query,
            users: c.users,
            exact: true,
            window_seconds: a.window().secs(),
            within_seconds: c.within_seconds,
            as_of: c.as_of,
        }));
    }
    let e = est.estimate(&segment, mode).await?;
    Ok(Json(EstimateBody {
        segment: e.segment,
        users: e.users,
        exact: e.exact,
        window_seconds: e.window_seconds,
        within_seconds: e.window_seconds,
        as_of: e.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct SegmentCountBody {
    segment: String,
    users: u64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct EstimateListBody {
    /// Every segment with users, sorted by name.
    segments: Vec<SegmentCountBody>,
    exact: bool,
    window_seconds: u64,
    within_seconds: u64,
    as_of: i64,
}

/// Users in every segment that has any.
#[utoipa::path(
    get,
    path = "/v1/segments",
    tag = "estimates",
    params(
        ("mode" = Option<String>, Query, description = "`exact` (default) or `approx`", example = "exact"),
        ("within" = Option<String>, Query, description = "Lookback such as `1d`", example = "1d"),
    ),
    responses(
        (status = 200, description = "Counts sorted by segment", body = EstimateListBody,
         example = json!({"segments": [{"segment": "news", "users": 2}, {"segment": "sports", "users": 2}], "exact": true, "window_seconds": 1209600, "within_seconds": 86400, "as_of": 1764000123})),
        (status = 400, description = "Invalid mode or within", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid within: within must be longer than 0 s"}})),
    )
)]
pub(crate) async fn list(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Json<EstimateListBody>, ApiError> {
    let (est, mode, within) = estimation(&state, query.as_deref())?;
    let body = |segments: Vec<userseg_usecase::SegmentCount>,
                exact,
                window_seconds,
                within_seconds,
                as_of| {
        EstimateListBody {
            segments: segments
                .into_iter()
                .map(|s| SegmentCountBody {
                    segment: s.segment,
                    users: s.users,
                })
                .collect(),
            exact,
            window_seconds,
            within_seconds,
            as_of,
        }
    };
    if let Some(w) = within {
        let a = analytics(&state)?;
        let l = a.count_all(Some(w)).await?;
        return Ok(Json(body(
            l.segments,
            true,
            a.window().secs(),
            l.within_seconds,
            l.as_of,
        )));
    }
    let l = est.list(mode).await?;
    Ok(Json(body(
        l.segments,
        l.exact,
        l.window_seconds,
        l.window_seconds,
        l.as_of,
    )))
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "Up", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Log, store and processor checks.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Every check passed", body = serde_json::Value, example = json!({"status": "ready", "checks": {"log": "ok", "store": "ok"}})),
        (status = 503, description = "A check failed (details per check)", body = serde_json::Value, example = json!({"status": "not_ready", "checks": {"log": "ok", "store": "unavailable: connection refused"}})),
    ))]
pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut futures = Vec::new();
    if let Some(i) = state.ingest.clone() {
        futures.push((
            "log".to_string(),
            Box::pin(async move { i.check_ready().await.map_err(|e| e.to_string()) })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>,
        ));
    }
    if let Some(e) = state.estimation.clone() {
        futures.push((
            "store".to_string(),
            Box::pin(async move { e.check_ready().await.map_err(|e| e.to_string()) }),
        ));
    }
    for (name, check) in &state.ready_checks {
        futures.push((name.clone(), check()));
    }
    let results = futures::future::join_all(futures.into_iter().map(|(name, f)| async move {
        let r = match tokio::time::timeout(Duration::from_secs(2), f).await {
            Ok(r) => r,
            Err(_) => Err("timed out after 2 s".to_string()),
        };
        (name, r)
    }))
    .await;
    for (name, r) in results {
        match r {
            Ok(()) => {
                checks.insert(name, json!("ok"));
            }
            Err(e) => {
                ready = false;
                checks.insert(name, json!(e));
            }
        }
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"status": if ready {"ready"} else {"not_ready"}, "checks": checks})),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String, example = json!("# TYPE userseg_processor_pairs_written_total counter"))))]
pub(crate) async fn metrics(State(state): State<ApiState>) -> Response {
    match &state.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_from_serde_path() {
        assert_eq!(index_in_path("pairs[3].ts"), Some(3));
        assert_eq!(index_in_path("pairs[12]"), Some(12));
        assert_eq!(index_in_path("pairs"), None);
        assert_eq!(index_in_path("."), None);
    }

    #[test]
    fn ndjson_reports_line_and_index() {
        let body = b"{\"user_id\":\"a\",\"segment\":\"s\"}\n\n{\"user_id\":\"b\",\"segment\":5}\n";
        let err = parse_ndjson(body, 10).map(|_| ()).unwrap_err();
        assert_eq!(err.line, Some(3));
        assert_eq!(err.index, Some(1));
        assert!(
            err.message.starts_with("line 3: invalid pair"),
            "{}",
            err.message
        );
        let ok = parse_ndjson(b"{\"user_id\":\"a\",\"segment\":\"s\",\"ts\":5}\r\n", 10).unwrap();
        assert_eq!(ok.len(), 1);
        assert_eq!(ok[0].ts, Some(5));
    }

    #[test]
    fn mode_parsing() {
        assert_eq!(mode_of(None).unwrap(), Mode::Exact);
        assert_eq!(mode_of(Some("mode=approx")).unwrap(), Mode::Approx);
        assert!(mode_of(Some("mode=fast")).is_err());
        assert!(mode_of(Some("x=1")).is_err());
        assert_eq!(mode_of(Some("within=7d&mode=exact")).unwrap(), Mode::Exact);
        assert!(mode_of(Some("mode=exact&mode=approx")).is_err());
    }
}
