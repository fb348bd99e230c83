//! The analytics routes of the HTTP API: per-user lookup, deletion, set expressions, overlap,
//! member export (NDJSON stream) and history. Validation is the use cases'; errors go through
//! the one [`ApiError`] mapping.

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use userseg_domain::{ErrorKind, Within};
use userseg_usecase::{
    Analytics, AnalyticsError, History, HistoryError, Member, Membership, PortError,
};
use utoipa::ToSchema;

use crate::{ApiError, ApiState};

impl From<AnalyticsError> for ApiError {
    fn from(e: AnalyticsError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

impl From<HistoryError> for ApiError {
    fn from(e: HistoryError) -> Self {
        ApiError::new(e.kind(), e.to_string())
    }
}

pub(crate) fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/users/{user_id}/segments", get(user_segments))
        .route("/v1/users/{user_id}", delete(delete_user))
        .route("/v1/users/delete", post(delete_users))
        .route("/v1/count", get(count))
        .route("/v1/overlap", get(overlap))
        .route("/v1/segments/{segment}/members", get(members))
        .route("/v1/segments/{segment}/history", get(history))
        .route("/v1/changes", get(crate::changes_http::changes))
        .with_state(state)
}

fn not_served(what: &str) -> ApiError {
    ApiError::not_served(what)
}

/// The analytics reads (a USS has none).
pub(crate) fn analytics(state: &ApiState) -> Result<&Analytics, ApiError> {
    state
        .analytics
        .as_ref()
        .filter(|a| a.serves_reads())
        .ok_or_else(|| not_served("analytics"))
}

/// User deletions (an ES has none: they go through a USS).
pub(crate) fn deletions(state: &ApiState) -> Result<&Analytics, ApiError> {
    state
        .analytics
        .as_ref()
        .filter(|a| a.serves_deletions())
        .ok_or_else(|| not_served("user deletions"))
}

/// A path parameter, percent-decoded; a rejection becomes our JSON 400.
pub(crate) fn path_param(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|e| ApiError::invalid(format!("invalid path: {}", e.body_text())))
}

/// Query parameters (percent- and `+`-decoded), only those in `allowed`, each at most once.
pub(crate) fn query_params(
    query: Option<&str>,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::invalid(format!("invalid query string: {e}")))?;
    for (i, (k, _)) in pairs.iter().enumerate() {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!(
                "unknown query parameter {k:?}; allowed: {}",
                allowed.join(", ")
            )));
        }
        if pairs[..i].iter().any(|(k2, _)| k2 == k) {
            return Err(ApiError::invalid(format!(
                "query parameter {k:?} is given twice"
            )));
        }
    }
    Ok(pairs)
}

pub(crate) fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A query parameter the route cannot do without.
fn required<'a>(params: &'a [(String, String)], key: &str) -> Result<&'a str, ApiError> {
    param(params, key).ok_or_else(|| ApiError::invalid(format!("missing query parameter {key}")))
}

pub(crate) fn within_param(
    a: &Analytics,
    params: &[(String, String)],
) -> Result<Option<Within>, ApiError> {
    Ok(a.parse_within(param(params, "within"))?)
}

/// The JSON error body.
#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// `invalid_argument`, `payload_too_large`, `unauthenticated`, `not_found`, `overloaded`,
    /// `unavailable`, `internal`, ...
    code: String,
    message: String,
    /// The offending pair of a push.
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    /// The offending NDJSON line of a push (1-based).
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct MembershipBody {
    segment: String,
    /// Unix seconds, rounded down to the store's time bucket (at most 60 s).
    last_seen: i64,
    /// When the membership ends unless a newer pair arrives: last_seen + window.
    expires_at: i64,
}

impl From<Membership> for MembershipBody {
    fn from(m: Membership) -> Self {
        MembershipBody {
            segment: m.segment,
            last_seen: m.last_seen,
            expires_at: m.expires_at,
        }
    }
}

#[derive(Serialize, ToSchema)]
pub(crate) struct UserSegmentsBody {
    user_id: String,
    /// Live memberships, sorted by segment.
    segments: Vec<MembershipBody>,
    as_of: i64,
}

/// The live memberships of one user.
#[utoipa::path(
    get,
    path = "/v1/users/{user_id}/segments",
    tag = "analytics",
    params(("user_id" = String, Path, description = "The user id, percent-encoded (may hold `/`, spaces, any UTF-8)", example = "u1")),
    responses(
        (status = 200, description = "Live memberships sorted by segment; an unknown user has none", body = UserSegmentsBody,
         example = json!({"user_id": "u1", "segments": [{"segment": "sports", "last_seen": 1764000000, "expires_at": 1765209600}], "as_of": 1764000123})),
        (status = 400, description = "Invalid user id", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid user_id: user_id contains the control character U+000A at byte 1"}})),
    )
)]
pub(crate) async fn user_segments(
    State(state): State<ApiState>,
    user_id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<UserSegmentsBody>, ApiError> {
    let a = analytics(&state)?;
    let user_id = path_param(user_id)?;
    query_params(query.as_deref(), &[])?;
    let u = a.user_segments(&user_id).await?;
    Ok(Json(UserSegmentsBody {
        user_id: u.user_id,
        segments: u.segments.into_iter().map(Into::into).collect(),
        as_of: u.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct DeletedBody {
    /// Distinct user ids deleted (durably logged; applied in order with their pairs).
    deleted: usize,
}

/// Deletes one user (the right to erasure).
#[utoipa::path(
    delete,
    path = "/v1/users/{user_id}",
    tag = "analytics",
    params(("user_id" = String, Path, description = "The user id, percent-encoded", example = "u2")),
    responses(
        (status = 200, description = "Durable: the user counts nowhere once applied (milliseconds later)", body = DeletedBody, example = json!({"deleted": 1})),
        (status = 400, description = "Invalid user id", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid deletion: user_ids[0]: user_id contains the control character U+000A at byte 1"}})),
    )
)]
pub(crate) async fn delete_user(
    State(state): State<ApiState>,
    user_id: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<DeletedBody>, ApiError> {
    let a = deletions(&state)?;
    let user_id = path_param(user_id)?;
    query_params(query.as_deref(), &[])?;
    let deleted = a.delete_users(vec![user_id]).await?;
    Ok(Json(DeletedBody { deleted }))
}

/// The user ids of a deletion body (`{"user_ids": [...]}`); their validation is the use case's.
pub(crate) fn parse_delete_body(body: &[u8]) -> Result<Vec<String>, ApiError> {
    let body: DeleteUsersBody = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))?;
    Ok(body.user_ids)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct DeleteUsersBody {
    /// 1 to 10,000 user ids; one invalid id rejects the whole request.
    user_ids: Vec<String>,
}

/// Deletes up to 10,000 users in one request.
#[utoipa::path(
    post,
    path = "/v1/users/delete",
    tag = "analytics",
    request_body(content = DeleteUsersBody, example = json!({"user_ids": ["u3", "u4"]})),
    responses(
        (status = 200, description = "Durable", body = DeletedBody, example = json!({"deleted": 2})),
        (status = 400, description = "Malformed body or an invalid id (all or nothing)", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid deletion: user_ids is empty; give 1 to 10000 user ids"}})),
        (status = 413, description = "More than 10,000 ids", body = ErrorBody,
         example = json!({"error": {"code": "payload_too_large", "message": "invalid deletion: the request holds 10001 user ids; at most 10000 are allowed per request"}})),
    )
)]
pub(crate) async fn delete_users(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<DeletedBody>, ApiError> {
    let a = deletions(&state)?;
    let body = body.map_err(|e| {
        let kind = if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ErrorKind::PayloadTooLarge
        } else {
            ErrorKind::InvalidArgument
        };
        ApiError::new(
            kind,
            format!("could not read the request body: {}", e.body_text()),
        )
    })?;
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let media = ct.split(';').next().unwrap_or("").trim().to_owned();
        if !matches!(
            media.as_str(),
            "" | "application/json" | "application/x-www-form-urlencoded"
        ) {
            return Err(ApiError::new(
                ErrorKind::Unsupported,
                format!("unsupported content type {media:?}; send application/json"),
            ));
        }
    }
    crate::http::check_encoding(&headers)?;
    let user_ids = parse_delete_body(&body)?;
    let deleted = a.delete_users(user_ids).await?;
    Ok(Json(DeletedBody { deleted }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct CountBody {
    /// The expression as given.
    query: String,
    users: u64,
    exact: bool,
    /// The lookback used (the window when `within` is absent).
    within_seconds: u64,
    as_of: i64,
}

/// Users selected by a set expression over segments.
///
/// `AND`, `OR`, `NOT` (any letter case), parentheses, segment names; a segment named like a
/// keyword is written in double quotes. NOT binds tightest, then AND, then OR. `NOT x` means
/// the users with at least one live membership (within `within`) who are not in x. At most 64
/// segment references.
#[utoipa::path(
    get,
    path = "/v1/count",
    tag = "analytics",
    params(
        ("q" = String, Query, description = "The expression", example = "sports AND news AND NOT autos"),
        ("within" = Option<String>, Query, description = "Only memberships newer than now - within: `90m`, `36h`, `7d`; 0 < within <= WINDOW", example = "7d"),
    ),
    responses(
        (status = 200, description = "Exact count", body = CountBody,
         example = json!({"query": "sports AND news AND NOT autos", "users": 1, "exact": true, "within_seconds": 604800, "as_of": 1764000123})),
        (status = 400, description = "Malformed expression (with its position), bad within", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid expression at position 10: expected a segment name, NOT or '(' but found the end of the expression"}})),
    )
)]
pub(crate) async fn count(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Json<CountBody>, ApiError> {
    let a = analytics(&state)?;
    let params = query_params(query.as_deref(), &["q", "within"])?;
    let within = within_param(a, &params)?;
    let q = required(&params, "q")?;
    let c = a.count_expr(q, within).await?;
    Ok(Json(CountBody {
        query: c.query,
        users: c.users,
        exact: true,
        within_seconds: c.within_seconds,
        as_of: c.as_of,
    }))
}

#[derive(Serialize, ToSchema)]
pub(crate) struct OverlapBody {
    segments: Vec<String>,
    /// users[i] = |segments[i]|
    users: Vec<u64>,
    /// both[i][j] = |segments[i] ∩ segments[j]| (symmetric)
    both: Vec<Vec<u64>>,
    exact: bool,
    within_seconds: u64,
    as_of: i64,
}

/// The pairwise intersections of 2 to 64 distinct segments, in the order asked.
#[utoipa::path(
    get,
    path = "/v1/overlap",
    tag = "analytics",
    params(
        ("segments" = String, Query, description = "Comma-separated segment names", example = "sports,news"),
        ("within" = Option<String>, Query, description = "Lookback such as `7d`", example = "14d"),
    ),
    responses(
        (status = 200, description = "The symmetric matrix", body = OverlapBody,
         example = json!({"segments": ["sports", "news"], "users": [2, 2], "both": [[2, 1], [1, 2]], "exact": true, "within_seconds": 1209600, "as_of": 1764000123})),
        (status = 400, description = "Fewer than 2, more than 64, repeated or invalid segments; bad within", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid segments: 1 segments given; give 2 to 64 distinct segments"}})),
    )
)]
pub(crate) async fn overlap(
    State(state): State<ApiState>,
    RawQuery(query): RawQuery,
) -> Result<Json<OverlapBody>, ApiError> {
    let a = analytics(&state)?;
    let params = query_params(query.as_deref(), &["segments", "within"])?;
    let within = within_param(a, &params)?;
    let list = required(&params, "segments")?;
    let o = a
        .overlap(userseg_usecase::analytics::split_segments(list), within)
        .await?;
    Ok(Json(OverlapBody {
        segments: o.segments,
        users: o.overlap.users,
        both: o.overlap.both,
        exact: true,
        within_seconds: o.within_seconds,
        as_of: o.as_of,
    }))
}

/// One line of a member export.
#[derive(Serialize, ToSchema)]
pub(crate) struct MemberLine {
    user_id: String,
    /// Unix seconds, rounded down to the store's time bucket.
    last_seen: i64,
}

fn ndjson(members: Vec<Member>) -> Bytes {
    let mut out = Vec::with_capacity(members.len() * 48);
    for m in members {
        let line = MemberLine {
            user_id: m.user_id,
            last_seen: m.last_seen,
        };
        // Serializing a struct of a string and an integer cannot fail.
        if serde_json::to_writer(&mut out, &line).is_ok() {
            out.push(b'\n');
        }
    }
    Bytes::from(out)
}

/// Every live member of a segment, as NDJSON, streamed (memory stays bounded whatever the size).
#[utoipa::path(
    get,
    path = "/v1/segments/{segment}/members",
    tag = "analytics",
    params(
        ("segment" = String, Path, description = "Segment name", example = "news"),
        ("within" = Option<String>, Query, description = "Lookback such as `7d`", example = "1d"),
    ),
    responses(
        (status = 200, description = "One JSON object per line, any order", content_type = "application/x-ndjson", body = MemberLine,
         example = json!({"user_id": "u1", "last_seen": 1764000000})),
        (status = 400, description = "Invalid segment name or within", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid within: within is 1296000 s, longer than the window of 1209600 s"}})),
    )
)]
pub(crate) async fn members(
    State(state): State<ApiState>,
    segment: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let a = analytics(&state)?;
    let segment = path_param(segment)?;
    let params = query_params(query.as_deref(), &["within"])?;
    let within = within_param(a, &params)?;
    let export = a.export(&segment, within)?;
    let within_seconds = export.within_seconds;
    let as_of = export.as_of;
    struct St {
        rx: tokio::sync::mpsc::Receiver<Vec<Member>>,
        done: Option<tokio::task::JoinHandle<Result<u64, PortError>>>,
    }
    let st = St {
        rx: export.members,
        done: Some(export.done),
    };
    let stream = futures::stream::unfold(st, |mut st| async move {
        match st.rx.recv().await {
            Some(chunk) => Some((Ok::<Bytes, std::io::Error>(ndjson(chunk)), st)),
            None => {
                // The channel closed: the export ended; an error cuts the body short so the
                // client sees a failed transfer rather than a silently partial list.
                let done = st.done.take()?;
                match done.await {
                    Ok(Ok(n)) => {
                        metrics::counter!("userseg_exported_members_total").increment(n);
                        None
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "member export failed");
                        Some((Err(std::io::Error::other(e.to_string())), st))
                    }
                    Err(e) => Some((Err(std::io::Error::other(e.to_string())), st)),
                }
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_string()),
            (
                header::HeaderName::from_static("x-userseg-within-seconds"),
                within_seconds.to_string(),
            ),
            (
                header::HeaderName::from_static("x-userseg-as-of"),
                as_of.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryPointBody {
    /// When the sample was taken (a multiple of HISTORY_INTERVAL).
    ts: i64,
    users: u64,
}

#[derive(Serialize, ToSchema)]
pub(crate) struct HistoryBody {
    segment: String,
    step_seconds: u64,
    /// In time order: per step the latest sample in it; steps without a sample are left out.
    points: Vec<HistoryPointBody>,
}

fn history_use_case(state: &ApiState) -> Result<&History, ApiError> {
    state.history.as_ref().ok_or_else(|| not_served("history"))
}

fn unix_param(params: &[(String, String)], key: &str) -> Result<Option<i64>, ApiError> {
    param(params, key)
        .map(|v| {
            v.parse::<i64>().map_err(|_| {
                ApiError::invalid(format!(
                    "{key} must be unix seconds (an integer), not {v:?}"
                ))
            })
        })
        .transpose()
}

/// A segment's count over time, sampled every HISTORY_INTERVAL.
#[utoipa::path(
    get,
    path = "/v1/segments/{segment}/history",
    tag = "analytics",
    params(
        ("segment" = String, Path, description = "Segment name", example = "sports"),
        ("from" = Option<i64>, Query, description = "Unix seconds; default to - 7d", example = 1764000000),
        ("to" = Option<i64>, Query, description = "Unix seconds; default now", example = 1764003600),
        ("step" = Option<String>, Query, description = "Step such as `1h`; default max(HISTORY_INTERVAL, 1h); at most 10,000 steps", example = "10m"),
    ),
    responses(
        (status = 200, description = "Points in time order", body = HistoryBody,
         example = json!({"segment": "sports", "step_seconds": 600, "points": [{"ts": 1764000000, "users": 2}]})),
        (status = 400, description = "from > to, bad step, too many steps, invalid segment", body = ErrorBody,
         example = json!({"error": {"code": "invalid_argument", "message": "invalid history range: from (1764003600) is after to (1764000000)"}})),
    )
)]
pub(crate) async fn history(
    State(state): State<ApiState>,
    segment: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
) -> Result<Json<HistoryBody>, ApiError> {
    let h = history_use_case(&state)?;
    let segment = path_param(segment)?;
    let params = query_params(query.as_deref(), &["from", "to", "step"])?;
    let from = unix_param(&params, "from")?;
    let to = unix_param(&params, "to")?;
    let step = param(&params, "step")
        .map(|s| {
            Analytics::parse_duration(s)
                .map_err(|e| ApiError::invalid(format!("invalid step: {e}")))
        })
        .transpose()?;
    let r = h.query(&segment, from, to, step).await?;
    Ok(Json(HistoryBody {
        segment: r.segment,
        step_seconds: r.step_seconds,
        points: r
            .points
            .into_iter()
            .map(|p| HistoryPointBody {
                ts: p.ts,
                users: p.users,
            })
            .collect(),
    }))
}
