//! Unit tests of the batch processor against in-memory fakes of its ports.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use userseg_domain::Pair;

use crate::*;

struct FakeSource {
    rx: mpsc::Receiver<Message<u64>>,
    committed: Arc<Mutex<Vec<u64>>>,
    /// Reports when nothing is waiting (like the embedded log); else never (like Kafka).
    drains: bool,
}

impl PairSource for FakeSource {
    type Position = u64;
    async fn next(&mut self) -> Result<Option<Message<u64>>, PortError> {
        Ok(self.rx.recv().await)
    }
    async fn commit(&mut self, positions: Vec<u64>) -> Result<(), PortError> {
        self.committed.lock().unwrap().extend(positions);
        Ok(())
    }
    fn is_drained(&self) -> bool {
        self.drains && self.rx.is_empty()
    }
    /// Every message is in partition 0, at offset = position.
    fn partition_offset(position: &u64) -> Option<(i32, i64)> {
        Some((0, *position as i64))
    }
}

/// A writer that replays a script of results, then succeeds.
#[derive(Default)]
struct ScriptedWriter {
    script: Mutex<VecDeque<PortError>>,
    written: Mutex<Vec<Vec<Pair>>>,
    attempts: Mutex<u32>,
    /// Writes and deletions in the order applied: `w<pairs>` / `d<users>`.
    ops: Mutex<Vec<String>>,
}

#[async_trait]
impl SegmentWriter for ScriptedWriter {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        *self.attempts.lock().unwrap() += 1;
        if let Some(e) = self.script.lock().unwrap().pop_front() {
            return Err(e);
        }
        self.ops.lock().unwrap().push(format!("w{}", pairs.len()));
        self.written.lock().unwrap().push(pairs.to_vec());
        Ok(())
    }

    async fn delete_users(&self, deletion: userseg_domain::UserDeletion) -> Result<(), PortError> {
        *self.attempts.lock().unwrap() += 1;
        if let Some(e) = self.script.lock().unwrap().pop_front() {
            return Err(e);
        }
        self.ops
            .lock()
            .unwrap()
            .push(format!("d{}", deletion.user_ids().join(",")));
        Ok(())
    }
}

#[derive(Default)]
struct Dlq(Mutex<Vec<DeadLetter>>);

#[async_trait]
impl DeadLetterSink for Dlq {
    async fn send(&self, letter: DeadLetter) -> Result<(), PortError> {
        self.0.lock().unwrap().push(letter);
        Ok(())
    }
}

fn pair(i: usize) -> Pair {
    Pair {
        user_id: format!("u{i}"),
        segment: "s".into(),
        ts: 1_000,
    }
}

fn msg(pos: u64, pairs: Vec<Pair>) -> Message<u64> {
    Message {
        position: pos,
        content: Content::Pairs(pairs),
        logged_at: None,
    }
}

struct Rig {
    tx: mpsc::Sender<Message<u64>>,
    committed: Arc<Mutex<Vec<u64>>>,
    writer: Arc<ScriptedWriter>,
    dlq: Arc<Dlq>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    health: ProcessorHealth,
}

fn rig(config: BatchConfig, script: Vec<PortError>) -> Rig {
    rig_with(config, script, false)
}

fn rig_with(config: BatchConfig, script: Vec<PortError>, drains: bool) -> Rig {
    rig_gated(config, script, drains, None)
}

fn rig_gated(
    config: BatchConfig,
    script: Vec<PortError>,
    drains: bool,
    gate: Option<Arc<dyn WriteGate>>,
) -> Rig {
    let (tx, rx) = mpsc::channel(64);
    let committed = Arc::new(Mutex::new(Vec::new()));
    let writer = Arc::new(ScriptedWriter {
        script: Mutex::new(script.into()),
        ..Default::default()
    });
    let dlq = Arc::new(Dlq::default());
    let mut processor = BatchProcessor::new(writer.clone(), dlq.clone(), config);
    if let Some(gate) = gate {
        processor = processor.with_gate(gate);
    }
    let health = processor.health();
    let cancel = CancellationToken::new();
    let source = FakeSource {
        rx,
        committed: committed.clone(),
        drains,
    };
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        processor.run(source, c).await;
    });
    Rig {
        tx,
        committed,
        writer,
        dlq,
        cancel,
        task,
        health,
    }
}

fn config(batch_size: usize) -> BatchConfig {
    BatchConfig {
        batch_size,
        flush_interval: Duration::from_secs(30),
        retry_attempts: 3,
        backoff_initial: Duration::from_millis(10),
        backoff_max: Duration::from_millis(80),
        shutdown_grace: Duration::from_secs(1),
    }
}

async fn until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..100_000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(start_paused = true)]
async fn flushes_when_batch_is_full_and_commits_after_write() {
    let r = rig(config(3), vec![]);
    r.tx.send(msg(1, vec![pair(1), pair(2)])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(r.writer.written.lock().unwrap().is_empty(), "not full yet");
    assert!(r.committed.lock().unwrap().is_empty());
    r.tx.send(msg(2, vec![pair(3)])).await.unwrap();
    until("the batch is committed", || {
        r.committed.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(r.writer.written.lock().unwrap().len(), 1);
    assert_eq!(r.writer.written.lock().unwrap()[0].len(), 3);
    assert_eq!(*r.committed.lock().unwrap(), vec![1, 2]);
}

#[tokio::test(start_paused = true)]
async fn flushes_after_the_interval() {
    let r = rig(config(1000), vec![]);
    r.tx.send(msg(7, vec![pair(1)])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(29)).await;
    assert!(r.writer.written.lock().unwrap().is_empty());
    tokio::time::sleep(Duration::from_secs(2)).await;
    until("the interval flush", || {
        r.committed.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(r.writer.written.lock().unwrap()[0], vec![pair(1)]);
}

#[tokio::test(start_paused = true)]
async fn transient_failures_retry_forever_and_never_dead_letter() {
    let script = (0..20)
        .map(|_| PortError::Transient("connection refused".into()))
        .collect();
    let r = rig(config(1), script);
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    until("the store failure is visible", || !r.health.store_ok()).await;
    assert!(
        r.committed.lock().unwrap().is_empty(),
        "nothing committed while failing"
    );
    until("the batch is finally written", || {
        r.committed.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(*r.writer.attempts.lock().unwrap(), 21);
    assert!(r.dlq.0.lock().unwrap().is_empty());
    assert!(r.health.store_ok());
    assert!(r
        .health
        .last_error()
        .unwrap()
        .contains("connection refused"));
}

#[tokio::test(start_paused = true)]
async fn permanent_rejection_is_retried_then_dead_lettered_then_committed() {
    let script = (0..10)
        .map(|_| PortError::Permanent("type mismatch".into()))
        .collect();
    let r = rig(config(2), script);
    r.tx.send(msg(1, vec![pair(1), pair(2)])).await.unwrap();
    until("the batch is committed", || {
        r.committed.lock().unwrap().len() == 1
    })
    .await;
    // One attempt plus three retries.
    assert_eq!(*r.writer.attempts.lock().unwrap(), 4);
    let dlq = r.dlq.0.lock().unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].kind, DeadLetterKind::RejectedByStore);
    assert_eq!(dlq[0].attempts, 4);
    assert!(dlq[0].reason.contains("type mismatch"));
    match &dlq[0].payload {
        DeadPayload::Pairs(p) => assert_eq!(p.len(), 2),
        other => panic!("unexpected payload {other:?}"),
    }
    assert!(r.writer.written.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn invalid_messages_are_dead_lettered_and_committed_with_the_next_flush() {
    let r = rig(config(2), vec![]);
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    r.tx.send(Message {
        position: 2,
        content: Content::Invalid {
            payload: b"garbage".to_vec(),
            reason: InvalidReason::Undecodable("bad protobuf".into()),
        },
        logged_at: None,
    })
    .await
    .unwrap();
    until("the dead letter", || r.dlq.0.lock().unwrap().len() == 1).await;
    assert!(
        r.committed.lock().unwrap().is_empty(),
        "position 2 must wait for position 1's batch"
    );
    r.tx.send(msg(3, vec![pair(3)])).await.unwrap();
    until("the flush", || r.committed.lock().unwrap().len() == 3).await;
    assert_eq!(*r.committed.lock().unwrap(), vec![1, 2, 3]);
    let dlq = r.dlq.0.lock().unwrap();
    assert_eq!(dlq[0].kind, DeadLetterKind::Undecodable);
    assert_eq!(dlq[0].reason, "undecodable: bad protobuf");
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_the_pending_batch() {
    let r = rig(config(1000), vec![]);
    r.tx.send(msg(1, vec![pair(1), pair(2)])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.cancel.cancel();
    r.task.await.unwrap();
    assert_eq!(*r.committed.lock().unwrap(), vec![1]);
    assert_eq!(r.writer.written.lock().unwrap()[0].len(), 2);
}

#[tokio::test(start_paused = true)]
async fn shutdown_with_the_store_down_abandons_without_committing() {
    let script = (0..1000)
        .map(|_| PortError::Transient("down".into()))
        .collect();
    let r = rig(config(1000), script);
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.cancel.cancel();
    r.task.await.unwrap();
    assert!(r.committed.lock().unwrap().is_empty());
    assert!(r.writer.written.lock().unwrap().is_empty());
}

/// A writer that waits for a permit per write, to hold a write in flight.
struct GatedWriter {
    gate: tokio::sync::Semaphore,
    written: Mutex<Vec<Vec<Pair>>>,
}

#[async_trait]
impl SegmentWriter for GatedWriter {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        self.gate
            .acquire()
            .await
            .map_err(|_| PortError::Transient("closed".into()))?
            .forget();
        self.written.lock().unwrap().push(pairs.to_vec());
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn the_next_batch_fills_while_one_is_written_and_commits_stay_in_order() {
    let (tx, rx) = mpsc::channel(64);
    let committed = Arc::new(Mutex::new(Vec::new()));
    let writer = Arc::new(GatedWriter {
        gate: tokio::sync::Semaphore::new(0),
        written: Mutex::new(Vec::new()),
    });
    let processor = BatchProcessor::new(writer.clone(), Arc::new(Dlq::default()), config(1));
    let source = FakeSource {
        rx,
        committed: committed.clone(),
        drains: false,
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        processor.run(source, c).await;
    });
    tx.send(msg(1, vec![pair(1)])).await.unwrap();
    tx.send(msg(2, vec![pair(2)])).await.unwrap();
    tx.send(msg(3, vec![pair(3)])).await.unwrap();
    // Batch 1 is held in its write; batch 2 was still consumed meanwhile.
    until("message 2 is consumed during write 1", || {
        tx.capacity() >= 63
    })
    .await;
    assert!(committed.lock().unwrap().is_empty());
    writer.gate.add_permits(1);
    until("batch 1 is committed", || {
        committed.lock().unwrap().len() == 1
    })
    .await;
    writer.gate.add_permits(2);
    until("all are committed", || committed.lock().unwrap().len() == 3).await;
    assert_eq!(*committed.lock().unwrap(), vec![1, 2, 3]);
    let written: Vec<Vec<Pair>> = writer.written.lock().unwrap().clone();
    assert_eq!(written, vec![vec![pair(1)], vec![pair(2)], vec![pair(3)]]);
    cancel.cancel();
}

/// With backlog batches, what arrives while a write is in flight is written as one batch when
/// that write ends (past `batch_size`, up to the backlog maximum), in order; without a
/// backlog, batches stay small.
#[tokio::test(start_paused = true)]
async fn a_backlog_is_applied_in_larger_batches_up_to_the_maximum() {
    let (tx, rx) = mpsc::channel(64);
    let committed = Arc::new(Mutex::new(Vec::new()));
    let writer = Arc::new(GatedWriter {
        gate: tokio::sync::Semaphore::new(0),
        written: Mutex::new(Vec::new()),
    });
    let processor = BatchProcessor::new(writer.clone(), Arc::new(Dlq::default()), config(1))
        .with_backlog_batches(3);
    let source = FakeSource {
        rx,
        committed: committed.clone(),
        drains: false,
    };
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let task = tokio::spawn(async move {
        processor.run(source, c).await;
    });
    // Batch 1 alone (nothing in flight), held in its write.
    tx.send(msg(1, vec![pair(1)])).await.unwrap();
    until("write 1 started", || tx.capacity() == 64).await;
    // Meanwhile 2 and 3 wait (2 < 3 pairs), 4 fills the batch to the maximum, 5 waits behind.
    for i in 2..=5 {
        tx.send(msg(i, vec![pair(i as usize)])).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(writer.written.lock().unwrap().is_empty());
    writer.gate.add_permits(1);
    until("batch 1 is committed", || {
        committed.lock().unwrap().len() == 1
    })
    .await;
    // Batch 2 is what arrived during write 1, up to the maximum; 5 goes once it is written.
    writer.gate.add_permits(2);
    until("all are committed", || committed.lock().unwrap().len() == 5).await;
    assert_eq!(*committed.lock().unwrap(), vec![1, 2, 3, 4, 5]);
    let written: Vec<Vec<Pair>> = writer.written.lock().unwrap().clone();
    assert_eq!(
        written,
        vec![
            vec![pair(1)],
            vec![pair(2), pair(3), pair(4)],
            vec![pair(5)]
        ]
    );
    // No backlog: one message, one batch, at once.
    writer.gate.add_permits(10);
    tx.send(msg(6, vec![pair(6)])).await.unwrap();
    until("batch 6 is committed", || {
        committed.lock().unwrap().len() == 6
    })
    .await;
    assert_eq!(writer.written.lock().unwrap().last(), Some(&vec![pair(6)]));
    cancel.cancel();
    task.await.unwrap();
}

fn deletion(pos: u64, users: &[&str]) -> Message<u64> {
    Message {
        position: pos,
        content: Content::Delete(
            userseg_domain::UserDeletion::new(users.iter().map(|u| u.to_string()).collect())
                .unwrap(),
        ),
        logged_at: None,
    }
}

#[tokio::test(start_paused = true)]
async fn a_drained_source_is_written_at_once_without_waiting_for_the_timer() {
    let r = rig_with(config(1000), vec![], true);
    let start = tokio::time::Instant::now();
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    // The clock is paused: only the drain can trigger this write, not the 30 s timer.
    until("the lone pair is committed", || {
        r.committed.lock().unwrap().len() == 1
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "written without waiting for the flush interval"
    );
    assert_eq!(r.writer.written.lock().unwrap()[0], vec![pair(1)]);
}

#[tokio::test(start_paused = true)]
async fn without_drain_detection_the_timer_still_batches() {
    let r = rig_with(config(1000), vec![], false);
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(r.writer.written.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_deletion_is_applied_after_the_pairs_before_it_and_before_those_after() {
    let r = rig(config(1000), vec![]);
    r.tx.send(msg(1, vec![pair(1), pair(2)])).await.unwrap();
    r.tx.send(msg(2, vec![pair(3)])).await.unwrap();
    r.tx.send(deletion(3, &["u1", "u3"])).await.unwrap();
    r.tx.send(msg(4, vec![pair(1)])).await.unwrap();
    until("everything before the deletion is committed", || {
        r.committed.lock().unwrap().len() >= 3
    })
    .await;
    assert_eq!(*r.committed.lock().unwrap(), vec![1, 2, 3]);
    // The pair after the deletion waits for its own batch (timer), then follows.
    tokio::time::sleep(Duration::from_secs(31)).await;
    until("the later pair is committed", || {
        r.committed.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(*r.writer.ops.lock().unwrap(), vec!["w3", "du1,u3", "w1"]);
}

#[tokio::test(start_paused = true)]
async fn a_failing_deletion_is_retried_and_stays_uncommitted_until_applied() {
    let script = vec![
        PortError::Transient("down".into()),
        PortError::Transient("down".into()),
    ];
    let r = rig(config(1000), script);
    r.tx.send(deletion(1, &["u9"])).await.unwrap();
    until("the store failure is visible", || !r.health.store_ok()).await;
    assert!(r.committed.lock().unwrap().is_empty());
    until("the deletion is committed", || {
        r.committed.lock().unwrap().len() == 1
    })
    .await;
    assert_eq!(*r.writer.ops.lock().unwrap(), vec!["du9"]);
    assert!(r.dlq.0.lock().unwrap().is_empty());
}

/// Admits messages of partition 0 below the watched offset.
struct Below(tokio::sync::watch::Receiver<i64>);

#[async_trait]
impl WriteGate for Below {
    async fn admit(&self, through: &std::collections::BTreeMap<i32, i64>) {
        let want = through.get(&0).copied().unwrap_or(-1);
        let mut rx = self.0.clone();
        let _ = rx.wait_for(|below| *below > want).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_gated_write_waits_until_the_gate_admits_its_last_message() {
    let (open_to, below) = tokio::sync::watch::channel(0_i64);
    let r = rig_gated(config(2), vec![], true, Some(Arc::new(Below(below))));
    r.tx.send(msg(1, vec![pair(1)])).await.unwrap();
    r.tx.send(msg(2, vec![pair(2)])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        r.writer.written.lock().unwrap().is_empty(),
        "held by the gate"
    );
    assert!(r.committed.lock().unwrap().is_empty());
    // Admitting only the first message is not enough: the batch ends at offset 2.
    open_to.send(2).unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(r.writer.written.lock().unwrap().is_empty());
    open_to.send(3).unwrap();
    until("the batch is written and committed", || {
        r.committed.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(r.writer.written.lock().unwrap().len(), 1);
    // A deletion waits too.
    r.tx.send(deletion(3, &["u1"])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!r
        .writer
        .ops
        .lock()
        .unwrap()
        .iter()
        .any(|o| o.starts_with('d')));
    open_to.send(4).unwrap();
    until("the deletion is applied", || {
        r.writer.ops.lock().unwrap().iter().any(|o| o == "du1")
    })
    .await;
    r.cancel.cancel();
    r.task.await.unwrap();
}
