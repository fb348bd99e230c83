//! User deletion (the right to erasure) as a record of the pair log.

use crate::{validate_user_id, Pair, PairError};

/// Most user ids in one deletion request.
pub const MAX_USERS_PER_DELETE: usize = 10_000;

/// A validated deletion: 1 to [`MAX_USERS_PER_DELETE`] distinct valid user ids, in the order
/// first given. Applying it removes every membership of those users; applying it again changes
/// nothing (idempotent). Pairs of a user logged after its deletion count again as usual.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UserDeletion {
    user_ids: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeletionError {
    #[error("user_ids is empty; give 1 to {MAX_USERS_PER_DELETE} user ids")]
    Empty,
    #[error("the request holds {count} user ids; at most {max} are allowed per request")]
    TooMany { count: usize, max: usize },
    #[error("user_ids[{index}]: {error}")]
    User { index: usize, error: PairError },
}

impl UserDeletion {
    /// Validates all or nothing: the first invalid id is reported with its index. Duplicates are
    /// dropped (the first occurrence keeps its place).
    pub fn new(user_ids: Vec<String>) -> Result<UserDeletion, DeletionError> {
        if user_ids.is_empty() {
            return Err(DeletionError::Empty);
        }
        if user_ids.len() > MAX_USERS_PER_DELETE {
            return Err(DeletionError::TooMany {
                count: user_ids.len(),
                max: MAX_USERS_PER_DELETE,
            });
        }
        for (index, id) in user_ids.iter().enumerate() {
            validate_user_id(id).map_err(|error| DeletionError::User { index, error })?;
        }
        let mut seen = std::collections::HashSet::with_capacity(user_ids.len());
        let user_ids = user_ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        Ok(UserDeletion { user_ids })
    }

    /// A deletion decoded from the log, re-validated (a log record is outside data too).
    pub fn from_log(user_ids: Vec<String>) -> Result<UserDeletion, DeletionError> {
        UserDeletion::new(user_ids)
    }

    pub fn user_ids(&self) -> &[String] {
        &self.user_ids
    }

    pub fn into_user_ids(self) -> Vec<String> {
        self.user_ids
    }

    /// How many distinct users (what `{"deleted": N}` reports).
    pub fn len(&self) -> usize {
        self.user_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.user_ids.is_empty()
    }

    /// Splits into deletions of at most `n` users each (`n >= 1`), e.g. one per log partition
    /// or message-size limit.
    pub fn chunks(&self, n: usize) -> impl Iterator<Item = UserDeletion> + '_ {
        self.user_ids.chunks(n.max(1)).map(|c| UserDeletion {
            user_ids: c.to_vec(),
        })
    }
}

/// One record of the pair log. The log is ordered per user (one partition per user in Kafka;
/// one sequence in the embedded log), and a deletion is applied after every pair of that user
/// logged before it and before every pair logged after it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Pairs(Vec<Pair>),
    DeleteUsers(UserDeletion),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn validation_is_all_or_nothing() {
        assert_eq!(UserDeletion::new(vec![]), Err(DeletionError::Empty));
        let d = UserDeletion::new(ids(&["a", "b", "a", "用户 with space/slash"])).unwrap();
        assert_eq!(d.user_ids(), &ids(&["a", "b", "用户 with space/slash"])[..]);
        assert_eq!(d.len(), 3);
        let e = UserDeletion::new(ids(&["a", "", "c"])).unwrap_err();
        assert_eq!(
            e,
            DeletionError::User {
                index: 1,
                error: PairError::EmptyUserId
            }
        );
        assert_eq!(e.to_string(), "user_ids[1]: user_id is empty");
        assert!(UserDeletion::new(ids(&["ok", "bad\u{0}"])).is_err());
        assert!(UserDeletion::new(vec!["x".repeat(257)]).is_err());
    }

    #[test]
    fn at_most_ten_thousand() {
        let many: Vec<String> = (0..MAX_USERS_PER_DELETE).map(|i| format!("u{i}")).collect();
        assert_eq!(UserDeletion::new(many.clone()).unwrap().len(), 10_000);
        let mut more = many;
        more.push("one-more".into());
        assert_eq!(
            UserDeletion::new(more),
            Err(DeletionError::TooMany {
                count: 10_001,
                max: 10_000
            })
        );
    }

    #[test]
    fn chunks_cover_every_id_once() {
        let d = UserDeletion::new((0..25).map(|i| format!("u{i}")).collect()).unwrap();
        let parts: Vec<UserDeletion> = d.chunks(10).collect();
        assert_eq!(parts.len(), 3);
        let joined: Vec<String> = parts.into_iter().flat_map(|p| p.into_user_ids()).collect();
        assert_eq!(joined, d.user_ids());
    }
}
