//! The estimation service's in-memory index: an exact copy of the live memberships of the store
//! of record (ClickHouse), loaded by a scan at start and then kept current by following the pair
//! log (Kafka). Estimates are answered from it in microseconds instead of by a query that reads
//! every live pair; until it has loaded they come from the store of record.
//!
//! Why nothing is missed: the follower is opened first, at the positions the batch processor
//! had committed, and the processor commits a position only after the store confirmed every pair
//! before it. So every pair before those positions is in the store when the scan (which starts
//! after the follower was opened) reads it, and every pair after them comes from the follower.
//! Pairs seen by both are harmless: the index keeps the latest ts of a membership, so applying
//! a pair twice, in any order, changes nothing.
//!
//! Deletions: the follower hands them out in log order with the pairs, and the index applies
//! them in that order, so a user's deletion removes exactly the pairs logged before it (those
//! scanned included: the scan may hold pairs logged before a deletion the follower has yet to
//! hand out, never pairs of a deletion before the committed positions, since the processor
//! commits a deletion only after the store of record applied it). Every read — counts and the
//! analytics ([`SegmentAnalytics`]) — comes from the index once it serves, from the store of
//! record before.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use userseg_domain::{Expr, Pair, UnixSeconds, UserDeletion, Within};

use crate::{
    Backoff, Clock, Followed, LiveScan, LogFollower, Member, Membership, Mode, Overlap, PortError,
    SegmentAnalytics, SegmentCount, SegmentCounter, SegmentWriter,
};

/// Tuning of the index's loading and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexConfig {
    /// Pairs per chunk of the start-up scan.
    pub scan_chunk_pairs: usize,
    /// Chunks buffered between the scan and the index (bounds the scan's memory).
    pub scan_buffer_chunks: usize,
    /// First pause after a failure; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        IndexConfig {
            // Below the embedded store's parallel threshold (4096 pairs), so a chunk is applied
            // on the task's own thread: bigger ones are applied by threads spawned per batch,
            // and a scan of millions of pairs spawning hundreds of short-lived threads left the
            // allocator with pages of their (abandoned) heaps: 6 (full index) to 9 (sharded)
            // bytes of RSS per live pair more at 10M pairs (docs/BENCHMARKS.md, "ES index
            // memory").
            scan_chunk_pairs: 4_000,
            scan_buffer_chunks: 32,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// Hooks into the index's loading and following, for what must happen at exact points of it
/// (the distributed change feed: detection starts right after the scan, and the emitter learns
/// how far detection got).
#[async_trait]
pub trait IndexObserver: Send + Sync + 'static {
    /// The scan as of `at` is done and nothing followed has been applied yet. Retried (with
    /// backoff) until it succeeds.
    async fn scanned(&self, at: UnixSeconds) -> Result<(), PortError>;

    /// Every followed message before `positions` ([`LogFollower::positions`]) is applied. May
    /// wait (backpressure: the index follows on once it returns).
    async fn applied(&self, positions: Vec<(i32, i64)>);
}

#[derive(Debug, Default)]
struct State {
    serving: AtomicBool,
    scanned_pairs: AtomicU64,
    followed_pairs: AtomicU64,
    followed_deletions: AtomicU64,
}

/// Where the index stands, for logs, readiness details and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexStatus {
    /// Estimates come from the index (else from the store of record).
    pub serving: bool,
    pub scanned_pairs: u64,
    pub followed_pairs: u64,
    /// Deletions applied from the log.
    pub followed_deletions: u64,
}

/// The index as a [`SegmentCounter`] and a [`SegmentAnalytics`]: the index once it has loaded,
/// the fallback (the store of record) before.
#[derive(Clone)]
pub struct SegmentIndex {
    writer: Arc<dyn SegmentWriter>,
    index: Arc<dyn SegmentCounter>,
    index_analytics: Arc<dyn SegmentAnalytics>,
    fallback: Arc<dyn SegmentCounter>,
    fallback_analytics: Arc<dyn SegmentAnalytics>,
    state: Arc<State>,
    config: IndexConfig,
    /// Sets the process-wide `userseg_index_serving` gauge (not a shard of the sharded index).
    whole: bool,
    observer: Option<Arc<dyn IndexObserver>>,
}

/// Waits the next backoff pause; false when cancelled meanwhile.
async fn wait(backoff: &mut Backoff, cancel: &CancellationToken) -> bool {
    let pause = backoff.pause();
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(pause) => true,
    }
}

impl SegmentIndex {
    /// `memory` is the in-memory store the index fills (its writing and reading sides);
    /// `fallback`, the store of record, answers until the index has loaded.
    pub fn new<M, F>(memory: Arc<M>, fallback: Arc<F>, config: IndexConfig) -> Self
    where
        M: SegmentWriter + SegmentCounter + SegmentAnalytics,
        F: SegmentCounter + SegmentAnalytics,
    {
        metrics::gauge!("userseg_index_serving").set(0.0);
        SegmentIndex {
            writer: memory.clone(),
            index: memory.clone(),
            index_analytics: memory,
            fallback: fallback.clone(),
            fallback_analytics: fallback,
            state: Arc::default(),
            config,
            whole: true,
            observer: None,
        }
    }

    /// The index of one shard of the sharded index ([`crate::ShardedIndex`]): `memory` is also
    /// what it answers with before loading (its owner asks it only once it serves), and it
    /// leaves the `userseg_index_serving` gauge to its owner.
    pub fn shard<M>(memory: Arc<M>, config: IndexConfig) -> Self
    where
        M: SegmentWriter + SegmentCounter + SegmentAnalytics,
    {
        SegmentIndex {
            writer: memory.clone(),
            index: memory.clone(),
            index_analytics: memory.clone(),
            fallback: memory.clone(),
            fallback_analytics: memory,
            state: Arc::default(),
            config,
            whole: false,
            observer: None,
        }
    }

    /// Calls `observer` at the points [`IndexObserver`] names.
    pub fn with_observer(mut self, observer: Arc<dyn IndexObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    pub fn status(&self) -> IndexStatus {
        IndexStatus {
            serving: self.state.serving.load(Ordering::Acquire),
            scanned_pairs: self.state.scanned_pairs.load(Ordering::Relaxed),
            followed_pairs: self.state.followed_pairs.load(Ordering::Relaxed),
            followed_deletions: self.state.followed_deletions.load(Ordering::Relaxed),
        }
    }

    fn serving(&self) -> bool {
        self.state.serving.load(Ordering::Acquire)
    }

    /// Loads and then follows until cancelled: opens the follower (`open`, retried until it
    /// succeeds), scans the store of record as of `clock.now()` (retried until it succeeds),
    /// then applies what the follower hands out, and serves from the index once the follower has
    /// caught up. Failures are retried with backoff; nothing read is ever dropped.
    pub async fn run<F, O, Fut>(
        self,
        mut open: O,
        scan: Arc<dyn LiveScan>,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
    ) where
        F: LogFollower,
        O: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<F, PortError>> + Send,
    {
        let started = Instant::now();
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut follower = loop {
            let opened = tokio::select! {
                _ = cancel.cancelled() => return,
                r = open() => r,
            };
            match opened {
                Ok(f) => break f,
                Err(e) => {
                    tracing::warn!(error = %e, "index: cannot open the log follower; will retry");
                    if !wait(&mut backoff, &cancel).await {
                        return;
                    }
                }
            }
        };
        backoff.reset();
        let scanned_at = loop {
            let at = clock.now();
            let scanned = tokio::select! {
                _ = cancel.cancelled() => return,
                r = self.scan_once(scan.as_ref(), at) => r,
            };
            match scanned {
                Ok(n) => {
                    tracing::info!(
                        pairs = n,
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "index: scanned the store of record"
                    );
                    break at;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "index: scanning the store of record failed; will retry");
                    if !wait(&mut backoff, &cancel).await {
                        return;
                    }
                }
            }
        };
        backoff.reset();
        if let Some(observer) = &self.observer {
            loop {
                let done = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = observer.scanned(scanned_at) => r,
                };
                match done {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "index: the post-scan step failed; will retry");
                        if !wait(&mut backoff, &cancel).await {
                            return;
                        }
                    }
                }
            }
            backoff.reset();
        }
        let mut last_lag_report = Instant::now();
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return,
                r = follower.next() => r,
            };
            match next {
                Ok(Followed::Pairs(pairs)) => {
                    backoff.reset();
                    let n = pairs.len() as u64;
                    if !self.apply(pairs.into(), &cancel).await {
                        return;
                    }
                    self.state.followed_pairs.fetch_add(n, Ordering::Relaxed);
                    metrics::counter!("userseg_index_followed_pairs_total").increment(n);
                    if !self.applied(follower.positions(), &cancel).await {
                        return;
                    }
                }
                Ok(Followed::Delete(deletion)) => {
                    backoff.reset();
                    if !self.delete(deletion, &cancel).await {
                        return;
                    }
                    self.state
                        .followed_deletions
                        .fetch_add(1, Ordering::Relaxed);
                    if !self.applied(follower.positions(), &cancel).await {
                        return;
                    }
                }
                Ok(Followed::CaughtUp) => {
                    if !self.state.serving.swap(true, Ordering::AcqRel) {
                        if self.whole {
                            metrics::gauge!("userseg_index_serving").set(1.0);
                        }
                        let s = self.status();
                        tracing::info!(
                            scanned_pairs = s.scanned_pairs,
                            followed_pairs = s.followed_pairs,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "index: caught up with the log; serving estimates from memory"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "index: following the log failed; will retry");
                    if !wait(&mut backoff, &cancel).await {
                        return;
                    }
                }
            }
            if last_lag_report.elapsed() >= Duration::from_secs(1) {
                last_lag_report = Instant::now();
                if let Some(lag) = follower.lag() {
                    metrics::gauge!("userseg_index_lag_messages").set(lag as f64);
                }
            }
        }
    }

    /// Tells the observer how far the follower's messages are applied; false when cancelled.
    async fn applied(&self, positions: Vec<(i32, i64)>, cancel: &CancellationToken) -> bool {
        let Some(observer) = &self.observer else {
            return true;
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = observer.applied(positions) => true,
        }
    }

    /// One full scan into the index; the count of pairs scanned.
    async fn scan_once(&self, scan: &dyn LiveScan, at: UnixSeconds) -> Result<u64, PortError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Pair>>(self.config.scan_buffer_chunks);
        let chunk = self.config.scan_chunk_pairs.max(1);
        let apply = async {
            while let Some(pairs) = rx.recv().await {
                let n = pairs.len() as u64;
                self.writer.write(pairs.into()).await?;
                self.state.scanned_pairs.fetch_add(n, Ordering::Relaxed);
                metrics::counter!("userseg_index_scanned_pairs_total").increment(n);
            }
            Ok::<(), PortError>(())
        };
        let (scanned, applied) = tokio::join!(scan.scan_live(at, chunk, tx), apply);
        // An apply failure drops the receiver, which makes the scan fail too: report the cause.
        applied?;
        scanned
    }

    /// Applies a followed deletion, retrying until the index takes it; false when cancelled.
    async fn delete(&self, deletion: UserDeletion, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            match self.writer.delete_users(deletion.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(error = %e, users = deletion.len(), "index: applying a deletion failed; will retry");
                    metrics::counter!("userseg_index_apply_errors_total").increment(1);
                    if !wait(&mut backoff, cancel).await {
                        return false;
                    }
                }
            }
        }
    }

    /// The analytics of the index when it serves, else of the store of record.
    fn analytics(&self) -> &dyn SegmentAnalytics {
        if self.serving() {
            self.index_analytics.as_ref()
        } else {
            self.fallback_analytics.as_ref()
        }
    }

    /// Applies followed pairs, retrying until the index takes them; false when cancelled.
    async fn apply(&self, pairs: Arc<[Pair]>, cancel: &CancellationToken) -> bool {
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        loop {
            match self.writer.write(pairs.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(error = %e, pairs = pairs.len(), "index: applying pairs failed; will retry");
                    metrics::counter!("userseg_index_apply_errors_total").increment(1);
                    if !wait(&mut backoff, cancel).await {
                        return false;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl SegmentCounter for SegmentIndex {
    async fn count(
        &self,
        segment: &str,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(u64, bool), PortError> {
        if self.serving() {
            self.index.count(segment, at, Mode::Exact).await
        } else {
            self.fallback.count(segment, at, mode).await
        }
    }

    async fn count_all(
        &self,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError> {
        if self.serving() {
            self.index.count_all(at, Mode::Exact).await
        } else {
            self.fallback.count_all(at, mode).await
        }
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        if self.serving() {
            Ok(())
        } else {
            self.fallback.check_ready().await
        }
    }
}

#[async_trait]
impl SegmentAnalytics for SegmentIndex {
    async fn user_segments(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, PortError> {
        self.analytics().user_segments(user_id, at).await
    }

    async fn count_within(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        self.analytics().count_within(segment, at, within).await
    }

    async fn count_all_within(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        self.analytics().count_all_within(at, within).await
    }

    async fn count_expr(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        self.analytics().count_expr(expr, at, within).await
    }

    async fn overlap(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, PortError> {
        self.analytics().overlap(segments, at, within).await
    }

    /// An export started while the index loads streams from the store of record to its end.
    async fn export_members(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: tokio::sync::mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        self.analytics()
            .export_members(segment, at, within, chunk, sink)
            .await
    }
}

#[cfg(test)]
#[path = "index_tests.rs"]
mod tests;
