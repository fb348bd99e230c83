//! The batch processor: consumes a [`PairSource`], buffers pairs into batches (by size and by
//! time), writes each batch to a [`SegmentWriter`], and commits positions only after the write
//! was confirmed. Transient store failures are retried without limit (consumption pauses, lag
//! grows); permanent rejections are retried `retry_attempts` times and then dead-lettered, and
//! only then committed. Nothing is ever dropped.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use userseg_domain::{Pair, UserDeletion};

use crate::{
    Backoff, Content, DeadLetter, DeadLetterKind, DeadLetterSink, DeadPayload, Message, PairSource,
    PortError, SegmentWriter, WriteGate,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Flush once this many pairs are buffered.
    pub batch_size: usize,
    /// Flush at the latest this long after the first message of a batch arrived.
    pub flush_interval: Duration,
    /// How many times a batch the store rejects for good is retried before it is dead-lettered.
    pub retry_attempts: u32,
    /// First backoff between retries; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// On shutdown, how long to keep trying to flush the last batch before abandoning it
    /// (abandoned batches are not committed, so they are delivered again after a restart).
    pub shutdown_grace: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            batch_size: 1000,
            flush_interval: Duration::from_secs(30),
            retry_attempts: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// What the processor reports to readiness checks and operators.
#[derive(Clone, Debug, Default)]
pub struct ProcessorHealth(Arc<HealthInner>);

#[derive(Debug, Default)]
struct HealthInner {
    store_failing: AtomicBool,
    last_error: Mutex<Option<String>>,
    pairs_written: AtomicU64,
    batches_written: AtomicU64,
    dead_letters: AtomicU64,
}

impl ProcessorHealth {
    /// False while the store keeps failing transiently.
    pub fn store_ok(&self) -> bool {
        !self.0.store_failing.load(Ordering::Relaxed)
    }
    pub fn last_error(&self) -> Option<String> {
        self.0
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
    pub fn pairs_written(&self) -> u64 {
        self.0.pairs_written.load(Ordering::Relaxed)
    }
    pub fn batches_written(&self) -> u64 {
        self.0.batches_written.load(Ordering::Relaxed)
    }
    pub fn dead_letters(&self) -> u64 {
        self.0.dead_letters.load(Ordering::Relaxed)
    }
    fn failing(&self, error: &PortError) {
        self.0.store_failing.store(true, Ordering::Relaxed);
        *self.0.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
    }
    fn recovered(&self) {
        self.0.store_failing.store(false, Ordering::Relaxed);
    }
}

pub struct BatchProcessor {
    writer: Arc<dyn SegmentWriter>,
    dead_letters: Arc<dyn DeadLetterSink>,
    config: BatchConfig,
    health: ProcessorHealth,
    /// Holds writes back until the gate admits their messages (the distributed change feed).
    gate: Option<Arc<dyn WriteGate>>,
    /// While a write is in flight, the pending batch grows past `batch_size` up to this many
    /// pairs (see [`BatchProcessor::with_backlog_batches`]).
    backlog_batch_size: usize,
}

/// Why a batch was flushed (the `reason` label of `userseg_processor_flushes_total`).
#[derive(Clone, Copy, Debug)]
enum FlushReason {
    /// `batch_size` pairs were buffered.
    Size,
    /// `flush_interval` passed since the first buffered message.
    Interval,
    /// The processor is stopping.
    Shutdown,
    /// Nothing else was waiting in the source (group commit: an idle system applies at once).
    Drained,
    /// A user deletion arrived: the pairs before it are written, then it is applied.
    Deletion,
}

impl FlushReason {
    fn count(self) {
        let reason = match self {
            FlushReason::Size => "size",
            FlushReason::Interval => "interval",
            FlushReason::Shutdown => "shutdown",
            FlushReason::Drained => "drained",
            FlushReason::Deletion => "deletion",
        };
        metrics::counter!("userseg_processor_flushes_total", "reason" => reason).increment(1);
    }
}

/// The batch was given up because the processor is stopping; it stays uncommitted.
struct Abandoned;

/// Why the consuming loop ended.
enum Stop {
    /// Cancelled, or the source closed: write what is pending, within the shutdown grace.
    Finish,
    /// A write was given up: what is pending stays uncommitted too.
    Abandoned,
}

/// The pending batch (filling) and the batch being written.
struct Batches<'a, P> {
    pairs: Vec<Pair>,
    /// The positions of every message in the pending batch, committed once it is written.
    positions: Vec<P>,
    /// When the log made each pending message durable (for the ingest → applied lag).
    logged: Vec<SystemTime>,
    /// A deletion ends the batch: the pairs before it are written first, then it.
    deletion: Option<UserDeletion>,
    /// When the pending batch is due (`flush_interval` after its first message).
    deadline: Option<Instant>,
    /// The batch being written, and the positions to commit once it is.
    inflight: Option<(WriteFuture<'a>, Vec<P>)>,
}

impl<P> Default for Batches<'_, P> {
    fn default() -> Self {
        Batches {
            pairs: Vec::new(),
            positions: Vec::new(),
            logged: Vec::new(),
            deletion: None,
            deadline: None,
            inflight: None,
        }
    }
}

/// A batch being written in the background.
type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Abandoned>> + Send + 'a>>;

impl BatchProcessor {
    pub fn new(
        writer: Arc<dyn SegmentWriter>,
        dead_letters: Arc<dyn DeadLetterSink>,
        config: BatchConfig,
    ) -> Self {
        BatchProcessor {
            writer,
            dead_letters,
            config,
            health: ProcessorHealth::default(),
            gate: None,
            backlog_batch_size: 0,
        }
    }

    /// Adapts the batch to the backlog: while a write is in flight the pending batch keeps
    /// filling past `batch_size`, up to `max` pairs, and goes as soon as that write ends (or
    /// reaches `max`). An idle or keeping-up processor still writes small batches at once;
    /// one that falls behind applies what arrived meanwhile in one go, so that the per-batch
    /// costs of the store (per segment touched) are spread over more pairs.
    pub fn with_backlog_batches(mut self, max: usize) -> Self {
        self.backlog_batch_size = max;
        self
    }

    /// Whether a pending batch of `pending` pairs is full (`writing`: a write is in flight).
    fn full(&self, pending: usize, writing: bool) -> bool {
        pending >= self.config.batch_size
            && (!writing || pending >= self.backlog_batch_size.max(self.config.batch_size))
    }

    /// Every write (pairs or a deletion) first waits until `gate` admits the messages it
    /// stands for ([`WriteGate`]).
    pub fn with_gate(mut self, gate: Arc<dyn WriteGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The (partition, offset)s of `positions`, for the gate.
    fn offsets<S: PairSource>(positions: &[S::Position]) -> Vec<(i32, i64)> {
        positions.iter().filter_map(S::partition_offset).collect()
    }

    /// Waits for the gate (if any) to admit the messages at `offsets`; gives up when `stop`
    /// fires.
    async fn admit(
        &self,
        offsets: &[(i32, i64)],
        stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let Some(gate) = &self.gate else {
            return Ok(());
        };
        let mut through: BTreeMap<i32, i64> = BTreeMap::new();
        for &(p, o) in offsets {
            let at = through.entry(p).or_insert(o);
            *at = (*at).max(o);
        }
        if through.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        tokio::select! {
            _ = stop.cancelled() => return Err(Abandoned),
            _ = gate.admit(&through) => {}
        }
        metrics::histogram!("userseg_processor_gate_wait_seconds").record(started.elapsed());
        Ok(())
    }

    pub fn health(&self) -> ProcessorHealth {
        self.health.clone()
    }

    /// Runs until `cancel` fires (then flushes what is buffered, within the shutdown grace) or
    /// the source closes; hands the source back so the caller can close it cleanly.
    ///
    /// One batch is written while the next one fills, so consuming and writing overlap;
    /// positions are still committed in order, each only after its batch was written.
    pub async fn run<S: PairSource>(&self, mut source: S, cancel: CancellationToken) -> S {
        // Writes keep retrying until the shutdown grace has passed after `cancel`.
        let write_stop = CancellationToken::new();
        let grace_timer = self.grace_timer(&cancel, &write_stop);
        let mut batches = Batches::default();
        let mut stop = self
            .consume(&mut source, &mut batches, &cancel, &write_stop)
            .await;
        if let Stop::Finish = stop {
            if self
                .finish(&mut source, batches, &write_stop)
                .await
                .is_err()
            {
                stop = Stop::Abandoned;
            }
        }
        if let Stop::Abandoned = stop {
            tracing::warn!(
                "abandoned unwritten batches on shutdown; they stay uncommitted and are delivered again"
            );
        }
        grace_timer.abort();
        source
    }

    /// Cancels `write_stop` once the shutdown grace has passed after `cancel`.
    fn grace_timer(
        &self,
        cancel: &CancellationToken,
        write_stop: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let (cancel, write_stop) = (cancel.clone(), write_stop.clone());
        let grace = self.config.shutdown_grace;
        tokio::spawn(async move {
            cancel.cancelled().await;
            tokio::time::sleep(grace).await;
            write_stop.cancel();
        })
    }

    /// The consuming loop: collects messages into the pending batch and flushes it when it is
    /// full, due, or nothing else waits, until told to stop.
    async fn consume<'a, S: PairSource>(
        &'a self,
        source: &mut S,
        batches: &mut Batches<'a, S::Position>,
        cancel: &CancellationToken,
        write_stop: &CancellationToken,
    ) -> Stop {
        let mut source_backoff = self.backoff();
        loop {
            match self
                .collect(source, batches, &mut source_backoff, cancel)
                .await
            {
                Err(stop) => return stop,
                Ok(Some(reason)) => {
                    reason.count();
                    if self.flush(source, batches, write_stop).await.is_err() {
                        return Stop::Abandoned;
                    }
                }
                Ok(None) => {
                    if batches.deadline.is_none() && !batches.positions.is_empty() {
                        batches.deadline = Some(Instant::now() + self.config.flush_interval);
                    }
                }
            }
        }
    }

    /// Waits for the next event: a stop, the end of the write in flight (committed here), the
    /// flush timer, or a message (added to the pending batch). Says whether to flush now.
    async fn collect<S: PairSource>(
        &self,
        source: &mut S,
        batches: &mut Batches<'_, S::Position>,
        source_backoff: &mut Backoff,
        cancel: &CancellationToken,
    ) -> Result<Option<FlushReason>, Stop> {
        let deadline = batches.deadline;
        let timer = tokio::time::sleep_until(
            deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)),
        );
        let inflight = &mut batches.inflight;
        tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(Stop::Finish),
            written = async {
                match inflight.as_mut() {
                    Some((write, _)) => write.await,
                    None => std::future::pending().await,
                }
            }, if inflight.is_some() => {
                let done = batches.inflight.take().map(|(_, p)| p).unwrap_or_default();
                if written.is_err() {
                    return Err(Stop::Abandoned);
                }
                self.commit(source, done).await;
                // Group commit: what arrived during the write goes now if nothing else waits,
                // or if it is full (it may have grown past `batch_size` during the write).
                Ok(if batches.positions.is_empty() {
                    None
                } else if self.full(batches.pairs.len(), false) {
                    Some(FlushReason::Size)
                } else {
                    source.is_drained().then_some(FlushReason::Drained)
                })
            }
            _ = timer, if deadline.is_some() => Ok(Some(FlushReason::Interval)),
            next = source.next() => match next {
                Ok(Some(msg)) => {
                    source_backoff.reset();
                    self.add(source, batches, msg, cancel).await
                }
                Ok(None) => Err(Stop::Finish),
                Err(e) => {
                    tracing::warn!(error = %e, "source failed; retrying");
                    source.idle(source_backoff.pause()).await;
                    Ok(None)
                }
            },
        }
    }

    /// Adds a message to the pending batch (an undecodable one goes to the dead letters) and
    /// says whether to flush now: the batch is full, a deletion ends it, or (read-your-writes)
    /// nothing else is waiting and no write is in flight.
    async fn add<S: PairSource>(
        &self,
        source: &mut S,
        batches: &mut Batches<'_, S::Position>,
        msg: Message<S::Position>,
        cancel: &CancellationToken,
    ) -> Result<Option<FlushReason>, Stop> {
        batches.positions.push(msg.position);
        match msg.content {
            Content::Pairs(p) => {
                batches.pairs.extend(p);
                batches.logged.extend(msg.logged_at);
            }
            Content::Delete(d) => batches.deletion = Some(d),
            Content::Invalid { payload, reason } => {
                let letter = DeadLetter {
                    payload: DeadPayload::Raw(payload),
                    kind: reason.kind(),
                    reason: reason.to_string(),
                    attempts: 0,
                };
                if self
                    .dead_letter(Some(source), letter, cancel)
                    .await
                    .is_err()
                {
                    return Err(Stop::Finish);
                }
            }
        }
        Ok(
            if self.full(batches.pairs.len(), batches.inflight.is_some()) {
                Some(FlushReason::Size)
            } else if batches.deletion.is_some() {
                Some(FlushReason::Deletion)
            } else if batches.inflight.is_none() && source.is_drained() {
                Some(FlushReason::Drained)
            } else {
                None
            },
        )
    }

    /// Flushes the pending batch. At most one write is in flight: the previous one is awaited
    /// (keeping the source alive) and committed first. A deletion is applied in log order (the
    /// pairs before it, then it) and committed; a batch of pairs starts writing in the
    /// background; a batch of dead letters only is committed at once.
    async fn flush<'a, S: PairSource>(
        &'a self,
        source: &mut S,
        batches: &mut Batches<'a, S::Position>,
        write_stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        if let Some((write, done)) = batches.inflight.take() {
            Self::wait_alive(source, write).await?;
            self.commit(source, done).await;
        }
        batches.deadline = None;
        let pairs = std::mem::take(&mut batches.pairs);
        let logged = std::mem::take(&mut batches.logged);
        let done = std::mem::take(&mut batches.positions);
        let through = done.last().and_then(S::log_offset);
        if let Some(deletion) = batches.deletion.take() {
            // The deletion is the batch's last message; the pairs end before it.
            let pairs_through = done
                .len()
                .checked_sub(2)
                .and_then(|i| S::log_offset(&done[i]));
            self.admit(&Self::offsets::<S>(&done), write_stop).await?;
            self.write_then_delete::<S>(
                (pairs, pairs_through),
                logged,
                (deletion, through),
                write_stop,
            )
            .await?;
            self.commit(source, done).await;
        } else if pairs.is_empty() {
            self.commit(source, done).await;
        } else {
            let gate = Self::offsets::<S>(&done);
            let stop = write_stop.clone();
            let write = async move {
                self.admit(&gate, &stop).await?;
                self.write_batch::<S>(pairs.into(), through, logged, stop)
                    .await
            };
            batches.inflight = Some((Box::pin(write), done));
        }
        Ok(())
    }

    /// Stopping: finishes the write in flight and then the pending batch, within the grace
    /// period, committing each once written.
    async fn finish<S: PairSource>(
        &self,
        source: &mut S,
        batches: Batches<'_, S::Position>,
        write_stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let Batches {
            pairs,
            positions,
            logged,
            inflight,
            ..
        } = batches;
        if let Some((write, done)) = inflight {
            write.await?;
            self.commit(source, done).await;
        }
        if positions.is_empty() {
            return Ok(());
        }
        FlushReason::Shutdown.count();
        let n = pairs.len();
        if !pairs.is_empty() {
            self.admit(&Self::offsets::<S>(&positions), write_stop)
                .await?;
            let through = positions.last().and_then(S::log_offset);
            self.write_batch::<S>(pairs.into(), through, logged, write_stop.clone())
                .await?;
        }
        self.commit(source, positions).await;
        tracing::info!(pairs = n, "flushed the last batch on shutdown");
        Ok(())
    }

    /// Waits for a write. A normal write ends well within the group's poll interval, so the
    /// source is left alone; only a write that keeps failing (the store is down) makes the
    /// source idle, to keep it a live member of its consumer group while consumption pauses.
    async fn wait_alive<S: PairSource>(
        source: &mut S,
        mut write: WriteFuture<'_>,
    ) -> Result<(), Abandoned> {
        tokio::select! {
            written = &mut write => return written,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
        loop {
            tokio::select! {
                written = &mut write => return written,
                _ = source.idle(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn commit<S: PairSource>(&self, source: &mut S, positions: Vec<S::Position>) {
        if positions.is_empty() {
            return;
        }
        if let Err(e) = source.commit(positions).await {
            // The batch is written; an uncommitted position only means it is delivered and
            // written again later, which idempotent writes make harmless.
            tracing::warn!(error = %e, "commit failed; those messages will be redelivered");
            metrics::counter!("userseg_processor_commit_failures_total").increment(1);
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(self.config.backoff_initial, self.config.backoff_max)
    }

    /// Writes `pairs` (if any), then applies `deletion`, each retried like a batch.
    async fn write_then_delete<S: PairSource>(
        &self,
        (pairs, pairs_through): (Vec<Pair>, Option<u64>),
        logged: Vec<SystemTime>,
        (deletion, through): (UserDeletion, Option<u64>),
        stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        if !pairs.is_empty() {
            self.write_batch::<S>(pairs.into(), pairs_through, logged, stop.clone())
                .await?;
        }
        let mut backoff = self.backoff();
        let mut rejections: u32 = 0;
        loop {
            match self
                .writer
                .delete_users_through(deletion.clone(), through)
                .await
            {
                Ok(()) => {
                    self.health.recovered();
                    metrics::counter!("userseg_processor_users_deleted_total")
                        .increment(deletion.len() as u64);
                    return Ok(());
                }
                Err(PortError::Permanent(reason)) => {
                    rejections += 1;
                    if rejections > self.config.retry_attempts {
                        tracing::error!(users = deletion.len(), %reason, "store rejected a deletion for good; dead-lettering it");
                        let letter = DeadLetter {
                            payload: DeadPayload::Deletion(deletion),
                            reason,
                            kind: DeadLetterKind::RejectedByStore,
                            attempts: rejections,
                        };
                        return self.dead_letter::<S>(None, letter, stop).await;
                    }
                    tracing::warn!(attempt = rejections, %reason, "store rejected a deletion; retrying");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "store unavailable for a deletion; pausing consumption");
                    self.health.failing(&e);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Abandoned),
                _ = tokio::time::sleep(backoff.pause()) => {}
            }
        }
    }

    /// Records a confirmed write: health, counters, write time, ingest → applied lag.
    fn written(&self, pairs: usize, started: std::time::Instant, logged: Vec<SystemTime>) {
        self.health.recovered();
        let health = &self.health.0;
        health
            .pairs_written
            .fetch_add(pairs as u64, Ordering::Relaxed);
        health.batches_written.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("userseg_processor_pairs_written_total").increment(pairs as u64);
        metrics::counter!("userseg_processor_batches_written_total").increment(1);
        metrics::histogram!("userseg_processor_batch_pairs").record(pairs as f64);
        metrics::histogram!("userseg_processor_write_seconds").record(started.elapsed());
        let applied = SystemTime::now();
        let lag = metrics::histogram!("userseg_processor_applied_lag_seconds");
        for t in logged {
            lag.record(applied.duration_since(t).unwrap_or_default());
        }
    }

    /// Writes a batch, retrying transient failures until `stop` and permanent rejections
    /// `retry_attempts` times, then dead-lettering it.
    async fn write_batch<S: PairSource>(
        &self,
        batch: Arc<[Pair]>,
        through: Option<u64>,
        logged: Vec<SystemTime>,
        stop: CancellationToken,
    ) -> Result<(), Abandoned> {
        let mut backoff = self.backoff();
        let mut rejections: u32 = 0;
        loop {
            let started = std::time::Instant::now();
            let result = self.writer.write_through(batch.clone(), through).await;
            match result {
                Ok(()) => {
                    self.written(batch.len(), started, logged);
                    return Ok(());
                }
                Err(PortError::Permanent(reason)) => {
                    rejections += 1;
                    metrics::counter!("userseg_processor_write_failures_total", "kind" => "permanent")
                        .increment(1);
                    if rejections > self.config.retry_attempts {
                        tracing::error!(
                            pairs = batch.len(),
                            attempts = rejections,
                            %reason,
                            "store rejected the batch for good; dead-lettering it"
                        );
                        let letter = DeadLetter {
                            payload: DeadPayload::Pairs(batch),
                            reason,
                            kind: DeadLetterKind::RejectedByStore,
                            attempts: rejections,
                        };
                        return self.dead_letter::<S>(None, letter, &stop).await;
                    }
                    metrics::counter!("userseg_processor_retries_total", "kind" => "permanent")
                        .increment(1);
                    tracing::warn!(attempt = rejections, %reason, "store rejected the batch; retrying");
                }
                Err(e) => {
                    metrics::counter!("userseg_processor_write_failures_total", "kind" => "transient")
                        .increment(1);
                    metrics::counter!("userseg_processor_retries_total", "kind" => "transient")
                        .increment(1);
                    tracing::warn!(error = %e, backoff_ms = backoff.current().as_millis() as u64, "store unavailable; pausing consumption");
                    self.health.failing(&e);
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(Abandoned),
                _ = tokio::time::sleep(backoff.pause()) => {}
            }
        }
    }

    async fn dead_letter<S: PairSource>(
        &self,
        mut source: Option<&mut S>,
        letter: DeadLetter,
        stop: &CancellationToken,
    ) -> Result<(), Abandoned> {
        let mut backoff = self.backoff();
        loop {
            match self.dead_letters.send(letter.clone()).await {
                Ok(()) => {
                    self.health.0.dead_letters.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("userseg_dead_letters_total", "kind" => letter.kind.as_str())
                        .increment(1);
                    tracing::warn!(kind = letter.kind.as_str(), reason = %letter.reason, "dead-lettered a message");
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter sink failed; retrying");
                }
            }
            let wait = backoff.pause();
            let pause = async {
                match source.as_deref_mut() {
                    Some(s) => s.idle(wait).await,
                    None => tokio::time::sleep(wait).await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Err(Abandoned),
                _ = pause => {}
            }
        }
    }
}
