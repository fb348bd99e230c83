//! Serving the API and the pieces every role shares: readiness of the batch processor, the
//! handle of a running role, start and bounded stop of the server.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userseg_api::{ApiState, ReadyCheck};
use userseg_usecase::ProcessorHealth;

use crate::config::ServiceConfig;

/// A running role (standalone, uss or es), as returned by its `start`: the address it listens
/// on, and its lifetime, which ends once the shutdown token fired and the role has stopped in
/// order (requests drained, batches flushed, final snapshot written).
pub struct Server {
    addr: SocketAddr,
    tls: bool,
    shutdown: CancellationToken,
    task: JoinHandle<Result<()>>,
}

impl Server {
    /// The bound address (the OS picked the port when SERVICE_PORT is 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://<addr>` (`https://` with TLS), the base URL of the HTTP and gRPC API.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Asks the role to stop (the same as firing the shutdown token given to `start`).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the role has stopped; it stops when the shutdown token fires.
    pub async fn wait(self) -> Result<()> {
        self.task.await.context("the role's task failed")?
    }

    /// Fires the shutdown token and waits until the role has stopped.
    pub async fn stop(self) -> Result<()> {
        self.shutdown();
        self.wait().await
    }
}

/// Binds the service address, for a role to build its [`Server`] on.
pub(crate) async fn bind(service: &ServiceConfig) -> Result<TcpListener> {
    tokio::net::TcpListener::bind(service.addr)
        .await
        .with_context(|| {
            format!(
                "SERVICE_HOST/SERVICE_PORT: cannot listen on {}",
                service.addr
            )
        })
}

/// Serves the API on `listener` until `shutdown` fires, then runs `teardown` (after the
/// in-flight requests finished, at most 10 s) and ends.
pub(crate) fn run<F>(
    listener: TcpListener,
    state: ApiState,
    service: &ServiceConfig,
    role: &'static str,
    shutdown: CancellationToken,
    teardown: F,
) -> Result<Server>
where
    F: Future<Output = Result<()>> + Send + 'static,
{
    let addr = listener.local_addr()?;
    crate::reload::on_sighup(state.auth.clone(), service.tls.clone())?;
    tracing::info!(
        %addr,
        role,
        tls = service.tls.is_some(),
        mutual_tls = service.tls.as_ref().is_some_and(|t| t.files().client_ca.is_some()),
        api_keys = state.auth.is_some(),
        window_seconds = service.window.secs(),
        "userseg listening"
    );
    let router = userseg_api::router(state);
    let tls = service.tls.is_some();
    let http = match service.tls.clone() {
        Some(config) => tokio::spawn(userseg_api::serve_tls(
            listener,
            router,
            config,
            shutdown.clone(),
        )),
        None => tokio::spawn(userseg_api::serve(listener, router, shutdown.clone())),
    };
    let stopped = shutdown.clone();
    let task = tokio::spawn(async move {
        stopped.cancelled().await;
        stop(http).await;
        let result = teardown.await;
        tracing::info!(role, "userseg stopped");
        result
    });
    Ok(Server {
        addr,
        tls,
        shutdown,
        task,
    })
}

/// Not ready while the batch processor's writes to the store keep failing.
pub(crate) fn processor_check(health: ProcessorHealth) -> ReadyCheck {
    Arc::new(move || {
        let h = health.clone();
        Box::pin(async move {
            if h.store_ok() {
                Ok(())
            } else {
                Err(format!(
                    "writes to the store are failing, consumption paused: {}",
                    h.last_error().unwrap_or_default()
                ))
            }
        })
    })
}

/// Waits for the server to finish its in-flight requests, at most 10 s.
async fn stop(server: JoinHandle<std::io::Result<()>>) {
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server error during shutdown"),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish in 10 s; closing them"),
    }
}
