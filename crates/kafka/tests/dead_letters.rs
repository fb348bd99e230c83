//! The Kafka adapters against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh):
//! dead letters and their headers.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rdkafka::message::{Headers, Message as _};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use userseg_domain::Pair;
use userseg_kafka::{encode_batch, KafkaDeadLetters, KafkaSource};
use userseg_usecase::{Content, DeadLetter, DeadLetterKind, DeadLetterSink, DeadPayload};

const LONG: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_carry_their_headers() {
    let cfg = config("dlq", 2);
    let _publisher = setup(&cfg).await;
    let raw = raw_producer(&cfg);
    let garbage = b"definitely not protobuf \xff\xff".to_vec();
    raw.send(
        FutureRecord::<str, _>::to(&cfg.topic)
            .partition(1)
            .payload(garbage.as_slice()),
        Timeout::After(Duration::from_secs(10)),
    )
    .await
    .expect("send");

    let mut source = KafkaSource::new(&cfg).expect("source");
    let sink = KafkaDeadLetters::new(&cfg)
        .expect("sink")
        .with_provenance(source.provenance());
    let m = next_within(&mut source, LONG).await;
    let Content::Invalid { payload, reason } = m.content else {
        panic!("expected an invalid message");
    };
    sink.send(DeadLetter {
        payload: DeadPayload::Raw(payload),
        reason: reason.to_string(),
        kind: reason.kind(),
        attempts: 0,
    })
    .await
    .expect("dead letter");
    let rejected: Arc<[Pair]> = vec![pair("u1", "s1", 5), pair("u2", "s2", 6)].into();
    sink.send(DeadLetter {
        payload: DeadPayload::Pairs(rejected.clone()),
        reason: "store said no".into(),
        kind: DeadLetterKind::RejectedByStore,
        attempts: 4,
    })
    .await
    .expect("dead letter");

    let letters = read_raw(&cfg, &cfg.dlq_topic, 2, 2).await;
    let headers = |m: &rdkafka::message::OwnedMessage| -> BTreeMap<String, String> {
        m.headers()
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
            .unwrap_or_default()
    };
    let (raw_letter, pairs_letter) = if headers(&letters[0])["userseg-kind"] == "undecodable" {
        (&letters[0], &letters[1])
    } else {
        (&letters[1], &letters[0])
    };

    assert_eq!(raw_letter.payload(), Some(garbage.as_slice()));
    let h = headers(raw_letter);
    assert_eq!(h["userseg-kind"], "undecodable");
    assert_eq!(h["userseg-reason"], reason.to_string());
    assert_eq!(h["userseg-attempts"], "0");
    assert_eq!(h["userseg-source-topic"], cfg.topic);
    assert_eq!(h["userseg-source-partition"], "1");
    assert_eq!(h["userseg-source-offset"], m.position.offset.to_string());

    let h = headers(pairs_letter);
    assert_eq!(h["userseg-kind"], "rejected_by_store");
    assert_eq!(h["userseg-reason"], "store said no");
    assert_eq!(h["userseg-attempts"], "4");
    assert_eq!(h["userseg-pairs"], "2");
    assert!(!h.contains_key("userseg-source-topic"));
    assert_eq!(
        pairs_letter.payload(),
        Some(encode_batch(&rejected).as_slice())
    );
    source.close().await;
}
