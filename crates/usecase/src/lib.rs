//! userseg's use cases and the ports (traits) through which they reach the outside world.
//!
//! Adapters (the embedded WAL and store, Kafka, ClickHouse) implement the ports; the delivery
//! layer calls the use cases. Nothing here knows which adapters are wired in.

pub mod backoff;
pub mod clock;
pub mod estimate;
pub mod index;
pub mod ingest;
pub mod ports;
pub mod processor;
#[cfg(feature = "testsuite")]
pub mod store_suite;

pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock};
pub use estimate::{Estimate, EstimateList, Estimation, EstimationError};
pub use index::{IndexConfig, IndexStatus, SegmentIndex};
pub use ingest::{Ingest, IngestError};
pub use ports::{
    Content, DeadLetter, DeadLetterKind, DeadLetterSink, DeadPayload, Followed, InvalidReason,
    LiveScan, LogFollower, Message, Mode, PairPublisher, PairSource, PortError, SegmentCount,
    SegmentCounter, SegmentWriter,
};
pub use processor::{BatchConfig, BatchProcessor, ProcessorHealth};
#[cfg(test)]
mod processor_tests;
