//! userseg's roles as a library: each role's `start(config, shutdown)` wires config →
//! adapters → use cases → API and returns a running [`Server`]. The binary (`main.rs`) and the
//! tests start the roles the same way.
//!
//! - [`standalone::start`]: everything in one process on the embedded store.
//! - [`uss::start`]: the stateless ingest service, publishing to Kafka.
//! - [`es::start`]: the estimation service, Kafka → batch processor → ClickHouse, estimates from
//!   the in-memory index.
//! - [`migrate::run`]: the ClickHouse schema.

pub mod cli;
pub mod config;
pub mod es;
pub mod keys;
pub mod migrate;
pub mod observability;
mod peers;
mod reload;
mod server;
pub mod standalone;
pub mod uss;

pub use server::Server;
