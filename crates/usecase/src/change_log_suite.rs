//! The behaviour every [`ChangeLog`] adapter must have, written once. Each adapter runs it with
//! [`change_log_test_suite!`](crate::change_log_test_suite) against a fresh, empty log per test.

use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use userseg_domain::{ChangeEvent, ChangeReason};

use crate::{ChangeLog, ChangeReadError};

const NO_WAIT: Duration = Duration::ZERO;

/// The `i`-th event of a test: every reason, odd but valid names.
pub fn event(i: u64) -> ChangeEvent {
    let reason = match i % 3 {
        0 => ChangeReason::Pair,
        1 => ChangeReason::Expired,
        _ => ChangeReason::Deleted,
    };
    ChangeEvent::new(
        format!("user {i} é"),
        format!("seg:{}", i % 5),
        reason,
        1_800_000_000 + i as i64 * 60,
        i as i64,
    )
}

async fn read_all(log: &dyn ChangeLog, after: &str, max: usize) -> (Vec<ChangeEvent>, String) {
    let mut out = Vec::new();
    let mut cursor = after.to_string();
    loop {
        let b = log.read(&cursor, max, NO_WAIT).await.expect("read");
        assert!(b.records.len() <= max, "a read returns at most max events");
        if b.records.is_empty() {
            assert_eq!(b.next, cursor, "an empty read stays where it was");
            return (out, cursor);
        }
        out.extend(b.records.into_iter().map(|r| r.event));
        cursor = b.next;
    }
}

pub async fn an_empty_log_reads_nothing_and_waits(log: Arc<dyn ChangeLog>) {
    let end = log.end().await.expect("end");
    assert_eq!(log.start().await.expect("start"), end);
    let started = std::time::Instant::now();
    let b = log
        .read(&end, 10, Duration::from_millis(200))
        .await
        .expect("read");
    assert!(b.records.is_empty());
    assert_eq!(b.next, end);
    assert!(
        started.elapsed() >= Duration::from_millis(150),
        "the read waited"
    );
}

pub async fn events_read_back_in_order_from_every_cursor(log: Arc<dyn ChangeLog>) {
    let start = log.end().await.expect("end");
    let events: Vec<ChangeEvent> = (0..40).map(event).collect();
    for chunk in events.chunks(7) {
        log.append(chunk.to_vec()).await.expect("append");
    }
    let (got, end) = read_all(log.as_ref(), &start, 5).await;
    assert_eq!(got, events, "every event, in order, with its id");
    assert_eq!(log.end().await.expect("end"), end);
    // Every record's cursor resumes right after it.
    let b = log.read(&start, 100, NO_WAIT).await.expect("read");
    assert_eq!(b.records.len(), 40);
    for (i, r) in b.records.iter().enumerate() {
        let (rest, _) = read_all(log.as_ref(), &r.cursor, 3).await;
        assert_eq!(
            rest,
            events[i + 1..].to_vec(),
            "after the cursor of event {i}"
        );
    }
    assert_eq!(log.start().await.expect("start"), start);
}

pub async fn a_read_waits_for_the_next_append(log: Arc<dyn ChangeLog>) {
    let end = log.end().await.expect("end");
    let writer = log.clone();
    let append = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        writer.append(vec![event(1)]).await.expect("append");
    });
    let b = log
        .read(&end, 10, Duration::from_secs(20))
        .await
        .expect("read");
    assert_eq!(b.records.len(), 1, "the read returned the appended event");
    assert_eq!(b.records[0].event, event(1));
    append.await.expect("append task");
}

pub async fn foreign_cursors_are_malformed(log: Arc<dyn ChangeLog>) {
    log.append((0..3).map(event).collect())
        .await
        .expect("append");
    for bad in ["", "abc", "-1", "999999999999", "zzzzzzzzzzzzzzzzzzzzzzzzz"] {
        match log.read(bad, 10, NO_WAIT).await {
            Err(ChangeReadError::Malformed(_)) => {}
            other => panic!("cursor {bad:?}: expected malformed, got {other:?}"),
        }
    }
}

/// Random appends and reads from random cursors in random chunk sizes against the list of
/// everything appended.
pub async fn random_reads_match_the_appended_list(log: Arc<dyn ChangeLog>, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let start = log.end().await.expect("end");
    let mut all: Vec<ChangeEvent> = Vec::new();
    let mut cursors: Vec<(String, usize)> = vec![(start.clone(), 0)];
    let mut next = 0u64;
    for _ in 0..30 {
        let n = rng.random_range(0..20);
        let batch: Vec<ChangeEvent> = (0..n).map(|k| event(next + k)).collect();
        next += n;
        log.append(batch.clone()).await.expect("append");
        all.extend(batch);
        let (from, seen) = cursors[rng.random_range(0..cursors.len())].clone();
        let max = rng.random_range(1..30);
        let b = log.read(&from, max, NO_WAIT).await.expect("read");
        let want = &all[seen..(seen + max).min(all.len())];
        let got: Vec<ChangeEvent> = b.records.iter().map(|r| r.event.clone()).collect();
        assert_eq!(got, want, "seed {seed}: read after event {seen}, max {max}");
        for (i, r) in b.records.iter().enumerate() {
            cursors.push((r.cursor.clone(), seen + i + 1));
        }
    }
    let (got, _) = read_all(log.as_ref(), &start, 13).await;
    assert_eq!(got, all, "seed {seed}");
}

/// Generates one `#[tokio::test]` per suite case. `$make` is an async fn returning a fresh,
/// empty `Arc<dyn ChangeLog>`.
#[macro_export]
macro_rules! change_log_test_suite {
    ($make:ident, seeds = $seeds:expr) => {
        mod change_log_suite {
            use $crate::change_log_suite as suite;

            $crate::__suite_tests!(suite, super::$make().await;
                an_empty_log_reads_nothing_and_waits,
                events_read_back_in_order_from_every_cursor,
                a_read_waits_for_the_next_append,
                foreign_cursors_are_malformed,
            );
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn random_reads_match_the_appended_list() {
                for seed in 0..$seeds {
                    suite::random_reads_match_the_appended_list(super::$make().await, seed).await;
                }
            }
        }
    };
}
