//! Durations in query strings (`within=7d`, `step=1h`) and the `within` lookback.

use crate::{Bucketing, UnixSeconds, Window};

/// Why a duration in a query was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "{0:?} is not a duration; write a number and a unit (s, m, h, d, w) such as 90m, 36h or 7d"
    )]
    Malformed(String),
    #[error("{0:?} is too long a duration")]
    Overflow(String),
    #[error("within must be longer than 0 s")]
    Zero,
    #[error("within is {secs} s, longer than the window of {window} s")]
    BeyondWindow { secs: u64, window: u64 },
}

/// Parses `90m`, `36h`, `7d`, `1d12h`, `30s`, `2w` (integer amounts, units s m h d w, several
/// terms summed; no spaces) into seconds.
pub fn parse_duration(text: &str) -> Result<u64, DurationError> {
    let malformed = || DurationError::Malformed(text.to_owned());
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return Err(malformed());
    }
    let mut total: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || i == bytes.len() {
            return Err(malformed());
        }
        let n: u64 = text[start..i]
            .parse()
            .map_err(|_| DurationError::Overflow(text.to_owned()))?;
        let unit = match bytes[i] {
            b's' => 1,
            b'm' => 60,
            b'h' => 3600,
            b'd' => 86_400,
            b'w' => 7 * 86_400,
            _ => return Err(malformed()),
        };
        i += 1;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    }
    Ok(total)
}

/// A lookback: count only memberships whose latest ts is newer than `at - within`.
/// Always `0 < within <= window`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Within {
    secs: u64,
}

impl Within {
    pub fn from_secs(secs: u64, window: Window) -> Result<Within, DurationError> {
        if secs == 0 {
            return Err(DurationError::Zero);
        }
        if secs > window.secs() {
            return Err(DurationError::BeyondWindow {
                secs,
                window: window.secs(),
            });
        }
        Ok(Within { secs })
    }

    /// Parses a duration text such as `7d` and checks it against the window.
    pub fn parse(text: &str, window: Window) -> Result<Within, DurationError> {
        Within::from_secs(parse_duration(text)?, window)
    }

    /// The whole window (what a query without `within` means).
    pub fn full(window: Window) -> Within {
        Within {
            secs: window.secs(),
        }
    }

    pub fn secs(self) -> u64 {
        self.secs
    }

    /// Is a membership whose latest ts is `ts` counted at `at`? Exactly: `ts > at - within`.
    /// As for counts, a ts ahead of `at` (accepted pairs may be up to 5 minutes ahead of the
    /// clock) counts from the moment it was accepted.
    pub fn is_live(self, ts: UnixSeconds, at: UnixSeconds) -> bool {
        // Bounded by the window's 10-year maximum, so it fits.
        ts > at.saturating_sub(self.secs as i64)
    }
}

impl Bucketing {
    /// The live buckets at `at` for a lookback: `(lo, hi]` (stores count buckets above `hi` too:
    /// pairs ahead of the clock). For `within` = the window this is
    /// [`Bucketing::live_range`]; shorter lookbacks are rounded up to whole buckets, so the time
    /// error stays below one bucket as for the window.
    pub fn live_range_within(self, at: UnixSeconds, within: Within) -> (i64, i64) {
        let hi = self.bucket_of(at);
        let bs = self.bucket_secs();
        let n = ((within.secs() as i64 + bs - 1) / bs).min(self.window_buckets());
        (hi - n, hi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90m"), Ok(5400));
        assert_eq!(parse_duration("36h"), Ok(129_600));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert_eq!(parse_duration("1d12h"), Ok(129_600));
        assert_eq!(parse_duration("2w"), Ok(1_209_600));
        assert_eq!(parse_duration("45s"), Ok(45));
        assert_eq!(parse_duration("0m"), Ok(0));
        for bad in ["", "7", "d", "7x", "7 d", "-7d", "7d ", "1.5h", "７d", "h1"] {
            assert_eq!(
                parse_duration(bad),
                Err(DurationError::Malformed(bad.into())),
                "{bad:?}"
            );
        }
        assert!(matches!(
            parse_duration("99999999999999999999d"),
            Err(DurationError::Overflow(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999w"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn within_bounds() {
        let w = Window::DEFAULT;
        assert_eq!(Within::parse("0m", w), Err(DurationError::Zero));
        assert_eq!(Within::parse("14d", w).map(Within::secs), Ok(1_209_600));
        assert_eq!(
            Within::parse("15d", w),
            Err(DurationError::BeyondWindow {
                secs: 1_296_000,
                window: 1_209_600
            })
        );
        assert_eq!(
            Within::parse("14d1s", w).unwrap_err().to_string(),
            "within is 1209601 s, longer than the window of 1209600 s"
        );
        assert_eq!(Within::full(w).secs(), w.secs());
    }

    #[test]
    fn full_within_is_the_live_range() {
        for secs in [1u64, 59, 60, 3600, 14 * 86_400, 40 * 86_400] {
            let w = Window::from_secs(secs).unwrap();
            let b = Bucketing::for_window(w);
            for at in [0i64, 1_764_000_000, 1_764_000_037] {
                assert_eq!(b.live_range_within(at, Within::full(w)), b.live_range(at));
            }
        }
    }

    proptest! {
        /// Bucketed `within` differs from the exact rule only within one bucket of the edges.
        #[test]
        fn bucketed_within_error_is_below_one_bucket(
            within in 1u64..=14 * 86_400,
            ts in 1_000_000_000i64..2_000_000_000,
            age in -400i64..1_300_000,
        ) {
            let w = Window::DEFAULT;
            let b = Bucketing::for_window(w);
            let d = Within::from_secs(within, w).unwrap();
            let at = ts + age;
            let exact = d.is_live(ts, at);
            let (lo, _) = b.live_range_within(at, d);
            let bucketed = b.bucket_of(ts) > lo;
            if exact != bucketed {
                let bs = b.bucket_secs();
                prop_assert!((at - (ts + within as i64)).abs() < bs,
                    "within {within} ts {ts} at {at}");
            }
        }
    }
}
