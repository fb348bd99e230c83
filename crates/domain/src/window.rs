use crate::{PairError, UnixSeconds, MAX_FUTURE_SKEW_SECS};

/// How long a membership lives after the latest `ts` seen for its (user, segment) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Window {
    secs: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    #[error("the window must be at least 1 second")]
    Zero,
    #[error("the window must be at most 10 years")]
    TooLong,
}

/// Longest window we accept: keeps all arithmetic far from overflow.
const MAX_WINDOW_SECS: u64 = 10 * 366 * 86_400;

impl Window {
    /// Two weeks, the product's default.
    pub const DEFAULT: Window = Window { secs: 14 * 86_400 };

    pub fn from_secs(secs: u64) -> Result<Window, WindowError> {
        if secs == 0 {
            return Err(WindowError::Zero);
        }
        if secs > MAX_WINDOW_SECS {
            return Err(WindowError::TooLong);
        }
        Ok(Window { secs })
    }

    pub fn secs(self) -> u64 {
        self.secs
    }

    fn secs_i64(self) -> i64 {
        // Bounded by MAX_WINDOW_SECS, so it fits.
        self.secs as i64
    }

    /// Is a pair seen at `ts` a member at time `at`? Exactly: `at - window < ts <= at`.
    pub fn is_live(self, ts: UnixSeconds, at: UnixSeconds) -> bool {
        ts <= at && ts > at.saturating_sub(self.secs_i64())
    }

    /// Rejects event times more than 5 minutes ahead of `now`, or already expired at `now`.
    pub fn check_ts(self, ts: UnixSeconds, now: UnixSeconds) -> Result<(), PairError> {
        let ahead = ts.saturating_sub(now);
        if ahead > MAX_FUTURE_SKEW_SECS {
            return Err(PairError::TsInFuture { ts, now, ahead });
        }
        let age = now.saturating_sub(ts);
        if age >= self.secs_i64() {
            return Err(PairError::TsExpired {
                ts,
                age,
                window: self.secs,
            });
        }
        Ok(())
    }
}

/// Time buckets used by stores that count by bucket instead of by second.
///
/// Bucket `b` covers `[b * bucket_secs, (b + 1) * bucket_secs)`. A pair in bucket `b` is counted
/// at time `t` when `bucket(t) - window_buckets < b <= bucket(t)`. Compared with the exact rule
/// (`t - window < ts <= t`) a membership starts and ends less than one bucket early or late, so
/// the error in time is below `bucket_secs`, which is at most 60 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bucketing {
    bucket_secs: i64,
    window_buckets: i64,
}

impl Bucketing {
    /// The coarsest bucket allowed: the error budget of expiry.
    pub const MAX_BUCKET_SECS: i64 = 60;
    /// Target number of buckets per window: short windows get fine buckets.
    const TARGET_BUCKETS: u64 = 2048;

    pub fn for_window(window: Window) -> Bucketing {
        let bucket_secs = window
            .secs
            .div_ceil(Self::TARGET_BUCKETS)
            .clamp(1, Self::MAX_BUCKET_SECS as u64) as i64;
        let window_buckets = (window.secs_i64() + bucket_secs - 1) / bucket_secs;
        Bucketing {
            bucket_secs,
            window_buckets,
        }
    }

    pub fn bucket_secs(self) -> i64 {
        self.bucket_secs
    }

    pub fn window_buckets(self) -> i64 {
        self.window_buckets
    }

    /// Buckets a pair may lie ahead of the clock (the future skew, rounded up, plus one).
    pub fn future_buckets(self) -> i64 {
        MAX_FUTURE_SKEW_SECS / self.bucket_secs + 2
    }

    pub fn bucket_of(self, ts: UnixSeconds) -> i64 {
        ts.div_euclid(self.bucket_secs)
    }

    /// The live buckets at `at`: `(lo, hi]`.
    pub fn live_range(self, at: UnixSeconds) -> (i64, i64) {
        let hi = self.bucket_of(at);
        (hi - self.window_buckets, hi)
    }

    pub fn is_live_bucket(self, bucket: i64, at: UnixSeconds) -> bool {
        let (lo, hi) = self.live_range(at);
        bucket > lo && bucket <= hi
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn window_bounds() {
        assert_eq!(Window::from_secs(0), Err(WindowError::Zero));
        assert!(Window::from_secs(1).is_ok());
        assert_eq!(Window::from_secs(u64::MAX), Err(WindowError::TooLong));
        assert_eq!(Window::DEFAULT.secs(), 1_209_600);
    }

    #[test]
    fn is_live_is_half_open() {
        let w = Window::from_secs(100).unwrap();
        assert!(!w.is_live(1000, 1100)); // exactly window old: expired
        assert!(w.is_live(1001, 1100));
        assert!(w.is_live(1100, 1100)); // now: live
        assert!(!w.is_live(1101, 1100)); // future: not yet
    }

    #[test]
    fn bucket_sizes() {
        let b = Bucketing::for_window(Window::DEFAULT);
        assert_eq!(b.bucket_secs(), 60);
        assert_eq!(b.window_buckets(), 20_160);
        let b = Bucketing::for_window(Window::from_secs(2).unwrap());
        assert_eq!(b.bucket_secs(), 1);
        assert_eq!(b.window_buckets(), 2);
        let b = Bucketing::for_window(Window::from_secs(3600).unwrap());
        assert_eq!(b.bucket_secs(), 2);
        assert_eq!(b.window_buckets(), 1800);
    }

    #[test]
    fn negative_timestamps_bucket_downwards() {
        let b = Bucketing::for_window(Window::DEFAULT);
        assert_eq!(b.bucket_of(-1), -1);
        assert_eq!(b.bucket_of(0), 0);
        assert_eq!(b.bucket_of(59), 0);
        assert_eq!(b.bucket_of(60), 1);
    }

    proptest! {
        /// Bucketed membership differs from exact membership only within one bucket of the exact
        /// start (ts) and end (ts + window): the promised time error.
        #[test]
        fn bucketed_error_is_below_one_bucket(
            window in 1u64..=40 * 86_400,
            ts in 1_000_000_000i64..2_000_000_000,
            offset in -200_000i64..4_000_000,
        ) {
            let w = Window::from_secs(window).unwrap();
            let b = Bucketing::for_window(w);
            let at = ts + offset;
            let exact = w.is_live(ts, at);
            let bucketed = b.is_live_bucket(b.bucket_of(ts), at);
            if exact != bucketed {
                let bs = b.bucket_secs();
                let near_start = (at - ts).abs() < bs;
                let near_end = (at - (ts + window as i64)).abs() < bs;
                prop_assert!(near_start || near_end,
                    "window {window} ts {ts} at {at}: exact {exact} bucketed {bucketed}");
                prop_assert!(bs <= Bucketing::MAX_BUCKET_SECS);
            }
        }
    }
}
