//! The distributed change feed's emitter: each estimation service (ES) detects every change in
//! its index (it follows the whole pair log), and publishes to the change topic only the events
//! of users whose pair-log partition it owns in the consumer group, so each partition has
//! exactly one emitter and a user's events stay in order.
//!
//! Handover (a rebalance, a crashed member): the events of partitions this member does not own
//! are kept for `retain`; when a partition is assigned to it, it first publishes the kept
//! events of that partition (those its previous owner may not have published before it left),
//! then the new ones. So nothing is missing, and an event may repeat — with the same
//! deterministic id, since every ES detects the same change the same way (at-least-once;
//! consumers drop repeats by id, docs/CHANGES.md).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use userseg_domain::ChangeEvent;

use crate::{Backoff, ChangeLog};

/// Tuning of the emitter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitterConfig {
    /// How long the events of partitions owned by others are kept for a handover (longer than
    /// the group's session timeout plus the index's lag).
    pub retain: Duration,
    /// At most this many such events are kept (the oldest go first).
    pub retain_max: usize,
}

impl Default for EmitterConfig {
    fn default() -> Self {
        EmitterConfig {
            retain: Duration::from_secs(120),
            retain_max: 1_000_000,
        }
    }
}

/// Where detected events enter the emitter: called from the store's apply path, never blocks.
#[derive(Clone)]
pub struct EmitterInlet(mpsc::UnboundedSender<Vec<ChangeEvent>>);

impl EmitterInlet {
    pub fn send(&self, events: Vec<ChangeEvent>) {
        metrics::gauge!("userseg_changes_emit_pending").increment(events.len() as f64);
        let _ = self.0.send(events);
    }
}

/// Publishes the detected events of the owned partitions; see the module doc.
pub struct ChangeEmitter {
    log: Arc<dyn ChangeLog>,
    owned: watch::Receiver<Arc<BTreeSet<i32>>>,
    partition_of: Box<dyn Fn(&str) -> i32 + Send + Sync>,
    rx: mpsc::UnboundedReceiver<Vec<ChangeEvent>>,
    config: EmitterConfig,
}

impl ChangeEmitter {
    /// `owned`: the pair-log partitions this member owns; `partition_of`: a user's pair-log
    /// partition.
    pub fn new(
        log: Arc<dyn ChangeLog>,
        owned: watch::Receiver<Arc<BTreeSet<i32>>>,
        partition_of: impl Fn(&str) -> i32 + Send + Sync + 'static,
        config: EmitterConfig,
    ) -> (ChangeEmitter, EmitterInlet) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            ChangeEmitter {
                log,
                owned,
                partition_of: Box::new(partition_of),
                rx,
                config,
            },
            EmitterInlet(tx),
        )
    }

    /// Runs until cancelled (or every inlet is dropped and everything is published).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut owned: Arc<BTreeSet<i32>> = Arc::default();
        let mut kept: VecDeque<(Instant, i32, ChangeEvent)> = VecDeque::new();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut closed = false;
        let mut watching = true;
        loop {
            if closed && !watching {
                return;
            }
            let mut incoming: Vec<ChangeEvent> = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = self.rx.recv(), if !closed => match got {
                    Some(e) => incoming = e,
                    None => closed = true,
                },
                changed = self.owned.changed(), if watching => {
                    watching = changed.is_ok();
                }
            }
            while let Ok(more) = self.rx.try_recv() {
                incoming.extend(more);
            }
            metrics::gauge!("userseg_changes_emit_pending").decrement(incoming.len() as f64);
            let now_owned = self.owned.borrow_and_update().clone();
            let mut out: Vec<ChangeEvent> = Vec::new();
            if now_owned != owned {
                let gained: BTreeSet<i32> = now_owned.difference(&owned).copied().collect();
                if !gained.is_empty() {
                    let before = kept.len();
                    let mut rest = VecDeque::with_capacity(kept.len());
                    for (at, p, e) in kept.drain(..) {
                        if gained.contains(&p) {
                            out.push(e);
                        } else {
                            rest.push_back((at, p, e));
                        }
                    }
                    kept = rest;
                    tracing::info!(
                        partitions = ?gained,
                        replayed = before - kept.len(),
                        "change feed: emitting for newly owned partitions, kept events first"
                    );
                    metrics::counter!("userseg_changes_replayed_total")
                        .increment((before - kept.len()) as u64);
                }
                owned = now_owned;
            }
            let now = Instant::now();
            for e in incoming {
                let p = (self.partition_of)(&e.user_id);
                if owned.contains(&p) {
                    out.push(e);
                } else {
                    kept.push_back((now, p, e));
                }
            }
            while kept.len() > self.config.retain_max
                || kept
                    .front()
                    .is_some_and(|(at, _, _)| now.duration_since(*at) > self.config.retain)
            {
                kept.pop_front();
            }
            metrics::gauge!("userseg_changes_emit_kept").set(kept.len() as f64);
            // Publish, retrying until it succeeds: the events are gone from the index's view.
            while !out.is_empty() {
                let n = out.len();
                match self.log.append(out.clone()).await {
                    Ok(()) => {
                        metrics::counter!("userseg_changes_emitted_total").increment(n as u64);
                        out.clear();
                        backoff.reset();
                    }
                    Err(e) => {
                        metrics::counter!("userseg_changes_emit_failures_total").increment(1);
                        tracing::warn!(error = %e, events = n, "change feed: publishing failed; will retry");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff.pause()) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ChangeBatch, ChangeReadError, PortError};
    use async_trait::async_trait;
    use std::sync::Mutex;
    use userseg_domain::ChangeReason;

    /// Records appends; fails the first `fail` of them.
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<ChangeEvent>>,
        fail: Mutex<usize>,
    }

    #[async_trait]
    impl ChangeLog for Recorder {
        async fn append(&self, events: Vec<ChangeEvent>) -> Result<(), PortError> {
            let mut fail = self.fail.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(PortError::Transient("down".into()));
            }
            self.got.lock().unwrap().extend(events);
            Ok(())
        }
        async fn end(&self) -> Result<String, PortError> {
            Ok(String::new())
        }
        async fn start(&self) -> Result<String, PortError> {
            Ok(String::new())
        }
        async fn read(
            &self,
            _: &str,
            _: usize,
            _: Duration,
        ) -> Result<ChangeBatch, ChangeReadError> {
            Ok(ChangeBatch::default())
        }
    }

    fn ev(user: &str, key: i64) -> ChangeEvent {
        ChangeEvent::new(user, "s", ChangeReason::Pair, 0, key)
    }

    /// User `uN` is in partition N.
    fn part(u: &str) -> i32 {
        u[1..].parse().unwrap()
    }

    async fn until(what: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() {
            assert!(Instant::now() < deadline, "condition not met");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn only_owned_partitions_are_published_and_a_gained_one_replays_what_was_kept() {
        let log = Arc::new(Recorder::default());
        *log.fail.lock().unwrap() = 1;
        let (owned_tx, owned_rx) = watch::channel(Arc::new(BTreeSet::from([0])));
        let (emitter, inlet) =
            ChangeEmitter::new(log.clone(), owned_rx, part, EmitterConfig::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(emitter.run(cancel.clone()));
        inlet.send(vec![ev("u0", 1), ev("u1", 1), ev("u0", 2)]);
        inlet.send(vec![ev("u1", 2)]);
        until(|| log.got.lock().unwrap().len() == 2).await;
        assert_eq!(*log.got.lock().unwrap(), vec![ev("u0", 1), ev("u0", 2)]);
        // Partition 1 moves here: its kept events first, in order, then the new ones.
        owned_tx.send(Arc::new(BTreeSet::from([0, 1]))).unwrap();
        until(|| log.got.lock().unwrap().len() == 4).await;
        inlet.send(vec![ev("u1", 3)]);
        until(|| log.got.lock().unwrap().len() == 5).await;
        assert_eq!(
            log.got.lock().unwrap()[2..],
            [ev("u1", 1), ev("u1", 2), ev("u1", 3)]
        );
        // Given up: no longer published.
        owned_tx.send(Arc::new(BTreeSet::from([1]))).unwrap();
        inlet.send(vec![ev("u0", 9), ev("u1", 9)]);
        until(|| log.got.lock().unwrap().len() == 6).await;
        assert_eq!(log.got.lock().unwrap()[5], ev("u1", 9));
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn kept_events_older_than_retain_are_dropped() {
        let log = Arc::new(Recorder::default());
        let (owned_tx, owned_rx) = watch::channel(Arc::new(BTreeSet::new()));
        let config = EmitterConfig {
            retain: Duration::from_secs(10),
            retain_max: 2,
        };
        let (emitter, inlet) = ChangeEmitter::new(log.clone(), owned_rx, part, config);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(emitter.run(cancel.clone()));
        inlet.send(vec![ev("u1", 1)]);
        tokio::time::sleep(Duration::from_secs(11)).await;
        inlet.send(vec![ev("u1", 2), ev("u1", 3), ev("u1", 4)]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        owned_tx.send(Arc::new(BTreeSet::from([1]))).unwrap();
        until(|| log.got.lock().unwrap().len() == 2).await;
        assert_eq!(*log.got.lock().unwrap(), vec![ev("u1", 3), ev("u1", 4)]);
        cancel.cancel();
        task.await.unwrap();
    }
}
