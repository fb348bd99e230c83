//! The port traits. Each has an embedded adapter (standalone mode) and a distributed one
//! (Kafka, ClickHouse).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use userseg_domain::{Expr, Pair, UnixSeconds, UserDeletion, Within};

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

    /// Appends a deletion of users to the same log, ordered with the pairs: after every pair
    /// of those users published before it, before every pair published after it (Kafka: one
    /// record per partition keyed like the pairs of its users). Resolves, like
    /// [`publish`](Self::publish), only once the deletion is durable. Logs that cannot carry
    /// deletions keep this default, which refuses.
    async fn publish_deletion(&self, deletion: UserDeletion) -> Result<(), PortError> {
        let _ = deletion;
        Err(PortError::Permanent(
            "this log cannot carry user deletions".into(),
        ))
    }

    /// Can the log take writes right now?
    async fn check_ready(&self) -> Result<(), PortError>;
}

/// What a source delivers: pairs, or a message that could not be decoded or validated (which the
/// processor dead-letters).
#[derive(Debug)]
pub enum Content {
    Pairs(Vec<Pair>),
    /// A deletion of users: the processor applies every pair delivered before it first, then
    /// the deletion ([`SegmentWriter::delete_users`]), then goes on.
    Delete(UserDeletion),
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

    /// True when [`next`](Self::next) would have to wait: nothing delivered is pending. The
    /// processor then writes what it holds at once instead of waiting for its flush timer
    /// (group commit: an idle system applies a pair within milliseconds, a busy one still
    /// batches). Sources that cannot tell keep the default `false` (Kafka says `true` only while
    /// a revocation waits for the processor to write and commit what it holds).
    fn is_drained(&self) -> bool {
        false
    }

    /// The log offset a position stands for (the embedded log's byte offset after the
    /// message), when the log has one: the batch processor hands it to
    /// [`SegmentWriter::write_through`] so a store with a change feed knows which records its
    /// events cover. Sources without such offsets keep the default `None`.
    fn log_offset(position: &Self::Position) -> Option<u64> {
        let _ = position;
        None
    }

    /// The (partition, offset) a position stands for in a partitioned log (Kafka), for a
    /// [`WriteGate`]. Sources without partitions keep the default `None`.
    fn partition_offset(position: &Self::Position) -> Option<(i32, i64)> {
        let _ = position;
        None
    }
}

/// Holds the batch processor's writes to the store of record back until something else has
/// dealt with the messages first: the distributed change feed must have published the events
/// of every message before the store of record holds it, because an index reloaded from the
/// store of record after a crash could no longer detect them ([`crate::emitter`]).
#[async_trait]
pub trait WriteGate: Send + Sync + 'static {
    /// Resolves once the messages up to and including these offsets, per partition, may be
    /// written. Cancel-safe.
    async fn admit(&self, through: &std::collections::BTreeMap<i32, i64>);
}

/// Durable per-partition watermarks of the distributed change feed's exits: for each pair-log
/// partition, the time `t` such that the `expired` exits of every membership that had expired
/// at `t` are published. A new emitter of the partition starts its exits there, so exits due
/// while no estimation service ran are published late rather than never. (ClickHouse's
/// `change_marks` table; tests use an in-memory one.)
#[async_trait]
pub trait ExitMarks: Send + Sync + 'static {
    /// The latest mark of each partition that has one.
    async fn load(&self) -> Result<std::collections::BTreeMap<i32, UnixSeconds>, PortError>;

    /// Raises the marks of these partitions (a lower mark than the stored one changes nothing).
    async fn save(
        &self,
        marks: &std::collections::BTreeMap<i32, UnixSeconds>,
    ) -> Result<(), PortError>;
}

/// Where dead letters go: a DLQ topic, or a file in standalone mode.
#[derive(Clone, Debug)]
pub enum DeadPayload {
    /// Bytes exactly as read from the log.
    Raw(Vec<u8>),
    /// Pairs that the store rejected for good.
    Pairs(Arc<[Pair]>),
    /// A deletion the store rejected for good.
    Deletion(UserDeletion),
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

    /// Removes every membership of these users, so that they count nowhere and are listed
    /// nowhere, and their ids leave the store's files (snapshots written after it returns,
    /// table parts after the mutation). Idempotent: deleting again, or users the store never
    /// held, changes nothing. Pairs written after it returned count again as usual. Stores
    /// without deletions keep this default, which refuses for good.
    async fn delete_users(&self, deletion: UserDeletion) -> Result<(), PortError> {
        let _ = deletion;
        Err(PortError::Permanent(
            "this store cannot delete users".into(),
        ))
    }

    /// [`write`](Self::write) of pairs read from the log up to offset `through`
    /// ([`PairSource::log_offset`] of the batch's last message), for stores that record what
    /// their change feed covers. The default ignores the offset.
    async fn write_through(
        &self,
        pairs: Arc<[Pair]>,
        through: Option<u64>,
    ) -> Result<(), PortError> {
        let _ = through;
        self.write(pairs).await
    }

    /// [`delete_users`](Self::delete_users) of the deletion logged at offset `through`.
    async fn delete_users_through(
        &self,
        deletion: UserDeletion,
        through: Option<u64>,
    ) -> Result<(), PortError> {
        let _ = through;
        self.delete_users(deletion).await
    }
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
    /// A deletion of users read from the log: the index applies it after every [`Pairs`]
    /// handed out before it and before those handed out after it (log order, per user).
    ///
    /// [`Pairs`]: Followed::Pairs
    Delete(UserDeletion),
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

    /// Per partition, the offset of the next message not yet handed out: every message before
    /// it has been returned by [`next`](Self::next). Empty when the log has no partitions.
    fn positions(&self) -> Vec<(i32, i64)> {
        Vec::new()
    }
}

/// One live membership of a user, as [`SegmentAnalytics::user_segments`] reports it. Times may
/// be rounded down to the store's time bucket (at most 60 s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Membership {
    pub segment: String,
    /// The latest ts seen for the membership.
    pub last_seen: UnixSeconds,
    /// When the membership ends unless a newer pair arrives: `last_seen + window`.
    pub expires_at: UnixSeconds,
}

/// One member of a segment, as [`SegmentAnalytics::export_members`] streams it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub user_id: String,
    /// The latest ts of the membership (may be rounded down to the store's time bucket).
    pub last_seen: UnixSeconds,
}

/// Pairwise intersections of segments, in the order asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Overlap {
    /// `users[i]` = |s_i|.
    pub users: Vec<u64>,
    /// `both[i][j]` = |s_i ∩ s_j| (symmetric; the diagonal equals `users`).
    pub both: Vec<Vec<u64>>,
}

/// Exact reads beyond per-segment counts: per-user lookup, counts with a lookback, set
/// expressions, overlap, export.
///
/// Everywhere: a membership is live at `at` when its latest ts is in `(at - d, at]`, where `d`
/// is `within` or, when `None`, the window. Stores that bucket time (the embedded store, by at
/// most 60 s) may be off by less than one bucket at the edges, as for counts. Segment names
/// and user ids arrive validated, expressions parsed and within the limits of
/// [`userseg_domain::Expr`]; adapters must still never paste them into a query unescaped.
#[async_trait]
pub trait SegmentAnalytics: Send + Sync + 'static {
    /// The user's live memberships, sorted by segment; empty for an unknown user.
    async fn user_segments(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, PortError>;

    /// Users in one segment (exact).
    async fn count_within(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError>;

    /// Every segment with at least one user, sorted by name (exact).
    async fn count_all_within(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError>;

    /// Users the expression selects (exact). `NOT x` is relative to the universe: users with
    /// at least one live membership (under the same `within`) in any segment.
    async fn count_expr(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError>;

    /// The pairwise intersection matrix of `segments` (2 to 64 distinct names).
    async fn overlap(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, PortError>;

    /// Streams every live member of `segment` to `sink`, in chunks of at most `chunk` members,
    /// in any order, each member once, with memory bounded by the chunk size and the channel
    /// whatever the segment's size (never built whole in memory). Returns how many were sent.
    /// If the receiver is dropped the export stops with `Transient`.
    async fn export_members(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: tokio::sync::mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError>;
}

/// One point of a segment's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryPoint {
    /// When the sample was taken.
    pub ts: UnixSeconds,
    pub users: u64,
}

/// Where the count samples of every segment are kept (a file log in DATA_DIR, a ClickHouse
/// table).
///
/// A *sample* is taken at a tick `at` (a multiple of the sampling interval, so that several
/// samplers sample the same ticks) and holds the count of every segment at `at`; a segment
/// absent from it had no users then.
#[async_trait]
pub trait HistoryStore: Send + Sync + 'static {
    /// Stores the sample of tick `at` durably. Recording a tick again (a restart, or a second
    /// sampler) keeps one sample for it: reads never see duplicates.
    async fn record(&self, at: UnixSeconds, counts: &[SegmentCount]) -> Result<(), PortError>;

    /// For each step `k` — ticks in `[from + k*step, from + (k+1)*step)`, clipped to `to`
    /// inclusive — the latest sample, as `(its tick, the segment's users in it, 0 if absent)`;
    /// steps without a sample are left out. Points in time order. `from <= to`, `step >= 1`.
    async fn read(
        &self,
        segment: &str,
        from: UnixSeconds,
        to: UnixSeconds,
        step: u64,
    ) -> Result<Vec<HistoryPoint>, PortError>;

    /// Forgets samples of ticks before `before` (retention).
    async fn prune(&self, before: UnixSeconds) -> Result<(), PortError>;

    /// The latest recorded tick, if any (a restarted sampler resumes after it).
    async fn last_tick(&self) -> Result<Option<UnixSeconds>, PortError>;
}

/// An event of the change feed with the cursor just after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRecord {
    /// Opaque to clients: reading after it resumes right after this event.
    pub cursor: String,
    pub event: userseg_domain::ChangeEvent,
}

/// What one [`ChangeLog::read`] returns: events in log order, and where the next read starts
/// (past the last event, and past records that are not events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeBatch {
    pub records: Vec<ChangeRecord>,
    pub next: String,
}

/// Why a change log cannot be read after a cursor.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChangeReadError {
    /// Not a cursor this log handed out (HTTP 400).
    #[error("malformed cursor: {0}")]
    Malformed(String),
    /// A cursor of events the log no longer keeps (older than the retention; HTTP 410).
    #[error("cursor expired: {0}")]
    Expired(String),
    #[error(transparent)]
    Port(#[from] PortError),
}

/// The durable change feed: events of users entering and leaving segments, in the order they
/// happened per user, kept for a retention (a file log in DATA_DIR, a Kafka topic).
///
/// Cursors are opaque strings; a cursor names the position just after an event (or the end of
/// the log), and reading after it never skips or repeats an event of the log.
#[async_trait]
pub trait ChangeLog: Send + Sync + 'static {
    /// Appends events in order; durable per the adapter's contract once `Ok`.
    async fn append(&self, events: Vec<userseg_domain::ChangeEvent>) -> Result<(), PortError>;

    /// The cursor of the current end: reading after it returns only events appended later.
    async fn end(&self) -> Result<String, PortError>;

    /// The cursor of the oldest event kept (reading after it returns every event kept).
    async fn start(&self) -> Result<String, PortError>;

    /// Up to `max` events after `after`; when there is none yet, waits up to `wait` for one
    /// (then returns an empty batch whose `next` is `after`). Memory is bounded by `max`
    /// whatever the log holds.
    async fn read(
        &self,
        after: &str,
        max: usize,
        wait: Duration,
    ) -> Result<ChangeBatch, ChangeReadError>;
}
