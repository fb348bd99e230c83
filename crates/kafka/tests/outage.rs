//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh):
//! a broker that is missing, silent or cut off: bounded, transient failures and recovery.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use userseg_domain::Pair;
use userseg_kafka::{KafkaDeadLetters, KafkaPublisher, KafkaSource};
use userseg_usecase::{
    DeadLetter, DeadLetterKind, DeadLetterSink, DeadPayload, PairPublisher, PairSource, PortError,
};

const LONG: Duration = Duration::from_secs(60);

fn unreachable_config(brokers: String) -> userseg_kafka::KafkaConfig {
    init_tracing();
    let mut cfg = userseg_kafka::KafkaConfig::new(brokers);
    cfg.ack_timeout = Duration::from_secs(2);
    cfg
}

async fn assert_transient_within<F: std::future::Future<Output = Result<(), PortError>>>(
    what: &str,
    bound: Duration,
    f: F,
) {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(bound + Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"));
    let took = started.elapsed();
    assert!(
        matches!(result, Err(PortError::Transient(_))),
        "{what}: {result:?}"
    );
    assert!(took <= bound, "{what} took {took:?}, more than {bound:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_without_a_broker_is_transient_within_the_bound() {
    let cfg = unreachable_config(format!("127.0.0.1:{}", free_port()));
    let bound = cfg.ack_timeout + Duration::from_millis(1500);
    let publisher = KafkaPublisher::new(&cfg).expect("publisher");
    assert_transient_within("publish", bound, publisher.publish(vec![pair("u", "s", 1)])).await;
    let deletion = userseg_domain::UserDeletion::new(vec!["u".into()]).expect("valid");
    assert_transient_within(
        "publish_deletion",
        bound,
        publisher.publish_deletion(deletion),
    )
    .await;
    assert_transient_within("check_ready", bound, publisher.check_ready()).await;
    let sink = KafkaDeadLetters::new(&cfg).expect("sink");
    let letter = DeadLetter {
        payload: DeadPayload::Raw(b"x".to_vec()),
        reason: "r".into(),
        kind: DeadLetterKind::Undecodable,
        attempts: 0,
    };
    assert_transient_within("dead letter", bound, sink.send(letter)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_silent_broker_is_transient_within_the_bound() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            open.push(s);
        }
    });
    let cfg = unreachable_config(addr.to_string());
    let bound = cfg.ack_timeout + Duration::from_millis(1500);
    let publisher = KafkaPublisher::new(&cfg).expect("publisher");
    assert_transient_within("publish", bound, publisher.publish(vec![pair("u", "s", 1)])).await;
    let deletion = userseg_domain::UserDeletion::new(vec!["u".into()]).expect("valid");
    assert_transient_within(
        "publish_deletion",
        bound,
        publisher.publish_deletion(deletion),
    )
    .await;
    let sink = KafkaDeadLetters::new(&cfg).expect("sink");
    let letter = DeadLetter {
        payload: DeadPayload::Pairs(vec![pair("u", "s", 1)].into()),
        reason: "r".into(),
        kind: DeadLetterKind::RejectedByStore,
        attempts: 3,
    };
    assert_transient_within("dead letter", bound, sink.send(letter)).await;
    hold.abort();
}

/// A tansu of this test alone, reachable only through a TCP proxy that the test can cut: an
/// outage without restarting the broker, so the network cut alone is tested here; the broker
/// restart with its data is crates/userseg/tests/broker_restart.rs.
struct ProxiedBroker {
    tansu: std::process::Child,
    proxy_port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl ProxiedBroker {
    async fn start() -> Self {
        let tansu_bin = std::env::var("TANSU_BIN").unwrap_or_else(|_| {
            format!(
                "{}/.cache/userseg/tansu-0.6.0/bin/tansu",
                std::env::var("HOME").unwrap_or_default()
            )
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let proxy_port = listener.local_addr().expect("addr").port();
        let inner_port = free_port();
        let tansu = std::process::Command::new(&tansu_bin)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{inner_port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{proxy_port}"))
            .arg("--storage-engine")
            .arg("memory://tansu/")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {tansu_bin} (TANSU_BIN; scripts/install-deps.sh builds it): {e}")
            });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", inner_port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tansu never listened"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let connections: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, connections) = (up.clone(), connections.clone());
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the connection is closed at once
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", inner_port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    connections
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(task.abort_handle());
                }
            }
        });
        ProxiedBroker {
            tansu,
            proxy_port,
            up,
            connections,
            accept,
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.proxy_port)
    }

    /// Closes every connection and refuses new ones.
    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self
            .connections
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for ProxiedBroker {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
        let _ = self.tansu.kill();
        let _ = self.tansu.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_publishes_transiently_and_then_everything_recovers() {
    init_tracing();
    let broker = ProxiedBroker::start().await;
    let mut cfg = userseg_kafka::KafkaConfig::new(broker.address());
    let base = unique("outage");
    cfg.topic = base.clone();
    cfg.dlq_topic = format!("{base}-dlq");
    cfg.group_id = format!("{base}-group");
    cfg.partitions = 2;
    cfg.ack_timeout = Duration::from_secs(3);
    let publisher = setup(&cfg).await;
    let before: Vec<Pair> = (0..20)
        .map(|i| pair(&format!("b{i}"), "before", i))
        .collect();
    publisher.publish(before.clone()).await.expect("publish");

    let mut source = KafkaSource::new(&cfg).expect("source");
    let got = read_until(&mut source, LONG, |m| pair_count(m) >= before.len()).await;
    source
        .commit(got.iter().map(|m| m.position).collect())
        .await
        .expect("commit");

    broker.cut();
    // The partition count is cached, so this goes all the way to the delivery timeout.
    let bound = cfg.ack_timeout + Duration::from_millis(1500);
    assert_transient_within(
        "publish during the outage",
        bound,
        publisher.publish(vec![pair("maybe", "during", 1)]),
    )
    .await;
    assert_transient_within(
        "check_ready during the outage",
        bound,
        publisher.check_ready(),
    )
    .await;
    // The consumer, idling as the processor does while something is down, survives too.
    source.idle(Duration::from_secs(1)).await;

    broker.restore();
    let after: Vec<Pair> = (0..20)
        .map(|i| pair(&format!("a{i}"), "after", i))
        .collect();
    let deadline = tokio::time::Instant::now() + LONG;
    loop {
        match publisher.publish(after.clone()).await {
            Ok(()) => break,
            Err(PortError::Transient(e)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "broker not reachable yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("publishing after the outage: {e}"),
        }
    }
    publisher.check_ready().await.expect("ready again");
    // The same consumer carries on and gets the new pairs; the failed publish may or may not
    // have landed (at least once), and nothing committed comes again.
    let rest = read_until(&mut source, LONG, |m| {
        pairs_of(m).iter().filter(|p| p.segment == "after").count() >= after.len()
    })
    .await;
    let mut have: Vec<Pair> = pairs_of(&rest)
        .into_iter()
        .filter(|p| p.segment != "during")
        .collect();
    have.sort_by_key(|p| p.user_id.clone());
    let mut want = after;
    want.sort_by_key(|p| p.user_id.clone());
    assert_eq!(have, want);
    source.close().await;
}
