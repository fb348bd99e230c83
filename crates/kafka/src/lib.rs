//! Kafka adapters for userseg (see docs/MESSAGE_FORMAT.md for the wire format):
//!
//! - [`KafkaPublisher`]: the [`PairPublisher`](userseg_usecase::PairPublisher) ingest writes to.
//!   Pairs are grouped by partition (Kafka's murmur2 partitioner on `user_id`), one
//!   `PairBatch` message per partition per request, and `publish` resolves only once the broker
//!   acknowledged every message (`acks=all`, one request in flight).
//! - [`KafkaSource`]: the [`PairSource`](userseg_usecase::PairSource) the batch processor
//!   consumes, a consumer-group member with manual, synchronous offset commits.
//! - [`KafkaDeadLetters`]: the [`DeadLetterSink`](userseg_usecase::DeadLetterSink) writing to the
//!   DLQ topic with `userseg-*` headers.
//! - [`KafkaFollower`]: the [`LogFollower`](userseg_usecase::LogFollower) of an in-memory
//!   index: the whole topic, outside any group, from the offsets the processors' group committed.
//! - [`KafkaChangeLog`]: the [`ChangeLog`](userseg_usecase::ChangeLog) of the change feed on
//!   KAFKA_CHANGES_TOPIC, keyed by user id.
//! - [`ensure_topics`]: creates the topic and the DLQ topic when missing.
//!
//! Configuration: [`KafkaConfig`] is a plain typed struct; the binary declares, parses and
//! validates every setting (naming the variable to fix) and hands the adapters the result.

mod admin;
mod changes;
mod codec;
pub mod config;
mod context;
mod dlq;
mod error;
mod follower;
mod metadata;
mod partitioner;
mod producer;
mod publisher;
mod source;

pub use admin::ensure_topics;
pub use changes::{decode_event, encode_event, KafkaChangeLog};
pub use codec::{decode_batch, decode_record, encode_batch, encode_deletion, DecodeError};
pub use config::{Compression, KafkaConfig, UnknownCompression, MESSAGE_OVERHEAD_BYTES};
pub use dlq::{
    KafkaDeadLetters, HEADER_ATTEMPTS, HEADER_KIND, HEADER_PAIRS, HEADER_PART, HEADER_REASON,
    HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, HEADER_SOURCE_TOPIC, HEADER_USERS,
};
pub use error::SetupError;
pub use follower::KafkaFollower;
pub use partitioner::{murmur2, partition_for};
pub use publisher::KafkaPublisher;
pub use source::{KafkaSource, Origin, Position, Provenance};
