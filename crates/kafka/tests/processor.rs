//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh):
//! the batch processor driving the Kafka adapters end to end.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use userseg_domain::Pair;
use userseg_kafka::{KafkaDeadLetters, KafkaSource};
use userseg_usecase::{PairPublisher, PortError};

const LONG: Duration = Duration::from_secs(60);

/// A store that fails transiently a few times, then records what it is given.
#[derive(Default)]
struct FlakyStore {
    failures_left: std::sync::Mutex<u32>,
    written: std::sync::Mutex<Vec<Pair>>,
}

#[async_trait::async_trait]
impl userseg_usecase::SegmentWriter for FlakyStore {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        {
            let mut left = self.failures_left.lock().unwrap_or_else(|e| e.into_inner());
            if *left > 0 {
                *left -= 1;
                return Err(PortError::Transient("store down".into()));
            }
        }
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pairs.iter().cloned());
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_processor_drives_the_adapters_end_to_end() {
    use userseg_usecase::{BatchConfig, BatchProcessor};

    let cfg = config("processor", 3);
    let publisher = setup(&cfg).await;
    let pairs: Vec<Pair> = (0..300)
        .map(|i| pair(&format!("p{}", i % 40), &format!("s{}", i % 7), i))
        .collect();
    for chunk in pairs.chunks(30) {
        publisher.publish(chunk.to_vec()).await.expect("publish");
    }
    raw_producer(&cfg)
        .send(
            FutureRecord::<str, _>::to(&cfg.topic)
                .partition(2)
                .payload(&b"garbage"[..]),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .expect("send");

    let store = Arc::new(FlakyStore {
        failures_left: std::sync::Mutex::new(3),
        ..FlakyStore::default()
    });
    let source = KafkaSource::new(&cfg).expect("source");
    let sink = Arc::new(
        KafkaDeadLetters::new(&cfg)
            .expect("sink")
            .with_provenance(source.provenance()),
    );
    let processor = BatchProcessor::new(
        store.clone(),
        sink,
        BatchConfig {
            batch_size: 64,
            flush_interval: Duration::from_millis(200),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_millis(200),
            ..BatchConfig::default()
        },
    );
    let health = processor.health();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { processor.run(source, cancel).await }
    });

    let deadline = tokio::time::Instant::now() + LONG;
    while store
        .written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len()
        < pairs.len()
        || health.dead_letters() < 1
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "processor wrote {} of {} pairs, {} dead letters",
            store
                .written
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len(),
            pairs.len(),
            health.dead_letters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait for the commit after the last write, then stop.
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        let checker: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("group.id", &cfg.group_id)
            .create()
            .expect("checker");
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition(&cfg.topic, p);
        }
        let topic = cfg.topic.clone();
        let (committed, ends) = tokio::task::spawn_blocking(move || {
            let committed = checker
                .committed_offsets(tpl, Duration::from_secs(10))
                .expect("committed");
            let ends: Vec<i64> = (0..3)
                .map(|p| {
                    checker
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .expect("watermarks")
                        .1
                })
                .collect();
            (committed, ends)
        })
        .await
        .expect("join");
        let done = committed
            .elements()
            .iter()
            .all(|e| e.offset() == Offset::Offset(ends[e.partition() as usize]));
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "offsets never fully committed: {:?} vs ends {ends:?}",
            committed.to_topic_map()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cancel.cancel();
    run.await.expect("processor");

    // Every pair reached the store (at least once, possibly more after the transient failures).
    let mut written = store
        .written
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    written.sort_by_key(|p| p.ts);
    written.dedup();
    assert_eq!(written, pairs);
    // The garbage went to the DLQ with its origin.
    let letters = read_raw(&cfg, &cfg.dlq_topic, 3, 1).await;
    assert_eq!(letters[0].payload(), Some(&b"garbage"[..]));
    let origin: BTreeMap<String, String> = letters[0]
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| {
                    (
                        h.key.to_string(),
                        String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(origin["userseg-kind"], "undecodable");
    assert_eq!(origin["userseg-source-partition"], "2");
    // A new member of the group finds nothing left to do.
    let mut after = KafkaSource::new(&cfg).expect("source");
    wait_assigned(&mut after, LONG, |p| p.len() == 3).await;
    assert_quiet(&mut after, Duration::from_millis(1000)).await;
    after.close().await;
}
