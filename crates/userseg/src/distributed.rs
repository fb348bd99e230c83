//! Distributed mode: `uss` (ingest → Kafka), `es` (Kafka → batch processor → ClickHouse, and
//! estimates from ClickHouse), `migrate` (ClickHouse schema). The use cases are the same as in
//! standalone mode; only the adapters differ.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use userseg_api::{ApiState, ReadyCheck};
use userseg_clickhouse::{ClickHouseConfig, ClickHouseStore};
use userseg_embedded::{EmbeddedStore, MemStore};
use userseg_kafka::KafkaFollower;
use userseg_kafka::{KafkaConfig, KafkaDeadLetters, KafkaPublisher, KafkaSource};
use userseg_usecase::{
    BatchProcessor, Clock, Estimation, Ingest, Mode, Replica, ReplicaConfig, SegmentCounter,
    SystemClock,
};

use crate::config::{duration, BatchArgs, ServiceArgs};
use crate::{observability, server};

#[derive(Args, Debug, Clone)]
pub struct KafkaArgs {
    /// Bootstrap brokers, host:port[,host:port].
    #[arg(long, env = "KAFKA_BROKER_URL", default_value = "localhost:9092")]
    pub kafka_broker_url: String,
    /// Topic of the pair log.
    #[arg(long, env = "KAFKA_TOPIC", default_value = "user-segments")]
    pub kafka_topic: String,
    /// Dead-letter topic.
    #[arg(long, env = "KAFKA_DLQ_TOPIC", default_value = "user-segments-dlq")]
    pub kafka_dlq_topic: String,
    /// Partitions of the topics when userseg creates them.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 6)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics when userseg creates them.
    #[arg(long, env = "KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    pub kafka_replication_factor: i32,
    /// Create missing topics at start.
    #[arg(long, env = "KAFKA_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub kafka_create_topics: bool,
    /// Longest wait for the broker to acknowledge a publish (then 503 / UNAVAILABLE).
    #[arg(long, env = "KAFKA_ACK_TIMEOUT", default_value = "10s")]
    pub kafka_ack_timeout: String,
    /// Producer linger (batching delay).
    #[arg(long, env = "KAFKA_LINGER", default_value = "5ms")]
    pub kafka_linger: String,
    /// Producer compression: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "KAFKA_COMPRESSION", default_value = "lz4")]
    pub kafka_compression: String,
    /// Consumer group session timeout: how long a dead member keeps its partitions.
    #[arg(long, env = "KAFKA_SESSION_TIMEOUT", default_value = "45s")]
    pub kafka_session_timeout: String,
    /// Extra librdkafka properties, key=value,key=value (e.g. security settings).
    #[arg(long, env = "KAFKA_EXTRA", default_value = "")]
    pub kafka_extra: String,
}

impl KafkaArgs {
    pub fn validate(&self, group_id: Option<&str>) -> Result<KafkaConfig> {
        let mut c = KafkaConfig::new(self.kafka_broker_url.clone());
        c.topic = self.kafka_topic.clone();
        c.dlq_topic = self.kafka_dlq_topic.clone();
        if let Some(g) = group_id {
            c.group_id = g.to_owned();
        }
        c.partitions = self.kafka_partitions;
        c.replication_factor = self.kafka_replication_factor;
        c.ack_timeout = duration("KAFKA_ACK_TIMEOUT", &self.kafka_ack_timeout)?;
        c.linger = duration("KAFKA_LINGER", &self.kafka_linger)?;
        c.compression = self.kafka_compression.parse()?;
        c.session_timeout = duration("KAFKA_SESSION_TIMEOUT", &self.kafka_session_timeout)?;
        c.extra = KafkaConfig::parse_extra(&self.kafka_extra)?;
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Debug, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP interface.
    #[arg(long, env = "CLICKHOUSE_ADDR", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_addr: String,
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "userseg")]
    pub clickhouse_database: String,
    #[arg(long, env = "CLICKHOUSE_USER", default_value = "default")]
    pub clickhouse_user: String,
    #[arg(
        long,
        env = "CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub clickhouse_password: String,
    /// Timeout of one ClickHouse request.
    #[arg(long, env = "CLICKHOUSE_REQUEST_TIMEOUT", default_value = "30s")]
    pub clickhouse_request_timeout: String,
}

impl ClickHouseArgs {
    pub fn validate(&self) -> Result<ClickHouseConfig> {
        let c = ClickHouseConfig {
            addr: self.clickhouse_addr.clone(),
            database: self.clickhouse_database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            request_timeout: duration(
                "CLICKHOUSE_REQUEST_TIMEOUT",
                &self.clickhouse_request_timeout,
            )?,
            ..ClickHouseConfig::default()
        };
        c.validate()?;
        Ok(c)
    }
}

#[derive(Args, Debug, Clone)]
pub struct UssArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
}

#[derive(Args, Debug, Clone)]
pub struct EsArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// Consumer group of the estimation services.
    #[arg(long, env = "KAFKA_GROUP_ID", default_value = "userseg-es")]
    pub kafka_group_id: String,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    /// How long an estimate is served from cache (0s disables the cache).
    #[arg(long, env = "ESTIMATE_CACHE_TTL", default_value = "1s")]
    pub estimate_cache_ttl: String,
    /// How often expired day partitions are dropped.
    #[arg(long, env = "RETENTION_INTERVAL", default_value = "1h")]
    pub retention_interval: String,
    /// Keep an exact in-memory index of the live pairs (loaded from ClickHouse at start, then
    /// kept current from the topic) and answer estimates from it; ClickHouse answers until it
    /// has loaded. About 15 bytes of memory per live pair.
    #[arg(long, env = "ES_INDEX", default_value_t = true, action = clap::ArgAction::Set)]
    pub es_index: bool,
}

#[derive(Args, Debug, Clone)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
}

/// `userseg uss`: validates and publishes to Kafka; stateless.
pub async fn run_uss(args: UssArgs) -> Result<()> {
    let service = args.service.validate()?;
    let kafka = args.kafka.validate(None)?;
    let metrics = observability::init_metrics(observability::Role::Uss)?;
    let shutdown = observability::shutdown_on_signals()?;
    if args.kafka.kafka_create_topics {
        if let Err(e) = userseg_kafka::ensure_topics(&kafka).await {
            // The broker may come later; publishing will say UNAVAILABLE until then.
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
    }
    let publisher = Arc::new(KafkaPublisher::new(&kafka)?);
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let ingest = Ingest::new(publisher.clone(), clock, service.window, service.limits);
    let mut state = ApiState::new(Some(ingest), None);
    state.metrics = Some(metrics);
    state.auth_token = service.api_token.as_deref().map(Arc::from);
    let server = server::serve(state, &service, "uss", shutdown.clone()).await?;
    shutdown.cancelled().await;
    server::stop(server).await;
    if let Err(e) = publisher.flush(Duration::from_secs(10)).await {
        tracing::warn!(error = %e, "producer flush on shutdown failed");
    }
    tracing::info!("userseg uss stopped");
    Ok(())
}

/// `userseg es`: consumes the pair log in batches into ClickHouse and serves estimates.
pub async fn run_es(args: EsArgs) -> Result<()> {
    let service = args.service.validate()?;
    let batch = args.batch.validate(Duration::from_secs(30))?;
    if args.kafka_group_id.trim().is_empty() {
        bail!("KAFKA_GROUP_ID: must not be empty");
    }
    let kafka = args.kafka.validate(Some(&args.kafka_group_id))?;
    let clickhouse = args.clickhouse.validate()?;
    let cache_ttl = duration("ESTIMATE_CACHE_TTL", &args.estimate_cache_ttl)?;
    let retention_interval = duration("RETENTION_INTERVAL", &args.retention_interval)?;
    if retention_interval < Duration::from_secs(1) {
        bail!("RETENTION_INTERVAL: must be at least 1s");
    }
    let metrics = observability::init_metrics(observability::Role::Es)?;
    let shutdown = observability::shutdown_on_signals()?;
    if args.kafka.kafka_create_topics {
        if let Err(e) = userseg_kafka::ensure_topics(&kafka).await {
            tracing::warn!(error = %e, "could not ensure topics at start");
        }
    }
    let store = ClickHouseStore::new(clickhouse, service.window)?;
    let source = KafkaSource::new(&kafka)?;
    let dlq = KafkaDeadLetters::new(&kafka)?.with_provenance(source.provenance());
    let processor = BatchProcessor::new(Arc::new(store.clone()), Arc::new(dlq), batch);
    let health = processor.health();
    let processor_stop = CancellationToken::new();
    let processor_task = {
        let stop = processor_stop.clone();
        tokio::spawn(async move { processor.run(source, stop).await })
    };

    let retention_stop = CancellationToken::new();
    let retention_task = {
        let store = store.clone();
        let stop = retention_stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(retention_interval);
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
    };

    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let index_stop = CancellationToken::new();
    let mut index_tasks = Vec::new();
    let counter: Arc<dyn SegmentCounter> = if args.es_index {
        let (replica, tasks) = start_index(&kafka, &store, &service, clock.clone(), &index_stop);
        index_tasks = tasks;
        Arc::new(replica)
    } else {
        Arc::new(store)
    };
    let estimation = Estimation::new(counter, clock, service.window, cache_ttl);
    // Approx: the index answers it exactly; ClickHouse (ES_INDEX=false, or while the index
    // loads) answers it from the sketches, far cheaper than exact for a 15 s gauge.
    observability::spawn_segment_gauges(estimation.clone(), Mode::Approx, index_stop.clone());
    let mut state = ApiState::new(None, Some(estimation));
    state.metrics = Some(metrics);
    state.auth_token = service.api_token.as_deref().map(Arc::from);
    state
        .ready_checks
        .push(("processor".into(), server::processor_check(health)));
    // Broker reachability, through a metadata request of an idle producer client.
    let broker_probe = Arc::new(KafkaPublisher::new(&kafka)?);
    let kafka_check: ReadyCheck = Arc::new(move || {
        let probe = broker_probe.clone();
        Box::pin(async move {
            userseg_usecase::PairPublisher::check_ready(probe.as_ref())
                .await
                .map_err(|e| e.to_string())
        })
    });
    state.ready_checks.push(("kafka".into(), kafka_check));

    let server = server::serve(state, &service, "es", shutdown.clone()).await?;
    shutdown.cancelled().await;
    // Stop consuming: the processor flushes its batch (bounded by the shutdown grace) and
    // commits; then the consumer leaves the group so partitions move at once.
    processor_stop.cancel();
    match processor_task.await {
        Ok(source) => source.close().await,
        Err(e) => tracing::warn!(error = %e, "processor task failed"),
    }
    retention_stop.cancel();
    let _ = retention_task.await;
    index_stop.cancel();
    for t in index_tasks {
        let _ = t.await;
    }
    server::stop(server).await;
    tracing::info!("userseg es stopped");
    Ok(())
}

/// How often the index drops expired memberships (their memory is reused).
const INDEX_EXPIRE_INTERVAL: Duration = Duration::from_secs(60);
/// How often the index's size gauges are refreshed.
const INDEX_STATS_INTERVAL: Duration = Duration::from_secs(5);

/// Starts the in-memory index: a task that loads and follows it, and one that expires it.
fn start_index(
    kafka: &userseg_kafka::KafkaConfig,
    store: &ClickHouseStore,
    service: &crate::config::ServiceConfig,
    clock: Arc<dyn Clock>,
    stop: &CancellationToken,
) -> (Replica, Vec<tokio::task::JoinHandle<()>>) {
    let mem = Arc::new(MemStore::new(service.window));
    let index = EmbeddedStore(mem.clone());
    let replica = Replica::new(
        Arc::new(index.clone()),
        Arc::new(index),
        Arc::new(store.clone()),
        ReplicaConfig::default(),
    );
    let kafka = kafka.clone();
    let open = move || {
        let kafka = kafka.clone();
        async move { KafkaFollower::open(&kafka).await }
    };
    let run = tokio::spawn(replica.clone().run(
        open,
        Arc::new(store.clone()),
        clock.clone(),
        stop.clone(),
    ));
    let expire = {
        let stop = stop.clone();
        tokio::spawn(async move {
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
                let expire = last_expire.elapsed() >= INDEX_EXPIRE_INTERVAL;
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
        })
    };
    (replica, vec![run, expire])
}

/// `userseg migrate`: applies the ClickHouse migrations.
pub async fn run_migrate(args: MigrateArgs) -> Result<()> {
    let config = args.clickhouse.validate()?;
    let applied = userseg_clickhouse::migrate(&config)
        .await
        .with_context(|| format!("migrating {} at {}", config.database, config.addr))?;
    if applied.is_empty() {
        println!(
            "database {} is up to date (schema version {})",
            config.database,
            userseg_clickhouse::latest_version()
        );
    } else {
        for m in applied {
            println!("applied {:04} {}", m.version, m.name);
        }
    }
    Ok(())
}
