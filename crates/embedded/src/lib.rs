//! Embedded adapters: everything standalone mode needs in one process, no external service,
//! and the exact in-memory store the estimation service (ES) keeps as its index.
//!
//! - [`wal`]: the write-ahead log (the embedded counterpart of Kafka): durable, group-committed.
//! - [`store`]: the exact in-memory segment store (the embedded counterpart of ClickHouse).
//! - [`standalone`]: opening a data directory (lock, snapshot, log replay).
//! - [`checkpoint`]: snapshots of the store so the log can be truncated and restarts are fast.
//! - [`dlq`]: dead letters appended to a file.
//! - [`history`]: segment count samples in `DATA_DIR/history`.

pub mod changes;
pub mod checkpoint;
pub mod dlq;
pub mod history;
pub mod standalone;
pub mod store;
pub mod wal;

pub use changes::{ChangeLogConfig, EventSink, FileChangeLog};
pub use checkpoint::{CheckpointConfig, Checkpointer};
pub use dlq::FileDeadLetters;
pub use history::FileHistory;
pub use standalone::{
    open_standalone, open_standalone_with, ChangesSetup, DataDirLock, OpenError, Recovery,
    Standalone,
};
pub use store::{EmbeddedStore, MemStore, MemoryStats};
pub use wal::{LogFault, WalConfig, WalHandle, WalLog, WalSource};
