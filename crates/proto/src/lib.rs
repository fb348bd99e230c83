//! Code generated from `proto/userseg/v1`: the gRPC service and the log record format.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("userseg.v1");
}

/// The encoded file descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/userseg_descriptor.bin"));

/// The version of a [`v1::PairBatch`] holding pairs (what pair batches are written as).
pub const PAIR_BATCH_VERSION: u32 = 1;

/// The version of a [`v1::PairBatch`] holding a user deletion (`deletion` set, no pairs).
pub const DELETION_VERSION: u32 = 2;
