//! userseg's segment store on ClickHouse (18.16 and current versions), over the HTTP interface.
//!
//! Wiring:
//! 1. a [`ClickHouseConfig`] (the binary builds it from its validated settings);
//! 2. [`migrate`] once (`userseg migrate`): creates the database and applies the embedded
//!    migrations, recording them in `schema_migrations`;
//! 3. [`ClickHouseStore::new`]`(config, window)`, shared as `Arc<dyn SegmentWriter>` and
//!    `Arc<dyn SegmentCounter>`;
//! 4. call [`ClickHouseStore::drop_expired_partitions`] periodically (e.g. hourly).
//!
//! [`ClickHouseStore`] is also a [`LiveScan`](userseg_usecase::LiveScan): it streams the live
//! pairs to bootstrap an in-memory index, in bounded memory whatever the table holds; a
//! [`SegmentAnalytics`](userseg_usecase::SegmentAnalytics) (per-user lookup, counts with a
//! lookback, set expressions, overlap, streamed export, all exact to the second); a
//! [`HistoryStore`](userseg_usecase::HistoryStore) on the `history` table; and its
//! [`delete_users`](userseg_usecase::SegmentWriter::delete_users) returns once the users count
//! nowhere, exactly or approximately, and their rows are gone.
//!
//! The schema and its trade-offs are described in `docs/CLICKHOUSE.md`.

mod analytics;
mod client;
mod config;
mod delete;
mod error;
mod history;
mod marks;
mod migrate;
mod rows;
mod scan;
mod store;

pub use client::{looks_like_exception, quote_string, recording, ClickHouseClient, ResponseStream};
pub use config::{check_database_name, ClickHouseConfig};
pub use delete::DEFAULT_MUTATION_TIMEOUT;
pub use error::{ClickHouseError, CONFIG_ERROR_CODES, DATA_ERROR_CODES};
pub use migrate::{
    applied_migrations, latest_version, migrate, migrate_to, AppliedMigration, Migration,
    MIGRATIONS,
};
pub use store::{ClickHouseStore, DroppedPartition, PARTITIONED_TABLES};
