//! One connection of the API (plain or TLS), served by hyper with the limits that keep hostile
//! or broken clients from holding the server: a deadline for the first request, a header read
//! timeout, bounded header sizes, and HTTP/2 stream and reset limits.
//!
//! `axum::serve` sets none of these (hyper's header read timeout needs a timer, which it does
//! not give), so a client sending its headers one byte at a time held a connection forever.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

/// A connection must deliver the headers of its first request within this time (after the TLS
/// handshake, when there is one), or it is closed. Covers slow HTTP/1 headers, a slow HTTP/2
/// preface and a client that connects and sends nothing.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1: the headers of every later request on a kept-alive connection must arrive within
/// this time too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head: HTTP/1 read buffer (request line and headers; larger gets 431) and the
/// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` (larger resets the stream).
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// HTTP/1: at most this many headers (more gets 431).
pub const MAX_HEADERS: usize = 100;
/// HTTP/2: streams open at once on one connection (`SETTINGS_MAX_CONCURRENT_STREAMS`).
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// HTTP/2: streams reset by the client before the server accepted them, at most this many
/// pending at once; more (a rapid-reset flood, CVE-2023-44487) closes the connection with
/// `ENHANCE_YOUR_CALM`.
pub const MAX_PENDING_RESETS: usize = 20;
/// HTTP/2: streams the server had to reset because of client errors, at most this many per
/// connection before it is closed.
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;
/// HTTP/2: pings on an idle connection find dead peers; one that does not answer in
/// [`KEEP_ALIVE_TIMEOUT`] is closed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The connection builder with every limit set (both protocols, chosen per connection).
fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(KEEP_ALIVE_INTERVAL)
        .keep_alive_timeout(KEEP_ALIVE_TIMEOUT);
    b
}

/// Serves one accepted connection (already past TLS, if any) until it ends, the client misses
/// the first-request deadline, or graceful shutdown finishes it.
pub(crate) async fn serve<I>(io: I, router: Router, watcher: hyper_util::server::graceful::Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let seen = Arc::new(AtomicBool::new(false));
    let flag = seen.clone();
    let service = tower::service_fn(move |req: axum::extract::Request<hyper::body::Incoming>| {
        flag.store(true, Ordering::Relaxed);
        let router = router.clone();
        async move {
            let resp = tower::ServiceExt::oneshot(router, req).await;
            Ok::<_, Infallible>(match resp {
                Ok(r) => r,
                Err(never) => match never {},
            })
        }
    });
    let service = hyper_util::service::TowerToHyperService::new(service);
    let builder = builder();
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let conn = watcher.watch(conn.into_owned());
    tokio::pin!(conn);
    let deadline = async {
        tokio::time::sleep(FIRST_REQUEST_TIMEOUT).await;
        if seen.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        result = &mut conn => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        () = deadline => {
            tracing::debug!("closing a connection that sent no complete request in time");
        }
    }
}
