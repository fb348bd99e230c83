//! The change feed's event: a user entering or leaving a segment.

use crate::UnixSeconds;

/// Entered or exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A pair made the user live in a segment where it was not (not a refresh of a live
    /// membership).
    Entered,
    /// The user's membership ended.
    Exited,
}

/// Why the event happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeReason {
    /// `entered`: a pair arrived.
    Pair,
    /// `exited`: `last_seen + window` passed without a newer pair.
    Expired,
    /// `exited`: the user was deleted.
    Deleted,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Entered => "entered",
            ChangeKind::Exited => "exited",
        }
    }
}

impl ChangeReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeReason::Pair => "pair",
            ChangeReason::Expired => "expired",
            ChangeReason::Deleted => "deleted",
        }
    }

    pub fn kind(self) -> ChangeKind {
        match self {
            ChangeReason::Pair => ChangeKind::Entered,
            ChangeReason::Expired | ChangeReason::Deleted => ChangeKind::Exited,
        }
    }

    /// The byte a log stores for the reason.
    pub fn code(self) -> u8 {
        match self {
            ChangeReason::Pair => 1,
            ChangeReason::Expired => 2,
            ChangeReason::Deleted => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<ChangeReason> {
        match code {
            1 => Some(ChangeReason::Pair),
            2 => Some(ChangeReason::Expired),
            3 => Some(ChangeReason::Deleted),
            _ => None,
        }
    }
}

/// One event of the change feed.
///
/// `id` is deterministic: the same change detected again (a replay after a crash, a second
/// emitter after a rebalance) has the same id, so a consumer drops repeats by id. It is a
/// 64-bit FNV-1a hash of (user, segment, reason, `key`), where `key` is the membership's time
/// bucket for `entered` and `expired`, and the deletion's position in the log (plus the bucket)
/// for `deleted`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeEvent {
    pub user_id: String,
    pub segment: String,
    pub reason: ChangeReason,
    /// `entered`: the membership's latest ts (rounded down to the store's time bucket);
    /// `expired`: when it ended (`last_seen + window`, at the bucket's edge); `deleted`: when
    /// the deletion was applied.
    pub ts: UnixSeconds,
    /// What tells this change from the other changes of the same membership: the time bucket
    /// of the membership (`entered`, `expired`) or the deletion's position in the log.
    pub key: i64,
    /// [`event_id`] of (user, segment, reason, key).
    pub id: u64,
}

impl ChangeEvent {
    /// An event whose id is derived from its identity (see [`ChangeEvent`]).
    pub fn new(
        user_id: impl Into<String>,
        segment: impl Into<String>,
        reason: ChangeReason,
        ts: UnixSeconds,
        key: i64,
    ) -> ChangeEvent {
        let (user_id, segment) = (user_id.into(), segment.into());
        let id = event_id(&user_id, &segment, reason, key);
        ChangeEvent {
            user_id,
            segment,
            reason,
            ts,
            key,
            id,
        }
    }

    pub fn kind(&self) -> ChangeKind {
        self.reason.kind()
    }

    /// The id as clients see it: 16 lowercase hex digits.
    pub fn id_hex(&self) -> String {
        format!("{:016x}", self.id)
    }
}

/// FNV-1a 64 over the fields, each length-prefixed: stable across processes and versions.
pub fn event_id(user_id: &str, segment: &str, reason: ChangeReason, key: i64) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(PRIME);
        }
    };
    eat(&(user_id.len() as u32).to_le_bytes());
    eat(user_id.as_bytes());
    eat(&(segment.len() as u32).to_le_bytes());
    eat(segment.as_bytes());
    eat(&[reason.code()]);
    eat(&key.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_distinguish_every_field() {
        let e = ChangeEvent::new("u1", "s", ChangeReason::Pair, 60, 1);
        // Pinned: a change of the hash would break consumers' deduplication across versions.
        assert_eq!(e.id, event_id("u1", "s", ChangeReason::Pair, 1));
        assert_eq!(e.id_hex().len(), 16);
        let others = [
            event_id("u2", "s", ChangeReason::Pair, 1),
            event_id("u1", "t", ChangeReason::Pair, 1),
            event_id("u1", "s", ChangeReason::Expired, 1),
            event_id("u1", "s", ChangeReason::Pair, 2),
            event_id("u", "1s", ChangeReason::Pair, 1),
        ];
        for o in others {
            assert_ne!(o, e.id);
        }
        for r in [
            ChangeReason::Pair,
            ChangeReason::Expired,
            ChangeReason::Deleted,
        ] {
            assert_eq!(ChangeReason::from_code(r.code()), Some(r));
        }
        assert_eq!(ChangeReason::from_code(0), None);
    }
}
