//! Serving the API and the pieces every role shares: readiness of the batch processor,
//! start and bounded stop of the server.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userseg_api::{ApiState, ReadyCheck};
use userseg_usecase::ProcessorHealth;

use crate::config::ServiceConfig;

/// Not ready while the batch processor's writes to the store keep failing.
pub fn processor_check(health: ProcessorHealth) -> ReadyCheck {
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

/// Binds the service address and serves the API until `shutdown` fires.
pub async fn serve(
    state: ApiState,
    service: &ServiceConfig,
    role: &str,
    shutdown: CancellationToken,
) -> Result<JoinHandle<std::io::Result<()>>> {
    let listener = tokio::net::TcpListener::bind(service.addr)
        .await
        .with_context(|| {
            format!(
                "SERVICE_HOST/SERVICE_PORT: cannot listen on {}",
                service.addr
            )
        })?;
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
    Ok(match service.tls.clone() {
        Some(tls) => tokio::spawn(userseg_api::serve_tls(listener, router, tls, shutdown)),
        None => tokio::spawn(userseg_api::serve(listener, router, shutdown)),
    })
}

/// Waits for the server to finish its in-flight requests, at most 10 s.
pub async fn stop(server: JoinHandle<std::io::Result<()>>) {
    match tokio::time::timeout(Duration::from_secs(10), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "server error during shutdown"),
        Ok(Err(e)) => tracing::warn!(error = %e, "server task failed"),
        Err(_) => tracing::warn!("in-flight requests did not finish in 10 s; closing them"),
    }
}
