//! librdkafka is built with OpenSSL: the TLS and SASL settings an operator passes through
//! KAFKA_EXTRA build working clients (publisher, consumer, follower), and a bad CA file is
//! refused at creation with librdkafka's reason. (tansu, the test broker, serves neither TLS
//! nor SASL mechanisms librdkafka offers, so no broker is involved.)

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
