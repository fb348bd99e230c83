//! userseg's segment store on ClickHouse (18.16 and current versions), over the HTTP interface.
//!
//! Wiring:
//! 1. [`ClickHouseConfig::from_env`] (or build the struct and call [`ClickHouseConfig::validate`]);
//! 2. [`migrate`] once (`userseg migrate`): creates the database and applies the embedded
//!    migrations, recording them in `schema_migrations`;
//! 3. [`ClickHouseStore::new`]`(config, window)`, shared as `Arc<dyn SegmentWriter>` and
//!    `Arc<dyn SegmentCounter>`;
//! 4. call [`ClickHouseStore::drop_expired_partitions`] periodically (e.g. hourly).
//!
//! The schema and its trade-offs are described in `docs/CLICKHOUSE.md`.

mod client;
mod config;
mod error;
mod migrate;
mod store;

pub use client::{quote_string, ClickHouseClient};
pub use config::{env, ClickHouseConfig, ConfigError};
pub use error::{ClickHouseError, CONFIG_ERROR_CODES, DATA_ERROR_CODES};
pub use migrate::{
    applied_migrations, latest_version, migrate, migrate_to, AppliedMigration, Migration,
    MIGRATIONS,
};
pub use store::{ClickHouseStore, DroppedPartition, PARTITIONED_TABLES};
