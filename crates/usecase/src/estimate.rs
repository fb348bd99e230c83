use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use userseg_domain::{validate_segment, ErrorKind, PairError, UnixSeconds, Window};

use crate::{Clock, Mode, PortError, SegmentCount, SegmentCounter};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    pub segment: String,
    pub users: u64,
    pub exact: bool,
    pub window_seconds: u64,
    pub as_of: UnixSeconds,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EstimateList {
    pub segments: Vec<SegmentCount>,
    pub exact: bool,
    pub window_seconds: u64,
    pub as_of: UnixSeconds,
}

#[derive(Debug, thiserror::Error)]
pub enum EstimationError {
    #[error("invalid segment name: {0}")]
    InvalidSegment(#[from] PairError),
    #[error(transparent)]
    Store(#[from] PortError),
}

impl EstimationError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EstimationError::InvalidSegment(_) => ErrorKind::InvalidArgument,
            EstimationError::Store(PortError::Overloaded(_)) => ErrorKind::Overloaded,
            EstimationError::Store(PortError::Transient(_)) => ErrorKind::Unavailable,
            EstimationError::Store(PortError::Permanent(_)) => ErrorKind::Internal,
        }
    }
}

#[derive(Clone)]
enum Cached {
    One(u64, bool),
    All(Arc<Vec<SegmentCount>>, bool),
}

/// Answers estimate queries, optionally through a short TTL cache (for stores where a query
/// costs real work, like ClickHouse).
#[derive(Clone)]
pub struct Estimation {
    counter: Arc<dyn SegmentCounter>,
    clock: Arc<dyn Clock>,
    window: Window,
    cache_ttl: Duration,
    cache: Arc<Mutex<HashMap<CacheKey, CacheEntry>>>,
}

type CacheKey = (Mode, Option<String>);
type CacheEntry = (Instant, UnixSeconds, Cached);

/// Upper bound on cached entries; the cache is cleared when it would grow past it.
const MAX_CACHE_ENTRIES: usize = 10_000;

impl Estimation {
    pub fn new(
        counter: Arc<dyn SegmentCounter>,
        clock: Arc<dyn Clock>,
        window: Window,
        cache_ttl: Duration,
    ) -> Self {
        Estimation {
            counter,
            clock,
            window,
            cache_ttl,
            cache: Arc::default(),
        }
    }

    fn cached(&self, key: &(Mode, Option<String>)) -> Option<(UnixSeconds, Cached)> {
        if self.cache_ttl.is_zero() {
            return None;
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(key) {
            Some((at, as_of, v)) if at.elapsed() < self.cache_ttl => Some((*as_of, v.clone())),
            _ => None,
        }
    }

    fn remember(&self, key: (Mode, Option<String>), as_of: UnixSeconds, v: Cached) {
        if self.cache_ttl.is_zero() {
            return;
        }
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (Instant::now(), as_of, v));
    }

    pub async fn estimate(&self, segment: &str, mode: Mode) -> Result<Estimate, EstimationError> {
        validate_segment(segment)?;
        let key = (mode, Some(segment.to_owned()));
        let (as_of, users, exact) = match self.cached(&key) {
            Some((as_of, Cached::One(users, exact))) => (as_of, users, exact),
            _ => {
                let started = Instant::now();
                let as_of = self.clock.now();
                let (users, exact) = self.counter.count(segment, as_of, mode).await?;
                metrics::histogram!("userseg_estimate_seconds", "scope" => "one")
                    .record(started.elapsed());
                self.remember(key, as_of, Cached::One(users, exact));
                (as_of, users, exact)
            }
        };
        Ok(Estimate {
            segment: segment.to_owned(),
            users,
            exact,
            window_seconds: self.window.secs(),
            as_of,
        })
    }

    pub async fn list(&self, mode: Mode) -> Result<EstimateList, EstimationError> {
        let key = (mode, None);
        let (as_of, segments, exact) = match self.cached(&key) {
            Some((as_of, Cached::All(segments, exact))) => (as_of, segments, exact),
            _ => {
                let started = Instant::now();
                let as_of = self.clock.now();
                let (mut segments, exact) = self.counter.count_all(as_of, mode).await?;
                segments.retain(|s| s.users > 0);
                segments.sort_unstable_by(|a, b| a.segment.cmp(&b.segment));
                metrics::histogram!("userseg_estimate_seconds", "scope" => "all")
                    .record(started.elapsed());
                let segments = Arc::new(segments);
                self.remember(key, as_of, Cached::All(segments.clone(), exact));
                (as_of, segments, exact)
            }
        };
        Ok(EstimateList {
            segments: segments.as_ref().clone(),
            exact,
            window_seconds: self.window.secs(),
            as_of,
        })
    }

    pub async fn check_ready(&self) -> Result<(), PortError> {
        self.counter.check_ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ManualClock;
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Fixed {
        calls: AtomicU64,
    }

    #[async_trait]
    impl SegmentCounter for Fixed {
        async fn count(&self, s: &str, _at: i64, m: Mode) -> Result<(u64, bool), PortError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Ok((s.len() as u64, m == Mode::Exact))
        }
        async fn count_all(
            &self,
            _at: i64,
            _m: Mode,
        ) -> Result<(Vec<SegmentCount>, bool), PortError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let c = |s: &str, u| SegmentCount {
                segment: s.into(),
                users: u,
            };
            Ok((vec![c("zeta", 2), c("empty", 0), c("alpha", 1)], true))
        }
        async fn check_ready(&self) -> Result<(), PortError> {
            Ok(())
        }
    }

    fn est(ttl: Duration) -> (Estimation, Arc<Fixed>) {
        let f = Arc::new(Fixed {
            calls: AtomicU64::new(0),
        });
        let e = Estimation::new(
            f.clone(),
            Arc::new(ManualClock::new(42)),
            Window::from_secs(60).unwrap(),
            ttl,
        );
        (e, f)
    }

    #[tokio::test]
    async fn list_is_sorted_without_zeroes() {
        let (e, _) = est(Duration::ZERO);
        let l = e.list(Mode::Exact).await.unwrap();
        let names: Vec<_> = l.segments.iter().map(|s| s.segment.as_str()).collect();
        assert_eq!(names, ["alpha", "zeta"]);
        assert_eq!(l.as_of, 42);
        assert_eq!(l.window_seconds, 60);
    }

    #[tokio::test]
    async fn rejects_bad_segment_names() {
        let (e, f) = est(Duration::ZERO);
        let err = e.estimate("no spaces", Mode::Exact).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidArgument);
        assert_eq!(f.calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn cache_serves_repeats_within_ttl() {
        let (e, f) = est(Duration::from_secs(3600));
        let a = e.estimate("abc", Mode::Exact).await.unwrap();
        let b = e.estimate("abc", Mode::Exact).await.unwrap();
        assert_eq!(a, b);
        assert_eq!(f.calls.load(Ordering::SeqCst), 1);
        // Another mode is another key.
        let c = e.estimate("abc", Mode::Approx).await.unwrap();
        assert!(!c.exact);
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
        let (e, f) = est(Duration::ZERO);
        e.estimate("abc", Mode::Exact).await.unwrap();
        e.estimate("abc", Mode::Exact).await.unwrap();
        assert_eq!(f.calls.load(Ordering::SeqCst), 2);
    }
}
