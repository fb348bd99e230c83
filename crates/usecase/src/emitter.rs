//! The distributed change feed's emitter: each estimation service (ES) detects every change in
//! its index (it follows the whole pair log), and publishes to the change topic only the events
//! of users whose pair-log partition it owns in the consumer group, so each partition has
//! exactly one emitter and a user's events stay in order.
//!
//! Nothing is missed, even when no ES was running:
//!
//! - **Publish before the store of record.** The batch processor writes a message to ClickHouse
//!   only once this emitter has published the events of every message up to it ([`EmitGate`],
//!   a [`WriteGate`]). So whatever the store of record holds has had its events published, and
//!   an index that reloads it after a crash (its scan then emits nothing) misses nothing: the
//!   messages after the group's committed offsets that the store of record lacks are followed
//!   again, with detection on, once the scan is done.
//! - **Exits due while nobody ran.** After publishing the exits of a tick, the emitter saves,
//!   per owned partition, the tick's time as the partition's exit mark ([`ExitMarks`]). A
//!   starting ES publishes the exits between each partition's mark and its scan from the store
//!   of record (`es.rs`), and its exit tick takes over from there.
//! - **Handover** (a rebalance, a crashed member): the events of partitions this member does
//!   not own are kept for `retain`; when a partition is assigned to it, it first publishes the
//!   kept events of that partition (those its previous owner may not have published before it
//!   left), then the new ones.
//!
//! So an event may repeat — with the same deterministic id, since every ES detects the same
//! change the same way (at-least-once; consumers drop repeats by id, docs/CHANGES.md).
//!
//! Memory: events kept for a handover are bounded by `retain` and `retain_max`; events waiting
//! to be published are bounded by `max_pending`: past it the index waits ([`EmitterInlet::through`]),
//! so while Kafka is down the index stops following instead of filling memory.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use userseg_domain::{ChangeEvent, UnixSeconds};

use crate::{Backoff, ChangeLog, ExitMarks, WriteGate};

/// Tuning of the emitter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmitterConfig {
    /// How long the events of partitions owned by others are kept for a handover (longer than
    /// the group's session timeout plus the index's lag).
    pub retain: Duration,
    /// At most this many such events are kept (the oldest go first).
    pub retain_max: usize,
    /// Detected events waiting for the emitter beyond which the index waits.
    pub max_pending: usize,
    /// How often the exit marks are saved (at most).
    pub mark_every: Duration,
}

impl Default for EmitterConfig {
    fn default() -> Self {
        EmitterConfig {
            retain: Duration::from_secs(120),
            retain_max: 1_000_000,
            max_pending: 200_000,
            mark_every: Duration::from_secs(5),
        }
    }
}

/// What the index hands the emitter, in detection order.
enum Inbound {
    Events(Vec<ChangeEvent>),
    /// Every event of the pair-log messages before these (partition, offset)s was handed over.
    Through(Vec<(i32, i64)>),
    /// Every exit due at this time was handed over.
    ExitsThrough(UnixSeconds),
}

/// Events handed over and not yet dealt with (published or kept), and a wake-up for an index
/// waiting for them to fall.
#[derive(Default)]
struct Pending {
    events: AtomicUsize,
    fell: Notify,
}

/// Where detected events enter the emitter.
#[derive(Clone)]
pub struct EmitterInlet {
    tx: mpsc::UnboundedSender<Inbound>,
    pending: Arc<Pending>,
    max_pending: usize,
}

impl EmitterInlet {
    /// Called from the store's apply path: never blocks (the index bounds what is pending by
    /// waiting in [`through`](Self::through) between batches).
    pub fn send(&self, events: Vec<ChangeEvent>) {
        if events.is_empty() {
            return;
        }
        metrics::gauge!("userseg_changes_emit_pending").increment(events.len() as f64);
        self.pending
            .events
            .fetch_add(events.len(), Ordering::AcqRel);
        let _ = self.tx.send(Inbound::Events(events));
    }

    /// The index has applied (and handed over the events of) every pair-log message before
    /// `positions`. Waits first while more than `max_pending` events are pending.
    pub async fn through(&self, positions: Vec<(i32, i64)>) {
        loop {
            let fell = self.pending.fell.notified();
            if self.pending.events.load(Ordering::Acquire) <= self.max_pending
                || self.tx.is_closed()
            {
                break;
            }
            fell.await;
        }
        if !positions.is_empty() {
            let _ = self.tx.send(Inbound::Through(positions));
        }
    }

    /// The exit tick at `at` has handed over its exits.
    pub fn exits_through(&self, at: UnixSeconds) {
        let _ = self.tx.send(Inbound::ExitsThrough(at));
    }
}

/// The batch processor's [`WriteGate`]: admits a message once the emitter has published the
/// events of every message up to it (see the module doc). A message of a partition this member
/// no longer owns (a lost assignment) is admitted at once: its commit is refused anyway, and
/// its next owner publishes its events before writing it again.
#[derive(Clone)]
pub struct EmitGate {
    published: watch::Receiver<BTreeMap<i32, i64>>,
    owned: watch::Receiver<Arc<BTreeSet<i32>>>,
}

impl EmitGate {
    fn admits(&self, through: &BTreeMap<i32, i64>) -> bool {
        let published = self.published.borrow();
        let owned = self.owned.borrow();
        through
            .iter()
            .all(|(p, o)| !owned.contains(p) || published.get(p).is_some_and(|next| next > o))
    }
}

#[async_trait]
impl WriteGate for EmitGate {
    async fn admit(&self, through: &BTreeMap<i32, i64>) {
        let mut gate = self.clone();
        gate.published.mark_unchanged();
        gate.owned.mark_unchanged();
        while !gate.admits(through) {
            // Fails only once the emitter is gone (shutting down): the processor's stop ends
            // the wait then.
            let changed = tokio::select! {
                r = gate.published.changed() => r,
                r = gate.owned.changed() => r,
            };
            if changed.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Publishes the detected events of the owned partitions; see the module doc.
pub struct ChangeEmitter {
    log: Arc<dyn ChangeLog>,
    marks: Option<Arc<dyn ExitMarks>>,
    owned: watch::Receiver<Arc<BTreeSet<i32>>>,
    partition_of: Box<dyn Fn(&str) -> i32 + Send + Sync>,
    rx: mpsc::UnboundedReceiver<Inbound>,
    pending: Arc<Pending>,
    published: watch::Sender<BTreeMap<i32, i64>>,
    config: EmitterConfig,
}

/// The emitter's own state between wake-ups.
#[derive(Default)]
struct Progress {
    owned: Arc<BTreeSet<i32>>,
    kept: VecDeque<(Instant, i32, ChangeEvent)>,
    /// Per partition, how far detection has handed everything over (from `Through`).
    covered: BTreeMap<i32, i64>,
    /// The latest tick whose exits were handed over and dealt with.
    exits_through: Option<UnixSeconds>,
    /// The marks saved last, and when.
    saved: BTreeMap<i32, UnixSeconds>,
    saved_at: Option<Instant>,
}

impl ChangeEmitter {
    /// `owned`: the pair-log partitions this member owns; `partition_of`: a user's pair-log
    /// partition; `marks`: where the exit marks are saved (none: not saved).
    pub fn new(
        log: Arc<dyn ChangeLog>,
        marks: Option<Arc<dyn ExitMarks>>,
        owned: watch::Receiver<Arc<BTreeSet<i32>>>,
        partition_of: impl Fn(&str) -> i32 + Send + Sync + 'static,
        config: EmitterConfig,
    ) -> (ChangeEmitter, EmitterInlet) {
        let (tx, rx) = mpsc::unbounded_channel();
        let pending = Arc::new(Pending::default());
        let (published, _) = watch::channel(BTreeMap::new());
        let inlet = EmitterInlet {
            tx,
            pending: pending.clone(),
            max_pending: config.max_pending,
        };
        (
            ChangeEmitter {
                log,
                marks,
                owned,
                partition_of: Box::new(partition_of),
                rx,
                pending,
                published,
                config,
            },
            inlet,
        )
    }

    /// The gate that holds the batch processor's writes back until their events are published.
    pub fn gate(&self) -> EmitGate {
        EmitGate {
            published: self.published.subscribe(),
            owned: self.owned.clone(),
        }
    }

    /// Runs until cancelled (or every inlet is dropped and everything is published).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut st = Progress::default();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut closed = false;
        let mut watching = true;
        loop {
            if closed && !watching {
                break;
            }
            let mut inbound: Vec<Inbound> = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => break,
                got = self.rx.recv(), if !closed => match got {
                    Some(m) => inbound.push(m),
                    None => closed = true,
                },
                changed = self.owned.changed(), if watching => {
                    watching = changed.is_ok();
                }
            }
            while let Ok(more) = self.rx.try_recv() {
                inbound.push(more);
            }
            let mut out = self.take_gained(&mut st);
            let now = Instant::now();
            let mut handled = 0;
            let mut through: Vec<Vec<(i32, i64)>> = Vec::new();
            let mut exits_through = None;
            for m in inbound {
                match m {
                    Inbound::Events(events) => {
                        handled += events.len();
                        for e in events {
                            let p = (self.partition_of)(&e.user_id);
                            if st.owned.contains(&p) {
                                out.push(e);
                            } else {
                                st.kept.push_back((now, p, e));
                            }
                        }
                    }
                    Inbound::Through(pos) => through.push(pos),
                    Inbound::ExitsThrough(at) => exits_through = Some(at),
                }
            }
            self.prune(&mut st, now);
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
            if handled > 0 {
                metrics::gauge!("userseg_changes_emit_pending").decrement(handled as f64);
                self.pending.events.fetch_sub(handled, Ordering::AcqRel);
                self.pending.fell.notify_waiters();
            }
            for pos in through {
                for (p, o) in pos {
                    let at = st.covered.entry(p).or_insert(o);
                    *at = (*at).max(o);
                }
            }
            if exits_through.is_some() {
                st.exits_through = exits_through;
            }
            self.publish_watermarks(&st);
            self.save_marks(&mut st, false).await;
        }
        self.save_marks(&mut st, true).await;
    }

    /// Takes in a change of the owned partitions: the kept events of gained ones, in order.
    fn take_gained(&mut self, st: &mut Progress) -> Vec<ChangeEvent> {
        let now_owned = self.owned.borrow_and_update().clone();
        let mut out = Vec::new();
        if now_owned == st.owned {
            return out;
        }
        let gained: BTreeSet<i32> = now_owned.difference(&st.owned).copied().collect();
        if !gained.is_empty() {
            let before = st.kept.len();
            let mut rest = VecDeque::with_capacity(st.kept.len());
            for (at, p, e) in st.kept.drain(..) {
                if gained.contains(&p) {
                    out.push(e);
                } else {
                    rest.push_back((at, p, e));
                }
            }
            st.kept = rest;
            tracing::info!(
                partitions = ?gained,
                replayed = before - st.kept.len(),
                "change feed: emitting for newly owned partitions, kept events first"
            );
            metrics::counter!("userseg_changes_replayed_total")
                .increment((before - st.kept.len()) as u64);
        }
        st.owned = now_owned;
        out
    }

    /// Drops kept events past `retain` or `retain_max`.
    fn prune(&self, st: &mut Progress, now: Instant) {
        while st.kept.len() > self.config.retain_max
            || st
                .kept
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > self.config.retain)
        {
            st.kept.pop_front();
        }
        metrics::gauge!("userseg_changes_emit_kept").set(st.kept.len() as f64);
    }

    /// What the gate admits: how far detection got, for the owned partitions only (all their
    /// events up to there are published).
    fn publish_watermarks(&self, st: &Progress) {
        let owned: BTreeMap<i32, i64> = st
            .covered
            .iter()
            .filter(|(p, _)| st.owned.contains(p))
            .map(|(p, o)| (*p, *o))
            .collect();
        self.published.send_if_modified(|w| {
            if *w == owned {
                false
            } else {
                *w = owned;
                true
            }
        });
    }

    /// Saves the exit marks of the owned partitions, at most every `mark_every` (`last`: now,
    /// on the way out).
    async fn save_marks(&self, st: &mut Progress, last: bool) {
        let (Some(marks), Some(at)) = (&self.marks, st.exits_through) else {
            return;
        };
        if !last
            && st
                .saved_at
                .is_some_and(|t| t.elapsed() < self.config.mark_every)
        {
            return;
        }
        let want: BTreeMap<i32, UnixSeconds> = st
            .owned
            .iter()
            .filter(|p| st.saved.get(p).is_none_or(|s| *s < at))
            .map(|p| (*p, at))
            .collect();
        if want.is_empty() {
            return;
        }
        let saved = if last {
            tokio::time::timeout(Duration::from_secs(2), marks.save(&want))
                .await
                .unwrap_or_else(|_| Err(crate::PortError::Transient("timed out".into())))
        } else {
            marks.save(&want).await
        };
        st.saved_at = Some(Instant::now());
        match saved {
            Ok(()) => st.saved.extend(want),
            Err(e) => {
                metrics::counter!("userseg_changes_mark_failures_total").increment(1);
                tracing::warn!(error = %e, "change feed: saving the exit marks failed; will retry");
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

    /// Records appends; fails the first `fail` of them; with `open`, each append first waits
    /// for a permit of it (a log that is down).
    #[derive(Default)]
    struct Recorder {
        got: Mutex<Vec<ChangeEvent>>,
        fail: Mutex<usize>,
        open: Option<tokio::sync::Notify>,
    }

    impl Recorder {
        fn stuck() -> Recorder {
            Recorder {
                open: Some(tokio::sync::Notify::new()),
                ..Recorder::default()
            }
        }

        fn let_one_through(&self) {
            if let Some(open) = &self.open {
                open.notify_one();
            }
        }
    }

    #[async_trait]
    impl ChangeLog for Recorder {
        async fn append(&self, events: Vec<ChangeEvent>) -> Result<(), PortError> {
            if let Some(open) = &self.open {
                open.notified().await;
            }
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
            ChangeEmitter::new(log.clone(), None, owned_rx, part, EmitterConfig::default());
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
            ..EmitterConfig::default()
        };
        let (emitter, inlet) = ChangeEmitter::new(log.clone(), None, owned_rx, part, config);
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

    /// Whether a future is still pending once everything else has run (paused time).
    async fn still_pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .is_err()
    }

    fn at(p: i32, o: i64) -> BTreeMap<i32, i64> {
        BTreeMap::from([(p, o)])
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_admits_a_message_only_once_its_events_are_published_by_its_owner() {
        let log = Arc::new(Recorder::default());
        *log.fail.lock().unwrap() = 3;
        let (owned_tx, owned_rx) = watch::channel(Arc::new(BTreeSet::from([0])));
        let (emitter, inlet) =
            ChangeEmitter::new(log.clone(), None, owned_rx, part, EmitterConfig::default());
        let gate = emitter.gate();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(emitter.run(cancel.clone()));
        // Nothing detected yet: nothing admitted.
        assert!(still_pending(gate.admit(&at(0, 0))).await);
        inlet.send(vec![ev("u0", 1), ev("u1", 1)]);
        inlet.through(vec![(0, 5), (1, 7)]).await;
        // Publishing fails three times first; the gate waits for it.
        gate.admit(&at(0, 4)).await;
        assert_eq!(*log.got.lock().unwrap(), vec![ev("u0", 1)]);
        // Offset 5 is past what detection handed over.
        assert!(still_pending(gate.admit(&at(0, 5))).await);
        // Partition 1 is not owned: its event is kept, not published. Once it is assigned
        // here, its messages wait for the kept event to be published.
        owned_tx.send(Arc::new(BTreeSet::from([0, 1]))).unwrap();
        gate.admit(&BTreeMap::from([(0, 4), (1, 6)])).await;
        assert_eq!(*log.got.lock().unwrap(), vec![ev("u0", 1), ev("u1", 1)]);
        // Lost: admitted at once (its commit is refused; its next owner publishes first).
        assert!(still_pending(gate.admit(&at(0, 6))).await);
        owned_tx.send(Arc::new(BTreeSet::from([1]))).unwrap();
        gate.admit(&at(0, 6)).await;
        cancel.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn while_the_topic_is_down_the_index_waits_instead_of_queueing_without_bound() {
        let log = Arc::new(Recorder::stuck());
        let (_owned_tx, owned_rx) = watch::channel(Arc::new(BTreeSet::from([0])));
        let config = EmitterConfig {
            max_pending: 3,
            ..EmitterConfig::default()
        };
        let (emitter, inlet) = ChangeEmitter::new(log.clone(), None, owned_rx, part, config);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(emitter.run(cancel.clone()));
        inlet.send(vec![ev("u0", 1), ev("u0", 2)]);
        inlet.through(vec![(0, 1)]).await;
        // The emitter holds 2 (publishing, stuck); 2 more are within the bound...
        inlet.send(vec![ev("u0", 3)]);
        inlet.through(vec![(0, 2)]).await;
        inlet.send(vec![ev("u0", 4)]);
        // ... and past it the index waits.
        assert!(still_pending(inlet.through(vec![(0, 3)])).await);
        log.let_one_through();
        log.let_one_through();
        inlet.through(vec![(0, 3)]).await;
        assert!(log.got.lock().unwrap().len() >= 2);
        cancel.cancel();
        task.await.unwrap();
    }

    /// Marks saved, per partition.
    #[derive(Default)]
    struct Marks(Mutex<Vec<BTreeMap<i32, UnixSeconds>>>);

    #[async_trait]
    impl ExitMarks for Marks {
        async fn load(&self) -> Result<BTreeMap<i32, UnixSeconds>, PortError> {
            let mut all: BTreeMap<i32, UnixSeconds> = BTreeMap::new();
            for m in self.0.lock().unwrap().iter() {
                for (p, at) in m {
                    let e = all.entry(*p).or_insert(*at);
                    *e = (*e).max(*at);
                }
            }
            Ok(all)
        }
        async fn save(&self, marks: &BTreeMap<i32, UnixSeconds>) -> Result<(), PortError> {
            if !marks.is_empty() {
                self.0.lock().unwrap().push(marks.clone());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn the_test_marks_pass_the_shared_suite() {
        crate::exit_marks_suite::run(&Marks::default()).await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_exit_marks_of_owned_partitions_follow_the_published_ticks() {
        let log = Arc::new(Recorder::default());
        let marks = Arc::new(Marks::default());
        let (owned_tx, owned_rx) = watch::channel(Arc::new(BTreeSet::from([0])));
        let config = EmitterConfig {
            mark_every: Duration::from_secs(5),
            ..EmitterConfig::default()
        };
        let (emitter, inlet) =
            ChangeEmitter::new(log.clone(), Some(marks.clone()), owned_rx, part, config);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(emitter.run(cancel.clone()));
        inlet.send(vec![ev("u0", 1)]);
        inlet.exits_through(100);
        until(|| marks.0.lock().unwrap().len() == 1).await;
        assert_eq!(marks.0.lock().unwrap()[0], at(0, 100));
        assert_eq!(
            log.got.lock().unwrap().len(),
            1,
            "published before the mark"
        );
        // Within `mark_every`: not saved again; after it, the owned partitions get the new mark.
        owned_tx.send(Arc::new(BTreeSet::from([0, 1]))).unwrap();
        inlet.exits_through(101);
        tokio::time::sleep(Duration::from_secs(6)).await;
        inlet.exits_through(102);
        until(|| marks.0.lock().unwrap().len() == 2).await;
        assert_eq!(
            marks.0.lock().unwrap()[1],
            BTreeMap::from([(0, 102), (1, 102)])
        );
        // On the way out (every inlet gone), the latest mark is saved.
        inlet.exits_through(103);
        drop(inlet);
        drop(owned_tx);
        task.await.unwrap();
        assert_eq!(
            marks.load().await.unwrap(),
            BTreeMap::from([(0, 103), (1, 103)])
        );
    }
}
