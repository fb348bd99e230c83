//! The message value: a versioned protobuf `PairBatch` (proto/userseg/v1/log.proto).

use prost::Message as _;
use userseg_domain::{validate_segment, validate_user_id, Pair, PairError};
use userseg_proto::v1::{LogPair, PairBatch};
use userseg_proto::PAIR_BATCH_VERSION;
use userseg_usecase::InvalidReason;

/// Why a message value could not be turned into pairs. The `Display` text is the reason given
/// to the dead-letter queue: it starts with `undecodable` for bytes that are not a `PairBatch`
/// of a known version, and with `invalid pair N` (0-based) for a pair failing validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable: {0}")]
    Undecodable(String),
    #[error("invalid pair {index}: {error}")]
    InvalidPair { index: usize, error: PairError },
}

impl From<DecodeError> for InvalidReason {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Undecodable(why) => InvalidReason::Undecodable(why),
            DecodeError::InvalidPair { index, error } => InvalidReason::InvalidPair {
                index,
                reason: error.to_string(),
            },
        }
    }
}

/// Encodes pairs as one `PairBatch` of the current version.
pub fn encode_batch(pairs: &[Pair]) -> Vec<u8> {
    PairBatch {
        version: PAIR_BATCH_VERSION,
        pairs: pairs.iter().map(to_log_pair).collect(),
    }
    .encode_to_vec()
}

/// Decodes and validates a `PairBatch`. `ts` is not checked against the window: a lagging
/// consumer legitimately reads old pairs (the store ignores expired ones).
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Pair>, DecodeError> {
    let batch = PairBatch::decode(bytes)
        .map_err(|e| DecodeError::Undecodable(format!("not a PairBatch protobuf: {e}")))?;
    if batch.version != PAIR_BATCH_VERSION {
        return Err(DecodeError::Undecodable(format!(
            "unknown PairBatch version {} (this reader knows version {PAIR_BATCH_VERSION})",
            batch.version
        )));
    }
    batch
        .pairs
        .into_iter()
        .enumerate()
        .map(|(index, p)| {
            validate_user_id(&p.user_id)
                .and_then(|()| validate_segment(&p.segment))
                .map_err(|error| DecodeError::InvalidPair { index, error })?;
            Ok(Pair {
                user_id: p.user_id,
                segment: p.segment,
                ts: p.ts,
            })
        })
        .collect()
}

fn to_log_pair(p: &Pair) -> LogPair {
    LogPair {
        user_id: p.user_id.clone(),
        segment: p.segment.clone(),
        ts: p.ts,
    }
}

pub(crate) fn into_log_pair(p: Pair) -> LogPair {
    LogPair {
        user_id: p.user_id,
        segment: p.segment,
        ts: p.ts,
    }
}

/// One message value to produce.
pub(crate) struct Encoded {
    pub value: Vec<u8>,
    /// The user id of the first pair (the message key).
    pub key: String,
    pub pairs: usize,
}

/// Bytes the `version` field takes in an encoded `PairBatch`.
fn version_len() -> usize {
    if PAIR_BATCH_VERSION == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(u64::from(PAIR_BATCH_VERSION))
    }
}

/// Bytes one pair takes inside an encoded `PairBatch` (tag, length, body).
fn pair_len(p: &LogPair) -> usize {
    let body = p.encoded_len();
    1 + prost::encoding::encoded_len_varint(body as u64) + body
}

/// Encodes `pairs` (in order) as `PairBatch` values of at most `max_bytes` each; usually one.
/// A single pair always fits (pairs are at most a few hundred bytes, `max_bytes` at least 4 KiB).
pub(crate) fn encode_chunks(pairs: Vec<LogPair>, max_bytes: usize) -> Vec<Encoded> {
    let mut out = Vec::new();
    let mut current: Vec<LogPair> = Vec::new();
    let mut size = version_len();
    for p in pairs {
        let len = pair_len(&p);
        if !current.is_empty() && size + len > max_bytes {
            out.push(finish(std::mem::take(&mut current)));
            size = version_len();
        }
        size += len;
        current.push(p);
    }
    if !current.is_empty() {
        out.push(finish(current));
    }
    out
}

fn finish(pairs: Vec<LogPair>) -> Encoded {
    let key = pairs.first().map(|p| p.user_id.clone()).unwrap_or_default();
    let n = pairs.len();
    let value = PairBatch {
        version: PAIR_BATCH_VERSION,
        pairs,
    }
    .encode_to_vec();
    Encoded {
        value,
        key,
        pairs: n,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(u: &str, s: &str, ts: i64) -> Pair {
        Pair {
            user_id: u.into(),
            segment: s.into(),
            ts,
        }
    }

    #[test]
    fn round_trip() {
        let pairs = vec![pair("u1", "sports", 1), pair("用户", "a.b:c-d_e", -5)];
        assert_eq!(decode_batch(&encode_batch(&pairs)), Ok(pairs));
        assert_eq!(decode_batch(&encode_batch(&[])), Ok(vec![]));
    }

    #[test]
    fn undecodable() {
        let e = decode_batch(&[0xff, 0xff, 0xff]).unwrap_err();
        assert!(e.to_string().starts_with("undecodable: "), "{e}");
        // Empty bytes decode as version 0, which no writer produces.
        let e = decode_batch(&[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("undecodable: unknown PairBatch version 0"),
            "{e}"
        );
        let v2 = PairBatch {
            version: 2,
            pairs: vec![],
        }
        .encode_to_vec();
        let e = decode_batch(&v2).unwrap_err();
        assert!(e.to_string().contains("version 2"), "{e}");
    }

    #[test]
    fn invalid_pairs_are_named_by_index() {
        let bad = PairBatch {
            version: PAIR_BATCH_VERSION,
            pairs: vec![
                into_log_pair(pair("ok", "ok", 1)),
                into_log_pair(pair("ok", "bad segment", 1)),
            ],
        }
        .encode_to_vec();
        let e = decode_batch(&bad).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid pair 1: segment contains"),
            "{e}"
        );
        let bad = PairBatch {
            version: PAIR_BATCH_VERSION,
            pairs: vec![into_log_pair(pair("", "s", 1))],
        }
        .encode_to_vec();
        assert_eq!(
            decode_batch(&bad).unwrap_err().to_string(),
            "invalid pair 0: user_id is empty"
        );
        // Old ts values are fine: the window is not re-checked.
        assert!(decode_batch(&encode_batch(&[pair("u", "s", 0)])).is_ok());
    }

    #[test]
    fn chunks_respect_the_limit_and_keep_order() {
        let pairs: Vec<Pair> = (0..5000)
            .map(|i| pair(&format!("user-{i:05}"), "segment-with-a-long-name", i))
            .collect();
        let log: Vec<LogPair> = pairs.iter().cloned().map(into_log_pair).collect();
        let whole = encode_batch(&pairs).len();
        assert_eq!(encode_chunks(log.clone(), whole).len(), 1);
        assert_eq!(
            encode_chunks(log.clone(), whole).remove(0).value.len(),
            whole
        );
        let chunks = encode_chunks(log, 10_000);
        assert!(chunks.len() >= whole / 10_000);
        let mut back = Vec::new();
        for c in &chunks {
            assert!(c.value.len() <= 10_000, "{}", c.value.len());
            let decoded = decode_batch(&c.value).unwrap();
            assert_eq!(decoded.len(), c.pairs);
            assert_eq!(c.key, decoded[0].user_id);
            back.extend(decoded);
        }
        assert_eq!(back, pairs);
        assert!(encode_chunks(vec![], 10_000).is_empty());
    }
}
