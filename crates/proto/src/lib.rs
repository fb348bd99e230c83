//! Code generated from `proto/userseg/v1`: the gRPC service and the log record format.

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("userseg.v1");
}

/// The encoded file descriptor set, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/userseg_descriptor.bin"));

/// Current version of [`v1::PairBatch`] written to the log.
pub const PAIR_BATCH_VERSION: u32 = 1;
