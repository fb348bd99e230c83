//! userseg's use cases and the ports (traits) through which they reach the outside world.
//!
//! Adapters (the embedded WAL and store, Kafka, ClickHouse) implement the ports; the delivery
//! layer calls the use cases. Nothing here knows which adapters are wired in.

pub mod analytics;
#[cfg(feature = "testsuite")]
pub mod analytics_suite;
pub mod clock;
pub mod estimate;
pub mod history;
pub mod ingest;
pub mod ports;
pub mod processor;
pub mod replica;
#[cfg(feature = "testsuite")]
pub mod store_suite;

pub use analytics::{
    Analytics, AnalyticsError, CountList, Export, ExprCount, OverlapAnswer, UserSegments,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use estimate::{Estimate, EstimateList, Estimation, EstimationError};
pub use history::{History, HistoryAnswer, HistoryConfig, HistoryError, HistorySampler};
pub use ingest::{Ingest, IngestError};
pub use ports::{
    Content, DeadLetter, DeadLetterSink, DeadPayload, Followed, HistoryPoint, HistoryStore,
    LiveScan, LogFollower, Member, Membership, Message, Mode, Overlap, PairPublisher, PairSource,
    PortError, SegmentAnalytics, SegmentCount, SegmentCounter, SegmentWriter,
};
pub use processor::{BatchConfig, BatchProcessor, ProcessorHealth};
pub use replica::{Replica, ReplicaConfig, ReplicaStatus};
#[cfg(test)]
mod processor_tests;
