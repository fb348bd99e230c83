//! Segment history: a sampler that records every segment's count each `interval` (at ticks that
//! are multiples of it), and the query that reads one segment's samples by step.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use userseg_domain::{validate_segment, ErrorKind, PairError, UnixSeconds};

use crate::{Clock, HistoryPoint, HistoryStore, Mode, PortError, SegmentCounter};

/// Most points one history query may ask for.
pub const MAX_HISTORY_POINTS: u64 = 10_000;
/// What `from` defaults to: `to` minus this.
pub const DEFAULT_HISTORY_SPAN: i64 = 7 * 86_400;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Seconds between samples (`HISTORY_INTERVAL`, at least 1).
    pub interval: u64,
    /// Seconds samples are kept (`HISTORY_RETENTION`).
    pub retention: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            interval: 60,
            retention: 35 * 86_400,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("invalid segment name: {0}")]
    InvalidSegment(PairError),
    #[error("invalid history range: {0}")]
    InvalidRange(String),
    #[error(transparent)]
    Store(#[from] PortError),
}

impl HistoryError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            HistoryError::InvalidSegment(_) | HistoryError::InvalidRange(_) => {
                ErrorKind::InvalidArgument
            }
            HistoryError::Store(PortError::Overloaded(_)) => ErrorKind::Overloaded,
            HistoryError::Store(PortError::Transient(_)) => ErrorKind::Unavailable,
            HistoryError::Store(PortError::Permanent(_)) => ErrorKind::Internal,
        }
    }
}

/// `GET /v1/segments/{s}/history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryAnswer {
    pub segment: String,
    pub step_seconds: u64,
    pub from: UnixSeconds,
    pub to: UnixSeconds,
    pub points: Vec<HistoryPoint>,
}

#[derive(Clone)]
pub struct History {
    store: Arc<dyn HistoryStore>,
    clock: Arc<dyn Clock>,
    config: HistoryConfig,
}

impl History {
    pub fn new(store: Arc<dyn HistoryStore>, clock: Arc<dyn Clock>, config: HistoryConfig) -> Self {
        History {
            store,
            clock,
            config,
        }
    }

    pub fn config(&self) -> HistoryConfig {
        self.config
    }

    /// `to` defaults to now, `from` to `to - 7d`, `step` to the larger of the sampling interval
    /// and one hour. At most [`MAX_HISTORY_POINTS`] steps.
    pub async fn query(
        &self,
        segment: &str,
        from: Option<UnixSeconds>,
        to: Option<UnixSeconds>,
        step: Option<u64>,
    ) -> Result<HistoryAnswer, HistoryError> {
        validate_segment(segment).map_err(HistoryError::InvalidSegment)?;
        let to = to.unwrap_or_else(|| self.clock.now());
        let from = from.unwrap_or(to.saturating_sub(DEFAULT_HISTORY_SPAN));
        let bad = |m: String| Err(HistoryError::InvalidRange(m));
        if from > to {
            return bad(format!("from ({from}) is after to ({to})"));
        }
        let step = step.unwrap_or(self.config.interval.max(3600));
        if step == 0 {
            return bad("step must be at least 1 s".into());
        }
        let span = to.abs_diff(from);
        let steps = (span / step).saturating_add(1);
        if steps > MAX_HISTORY_POINTS {
            return bad(format!(
                "{steps} steps of {step} s from {from} to {to}; at most {MAX_HISTORY_POINTS} are allowed, use a larger step"
            ));
        }
        let points = self.store.read(segment, from, to, step).await?;
        Ok(HistoryAnswer {
            segment: segment.to_owned(),
            step_seconds: step,
            from,
            to,
            points,
        })
    }
}

/// Samples every segment's count at each tick and prunes what retention lets go.
pub struct HistorySampler {
    counter: Arc<dyn SegmentCounter>,
    store: Arc<dyn HistoryStore>,
    clock: Arc<dyn Clock>,
    config: HistoryConfig,
}

impl HistorySampler {
    pub fn new(
        counter: Arc<dyn SegmentCounter>,
        store: Arc<dyn HistoryStore>,
        clock: Arc<dyn Clock>,
        config: HistoryConfig,
    ) -> Self {
        HistorySampler {
            counter,
            store,
            clock,
            config,
        }
    }

    /// Records the sample of tick `at` and prunes samples older than the retention.
    pub async fn sample(&self, at: UnixSeconds) -> Result<(), PortError> {
        let (counts, _) = self.counter.count_all(at, Mode::Exact).await?;
        self.store.record(at, &counts).await?;
        self.store
            .prune(at.saturating_sub(self.config.retention as i64))
            .await?;
        metrics::counter!("userseg_history_samples_total").increment(1);
        Ok(())
    }

    /// Samples at every tick until `cancel`. A tick missed while the process was down is not
    /// made up (its count is unknown); a failed sample is logged and the next tick tried.
    pub async fn run(self, cancel: CancellationToken) {
        let i = self.config.interval.max(1) as i64;
        let stored = match self.store.last_tick().await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "reading the last history tick failed");
                None
            }
        };
        // A tick already past at start is not sampled late (the store then holds later data).
        let now = self.clock.now();
        let floor = now.div_euclid(i) * i;
        let mut last = if now == floor { floor - i } else { floor };
        if let Some(t) = stored {
            last = last.max(t);
        }
        loop {
            let now = self.clock.now();
            let cur = now.div_euclid(i) * i;
            if cur > last {
                if let Err(e) = self.sample(cur).await {
                    tracing::warn!(error = %e, tick = cur, "history sample failed");
                }
                last = cur;
                continue;
            }
            // The clock has whole seconds: sleep until shortly before the next tick, then nap.
            let wait = Duration::from_secs((cur + i - now).max(0) as u64)
                .saturating_sub(Duration::from_millis(900))
                .max(Duration::from_millis(50));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
