//! The web console: one page and its assets, compiled into the binary (no CDN, no files at run
//! time). The page reads the same public API as any client, with the bearer token the user
//! types in (kept in the tab's sessionStorage); the assets themselves need no token.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("../ui/index.html");

/// The assets under `/ui/`, by file name: content and media type.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        include_str!("../ui/app.js"),
        "text/javascript; charset=utf-8",
    ),
    (
        "app.css",
        include_str!("../ui/app.css"),
        "text/css; charset=utf-8",
    ),
];

pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(index))
        // A catch-all, as the access table spells the console's routes (`/ui/{*}`: open).
        .route("/ui/{*asset}", get(asset))
}

fn page(body: &'static str, media_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, media_type),
            // Assets change with the binary; a reload should never show a stale page.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
            ),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    page(INDEX, "text/html; charset=utf-8")
}

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, body, media_type)) => page(body, media_type),
        None => crate::ApiError::new(
            userseg_domain::ErrorKind::NotFound,
            format!("the console has no asset {name:?}"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_references_only_embedded_assets() {
        for reference in INDEX
            .split(['"', '\''])
            .filter(|s| s.ends_with(".js") || s.ends_with(".css") || s.starts_with("http"))
        {
            assert!(
                ASSETS.iter().any(|(n, _, _)| *n == reference),
                "index.html references {reference:?}, which is not embedded"
            );
        }
    }
}
