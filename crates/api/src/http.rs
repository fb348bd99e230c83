//! The HTTP/JSON API.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use userseg_domain::{ErrorKind, RawPair};
use userseg_usecase::Mode;

use crate::{ApiError, ApiState};

pub(crate) fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/pairs", post(push))
        .route("/v1/segments", get(list))
        .route("/v1/segments/{segment}", get(one))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
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

fn parse_json(bytes: &[u8]) -> Result<Vec<RawPair>, ApiError> {
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

fn parse_ndjson(bytes: &[u8], max_pairs: usize) -> Result<Vec<RawPair>, ApiError> {
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

async fn push(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<serde_json::Value>, ApiError> {
    let ingest = state
        .ingest
        .as_ref()
        .ok_or_else(|| ApiError::not_served("ingest"))?;
    let format = format_of(&headers)?;
    let max = state.max_request_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(too_large(max));
    }
    let reserve = declared.unwrap_or(max).max(1);
    let _permit = tokio::time::timeout(
        state.overload_wait,
        state.inflight_bytes.acquire_many(reserve as u32),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorKind::Overloaded,
            "too many request bytes in flight; try again shortly",
        )
    })?
    .map_err(|_| ApiError::new(ErrorKind::Unavailable, "shutting down"))?;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|e| {
        let text = e.to_string();
        if text.contains("length limit") {
            too_large(max)
        } else {
            ApiError::invalid(format!("could not read the request body: {text}"))
        }
    })?;
    let raw = match format {
        Format::Json => parse_json(&bytes)?,
        Format::NdJson => parse_ndjson(&bytes, ingest.limits().max_pairs_per_request)?,
    };
    let accepted = ingest.push(raw).await?;
    Ok(Json(json!({ "accepted": accepted })))
}

fn mode_of(query: Option<&str>) -> Result<Mode, ApiError> {
    let mut mode = Mode::Exact;
    for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        match (k, v) {
            ("mode", "exact") => mode = Mode::Exact,
            ("mode", "approx") => mode = Mode::Approx,
            ("mode", other) => {
                return Err(ApiError::invalid(format!(
                    "mode must be exact or approx, not {other:?}"
                )))
            }
            (other, _) => {
                return Err(ApiError::invalid(format!(
                    "unknown query parameter {other:?}; the only one is mode"
                )))
            }
        }
    }
    Ok(mode)
}

/// The estimation use case (when this process serves estimates) and the requested mode.
fn estimation<'a>(
    state: &'a ApiState,
    query: Option<&str>,
) -> Result<(&'a userseg_usecase::Estimation, Mode), ApiError> {
    let est = state
        .estimation
        .as_ref()
        .ok_or_else(|| ApiError::not_served("estimates"))?;
    Ok((est, mode_of(query)?))
}

async fn one(
    State(state): State<ApiState>,
    Path(segment): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (est, mode) = estimation(&state, query.as_deref())?;
    let e = est.estimate(&segment, mode).await?;
    Ok(Json(json!({
        "segment": e.segment,
        "users": e.users,
        "exact": e.exact,
        "window_seconds": e.window_seconds,
        "as_of": e.as_of,
    })))
}

async fn list(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (est, mode) = estimation(&state, query.as_deref())?;
    let l = est.list(mode).await?;
    let segments: Vec<_> = l
        .segments
        .iter()
        .map(|s| json!({"segment": s.segment, "users": s.users}))
        .collect();
    Ok(Json(json!({
        "segments": segments,
        "exact": l.exact,
        "window_seconds": l.window_seconds,
        "as_of": l.as_of,
    })))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<ApiState>) -> Response {
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

async fn metrics(State(state): State<ApiState>) -> Response {
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
    }
}
