//! userseg's use cases and the ports (traits) through which they reach the outside world.
//!
//! Adapters (the embedded WAL and store, Kafka, ClickHouse) implement the ports; the delivery
//! layer calls the use cases. Nothing here knows which adapters are wired in.

pub mod analytics;
#[cfg(feature = "testsuite")]
pub mod analytics_suite;
pub mod backoff;
#[cfg(feature = "testsuite")]
pub mod change_log_suite;
pub mod changes;
pub mod clock;
pub mod emitter;
pub mod estimate;
#[cfg(any(test, feature = "testsuite"))]
pub mod exit_marks_suite;
pub mod history;
pub mod index;
pub mod ingest;
pub mod ports;
pub mod processor;
pub mod shards;
#[cfg(feature = "testsuite")]
pub mod store_suite;
#[cfg(feature = "testsuite")]
pub mod suite_model;

pub use analytics::{
    Analytics, AnalyticsError, CountList, Export, ExprCount, OverlapAnswer, UserSegments,
};
pub use backoff::Backoff;
pub use changes::{ChangeStream, Changes, ChangesError};
pub use clock::{Clock, ManualClock, SystemClock};
pub use emitter::{ChangeEmitter, EmitGate, EmitterConfig, EmitterInlet};
pub use estimate::{Estimate, EstimateList, Estimation, EstimationError};
pub use history::{History, HistoryAnswer, HistoryConfig, HistoryError, HistorySampler};
pub use index::{IndexConfig, IndexObserver, IndexStatus, SegmentIndex};
pub use ingest::{Ingest, IngestError};
pub use ports::{
    ChangeBatch, ChangeLog, ChangeReadError, ChangeRecord, Content, DeadLetter, DeadLetterKind,
    DeadLetterSink, DeadPayload, ExitMarks, Followed, HistoryPoint, HistoryStore, InvalidReason,
    LiveScan, LogFollower, Member, Membership, Message, Mode, Overlap, PairPublisher, PairSource,
    PortError, SegmentAnalytics, SegmentCount, SegmentCounter, SegmentWriter, WriteGate,
};
pub use processor::{BatchConfig, BatchProcessor, ProcessorHealth};
pub use shards::{
    combine, LocalShards, OpenPartition, PartitionOf, ShardAnswer, ShardAnswers, ShardMemory,
    ShardPeers, ShardQuery, ShardServer, ShardedIndex,
};
#[cfg(test)]
mod processor_tests;
