//! The port traits. Each has an embedded adapter (standalone mode) and a distributed one
//! (Kafka, ClickHouse).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use userseg_domain::{Pair, UnixSeconds};

/// How an adapter failed. The split decides what the batch processor does next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// The dependency is down, slow or unreachable: retrying later may succeed, so retry without
    /// limit and never dead-letter because of it.
    #[error("unavailable: {0}")]
    Transient(String),
    /// The dependency is up but refuses this input for good: retrying the same input fails again.
    #[error("rejected: {0}")]
    Permanent(String),
    /// The adapter's bounded queue is full: the caller should back off.
    #[error("overloaded: {0}")]
    Overloaded(String),
}

/// The log that ingest publishes to (the embedded write-ahead log, or Kafka).
#[async_trait]
pub trait PairPublisher: Send + Sync + 'static {
    /// Resolves only once every pair is durable (fsynced, or acknowledged by all in-sync
    /// replicas). A pair for which this returned `Ok` must survive a crash of any component.
    async fn publish(&self, pairs: Vec<Pair>) -> Result<(), PortError>;

    /// Can the log take writes right now?
    async fn check_ready(&self) -> Result<(), PortError>;
}

/// What a source delivers: pairs, or a message that could not be decoded or validated (which the
/// processor dead-letters).
#[derive(Debug)]
pub enum Content {
    Pairs(Vec<Pair>),
    Invalid {
        payload: Vec<u8>,
        reason: InvalidReason,
    },
}

/// Why a message of the log holds no usable pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InvalidReason {
    /// Not a pair batch of a known version: not protobuf, no value, an unknown version.
    Undecodable(String),
    /// A pair batch with a pair that fails validation (`index` is 0-based).
    InvalidPair { index: usize, reason: String },
}

impl InvalidReason {
    /// The kind of the dead letter this message becomes.
    pub fn kind(&self) -> DeadLetterKind {
        match self {
            InvalidReason::Undecodable(_) => DeadLetterKind::Undecodable,
            InvalidReason::InvalidPair { .. } => DeadLetterKind::InvalidPair,
        }
    }
}

/// The reason given to the dead-letter queue: `undecodable: …` or `invalid pair N: …`.
impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidReason::Undecodable(why) => write!(f, "undecodable: {why}"),
            InvalidReason::InvalidPair { index, reason } => {
                write!(f, "invalid pair {index}: {reason}")
            }
        }
    }
}

#[derive(Debug)]
pub struct Message<P> {
    pub position: P,
    pub content: Content,
    /// When the log made the message durable (the Kafka message timestamp, the write-ahead
    /// log's commit), if known: the processor measures ingest → applied lag from it.
    pub logged_at: Option<std::time::SystemTime>,
}

/// The consuming side of the log. Positions are committed only after the store confirmed the
/// pairs before them; uncommitted messages are delivered again after a restart.
pub trait PairSource: Send + 'static {
    type Position: Send + 'static;

    /// The next message, or `None` once the source is closed for good. Must be cancel-safe: the
    /// processor races it against its flush timer.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<Message<Self::Position>>, PortError>> + Send;

    /// Marks every message whose position is given as processed.
    fn commit(
        &mut self,
        positions: Vec<Self::Position>,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Waits `pause` without taking new messages while staying a live member of any consumer
    /// group (used while the store is unavailable).
    fn idle(&mut self, pause: Duration) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(pause)
    }
}

/// Where dead letters go: a DLQ topic, or a file in standalone mode.
#[derive(Clone, Debug)]
pub enum DeadPayload {
    /// Bytes exactly as read from the log.
    Raw(Vec<u8>),
    /// Pairs that the store rejected for good.
    Pairs(Arc<[Pair]>),
}

/// What made a dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// A message of the log that is not a pair batch of a known version.
    Undecodable,
    /// A message of the log with a pair that fails validation.
    InvalidPair,
    /// Pairs the store refused for good, after the retries.
    RejectedByStore,
}

impl DeadLetterKind {
    /// The stable name in DLQ headers, files and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Undecodable => "undecodable",
            DeadLetterKind::InvalidPair => "invalid_pair",
            DeadLetterKind::RejectedByStore => "rejected_by_store",
        }
    }
}

#[derive(Clone, Debug)]
pub struct DeadLetter {
    pub payload: DeadPayload,
    /// Why: the decode error, the invalid pair, or the store's rejection.
    pub reason: String,
    pub kind: DeadLetterKind,
    /// How many times the store was tried (0 for undecodable or invalid messages).
    pub attempts: u32,
}

#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Durably stores the dead letter; only after `Ok` may its offsets be committed.
    async fn send(&self, letter: DeadLetter) -> Result<(), PortError>;
}

/// The writing side of a segment store. Writes must be idempotent: applying the same pairs
/// again, in any order, leaves every count unchanged.
#[async_trait]
pub trait SegmentWriter: Send + Sync + 'static {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError>;
}

/// How a count is computed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Distinct users, exactly.
    #[default]
    Exact,
    /// From pre-aggregated sketches, when the store has them; stores without them answer exactly.
    Approx,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentCount {
    pub segment: String,
    pub users: u64,
}

/// The reading side of a segment store. A user is counted in a segment at `at` when the latest
/// `ts` of its pairs for that segment is newer than `at - window`.
#[async_trait]
pub trait SegmentCounter: Send + Sync + 'static {
    /// Users in one segment; returns the count and whether it is exact.
    async fn count(
        &self,
        segment: &str,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(u64, bool), PortError>;

    /// Every segment with at least one user, sorted by name; and whether the counts are exact.
    async fn count_all(
        &self,
        at: UnixSeconds,
        mode: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError>;

    async fn check_ready(&self) -> Result<(), PortError>;
}

/// Reads the live memberships a store of record holds, to bootstrap an in-memory index.
#[async_trait]
pub trait LiveScan: Send + Sync + 'static {
    /// Sends every stored pair with `ts > at - window` to `sink`, in chunks of at most
    /// `chunk_pairs` pairs, streaming (memory stays bounded by the channel's capacity whatever
    /// the store holds). Duplicates and older pairs of a membership may be sent too: the
    /// consumer keeps the latest ts. Returns how many pairs were sent. If the receiver is dropped
    /// the scan stops with `Transient`.
    async fn scan_live(
        &self,
        at: UnixSeconds,
        chunk_pairs: usize,
        sink: tokio::sync::mpsc::Sender<Vec<Pair>>,
    ) -> Result<u64, PortError>;
}

/// What a [`LogFollower`] hands out.
#[derive(Debug)]
pub enum Followed {
    /// Valid pairs read from the log (undecodable messages and invalid pairs are skipped and
    /// counted by the adapter: the batch processor dead-letters them).
    Pairs(Vec<Pair>),
    /// The follower has read everything the log held when it started following, on every
    /// partition. Sent once.
    CaughtUp,
}

/// Follows the whole pair log, without a consumer group and without committing, from the
/// positions the batch processor had committed when the follower was opened: everything before
/// them is already in the store of record.
pub trait LogFollower: Send + 'static {
    /// The next pairs, or [`Followed::CaughtUp`]. Cancel-safe.
    fn next(&mut self) -> impl Future<Output = Result<Followed, PortError>> + Send;

    /// Messages between the follower's position and the end of the log, when known.
    fn lag(&self) -> Option<u64>;
}
