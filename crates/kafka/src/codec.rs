//! The message value: a versioned protobuf `PairBatch` (proto/userseg/v1/log.proto), holding
//! pairs (version 1) or a user deletion (version 2).

use prost::Message as _;
use userseg_domain::{
    validate_segment, validate_user_id, DeletionError, Pair, PairError, Record, UserDeletion,
};
use userseg_proto::v1::{LogDeletion, LogPair, PairBatch};
use userseg_proto::{DELETION_VERSION, PAIR_BATCH_VERSION};
use userseg_usecase::InvalidReason;

/// Why a message value could not be turned into a record. The `Display` text is the reason
/// given to the dead-letter queue: it starts with `undecodable` for bytes that are not a record
/// of a known version (or a deletion naming an invalid user id), and with `invalid pair N`
/// (0-based) for a pair failing validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("undecodable: {0}")]
    Undecodable(String),
    #[error("invalid pair {index}: {error}")]
    InvalidPair { index: usize, error: PairError },
    #[error("undecodable: invalid deletion: {0}")]
    InvalidDeletion(DeletionError),
}

impl From<DecodeError> for InvalidReason {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Undecodable(why) => InvalidReason::Undecodable(why),
            DecodeError::InvalidPair { index, error } => InvalidReason::InvalidPair {
                index,
                reason: error.to_string(),
            },
            DecodeError::InvalidDeletion(e) => {
                InvalidReason::Undecodable(format!("invalid deletion: {e}"))
            }
        }
    }
}

/// Encodes pairs as one `PairBatch` of version 1.
pub fn encode_batch(pairs: &[Pair]) -> Vec<u8> {
    PairBatch {
        version: PAIR_BATCH_VERSION,
        pairs: pairs.iter().map(to_log_pair).collect(),
        deletion: None,
    }
    .encode_to_vec()
}

/// Encodes a deletion as one record of version 2 (whatever its size: the publisher splits
/// deletions by partition and size before encoding).
pub fn encode_deletion(deletion: &UserDeletion) -> Vec<u8> {
    deletion_record(deletion.user_ids().to_vec())
}

fn deletion_record(user_ids: Vec<String>) -> Vec<u8> {
    PairBatch {
        version: DELETION_VERSION,
        pairs: Vec::new(),
        deletion: Some(LogDeletion { user_ids }),
    }
    .encode_to_vec()
}

/// Decodes and validates one record of the log: a pair batch (version 1) or a deletion
/// (version 2). `ts` is not checked against the window: a lagging consumer legitimately reads
/// old pairs (the store ignores expired ones).
pub fn decode_record(bytes: &[u8]) -> Result<Record, DecodeError> {
    let batch = PairBatch::decode(bytes)
        .map_err(|e| DecodeError::Undecodable(format!("not a PairBatch protobuf: {e}")))?;
    match batch.version {
        PAIR_BATCH_VERSION => {
            if batch.deletion.is_some() {
                return Err(DecodeError::Undecodable(
                    "a version 1 record (pairs) with a deletion".into(),
                ));
            }
            decode_pairs(batch.pairs).map(Record::Pairs)
        }
        DELETION_VERSION => {
            if !batch.pairs.is_empty() {
                return Err(DecodeError::Undecodable(format!(
                    "a version 2 record (deletion) with {} pairs",
                    batch.pairs.len()
                )));
            }
            let ids = batch.deletion.map(|d| d.user_ids).unwrap_or_default();
            UserDeletion::from_log(ids)
                .map(Record::DeleteUsers)
                .map_err(DecodeError::InvalidDeletion)
        }
        v => Err(DecodeError::Undecodable(format!(
            "unknown PairBatch version {v} (this reader knows versions {PAIR_BATCH_VERSION} and {DELETION_VERSION})"
        ))),
    }
}

/// Decodes a record that must be a pair batch (a deletion is an error).
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Pair>, DecodeError> {
    match decode_record(bytes)? {
        Record::Pairs(pairs) => Ok(pairs),
        Record::DeleteUsers(_) => Err(DecodeError::Undecodable(
            "a user deletion, not a pair batch".into(),
        )),
    }
}

fn decode_pairs(pairs: Vec<LogPair>) -> Result<Vec<Pair>, DecodeError> {
    pairs
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
    /// The user id of the first pair or deleted user (the message key).
    pub key: String,
    /// Pairs (or, in a deletion, user ids) in the value.
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

/// Bytes one user id takes inside an encoded `LogDeletion`.
fn user_id_len(id: &str) -> usize {
    1 + prost::encoding::encoded_len_varint(id.len() as u64) + id.len()
}

/// Encodes the deletion of `user_ids` (in order) as version 2 records of at most `max_bytes`
/// each; usually one. `pairs` of each [`Encoded`] counts its user ids; the key is the first id.
pub(crate) fn encode_deletion_chunks(user_ids: Vec<String>, max_bytes: usize) -> Vec<Encoded> {
    // The version field, and the tag and the longest length prefix of `deletion`.
    let overhead = 2 + 1 + 5;
    let mut out = Vec::new();
    let mut current: Vec<String> = Vec::new();
    let mut size = overhead;
    let finish = |ids: Vec<String>| Encoded {
        key: ids.first().cloned().unwrap_or_default(),
        pairs: ids.len(),
        value: deletion_record(ids),
    };
    for id in user_ids {
        let len = user_id_len(&id);
        if !current.is_empty() && size + len > max_bytes {
            out.push(finish(std::mem::take(&mut current)));
            size = overhead;
        }
        size += len;
        current.push(id);
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
        deletion: None,
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

    /// A pair batch exactly as the writers before deletions existed encoded it.
    const OLD_RECORD: &[u8] = &[
        0x08, 0x01, 0x12, 0x12, 0x0a, 0x02, 0x75, 0x31, 0x12, 0x06, 0x73, 0x70, 0x6f, 0x72, 0x74,
        0x73, 0x18, 0x80, 0x82, 0x92, 0xc9, 0x06, 0x12, 0x16, 0x0a, 0x08, 0xe7, 0x94, 0xa8, 0xe6,
        0x88, 0xb7, 0x2f, 0x31, 0x12, 0x04, 0x6e, 0x65, 0x77, 0x73, 0x18, 0xbc, 0x82, 0x92, 0xc9,
        0x06,
    ];

    #[test]
    fn old_records_decode_and_pairs_are_still_written_the_old_way() {
        let pairs = vec![
            pair("u1", "sports", 1_764_000_000),
            pair("用户/1", "news", 1_764_000_060),
        ];
        assert_eq!(decode_record(OLD_RECORD), Ok(Record::Pairs(pairs.clone())));
        assert_eq!(encode_batch(&pairs), OLD_RECORD);
    }

    #[test]
    fn deletions_round_trip() {
        let d = UserDeletion::new(vec!["u1".into(), "用户 /x".into(), "u3".into()]).unwrap();
        assert_eq!(
            decode_record(&encode_deletion(&d)),
            Ok(Record::DeleteUsers(d.clone()))
        );
        // Empty, or naming an invalid id: undecodable (dead-lettered), never half-applied.
        let empty = deletion_record(vec![]);
        let e = decode_record(&empty).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("undecodable: invalid deletion: user_ids is empty"),
            "{e}"
        );
        let bad = deletion_record(vec!["ok".into(), "bad\n".into()]);
        let e = decode_record(&bad).unwrap_err();
        assert!(e.to_string().contains("user_ids[1]"), "{e}");
        assert!(matches!(
            InvalidReason::from(e),
            InvalidReason::Undecodable(_)
        ));
    }

    #[test]
    fn deletion_chunks_respect_the_limit_and_keep_order() {
        let ids: Vec<String> = (0..10_000)
            .map(|i| format!("user-{i:06}-{}", "x".repeat(i % 200)))
            .collect();
        let chunks = encode_deletion_chunks(ids.clone(), 100_000);
        assert!(chunks.len() > 5, "{}", chunks.len());
        let mut back = Vec::new();
        for c in &chunks {
            assert!(c.value.len() <= 100_000, "{}", c.value.len());
            let Ok(Record::DeleteUsers(d)) = decode_record(&c.value) else {
                panic!("not a deletion");
            };
            assert_eq!(d.len(), c.pairs);
            assert_eq!(c.key, d.user_ids()[0]);
            back.extend(d.into_user_ids());
        }
        assert_eq!(back, ids);
        assert_eq!(encode_deletion_chunks(vec!["a".into()], 100).len(), 1);
        assert!(encode_deletion_chunks(vec![], 100).is_empty());
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
        let v3 = PairBatch {
            version: 3,
            ..PairBatch::default()
        }
        .encode_to_vec();
        let e = decode_record(&v3).unwrap_err();
        assert!(e.to_string().contains("unknown PairBatch version 3"), "{e}");
        // A deletion is not a pair batch.
        let d = UserDeletion::new(vec!["u".into()]).unwrap();
        let e = decode_batch(&encode_deletion(&d)).unwrap_err();
        assert!(e.to_string().contains("a user deletion"), "{e}");
        // The versions are not mixed.
        let mixed = PairBatch {
            version: PAIR_BATCH_VERSION,
            pairs: vec![],
            deletion: Some(LogDeletion {
                user_ids: vec!["u".into()],
            }),
        }
        .encode_to_vec();
        assert!(decode_record(&mixed).is_err());
        let mixed = PairBatch {
            version: DELETION_VERSION,
            pairs: vec![into_log_pair(pair("u", "s", 1))],
            deletion: Some(LogDeletion {
                user_ids: vec!["u".into()],
            }),
        }
        .encode_to_vec();
        assert!(decode_record(&mixed).is_err());
    }

    #[test]
    fn invalid_pairs_are_named_by_index() {
        let bad = PairBatch {
            version: PAIR_BATCH_VERSION,
            pairs: vec![
                into_log_pair(pair("ok", "ok", 1)),
                into_log_pair(pair("ok", "bad segment", 1)),
            ],
            deletion: None,
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
            deletion: None,
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
