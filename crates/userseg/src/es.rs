//! `userseg es`: the estimation service. A consumer-group member that batches the pair log
//! (pairs and user deletions, in log order) into ClickHouse, and the API's reads — estimates,
//! analytics, history — from the in-memory index (or ClickHouse). It also samples every
//! segment's count into ClickHouse's history table each HISTORY_INTERVAL tick.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use userseg_api::{ApiState, ReadyCheck};
use userseg_clickhouse::ClickHouseStore;
use userseg_domain::{ChangeEvent, UnixSeconds};
use userseg_embedded::{EmbeddedStore, EventSink, MemStore};
use userseg_kafka::{
    KafkaChangeLog, KafkaConfig, KafkaDeadLetters, KafkaFollower, KafkaPublisher, KafkaSource,
};
use userseg_usecase::{
    Analytics, BatchProcessor, ChangeEmitter, ChangeLog, Changes, Clock, EmitterConfig,
    EmitterInlet, Estimation, ExitMarks, History, HistorySampler, HistoryStore, IndexConfig,
    IndexObserver, Mode, PartitionOf, PortError, SegmentAnalytics, SegmentCounter, SegmentIndex,
    ShardServer, ShardedIndex, SystemClock,
};

use crate::config::{EsConfig, IndexMode};
use crate::observability;
use crate::peers::HttpPeers;
use crate::server::{self, Server};

/// How often the index drops expired memberships (their memory is reused).
const INDEX_EXPIRE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the index's size gauges are refreshed.
const INDEX_STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the batch processor (Kafka → ClickHouse), the retention of expired partitions, the
/// in-memory index (when `cfg.index`) and the API. On shutdown the processor flushes its batch
/// and commits, and the consumer leaves the group so its partitions move at once.
pub async fn start(cfg: EsConfig, shutdown: CancellationToken) -> Result<Server> {
    let metrics = observability::metrics(observability::Role::Es)?;
    let listener = server::bind(&cfg.service).await?;
    if cfg.create_topics {
        if let Err(e) = userseg_kafka::ensure_topics(&cfg.kafka).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
    }
    let store = ClickHouseStore::new(cfg.clickhouse.clone(), cfg.service.window)?;
    let source = KafkaSource::new(&cfg.kafka)?;
    let assignment = source.assignment();
    let dlq = KafkaDeadLetters::new(&cfg.kafka)?.with_provenance(source.provenance());
    let mut processor =
        BatchProcessor::new(Arc::new(store.clone()), Arc::new(dlq), cfg.batch.clone());
    let background_stop = CancellationToken::new();
    let mut background = vec![retention(
        store.clone(),
        cfg.retention_interval,
        background_stop.clone(),
    )];

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // The change feed: published by the index's detection, read back for GET /v1/changes.
    let mut changes = None;
    let mut feed = None;
    if let Some(topic) = &cfg.changes_topic {
        let log = open_change_log(&cfg.kafka, topic, cfg.create_topics).await?;
        if cfg.index == IndexMode::Full {
            let pair_partitions = log.partitions_of(&cfg.kafka.topic).await?;
            let partition_of: PartitionOf = Arc::new(move |user: &str| {
                userseg_kafka::partition_for(user.as_bytes(), pair_partitions)
            });
            let of = partition_of.clone();
            let change_log: Arc<dyn ChangeLog> = log.clone();
            let marks: Arc<dyn ExitMarks> = Arc::new(store.clone());
            let (emitter, inlet) = ChangeEmitter::new(
                change_log,
                Some(marks.clone()),
                assignment.clone(),
                move |user| of(user),
                EmitterConfig {
                    // A dead member's partitions move after its session timed out.
                    retain: cfg.kafka.session_timeout * 2 + Duration::from_secs(30),
                    ..EmitterConfig::default()
                },
            );
            // The store of record takes a message only once its events are published.
            processor = processor.with_gate(Arc::new(emitter.gate()));
            background.push(tokio::spawn(emitter.run(background_stop.clone())));
            feed = Some(FeedParts {
                inlet,
                marks,
                partition_of,
            });
        } else {
            tracing::warn!(
                topic,
                "KAFKA_CHANGES_TOPIC needs ES_INDEX=true to detect changes: this ES serves the feed but publishes nothing"
            );
        }
        changes = Some(Changes::new(log, Duration::from_secs(15)));
    }
    let health = processor.health();
    let processor_stop = CancellationToken::new();
    let processor_task = {
        let stop = processor_stop.clone();
        tokio::spawn(async move { processor.run(source, stop).await })
    };
    let mut shards: Option<Arc<dyn ShardServer>> = None;
    let (counter, reads): (Arc<dyn SegmentCounter>, Arc<dyn SegmentAnalytics>) = match cfg.index {
        IndexMode::Full => {
            let (index, tasks) = start_index(&cfg, &store, clock.clone(), &background_stop, feed);
            background.extend(tasks);
            (Arc::new(index.clone()), Arc::new(index))
        }
        IndexMode::Partitioned => {
            let (index, tasks) =
                start_sharded(&cfg, &store, assignment, clock.clone(), &background_stop).await?;
            background.extend(tasks);
            shards = Some(Arc::new(index.clone()));
            (Arc::new(index.clone()), Arc::new(index))
        }
        IndexMode::Off => (Arc::new(store.clone()), Arc::new(store.clone())),
    };
    // Every ES samples the same ticks (multiples of HISTORY_INTERVAL); ClickHouse keeps one
    // sample per tick.
    let history_store: Arc<dyn HistoryStore> = Arc::new(store.clone());
    let sampler = HistorySampler::new(
        counter.clone(),
        history_store.clone(),
        clock.clone(),
        cfg.history,
    );
    background.push(tokio::spawn(sampler.run(background_stop.clone())));
    let window = cfg.service.window;
    let analytics = Analytics::reads(reads, clock.clone(), window);
    let history = History::new(history_store, clock.clone(), cfg.history);
    let estimation = Estimation::new(counter, clock, window, cfg.estimate_cache_ttl);
    // Approx: the index answers it exactly; ClickHouse (no index, or while it loads) answers it
    // from the sketches, far cheaper than exact for a 15 s gauge.
    background.push(observability::spawn_segment_gauges(
        estimation.clone(),
        Mode::Approx,
        background_stop.clone(),
    ));
    let mut state = ApiState::new(None, Some(estimation));
    state.analytics = Some(analytics);
    state.history = Some(history);
    state.changes = changes;
    state.metrics = Some(metrics);
    state.auth = cfg.service.auth.clone();
    state.shards = shards;
    state
        .ready_checks
        .push(("processor".into(), server::processor_check(health)));
    state
        .ready_checks
        .push(("kafka".into(), broker_check(&cfg.kafka)?));

    let teardown = async move {
        // Stop consuming: the processor flushes its batch (bounded by the shutdown grace) and
        // commits; then the consumer leaves the group so partitions move at once.
        processor_stop.cancel();
        match processor_task.await {
            Ok(source) => source.close().await,
            Err(e) => tracing::warn!(error = %e, "processor task failed"),
        }
        background_stop.cancel();
        for task in background {
            let _ = task.await;
        }
        Ok(())
    };
    server::run(listener, state, &cfg.service, "es", shutdown, teardown)
}

/// Broker reachability, through a metadata request of an idle producer client.
fn broker_check(kafka: &KafkaConfig) -> Result<ReadyCheck> {
    let probe = Arc::new(KafkaPublisher::new(kafka)?);
    Ok(Arc::new(move || {
        let probe = probe.clone();
        Box::pin(async move {
            userseg_usecase::PairPublisher::check_ready(probe.as_ref())
                .await
                .map_err(|e| e.to_string())
        })
    }))
}

/// Drops expired day partitions every `interval` (ClickHouse 18.16 has no TTL).
fn retention(
    store: ClickHouseStore,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            match store.drop_expired_partitions(SystemClock.now()).await {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::info!(partitions = dropped.len(), "dropped expired partitions")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "retention failed; will retry"),
            }
        }
    })
}

/// What the index needs to feed the emitter.
struct FeedParts {
    inlet: EmitterInlet,
    marks: Arc<dyn ExitMarks>,
    partition_of: PartitionOf,
}

/// Starts the in-memory index: a task that loads and follows it, and one that expires it;
/// with `feed`, change detection into the emitter and the exit tick.
fn start_index(
    cfg: &EsConfig,
    store: &ClickHouseStore,
    clock: Arc<dyn Clock>,
    stop: &CancellationToken,
    feed: Option<FeedParts>,
) -> (SegmentIndex, Vec<JoinHandle<()>>) {
    let mem = Arc::new(MemStore::new(cfg.service.window));
    let memberships = EmbeddedStore(mem.clone());
    let mut index = SegmentIndex::new(
        Arc::new(memberships),
        Arc::new(store.clone()),
        IndexConfig::default(),
    );
    let mut feed_tick = None;
    if let Some(feed) = feed {
        let inlet = feed.inlet.clone();
        index = index.with_observer(Arc::new(FeedObserver {
            mem: mem.clone(),
            store: store.clone(),
            feed,
            clock: clock.clone(),
            catch_up_failures: AtomicU32::new(0),
        }));
        feed_tick = Some(exit_tick(&mem, &index, inlet, clock.clone(), stop));
    }
    let kafka = cfg.kafka.clone();
    let open = move || {
        let kafka = kafka.clone();
        async move { KafkaFollower::open(&kafka).await }
    };
    let run = tokio::spawn(index.clone().run(
        open,
        Arc::new(store.clone()),
        clock.clone(),
        stop.clone(),
    ));
    let expire = tokio::spawn(expire_index(mem, index.clone(), clock, stop.clone()));
    let mut tasks = vec![run, expire];
    tasks.extend(feed_tick);
    (index, tasks)
}

/// How often the exit tick looks at the clock (as the standalone checkpointer does).
const EXIT_TICK: Duration = Duration::from_millis(500);

/// Change detection in the index (see `userseg_usecase::emitter`): turned on once the scan of
/// the store of record is done (the scan emits nothing: whatever the store of record holds has
/// had its events published, the batch processor's gate sees to it), after publishing the
/// exits due while no ES emitted them; then every followed message's events go to the
/// emitter, with how far the index got.
struct FeedObserver {
    mem: Arc<MemStore>,
    store: ClickHouseStore,
    feed: FeedParts,
    clock: Arc<dyn Clock>,
    catch_up_failures: AtomicU32,
}

/// Attempts at reading the exits due while no ES emitted them before giving up on them.
const CATCH_UP_TRIES: u32 = 5;

#[async_trait::async_trait]
impl IndexObserver for FeedObserver {
    async fn scanned(&self, at: UnixSeconds) -> Result<(), PortError> {
        let exits = match self.exits_due_before(at).await {
            Ok(exits) => exits,
            // Retried (with backoff) a few times; then the index serves without them rather
            // than never (a band too large for ClickHouse's memory would fail every time).
            Err(e) if self.catch_up_failures.fetch_add(1, Ordering::Relaxed) < CATCH_UP_TRIES => {
                return Err(e)
            }
            Err(e) => {
                tracing::error!(error = %e, "change feed: the exits due while no ES emitted them could not be read; they are not published");
                metrics::counter!("userseg_changes_catch_up_failures_total").increment(1);
                Vec::new()
            }
        };
        if !exits.is_empty() {
            tracing::info!(
                exits = exits.len(),
                "change feed: publishing the exits due while no ES emitted them"
            );
            metrics::counter!("userseg_changes_caught_up_exits_total")
                .increment(exits.len() as u64);
        }
        self.feed.inlet.send(exits);
        let inlet = self.feed.inlet.clone();
        let sink = EventSink::new(move |events| inlet.send(events));
        if !self
            .mem
            .attach_event_sink(sink, self.clock.clone(), self.mem.initial_exit_lo(at))
        {
            tracing::warn!("change feed: detection was on already");
        }
        Ok(())
    }

    async fn applied(&self, positions: Vec<(i32, i64)>) {
        self.feed.inlet.through(positions).await;
    }
}

impl FeedObserver {
    /// The `expired` exits due between each partition's exit mark and `at` (the scan's time):
    /// memberships whose latest pair expired in that span, per the store of record, and that
    /// the index (just loaded as of `at`) does not hold live. Partitions without a mark have
    /// never had an emitter: nothing to catch up.
    async fn exits_due_before(&self, at: UnixSeconds) -> Result<Vec<ChangeEvent>, PortError> {
        let marks = self.feed.marks.load().await?;
        let Some(&oldest) = marks.values().min() else {
            return Ok(Vec::new());
        };
        let window = i64::try_from(self.mem.window().secs()).unwrap_or(i64::MAX);
        // A margin of a bucket (at most an hour) on both sides; exact filtering below.
        let margin = 3_600;
        let band = self
            .store
            .latest_in(
                oldest.saturating_sub(window).saturating_sub(margin),
                at.saturating_sub(window).saturating_add(margin),
            )
            .await?;
        let mut exits: Vec<ChangeEvent> = band
            .into_iter()
            .filter(|p| {
                let Some(&mark) = marks.get(&(self.feed.partition_of)(&p.user_id)) else {
                    return false;
                };
                !self.mem.expired_at(p.ts, mark)
                    && self.mem.expired_at(p.ts, at)
                    && !self.mem.holds_live(&p.user_id, &p.segment, at)
            })
            .map(|p| self.mem.expired_event(&p.user_id, &p.segment, p.ts))
            .collect();
        exits.sort_by(|a, b| (a.ts, &a.user_id, &a.segment).cmp(&(b.ts, &b.user_id, &b.segment)));
        Ok(exits)
    }
}

/// The exit tick: while the index serves, emits the exits due, then tells the emitter how far
/// they go (the emitter saves it as the exit mark of its partitions).
fn exit_tick(
    mem: &Arc<MemStore>,
    index: &SegmentIndex,
    inlet: EmitterInlet,
    clock: Arc<dyn Clock>,
    stop: &CancellationToken,
) -> JoinHandle<()> {
    let (mem, index, stop) = (mem.clone(), index.clone(), stop.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXIT_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !index.status().serving || !mem.has_feed() {
                continue;
            }
            let (m, now) = (mem.clone(), clock.now());
            match tokio::task::spawn_blocking(move || m.tick_changes(now)).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "change feed: the exit tick failed"),
                Err(e) => tracing::warn!(error = %e, "change feed: the exit tick panicked"),
                Ok(Ok(_)) => inlet.exits_through(now),
            }
        }
    })
}

/// Opens the change topic's log, retrying for a while when the broker is not there yet.
async fn open_change_log(
    kafka: &KafkaConfig,
    topic: &str,
    create: bool,
) -> Result<Arc<KafkaChangeLog>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match KafkaChangeLog::open(kafka, topic, create).await {
            Ok(log) => return Ok(Arc::new(log)),
            Err(PortError::Transient(e)) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(topic, error = %e, "cannot open the change topic yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("KAFKA_CHANGES_TOPIC {topic}: {e}"),
        }
    }
}

/// Expires the index every [`INDEX_EXPIRE_INTERVAL`] and refreshes its size gauges every
/// [`INDEX_STATS_INTERVAL`].
/// Nothing is expired before the index serves: with a change feed, detection (which expiry
/// must not get ahead of) starts only after the scan.
async fn expire_index(
    mem: Arc<MemStore>,
    index: SegmentIndex,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(INDEX_STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_expire = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let m = mem.clone();
        let now = clock.now();
        let expire = last_expire.elapsed() >= INDEX_EXPIRE_INTERVAL && index.status().serving;
        if expire {
            last_expire = tokio::time::Instant::now();
        }
        let Ok(stats) = tokio::task::spawn_blocking(move || {
            if expire {
                m.expire(now);
            }
            m.memory()
        })
        .await
        else {
            continue;
        };
        metrics::gauge!("userseg_index_live_pairs").set(stats.live_pairs as f64);
        metrics::gauge!("userseg_index_users").set(stats.users as f64);
        metrics::gauge!("userseg_index_memory_bytes")
            .set((stats.member_bytes + stats.dict_bytes) as f64);
    }
}

/// The least prefetch buffer of a shard's follower.
const SHARD_PREFETCH_MIN_KBYTES: usize = 2048;

/// How long the sharded index waits at start for the topic's partition count.
const PARTITION_COUNT_WAIT: Duration = Duration::from_secs(60);

/// Starts the sharded index (ES_INDEX=partitioned): shards follow `assignment` (the partitions
/// this member owns), reads combine them with ES_PEERS' shards. Needs the topic's partition
/// count (the publisher's partitioner depends on it): waited for up to
/// [`PARTITION_COUNT_WAIT`].
async fn start_sharded(
    cfg: &EsConfig,
    store: &ClickHouseStore,
    assignment: tokio::sync::watch::Receiver<Arc<std::collections::BTreeSet<i32>>>,
    clock: Arc<dyn Clock>,
    stop: &CancellationToken,
) -> Result<(ShardedIndex<EmbeddedStore>, Vec<JoinHandle<()>>)> {
    let probe = KafkaPublisher::new(&cfg.kafka)?;
    let deadline = tokio::time::Instant::now() + PARTITION_COUNT_WAIT;
    let partitions = loop {
        match probe.partition_count().await {
            Ok(n) => break n,
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, "sharded index: waiting for the topic's partition count");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => anyhow::bail!("sharded index: the topic's partition count: {e}"),
        }
    };
    let partition_of: PartitionOf =
        Arc::new(move |user: &str| userseg_kafka::partition_for(user.as_bytes(), partitions));
    let peers = Arc::new(HttpPeers::new(cfg.peers.clone(), cfg.peer_token.clone())?);
    let window = cfg.service.window;
    let index = ShardedIndex::new(peers, partition_of, partitions, window);
    tracing::info!(partitions, peers = ?cfg.peers, "sharded index: starting");
    // One follower (one librdkafka consumer) per shard: they share KAFKA_PREFETCH_KBYTES, so
    // the prefetch buffers of all of them stay within what one full-index follower may hold
    // (at least 2 MiB each, enough for the largest message).
    let mut kafka = cfg.kafka.clone();
    let share = usize::try_from(partitions).unwrap_or(1).max(1);
    kafka.prefetch_kbytes = (kafka.prefetch_kbytes / share).max(SHARD_PREFETCH_MIN_KBYTES);
    let open = move |partition: i32| {
        let kafka = kafka.clone();
        async move { KafkaFollower::open_partitions(&kafka, Some(&[partition])).await }
    };
    let run = tokio::spawn(index.clone().run(
        assignment,
        move || Arc::new(EmbeddedStore(Arc::new(MemStore::new(window)))),
        open,
        Arc::new(store.clone()),
        clock.clone(),
        stop.clone(),
    ));
    let expire = tokio::spawn(expire_shards(index.clone(), clock, stop.clone()));
    Ok((index, vec![run, expire]))
}

/// [`expire_index`] for every shard of the sharded index, and the sums of their size gauges.
async fn expire_shards(
    index: ShardedIndex<EmbeddedStore>,
    clock: Arc<dyn Clock>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(INDEX_STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_expire = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let memories: Vec<Arc<MemStore>> = index
            .local()
            .memories()
            .await
            .into_iter()
            .map(|m| m.0.clone())
            .collect();
        let now = clock.now();
        let expire = last_expire.elapsed() >= INDEX_EXPIRE_INTERVAL;
        if expire {
            last_expire = tokio::time::Instant::now();
        }
        let Ok(stats) = tokio::task::spawn_blocking(move || {
            memories
                .iter()
                .map(|m| {
                    if expire {
                        m.expire(now);
                    }
                    m.memory()
                })
                .fold((0u64, 0u64, 0u64), |(p, u, b), s| {
                    (
                        p + s.live_pairs,
                        u + s.users,
                        b + s.member_bytes + s.dict_bytes,
                    )
                })
        })
        .await
        else {
            continue;
        };
        metrics::gauge!("userseg_index_live_pairs").set(stats.0 as f64);
        metrics::gauge!("userseg_index_users").set(stats.1 as f64);
        metrics::gauge!("userseg_index_memory_bytes").set(stats.2 as f64);
        let held = index.local().held().await.len();
        let loaded = index.local().ready().await.len();
        metrics::gauge!("userseg_index_shards").set(held as f64);
        metrics::gauge!("userseg_index_shards_loading").set(held.saturating_sub(loaded) as f64);
        let serving = index.check_ready().await.is_ok();
        metrics::gauge!("userseg_index_serving").set(if serving { 1.0 } else { 0.0 });
    }
}
