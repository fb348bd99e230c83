//! `userseg uss`: the stateless ingest service. It validates pairs and user deletions exactly
//! like standalone and publishes them to Kafka (a deletion is acknowledged once on the topic).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio_util::sync::CancellationToken;
use userseg_api::ApiState;
use userseg_kafka::KafkaPublisher;
use userseg_usecase::{Analytics, Clock, Ingest, SystemClock};

use crate::config::UssConfig;
use crate::observability;
use crate::server::{self, Server};

/// Starts the API publishing to Kafka (creating the topics first when asked to); on shutdown
/// it drains the in-flight requests and flushes the producer.
pub async fn start(cfg: UssConfig, shutdown: CancellationToken) -> Result<Server> {
    let metrics = observability::metrics(observability::Role::Uss)?;
    let listener = server::bind(&cfg.service).await?;
    if cfg.create_topics {
        if let Err(e) = userseg_kafka::ensure_topics(&cfg.kafka).await {
            // The broker may come later; publishing will say UNAVAILABLE until then.
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
    }
    let publisher = Arc::new(KafkaPublisher::new(&cfg.kafka)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ingest = Ingest::new(
        publisher.clone(),
        clock.clone(),
        cfg.service.window,
        cfg.service.limits,
    );
    let mut state = ApiState::new(Some(ingest), None);
    // Deletions only: the reads are an ES's.
    state.analytics = Some(Analytics::deletions(
        publisher.clone(),
        clock,
        cfg.service.window,
    ));
    state.metrics = Some(metrics);
    state.auth = cfg.service.auth.clone();
    let teardown = async move {
        if let Err(e) = publisher.flush(Duration::from_secs(10)).await {
            tracing::warn!(error = %e, "producer flush on shutdown failed");
        }
        Ok(())
    };
    server::run(listener, state, &cfg.service, "uss", shutdown, teardown)
}
