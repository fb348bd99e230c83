//! Request metrics for both protocols: counts, errors and duration histograms by route (HTTP)
//! or method (gRPC) and outcome. Labels are bounded: HTTP routes are the router's templates
//! (`/v1/segments/{segment}`, never the segment itself), gRPC methods are the served ones.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;

/// The error code of a response made from an [`crate::ApiError`] (set as a response extension).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ErrorCode(pub &'static str);

/// gRPC services whose method names are used as labels.
const GRPC_SERVICES: &[&str] = &[
    "userseg.v1.Segments",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
];

/// The gRPC code names, by number (the `code` label).
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// HTTP routes the API serves (the `route` label), so every family exists from start-up.
pub const HTTP_ROUTES: &[&str] = &[
    "/v1/pairs",
    "/v1/segments",
    "/v1/segments/{segment}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/ui/",
    "/ui/{*asset}",
];

/// Records one request: `userseg_http_*` for HTTP, `userseg_grpc_*` for gRPC.
pub(crate) async fn observe(req: Request, next: Next) -> Response {
    let started = Instant::now();
    let is_grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if is_grpc {
        let method = grpc_method(req.uri().path());
        let resp = next.run(req).await;
        // Unary answers and errors carry grpc-status in the headers (trailers-only) or in the
        // trailers after the body; a response without it in the headers is a success so far.
        let code = resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .and_then(|c| GRPC_CODES.get(c).copied())
            .unwrap_or("OK");
        // tonic answers a method it does not know with a bare UNIMPLEMENTED (no grpc-message):
        // label those together so made-up method names cannot grow the label set.
        let unknown = code == "UNIMPLEMENTED" && !resp.headers().contains_key("grpc-message");
        let method = if unknown { "other".to_string() } else { method };
        let labels = [("method", method), ("code", code.to_string())];
        metrics::counter!("userseg_grpc_requests_total", &labels).increment(1);
        metrics::histogram!("userseg_grpc_request_duration_seconds", &labels)
            .record(started.elapsed());
        return resp;
    }
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_string();
    let resp = next.run(req).await;
    let status = resp.status();
    let labels = [
        ("route", route.clone()),
        ("status", status.as_str().to_string()),
    ];
    metrics::counter!("userseg_http_requests_total", &labels).increment(1);
    metrics::histogram!("userseg_http_request_duration_seconds", &labels).record(started.elapsed());
    if status.is_client_error() || status.is_server_error() {
        let code = match resp.extensions().get::<ErrorCode>() {
            Some(ErrorCode(c)) => (*c).to_string(),
            None if status.as_u16() == 404 => "not_found".to_string(),
            None => format!("http_{}", status.as_u16()),
        };
        metrics::counter!("userseg_http_errors_total", "route" => route, "code" => code)
            .increment(1);
    }
    resp
}

/// `Service/Method` for the services we serve; `other` for anything else.
fn grpc_method(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return "other".into();
    };
    let plausible = !method.is_empty()
        && method.len() <= 64
        && method
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if GRPC_SERVICES.contains(&service) && plausible {
        format!("{service}/{method}")
    } else {
        "other".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_methods_are_bounded() {
        assert_eq!(
            grpc_method("/userseg.v1.Segments/Push"),
            "userseg.v1.Segments/Push"
        );
        assert_eq!(grpc_method("/evil.Service/Push"), "other");
        assert_eq!(grpc_method("/userseg.v1.Segments/a/b"), "other");
        assert_eq!(grpc_method("/"), "other");
        assert_eq!(GRPC_CODES[16], "UNAUTHENTICATED");
    }
}
