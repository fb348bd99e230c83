use crate::{UnixSeconds, Window};

/// Longest accepted user id, in bytes of UTF-8.
pub const MAX_USER_ID_BYTES: usize = 256;
/// Longest accepted segment name, in characters (all ASCII, so also bytes).
pub const MAX_SEGMENT_CHARS: usize = 128;
/// How far ahead of the server clock an event time may be.
pub const MAX_FUTURE_SKEW_SECS: i64 = 300;

/// A validated membership fact: `user_id` is in `segment` as of `ts`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pair {
    pub user_id: String,
    pub segment: String,
    pub ts: UnixSeconds,
}

/// A pair as a client sent it: `ts` may be absent (then it is the time of receipt).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPair {
    pub user_id: String,
    pub segment: String,
    pub ts: Option<i64>,
}

/// Why one pair was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PairError {
    #[error("user_id is empty")]
    EmptyUserId,
    #[error("user_id is {len} bytes long; at most {MAX_USER_ID_BYTES} bytes are allowed")]
    UserIdTooLong { len: usize },
    #[error("user_id contains the control character U+{code:04X} at byte {at}")]
    UserIdControlChar { code: u32, at: usize },
    #[error("segment is empty")]
    EmptySegment,
    #[error("segment is {len} characters long; at most {MAX_SEGMENT_CHARS} are allowed")]
    SegmentTooLong { len: usize },
    #[error("segment contains {ch:?} at position {at}; only A-Z a-z 0-9 _ . : - are allowed")]
    SegmentBadChar { ch: char, at: usize },
    #[error("ts {ts} is {ahead} s ahead of the server clock ({now}); at most {MAX_FUTURE_SKEW_SECS} s ahead is accepted")]
    TsInFuture { ts: i64, now: i64, ahead: i64 },
    #[error("ts {ts} is {age} s old, not younger than the window of {window} s, so it has already expired")]
    TsExpired { ts: i64, age: i64, window: u64 },
}

/// Request-size limits, configurable by the operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_pairs_per_request: usize,
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pairs_per_request: 100_000,
            max_request_bytes: 16 * 1024 * 1024,
        }
    }
}

/// Why a whole batch was rejected: the first bad pair and its position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("pair {index}: {error}")]
    Pair { index: usize, error: PairError },
    #[error("the request holds {count} pairs; at most {max} are allowed per request")]
    TooManyPairs { count: usize, max: usize },
}

/// Checks a user id: 1..=256 bytes of UTF-8 (guaranteed by `&str`) with no control characters.
pub fn validate_user_id(user_id: &str) -> Result<(), PairError> {
    if user_id.is_empty() {
        return Err(PairError::EmptyUserId);
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(PairError::UserIdTooLong { len: user_id.len() });
    }
    // Fast path: printable ASCII only.
    if user_id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    match user_id.char_indices().find(|(_, c)| c.is_control()) {
        Some((at, c)) => Err(PairError::UserIdControlChar { code: c as u32, at }),
        None => Ok(()),
    }
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-')
}

/// Checks a segment name: 1..=128 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_segment(segment: &str) -> Result<(), PairError> {
    if segment.is_empty() {
        return Err(PairError::EmptySegment);
    }
    if let Some((at, ch)) = segment
        .chars()
        .enumerate()
        .find(|(_, c)| !c.is_ascii() || !is_segment_byte(*c as u8))
    {
        // A too-long name made of bad characters reports the character first: it is the more
        // specific mistake.
        return Err(PairError::SegmentBadChar { ch, at });
    }
    if segment.len() > MAX_SEGMENT_CHARS {
        return Err(PairError::SegmentTooLong { len: segment.len() });
    }
    Ok(())
}

impl RawPair {
    /// Validates the pair against the clock and the window, filling in a missing `ts` with `now`.
    pub fn validate(self, now: UnixSeconds, window: Window) -> Result<Pair, PairError> {
        validate_user_id(&self.user_id)?;
        validate_segment(&self.segment)?;
        let ts = self.ts.unwrap_or(now);
        window.check_ts(ts, now)?;
        Ok(Pair {
            user_id: self.user_id,
            segment: self.segment,
            ts,
        })
    }
}

/// Validates a whole request, all or nothing: either every pair is valid and all are returned,
/// or the first invalid pair is reported with its index and nothing is returned.
pub fn validate_batch(
    raw: Vec<RawPair>,
    now: UnixSeconds,
    window: Window,
    limits: &Limits,
) -> Result<Vec<Pair>, BatchError> {
    if raw.len() > limits.max_pairs_per_request {
        return Err(BatchError::TooManyPairs {
            count: raw.len(),
            max: limits.max_pairs_per_request,
        });
    }
    let mut out = Vec::with_capacity(raw.len());
    for (index, pair) in raw.into_iter().enumerate() {
        match pair.validate(now, window) {
            Ok(p) => out.push(p),
            Err(error) => return Err(BatchError::Pair { index, error }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000;

    fn w() -> Window {
        Window::from_secs(14 * 86_400).unwrap()
    }

    fn raw(user: &str, seg: &str, ts: Option<i64>) -> RawPair {
        RawPair {
            user_id: user.into(),
            segment: seg.into(),
            ts,
        }
    }

    #[test]
    fn user_id_bounds() {
        assert_eq!(validate_user_id(""), Err(PairError::EmptyUserId));
        assert!(validate_user_id("a").is_ok());
        assert!(validate_user_id(&"x".repeat(256)).is_ok());
        assert_eq!(
            validate_user_id(&"x".repeat(257)),
            Err(PairError::UserIdTooLong { len: 257 })
        );
        // 256 bytes made of multi-byte characters is fine; 258 bytes is not.
        assert!(validate_user_id(&"é".repeat(128)).is_ok());
        assert_eq!(
            validate_user_id(&"é".repeat(129)),
            Err(PairError::UserIdTooLong { len: 258 })
        );
        assert!(validate_user_id("用户-42 with spaces").is_ok());
    }

    #[test]
    fn user_id_control_chars() {
        assert_eq!(
            validate_user_id("ab\ncd"),
            Err(PairError::UserIdControlChar { code: 0x0a, at: 2 })
        );
        assert_eq!(
            validate_user_id("\u{7f}"),
            Err(PairError::UserIdControlChar { code: 0x7f, at: 0 })
        );
        assert_eq!(
            validate_user_id("é\u{85}"),
            Err(PairError::UserIdControlChar { code: 0x85, at: 2 })
        );
        assert!(validate_user_id("tab\tno").is_err());
    }

    #[test]
    fn segment_rules() {
        assert_eq!(validate_segment(""), Err(PairError::EmptySegment));
        assert!(validate_segment("sports").is_ok());
        assert!(validate_segment("A-z_0.9:x").is_ok());
        assert!(validate_segment(&"s".repeat(128)).is_ok());
        assert_eq!(
            validate_segment(&"s".repeat(129)),
            Err(PairError::SegmentTooLong { len: 129 })
        );
        assert_eq!(
            validate_segment("a b"),
            Err(PairError::SegmentBadChar { ch: ' ', at: 1 })
        );
        assert_eq!(
            validate_segment("naïve"),
            Err(PairError::SegmentBadChar { ch: 'ï', at: 2 })
        );
        assert!(validate_segment("x/y").is_err());
        assert!(validate_segment("x'y").is_err());
    }

    #[test]
    fn ts_defaults_to_now() {
        let p = raw("u", "s", None).validate(NOW, w()).unwrap();
        assert_eq!(p.ts, NOW);
    }

    #[test]
    fn future_boundary_is_five_minutes() {
        assert!(raw("u", "s", Some(NOW + 300)).validate(NOW, w()).is_ok());
        assert_eq!(
            raw("u", "s", Some(NOW + 301)).validate(NOW, w()),
            Err(PairError::TsInFuture {
                ts: NOW + 301,
                now: NOW,
                ahead: 301
            })
        );
    }

    #[test]
    fn expiry_boundary_is_exactly_window() {
        let window = 14 * 86_400;
        assert!(raw("u", "s", Some(NOW - window + 1))
            .validate(NOW, w())
            .is_ok());
        assert_eq!(
            raw("u", "s", Some(NOW - window)).validate(NOW, w()),
            Err(PairError::TsExpired {
                ts: NOW - window,
                age: window,
                window: window as u64
            })
        );
        assert!(raw("u", "s", Some(i64::MIN)).validate(NOW, w()).is_err());
        assert!(raw("u", "s", Some(i64::MAX)).validate(NOW, w()).is_err());
    }

    #[test]
    fn batch_is_all_or_nothing() {
        let ok = vec![raw("a", "s", None), raw("b", "s", Some(NOW - 10))];
        assert_eq!(
            validate_batch(ok, NOW, w(), &Limits::default())
                .unwrap()
                .len(),
            2
        );
        let bad = vec![raw("a", "s", None), raw("b", "bad seg", None)];
        let err = validate_batch(bad, NOW, w(), &Limits::default()).unwrap_err();
        assert_eq!(
            err,
            BatchError::Pair {
                index: 1,
                error: PairError::SegmentBadChar { ch: ' ', at: 3 }
            }
        );
        assert_eq!(
            err.to_string(),
            "pair 1: segment contains ' ' at position 3; only A-Z a-z 0-9 _ . : - are allowed"
        );
    }

    #[test]
    fn batch_pair_limit() {
        let limits = Limits {
            max_pairs_per_request: 2,
            ..Limits::default()
        };
        let three = vec![raw("a", "s", None); 3];
        assert_eq!(
            validate_batch(three, NOW, w(), &limits),
            Err(BatchError::TooManyPairs { count: 3, max: 2 })
        );
        let two = vec![raw("a", "s", None); 2];
        assert!(validate_batch(two, NOW, w(), &limits).is_ok());
    }
}
