//! The core of userseg: what a (user_id, segment, ts) pair is, which pairs are valid, and the
//! window arithmetic that decides which memberships are live at a given time.
//!
//! This crate does no I/O and knows nothing about async runtimes, so every rule here is a plain
//! function that is tested exhaustively.

mod change;
mod deletion;
mod error;
mod expr;
mod pair;
mod window;
mod within;

pub use change::{event_id, ChangeEvent, ChangeKind, ChangeReason};
pub use deletion::{DeletionError, Record, UserDeletion, MAX_USERS_PER_DELETE};
pub use error::ErrorKind;
pub use expr::{
    Expr, ExprError, ExprErrorReason, MAX_EXPR_BYTES, MAX_EXPR_DEPTH, MAX_EXPR_SEGMENTS,
};
pub use pair::{
    validate_batch, validate_segment, validate_user_id, BatchError, Limits, Pair, PairError,
    RawPair, MAX_FUTURE_SKEW_SECS, MAX_SEGMENT_CHARS, MAX_USER_ID_BYTES,
};
pub use window::{Bucketing, Window, WindowError};
pub use within::{parse_duration, DurationError, Within};

/// Seconds since the Unix epoch.
pub type UnixSeconds = i64;
