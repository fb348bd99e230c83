//! librdkafka is built with OpenSSL: the TLS and SASL settings an operator passes through
//! KAFKA_EXTRA build working clients (publisher, consumer, follower), and a bad CA file is
//! refused at creation with librdkafka's reason.
//!
//! tansu, the test broker, speaks neither TLS nor SASL itself, so TLS is tested end to end
//! through a TLS-terminating proxy in front of a tansu of the test's own that advertises the
//! proxy's address (what a TLS-terminating load balancer in front of brokers does): pairs
//! published and consumed over TLS arrive; a client trusting another CA, and a client without
//! a certificate when the proxy demands mutual TLS, are refused. SASL is not exercised against
//! a broker (no SASL-capable broker can be installed here); its settings are checked to build
//! clients.

mod common;

use std::time::Duration;

use userseg_testkit::tansu::Tansu;
use userseg_testkit::tls::{server_config, Ca, Identity, TlsProxy};
use userseg_usecase::PairPublisher;

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use userseg_kafka::{KafkaConfig, KafkaPublisher, KafkaSource};

fn with_extra(extra: &[(&str, &str)]) -> KafkaConfig {
    let mut c = KafkaConfig::new("localhost:9093");
    c.extra = extra
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    c
}

#[tokio::test]
async fn tls_and_sasl_settings_build_clients() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca.self_signed(&KeyPair::generate().unwrap()).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let ca_path = ca_file.to_str().unwrap();
    let cases: [&[(&str, &str)]; 4] = [
        &[("security.protocol", "ssl"), ("ssl.ca.location", ca_path)],
        &[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "producer"),
            ("sasl.password", "secret"),
            ("ssl.ca.location", ca_path),
        ],
        &[
            ("security.protocol", "sasl_ssl"),
            ("sasl.mechanism", "PLAIN"),
            ("sasl.username", "producer"),
            ("sasl.password", "secret"),
            ("ssl.ca.location", ca_path),
        ],
        &[
            ("security.protocol", "sasl_plaintext"),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", "producer"),
            ("sasl.password", "secret"),
        ],
    ];
    for extra in cases {
        let config = with_extra(extra);
        KafkaPublisher::new(&config).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
        KafkaSource::new(&config).unwrap_or_else(|e| panic!("{extra:?}: {e}"));
    }

    let bad = dir.path().join("not-a-ca.pem");
    std::fs::write(&bad, "not a certificate").unwrap();
    let config = with_extra(&[
        ("security.protocol", "ssl"),
        ("ssl.ca.location", bad.to_str().unwrap()),
    ]);
    let err = match KafkaPublisher::new(&config) {
        Ok(_) => panic!("a bad CA file was accepted"),
        Err(e) => format!("{e}"),
    };
    assert!(err.to_lowercase().contains("ssl"), "{err}");
}

/// A tansu of this test's own behind a TLS proxy: the broker advertises `localhost:PROXY`, so
/// every connection a client makes (bootstrap and the advertised broker) goes through TLS.
async fn tls_broker(server: &Identity, client_ca: Option<&Ca>) -> (Tansu, TlsProxy) {
    // The proxy's port must be known before the broker starts (it advertises it).
    let port = common::free_port();
    let tansu = Tansu::start(Some(&format!("tcp://localhost:{port}")));
    let upstream = tansu.addr.parse().expect("tansu address");
    let proxy = TlsProxy::start(port, upstream, server_config(server, client_ca)).await;
    (tansu, proxy)
}

fn tls_config(
    name: &str,
    proxy: &TlsProxy,
    dir: &std::path::Path,
    ca: &Ca,
    client: Option<&Identity>,
) -> userseg_kafka::KafkaConfig {
    let mut c = common::config(name, 2);
    c.brokers = format!("localhost:{}", proxy.port);
    let ca_file = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    c.extra = vec![
        ("security.protocol".into(), "ssl".into()),
        ("ssl.ca.location".into(), ca_file.display().to_string()),
    ];
    if let Some(id) = client {
        let cert = dir.join(format!("{name}-client.crt"));
        let key = dir.join(format!("{name}-client.key"));
        std::fs::write(&cert, &id.cert_pem).unwrap();
        std::fs::write(&key, &id.key_pem).unwrap();
        c.extra.push((
            "ssl.certificate.location".into(),
            cert.display().to_string(),
        ));
        c.extra
            .push(("ssl.key.location".into(), key.display().to_string()));
    }
    c.ack_timeout = Duration::from_secs(5);
    c.metadata_timeout = Duration::from_secs(2);
    c
}

/// Publishes three pairs through `config` and reads them back with a consumer-group source.
async fn round_trip(config: &userseg_kafka::KafkaConfig) {
    let publisher = common::setup(config).await;
    let pairs = vec![
        common::pair("u1", "tls", 1_764_000_000),
        common::pair("u2", "tls", 1_764_000_001),
        common::pair("u3", "tls", 1_764_000_002),
    ];
    publisher
        .publish(pairs.clone())
        .await
        .expect("publish over TLS");
    let mut source = common::joined_source(config).await;
    let got = common::read_until(&mut source, Duration::from_secs(60), |m| {
        common::pair_count(m) >= pairs.len()
    })
    .await;
    let mut got = common::pairs_of(&got);
    got.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    assert_eq!(got, pairs);
}

/// The client must fail to reach the broker: readiness fails and so does a publish.
async fn refused(config: &userseg_kafka::KafkaConfig, proxy: &TlsProxy, what: &str) {
    let before = proxy.failed_handshakes();
    let publisher = userseg_kafka::KafkaPublisher::new(config).expect("publisher");
    assert!(
        publisher.check_ready().await.is_err(),
        "{what}: readiness passed"
    );
    let err = publisher
        .publish(vec![common::pair("u9", "tls", 1_764_000_000)])
        .await
        .expect_err(&format!("{what}: a publish was acknowledged"));
    assert!(
        matches!(err, userseg_usecase::PortError::Transient(_)),
        "{what}: {err}"
    );
    assert!(
        proxy.failed_handshakes() > before,
        "{what}: the proxy saw no failed handshake"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn ssl_through_a_tls_terminating_proxy() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kafka-test-ca");
    let (_tansu, proxy) = tls_broker(&ca.server(), None).await;

    round_trip(&tls_config("tls-ok", &proxy, dir.path(), &ca, None)).await;

    let other = Ca::new("another-ca");
    refused(
        &tls_config("tls-wrong-ca", &proxy, dir.path(), &other, None),
        &proxy,
        "a client trusting another CA",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_through_a_tls_terminating_proxy() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("kafka-test-ca");
    let clients = Ca::new("kafka-client-ca");
    let (_tansu, proxy) = tls_broker(&ca.server(), Some(&clients)).await;

    let id = clients.client("userseg");
    round_trip(&tls_config("mtls-ok", &proxy, dir.path(), &ca, Some(&id))).await;

    refused(
        &tls_config("mtls-no-cert", &proxy, dir.path(), &ca, None),
        &proxy,
        "a client without a certificate",
    )
    .await;
    let foreign = Ca::new("foreign").client("userseg");
    refused(
        &tls_config("mtls-foreign", &proxy, dir.path(), &ca, Some(&foreign)),
        &proxy,
        "a client with a certificate of another CA",
    )
    .await;
}
