use std::sync::Arc;
use std::time::Instant;

use userseg_domain::{validate_batch, BatchError, ErrorKind, Limits, RawPair, Window};

use crate::{Clock, PairPublisher, PortError};

/// Ingest: validate a request all-or-nothing, then publish it durably.
#[derive(Clone)]
pub struct Ingest {
    publisher: Arc<dyn PairPublisher>,
    clock: Arc<dyn Clock>,
    window: Window,
    limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Invalid(#[from] BatchError),
    #[error(transparent)]
    Publish(#[from] PortError),
}

impl IngestError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            IngestError::Invalid(BatchError::TooManyPairs { .. }) => ErrorKind::PayloadTooLarge,
            IngestError::Invalid(BatchError::Pair { .. }) => ErrorKind::InvalidArgument,
            IngestError::Publish(PortError::Overloaded(_)) => ErrorKind::Overloaded,
            IngestError::Publish(PortError::Transient(_)) => ErrorKind::Unavailable,
            IngestError::Publish(PortError::Permanent(_)) => ErrorKind::Internal,
        }
    }

    /// Index of the offending pair within the request, when one pair is to blame.
    pub fn index(&self) -> Option<usize> {
        match self {
            IngestError::Invalid(BatchError::Pair { index, .. }) => Some(*index),
            _ => None,
        }
    }
}

impl Ingest {
    pub fn new(
        publisher: Arc<dyn PairPublisher>,
        clock: Arc<dyn Clock>,
        window: Window,
        limits: Limits,
    ) -> Self {
        Ingest {
            publisher,
            clock,
            window,
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn window(&self) -> Window {
        self.window
    }

    /// Validates and durably publishes the pairs; returns how many were accepted. On error
    /// nothing of this request was accepted (validation is all-or-nothing and publishing is
    /// either acknowledged as a whole or must be retried by the client).
    pub async fn push(&self, raw: Vec<RawPair>) -> Result<usize, IngestError> {
        let started = Instant::now();
        let now = self.clock.now();
        let pairs = match validate_batch(raw, now, self.window, &self.limits) {
            Ok(p) => p,
            Err(e) => {
                metrics::counter!("userseg_ingest_rejected_requests_total", "reason" => "invalid")
                    .increment(1);
                return Err(e.into());
            }
        };
        let n = pairs.len();
        if n == 0 {
            return Ok(0);
        }
        if let Err(e) = self.publisher.publish(pairs).await {
            let reason = match e {
                PortError::Overloaded(_) => "overloaded",
                PortError::Transient(_) => "unavailable",
                PortError::Permanent(_) => "rejected",
            };
            metrics::counter!("userseg_ingest_rejected_requests_total", "reason" => reason)
                .increment(1);
            return Err(e.into());
        }
        metrics::counter!("userseg_ingest_pairs_total").increment(n as u64);
        metrics::histogram!("userseg_ingest_publish_seconds").record(started.elapsed());
        Ok(n)
    }

    pub async fn check_ready(&self) -> Result<(), PortError> {
        self.publisher.check_ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use async_trait::async_trait;
    use std::sync::Mutex;
    use userseg_domain::Pair;

    #[derive(Default)]
    struct Recorder {
        published: Mutex<Vec<Pair>>,
        fail: Mutex<Option<PortError>>,
    }

    #[async_trait]
    impl PairPublisher for Recorder {
        async fn publish(&self, pairs: Vec<Pair>) -> Result<(), PortError> {
            if let Some(e) = self.fail.lock().unwrap().clone() {
                return Err(e);
            }
            self.published.lock().unwrap().extend(pairs);
            Ok(())
        }
        async fn check_ready(&self) -> Result<(), PortError> {
            Ok(())
        }
    }

    fn raw(u: &str, s: &str, ts: Option<i64>) -> RawPair {
        RawPair {
            user_id: u.into(),
            segment: s.into(),
            ts,
        }
    }

    fn ingest(rec: Arc<Recorder>) -> Ingest {
        Ingest::new(
            rec,
            Arc::new(ManualClock::new(1_000_000)),
            Window::from_secs(3600).unwrap(),
            Limits::default(),
        )
    }

    #[tokio::test]
    async fn fills_missing_ts_with_receipt_time() {
        let rec = Arc::new(Recorder::default());
        let n = ingest(rec.clone())
            .push(vec![raw("u1", "s", None), raw("u2", "s", Some(999_000))])
            .await
            .unwrap();
        assert_eq!(n, 2);
        let got = rec.published.lock().unwrap().clone();
        assert_eq!(got[0].ts, 1_000_000);
        assert_eq!(got[1].ts, 999_000);
    }

    #[tokio::test]
    async fn invalid_pair_publishes_nothing() {
        let rec = Arc::new(Recorder::default());
        let err = ingest(rec.clone())
            .push(vec![raw("u1", "s", None), raw("u2", "s", Some(990_000))])
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(err.index(), Some(1));
        assert!(rec.published.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn publisher_errors_map_to_kinds() {
        let rec = Arc::new(Recorder::default());
        let ing = ingest(rec.clone());
        *rec.fail.lock().unwrap() = Some(PortError::Overloaded("full".into()));
        let e = ing.push(vec![raw("u", "s", None)]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Overloaded);
        *rec.fail.lock().unwrap() = Some(PortError::Transient("down".into()));
        let e = ing.push(vec![raw("u", "s", None)]).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }
}
