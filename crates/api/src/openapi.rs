//! The OpenAPI 3 document of the HTTP API, generated from the handlers' types and served at
//! `/openapi.json`.

use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "userseg",
        description = "Segment membership counts and analytics. A user is in a segment for WINDOW (14 days by default) after the latest ts of its pairs. Every count is exact. Errors are JSON bodies `{\"error\": {\"code\", \"message\"}}`; gRPC `userseg.v1.Segments` mirrors every route."
    ),
    paths(
        crate::http::push,
        crate::http::list,
        crate::http::one,
        crate::analytics_http::user_segments,
        crate::analytics_http::delete_user,
        crate::analytics_http::delete_users,
        crate::analytics_http::count,
        crate::analytics_http::overlap,
        crate::analytics_http::members,
        crate::analytics_http::history,
        crate::changes_http::changes,
        crate::http::healthz,
        crate::http::readyz,
        crate::http::metrics,
        serve,
    ),
    tags(
        (name = "ingest", description = "Pushing pairs"),
        (name = "estimates", description = "Counts per segment"),
        (name = "analytics", description = "Users, deletions, expressions, overlap, export, history"),
        (name = "operations", description = "Probes, metrics and this document"),
    )
)]
pub struct ApiDoc;

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "OpenAPI 3 document", body = serde_json::Value, example = json!({"openapi": "3.1.0"}))))]
pub(crate) async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The document, for tests and tools.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}
