//! The expected-count model for `--verify`: for every (user, segment) the generator got
//! acknowledged, the latest ts it sent, and from that the count the server should report.
//!
//! Memory: one `HashMap<u32, u32>` per segment (user index → latest ts as unix seconds), 8 bytes
//! per entry plus one control byte, at a load factor between 7/16 and 7/8: about 10-20 bytes per
//! distinct (user, segment) membership sent. A few million pairs cost tens of MB.
//!
//! Tolerance: stores may count by time bucket rather than by second (the embedded store uses
//! buckets of `clamp(ceil(window / 2048), 1, 60)` seconds), so a membership may end up to one
//! bucket early or late. Pairs sent without ts get the server's receive time, which the model
//! only knows as the client's send time (a little earlier). And the client's clock may be ahead
//! of the server's, so a ts just sent may still lie ahead of `as_of`. A membership whose latest
//! ts lies within [`Tolerance::expiry`] seconds of the expiry edge `as_of - window`, or within
//! [`Tolerance::now`] seconds after `as_of`, may or may not be counted: the model gives each
//! segment a range `[certain, certain + uncertain]`, and a count inside it matches.

use std::collections::HashMap;

use foldhash::fast::FixedState;
use serde::Serialize;

use crate::workload::GenPair;

/// Latest ts per membership, per segment.
pub struct Model {
    segments: Vec<HashMap<u32, u32, FixedState>>,
}

/// What one segment should count at `as_of`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Expected {
    /// By the exact rule `as_of - window < ts <= as_of`.
    pub exact: u64,
    /// Members certainly counted whatever the bucketing or send delay.
    pub min: u64,
    /// `min` plus the members within the tolerance of an edge.
    pub max: u64,
}

/// Seconds of uncertainty around the edges of the window, see the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Tolerance {
    /// Around `as_of - window`: the expiry bucket, plus the send-to-stamp delay for pairs
    /// without ts.
    pub expiry: u64,
    /// After `as_of`: clock skew.
    pub now: u64,
}

/// The expiry bucket of the embedded store for a window (seconds): the coarsest expiry
/// granularity the model assumes.
pub fn bucket_secs(window: u64) -> u64 {
    window.div_ceil(2048).clamp(1, 60)
}

fn ts_u32(ts: i64) -> u32 {
    ts.clamp(0, i64::from(u32::MAX)) as u32
}

impl Model {
    pub fn new(segments: u32) -> Model {
        Model {
            segments: (0..segments).map(|_| HashMap::default()).collect(),
        }
    }

    /// Records acknowledged pairs; pairs without ts count as sent at `sent_at`.
    pub fn record(&mut self, pairs: &[GenPair], sent_at: i64) {
        for p in pairs {
            let ts = ts_u32(p.ts.unwrap_or(sent_at));
            let e = self.segments[p.segment as usize]
                .entry(p.user)
                .or_insert(ts);
            *e = (*e).max(ts);
        }
    }

    /// Distinct (user, segment) memberships recorded.
    pub fn memberships(&self) -> u64 {
        self.segments.iter().map(|m| m.len() as u64).sum()
    }

    /// Approximate heap bytes held.
    pub fn memory_bytes(&self) -> u64 {
        self.segments.iter().map(|m| m.capacity() as u64 * 9).sum()
    }

    /// The expected count of every segment at `as_of` for a `window`.
    pub fn expected(&self, as_of: i64, window: u64, tolerance: Tolerance) -> Vec<Expected> {
        let expiry = as_of - window as i64;
        let tol = tolerance.expiry as i64;
        let ahead = tolerance.now as i64;
        self.segments
            .iter()
            .map(|m| {
                let mut e = Expected::default();
                for &ts in m.values() {
                    let ts = i64::from(ts);
                    if ts > expiry && ts <= as_of {
                        e.exact += 1;
                    }
                    if ts > expiry + tol && ts <= as_of {
                        e.min += 1;
                        e.max += 1;
                    } else if (ts > expiry - tol && ts <= expiry + tol)
                        || (ts > as_of && ts <= as_of + ahead)
                    {
                        e.max += 1;
                    }
                }
                e
            })
            .collect()
    }
}

/// A segment whose count is outside the expected range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Mismatch {
    pub segment: String,
    pub actual: u64,
    pub expected: u64,
    pub expected_min: u64,
    pub expected_max: u64,
}

/// Server counts against the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Comparison {
    pub segments_checked: usize,
    /// Sum over the segments of the expected counts (exact rule) and of the server's counts.
    pub expected_users: u64,
    pub actual_users: u64,
    /// Sum over segments of the memberships within the tolerance band.
    pub uncertain: u64,
    /// Largest `|actual - exact| / max(exact, 1)` over the segments.
    pub max_relative_error: f64,
    pub mismatches: Vec<Mismatch>,
}

/// Compares `actual(segment name)` (0 when the server does not list it) with `expected`, whose
/// index `s` is the segment named `names[s]`.
pub(crate) fn compare(
    names: &[Box<str>],
    expected: &[Expected],
    actual: impl Fn(&str) -> u64,
) -> Comparison {
    let mut c = Comparison {
        segments_checked: expected.len(),
        ..Comparison::default()
    };
    for (name, e) in names.iter().zip(expected) {
        let got = actual(name);
        c.expected_users += e.exact;
        c.actual_users += got;
        c.uncertain += e.max - e.min;
        let rel = got.abs_diff(e.exact) as f64 / e.exact.max(1) as f64;
        c.max_relative_error = c.max_relative_error.max(rel);
        if got < e.min || got > e.max {
            c.mismatches.push(Mismatch {
                segment: name.to_string(),
                actual: got,
                expected: e.exact,
                expected_min: e.min,
                expected_max: e.max,
            });
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(user: u32, segment: u32, ts: Option<i64>) -> GenPair {
        GenPair { user, segment, ts }
    }

    #[test]
    fn hand_made_example() {
        let window = 1000;
        let as_of = 10_000;
        let mut m = Model::new(3);
        // Segment 0: u1 re-sent with an older ts (the latest wins), u2 expired, u3 exactly at
        // the edge (ts = as_of - window is expired), u4 one second inside.
        m.record(&[p(1, 0, Some(9_500)), p(1, 0, Some(8_000))], 0);
        m.record(
            &[
                p(2, 0, Some(8_500)),
                p(3, 0, Some(9_000)),
                p(4, 0, Some(9_001)),
            ],
            0,
        );
        // Segment 1: u1 was expired, then refreshed; u5 has no ts: sent at 9_990.
        m.record(&[p(1, 1, Some(8_000))], 0);
        m.record(&[p(1, 1, Some(9_999)), p(5, 1, None)], 9_990);
        // Segment 2: nothing live (u7 expired a second ago).
        m.record(&[p(7, 2, Some(8_999))], 0);
        assert_eq!(m.memberships(), 7);

        let exact = m.expected(as_of, window, Tolerance::default());
        assert_eq!(exact.iter().map(|e| e.exact).collect::<Vec<_>>(), [2, 2, 0]);
        assert!(exact.iter().all(|e| e.min == e.exact && e.max == e.exact));

        // With 2 s of tolerance, u3 (at the edge) and u4 (1 s inside) become uncertain in 0.
        let tol = m.expected(as_of, window, Tolerance { expiry: 2, now: 0 });
        assert_eq!(
            tol[0],
            Expected {
                exact: 2,
                min: 1,
                max: 3
            }
        );
        assert_eq!(
            tol[1],
            Expected {
                exact: 2,
                min: 2,
                max: 2
            }
        );
        // u7 expired 1 s before as_of: within the tolerance, so it may still be counted.
        assert_eq!(
            tol[2],
            Expected {
                exact: 0,
                min: 0,
                max: 1
            }
        );

        // Later, u1 in segment 0 has expired too.
        let later = m.expected(10_500, window, Tolerance::default());
        assert_eq!(later.iter().map(|e| e.exact).collect::<Vec<_>>(), [0, 2, 0]);

        // Seen from 9_999 (u1 in segment 1 is 0 s ahead, fine), and from 9_998 with 1 s of clock
        // skew allowed: u1's ts 9_999 lies ahead of as_of, so it may or may not be counted.
        let early = m.expected(9_998, window, Tolerance { expiry: 0, now: 1 });
        assert_eq!(
            early[1],
            Expected {
                exact: 1,
                min: 1,
                max: 2
            }
        );
    }

    #[test]
    fn comparison() {
        let names: Vec<Box<str>> = vec!["a".into(), "b".into(), "c".into()];
        let expected = [
            Expected {
                exact: 10,
                min: 9,
                max: 11,
            },
            Expected {
                exact: 5,
                min: 5,
                max: 5,
            },
            Expected {
                exact: 0,
                min: 0,
                max: 0,
            },
        ];
        let ok = compare(&names, &expected, |s| match s {
            "a" => 11,
            "b" => 5,
            _ => 0,
        });
        assert!(ok.mismatches.is_empty());
        assert_eq!(ok.uncertain, 2);
        assert_eq!((ok.expected_users, ok.actual_users), (15, 16));
        assert!((ok.max_relative_error - 0.1).abs() < 1e-9);
        let bad = compare(&names, &expected, |s| match s {
            "a" => 10,
            "b" => 4,
            _ => 3,
        });
        assert_eq!(bad.mismatches.len(), 2);
        assert_eq!(bad.mismatches[0].segment, "b");
        assert_eq!(bad.mismatches[1].actual, 3);
        assert!((bad.max_relative_error - 3.0).abs() < 1e-9);
    }

    #[test]
    fn buckets() {
        assert_eq!(bucket_secs(14 * 86_400), 60);
        assert_eq!(bucket_secs(120), 1);
        assert_eq!(bucket_secs(34 * 3600), 60);
        assert_eq!(bucket_secs(10_000), 5);
    }
}
