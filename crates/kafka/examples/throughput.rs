//! Measures publish and consume throughput against a broker.
//!
//! ```text
//! scripts/tansu.sh start /tmp/userseg-tansu && . /tmp/userseg-tansu/tansu.env
//! USERSEG_TEST_KAFKA=$USERSEG_TEST_KAFKA PAIRS=1000000 REQUEST=1000 CONCURRENCY=16 \
//!   cargo run --release -p userseg-kafka --example throughput
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use userseg_domain::Pair;
use userseg_kafka::{ensure_topics, KafkaConfig, KafkaPublisher, KafkaSource};
use userseg_usecase::{Content, PairPublisher, PairSource};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let brokers = std::env::var("USERSEG_TEST_KAFKA")
        .map_err(|_| "set USERSEG_TEST_KAFKA to the broker address (scripts/tansu.sh start DIR)")?;
    let total = env_usize("PAIRS", 1_000_000);
    let per_request = env_usize("REQUEST", 1_000).max(1);
    let concurrency = env_usize("CONCURRENCY", 16).max(1);
    let users = env_usize("USERS", 200_000).max(1);

    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis();
    let mut config = KafkaConfig::new(brokers);
    config.topic = format!("bench-{stamp}");
    config.dlq_topic = format!("bench-{stamp}-dlq");
    config.group_id = format!("bench-{stamp}");
    ensure_topics(&config).await?;
    let publisher = Arc::new(KafkaPublisher::new(&config)?);
    publisher.check_ready().await?;

    let requests = total.div_ceil(per_request);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let publisher = publisher.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let r = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if r >= requests {
                    break;
                }
                let pairs: Vec<Pair> = (0..per_request)
                    .map(|i| {
                        let n = r * per_request + i;
                        Pair {
                            user_id: format!("user-{}", (n * 7919) % users),
                            segment: format!("segment-{}", n % 50),
                            ts: 1_764_000_000 + (n % 86_400) as i64,
                        }
                    })
                    .collect();
                let t = Instant::now();
                publisher.publish(pairs).await?;
                latencies.push(t.elapsed());
            }
            Ok::<_, userseg_usecase::PortError>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await??);
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    println!(
        "publish: {} pairs in {} requests of {per_request} ({concurrency} concurrent) in {elapsed:.2?}: \
         {:.0} pairs/s, {:.0} requests/s, latency p50 {:.1?} p99 {:.1?} max {:.1?}",
        requests * per_request,
        requests,
        (requests * per_request) as f64 / elapsed.as_secs_f64(),
        requests as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );

    let mut source = KafkaSource::new(&config)?;
    let started = Instant::now();
    let (mut pairs, mut messages) = (0usize, 0usize);
    while pairs < requests * per_request {
        match tokio::time::timeout(Duration::from_secs(30), source.next()).await {
            Ok(Ok(Some(m))) => {
                messages += 1;
                if let Content::Pairs(p) = m.content {
                    pairs += p.len();
                }
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                eprintln!("consume error: {e}");
                source.idle(Duration::from_millis(100)).await;
            }
            Err(_) => return Err("no message for 30 s".into()),
        }
    }
    let elapsed = started.elapsed();
    println!(
        "consume: {pairs} pairs in {messages} messages in {elapsed:.2?}: {:.0} pairs/s",
        pairs as f64 / elapsed.as_secs_f64()
    );
    source.close().await;
    Ok(())
}
