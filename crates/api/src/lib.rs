//! Delivery: the gRPC service `userseg.v1.Segments` (plus gRPC health and reflection) and the
//! HTTP/JSON API, served together on one port.

mod analytics_http;
pub mod auth;
mod changes_http;
pub mod conn;
#[doc(hidden)]
pub mod decode;
mod error;
mod grpc;
mod http;
mod observe;
pub mod openapi;
pub mod shards_http;
pub mod tls;
mod ui;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use userseg_usecase::{Analytics, Changes, Estimation, History, Ingest};

pub use auth::{Authenticator, KeyFileError, KeySet, Role};
pub use error::ApiError;
pub use observe::HTTP_ROUTES;
pub use tls::{serve_tls, TlsError, TlsFiles, TlsReloader};

/// A named readiness check (the broker, ClickHouse, the batch processor...).
pub type ReadyCheck =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// What the API serves. A USS has only `ingest`, an ES only `estimation`, standalone both.
#[derive(Clone)]
pub struct ApiState {
    pub ingest: Option<Ingest>,
    pub estimation: Option<Estimation>,
    /// User lookup, deletion, expressions, overlap, export, counts with `within`.
    pub analytics: Option<Analytics>,
    /// Segment count history.
    pub history: Option<History>,
    /// The change feed (`GET /v1/changes`), when it is on.
    pub changes: Option<Changes>,
    pub ready_checks: Vec<(String, ReadyCheck)>,
    pub metrics: Option<PrometheusHandle>,
    /// When set, every route but the open ones needs `Authorization: Bearer <token>` of a key
    /// with the route's role (see [`auth`]).
    pub auth: Option<Authenticator>,
    /// Largest request body (HTTP) or message (gRPC), in bytes.
    pub max_request_bytes: usize,
    /// Request bytes being decoded at once, at most (bounds memory under load).
    pub inflight_bytes: Arc<Semaphore>,
    /// How long a request waits for room before answering overloaded.
    pub overload_wait: Duration,
    /// Batches of one PushStream call being made durable at once.
    pub stream_pipeline: usize,
    /// An ES of a sharded index: its loaded shards, served to its peers on the internal routes
    /// (`shards_http`).
    pub shards: Option<Arc<dyn userseg_usecase::ShardServer>>,
}

impl ApiState {
    pub fn new(ingest: Option<Ingest>, estimation: Option<Estimation>) -> Self {
        let max_request_bytes = ingest
            .as_ref()
            .map_or(16 << 20, |i| i.limits().max_request_bytes);
        ApiState {
            ingest,
            estimation,
            analytics: None,
            history: None,
            changes: None,
            ready_checks: Vec::new(),
            metrics: None,
            auth: None,
            max_request_bytes,
            inflight_bytes: Arc::new(Semaphore::new(
                (max_request_bytes * 16).min(Semaphore::MAX_PERMITS),
            )),
            overload_wait: Duration::from_secs(5),
            stream_pipeline: 8,
            shards: None,
        }
    }
}

/// The whole API as one router: HTTP routes plus the gRPC services.
pub fn router(state: ApiState) -> Router {
    if state.auth.is_some() {
        auth::describe_metrics();
    }
    let grpc = grpc::routes(state.clone());
    // gRPC requests (by content type) go to the tonic services; anything else unmatched gets
    // a JSON 404.
    let fallback = tower::service_fn(move |req: axum::extract::Request| {
        let grpc = grpc.clone();
        async move {
            let is_grpc = req
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/grpc"));
            if is_grpc {
                tower::ServiceExt::oneshot(grpc, req).await
            } else {
                Ok(http::not_found(req).await)
            }
        }
    });
    let mut routes = http::routes(state.clone());
    if state.estimation.is_some() {
        routes = routes.merge(ui::routes());
    }
    if let Some(shards) = &state.shards {
        routes = routes.merge(shards_http::routes(shards.clone()));
    }
    routes
        .fallback_service(fallback)
        .layer(axum::middleware::from_fn_with_state(
            state,
            auth::middleware,
        ))
        .layer(axum::middleware::from_fn(observe::observe))
        .layer(axum::middleware::from_fn(catch_panic))
}

/// A handler that panics (a bug) answers 500 `internal` through the one error mapping instead
/// of dropping the connection, and the panic is logged with the route.
async fn catch_panic(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    use futures::FutureExt as _;
    let what = format!("{} {}", req.method(), req.uri().path());
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(resp) => resp,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(request = %what, panic = %why, "a request handler panicked");
            ApiError::new(
                userseg_domain::ErrorKind::Internal,
                format!("internal error while serving {what}"),
            )
            .into_response()
        }
    }
}

/// Serves `router` on `listener` until `shutdown` fires, then stops accepting and lets
/// in-flight requests finish. Every connection gets the limits of [`conn`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    accept_until(listener, shutdown, |stream, watcher| {
        conn::serve(stream, router.clone(), watcher)
    })
    .await
}

/// Accepts connections on `listener` until `shutdown` fires, handing each one (with
/// `TCP_NODELAY`) and a graceful-shutdown watcher to `handle` on a task of its own; then stops
/// accepting and waits until every connection has finished its requests.
pub(crate) async fn accept_until<F, Fut>(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    mut handle: F,
) -> std::io::Result<()>
where
    F: FnMut(tokio::net::TcpStream, hyper_util::server::graceful::Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, graceful.watcher()));
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
