//! The decoders of request bytes as plain functions, for the fuzz targets (`fuzz/`) and their
//! property tests. Each answers the same `ApiError` the server would; none may panic.

use prost::Message as _;
use userseg_domain::RawPair;
use userseg_proto::v1::PushRequest;

use crate::ApiError;

/// A `POST /v1/pairs` JSON body (`{"pairs": [...]}`).
pub fn push_json(body: &[u8]) -> Result<Vec<RawPair>, ApiError> {
    crate::http::parse_json(body)
}

/// A `POST /v1/pairs` NDJSON body, at most `max_pairs` pairs.
pub fn push_ndjson(body: &[u8], max_pairs: usize) -> Result<Vec<RawPair>, ApiError> {
    crate::http::parse_ndjson(body, max_pairs)
}

/// A `POST /v1/users/delete` body: the user ids.
pub fn delete_body(body: &[u8]) -> Result<Vec<String>, ApiError> {
    crate::analytics_http::parse_delete_body(body)
}

/// A query string, keeping only `allowed` keys, each at most once.
pub fn query(query: &str, allowed: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
    crate::analytics_http::query_params(Some(query), allowed)
}

/// A gRPC `PushRequest` message (without the gRPC frame): what `Push` and each message of
/// `PushStream` decode, with the error the client gets (INVALID_ARGUMENT).
pub fn push_proto(message: &[u8]) -> Result<Vec<RawPair>, ApiError> {
    let req = PushRequest::decode(message)
        .map_err(|e| ApiError::invalid(format!("invalid protobuf message: {e}")))?;
    Ok(crate::grpc::raw_pairs(req))
}
