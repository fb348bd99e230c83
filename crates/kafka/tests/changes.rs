//! The Kafka change log against a real broker (USERSEG_TEST_KAFKA, see scripts/tansu.sh): the
//! shared change-log suite on a one-partition topic (the suite checks one total order), and
//! per-user order with per-partition cursors on a topic of several partitions.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::time::Instant;
use userseg_domain::{ChangeEvent, ChangeReason};
use userseg_kafka::{KafkaChangeLog, KafkaConfig};
use userseg_usecase::{ChangeLog, PortError};

async fn open(cfg: &KafkaConfig, topic: &str) -> KafkaChangeLog {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match KafkaChangeLog::open(cfg, topic, true).await {
            Ok(log) => return log,
            Err(PortError::Transient(e)) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "change topic not ready; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("opening the change log: {e}"),
        }
    }
}

async fn make_log() -> Arc<dyn ChangeLog> {
    let cfg = config("changes", 1);
    let topic = format!("{}-changes", cfg.topic);
    let log = open(&cfg, &topic).await;
    // A fresh topic may not serve fetches at once: wait until its end is readable.
    let end = log.end().await.expect("end");
    log.read(&end, 1, Duration::ZERO).await.expect("read");
    Arc::new(log)
}

userseg_usecase::change_log_test_suite!(make_log, seeds = 3);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_events_stay_in_order_in_its_partition() {
    let cfg = config("changes-parts", 3);
    let topic = format!("{}-changes", cfg.topic);
    let log = open(&cfg, &topic).await;
    assert_eq!(log.partitions(), 3);
    let start = log.end().await.expect("end");
    let users: Vec<String> = (0..12).map(|u| format!("u{u}")).collect();
    let mut sent: Vec<ChangeEvent> = Vec::new();
    for round in 0..5i64 {
        let batch: Vec<ChangeEvent> = users
            .iter()
            .map(|u| {
                let reason = if round % 2 == 0 {
                    ChangeReason::Pair
                } else {
                    ChangeReason::Expired
                };
                ChangeEvent::new(u.clone(), "s", reason, 1_800_000_000 + round, round)
            })
            .collect();
        log.append(batch.clone()).await.expect("append");
        sent.extend(batch);
    }
    let per_user = |events: &[ChangeEvent]| {
        let mut m: HashMap<String, Vec<ChangeEvent>> = HashMap::new();
        for e in events {
            m.entry(e.user_id.clone()).or_default().push(e.clone());
        }
        m
    };
    // Read everything in small chunks, keeping every cursor.
    let mut got = Vec::new();
    let mut cursors = Vec::new();
    let mut cursor = start.clone();
    loop {
        let b = log.read(&cursor, 7, Duration::ZERO).await.expect("read");
        if b.records.is_empty() {
            break;
        }
        for r in b.records {
            cursors.push((r.cursor.clone(), got.len() + 1));
            got.push(r.event);
        }
        cursor = b.next;
    }
    assert_eq!(got.len(), sent.len(), "every event once");
    assert_eq!(
        per_user(&got),
        per_user(&sent),
        "each user's events in order"
    );
    // Resuming after any event's cursor reads exactly the events not yet read before it.
    for (c, seen) in cursors.iter().step_by(9) {
        let b = log.read(c, 1000, Duration::ZERO).await.expect("read");
        let rest: Vec<ChangeEvent> = b.records.into_iter().map(|r| r.event).collect();
        let mut want = got[*seen..].to_vec();
        let mut have = rest.clone();
        want.sort_by_key(|e| e.id);
        have.sort_by_key(|e| e.id);
        assert_eq!(have, want, "after event {seen}");
    }
    assert_eq!(log.end().await.expect("end"), cursor);
    // A cursor past the end is not one this log handed out.
    match log.read("k0.0.999999", 10, Duration::ZERO).await {
        Err(userseg_usecase::ChangeReadError::Malformed(_)) => {}
        other => panic!("expected malformed, got {other:?}"),
    }
}
