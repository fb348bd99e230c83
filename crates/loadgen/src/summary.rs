//! The result of a run, printed for humans or as one JSON object.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::model::{Comparison, Tolerance};

/// Request latency in milliseconds. For `grpc` (PushStream) one sample is a whole stream.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    pub unit: &'static str,
    pub samples: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The outcome of `--verify`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct VerifyReport {
    /// No segment outside its expected range (or the server did not claim exact counts).
    pub ok: bool,
    /// The server's `exact` flag.
    pub exact: bool,
    pub as_of: i64,
    pub window_seconds: u64,
    /// Seconds of uncertainty at the window's edges.
    pub tolerance: Tolerance,
    /// Listings fetched before the counts matched (or the wait ended).
    pub polls: u32,
    pub waited_secs: f64,
    /// Distinct (user, segment) memberships the model holds, and its approximate size.
    pub memberships: u64,
    pub model_bytes: u64,
    /// Segments the server lists that this run did not send to (ignored).
    pub other_segments: usize,
    #[serde(flatten)]
    pub comparison: Comparison,
    /// Why verification could not complete, if it could not.
    pub error: Option<String>,
}

/// `--fill`: the workload sent.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FillReport {
    /// The live pairs asked for.
    pub target_live_pairs: u64,
    /// The memberships of the workload, each sent once: the live pairs a fresh store holds
    /// afterwards.
    pub memberships: u64,
    /// The Zipf exponent of segment sizes solved for the target.
    pub skew: f64,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub protocol: &'static str,
    pub target: String,
    pub users: u32,
    pub segments: u32,
    pub batch: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// Effective spread of event times (0: no ts).
    pub ts_spread_secs: u64,
    /// Distinct pairs generated (each sent until accepted or the run failed).
    pub pairs_generated: u64,
    /// Of those, re-sends of earlier pairs.
    pub resends: u64,
    /// Pairs transmitted, counting retransmissions after overload.
    pub pairs_sent: u64,
    /// The sum of the server's `accepted`.
    pub pairs_accepted: u64,
    /// Successful requests (or streams).
    pub requests: u64,
    /// Requests (or streams) sent again after a retryable error.
    pub retries: u64,
    pub elapsed_secs: f64,
    /// `pairs_accepted / elapsed_secs`.
    pub pairs_per_sec: f64,
    /// `--rate`: the pairs per second the run was paced to (`None`: unlimited).
    pub rate_limit_pairs_per_sec: Option<f64>,
    pub latency: Latency,
    /// Failed attempts by gRPC code, `http_<status>` or `transport`.
    pub errors: BTreeMap<String, u64>,
    /// The error that stopped the run early, if any.
    pub fatal: Option<String>,
    pub verify: Option<VerifyReport>,
    /// `--fill`: the workload that was sent.
    pub fill: Option<FillReport>,
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let head = match s.len() % 3 {
        0 => 3,
        r => r,
    };
    let mut out = s[..head].to_string();
    for group in s.as_bytes()[head..].chunks(3) {
        out.push(',');
        out.extend(group.iter().map(|&b| char::from(b)));
    }
    out
}

/// A rate as given: with thousands separators when whole.
fn rate(r: f64) -> String {
    if r.fract() == 0.0 && r < 1e18 {
        thousands(r as u64)
    } else {
        format!("{r}")
    }
}

impl Summary {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    pub fn human(&self) -> String {
        let mut s = String::new();
        let spread = if self.ts_spread_secs == 0 {
            "no ts".to_string()
        } else {
            format!(
                "ts spread {}",
                humantime::format_duration(std::time::Duration::from_secs(self.ts_spread_secs))
            )
        };
        let _ = writeln!(
            s,
            "userseg load: {} -> {}  ({} workers, batch {}, {} users, {} segments, {}, seed {})",
            self.protocol,
            self.target,
            self.concurrency,
            self.batch,
            thousands(u64::from(self.users)),
            self.segments,
            spread,
            self.seed
        );
        let resend_pct = if self.pairs_generated > 0 {
            100.0 * self.resends as f64 / self.pairs_generated as f64
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "  pairs       {} generated ({resend_pct:.1}% re-sends), {} sent, {} accepted",
            thousands(self.pairs_generated),
            thousands(self.pairs_sent),
            thousands(self.pairs_accepted)
        );
        let _ = writeln!(
            s,
            "  requests    {} ok, {} retried",
            thousands(self.requests),
            thousands(self.retries)
        );
        if let Some(f) = &self.fill {
            let _ = writeln!(
                s,
                "  fill        {} memberships (asked {}), segment sizes Zipf with exponent {:.4}",
                thousands(f.memberships),
                thousands(f.target_live_pairs),
                f.skew
            );
        }
        let _ = writeln!(s, "  elapsed     {:.2} s", self.elapsed_secs);
        let _ = write!(
            s,
            "  throughput  {} pairs/s",
            thousands(self.pairs_per_sec.round() as u64)
        );
        match self.rate_limit_pairs_per_sec {
            Some(r) if r > 0.0 => {
                let _ = writeln!(
                    s,
                    "  (paced: --rate {} pairs/s, {:.1}% of it)",
                    rate(r),
                    100.0 * self.pairs_per_sec / r
                );
            }
            _ => s.push('\n'),
        }
        let _ = writeln!(
            s,
            "  latency     p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (per {}, {} samples)",
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.latency.unit,
            self.latency.samples
        );
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors      none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k} {}", thousands(*v)))
                .collect();
            let _ = writeln!(s, "  errors      {}", list.join(", "));
        }
        if let Some(f) = &self.fatal {
            let _ = writeln!(s, "  STOPPED     {f}");
        }
        if let Some(v) = &self.verify {
            v.human(&mut s);
        }
        s
    }
}

impl VerifyReport {
    /// The verification's lines of [`Summary::human`].
    fn human(&self, s: &mut String) {
        let v = self;
        let c = &v.comparison;
        let verdict = match (&v.error, v.ok, c.mismatches.is_empty()) {
            (Some(e), _, _) => format!("FAILED: {e}"),
            (None, true, true) => format!("OK: {} segments match", c.segments_checked),
            (None, true, false) => format!(
                "{} of {} segments differ, but the server's counts are not exact",
                c.mismatches.len(),
                c.segments_checked
            ),
            (None, false, _) => format!(
                "FAILED: {} of {} segments differ",
                c.mismatches.len(),
                c.segments_checked
            ),
        };
        let _ = writeln!(s, "  verify      {verdict}");
        let _ = writeln!(
            s,
            "              as_of {}, window {} s, tolerance {} s at expiry and {} s ahead ({} memberships near an edge), largest relative error {:.6}",
            v.as_of,
            v.window_seconds,
            v.tolerance.expiry,
            v.tolerance.now,
            c.uncertain,
            c.max_relative_error
        );
        let expired = v.memberships.saturating_sub(c.expected_users);
        let _ = writeln!(
            s,
            "              users summed over segments: server {}, expected {} (of {} memberships sent, {} expired)",
            thousands(c.actual_users),
            thousands(c.expected_users),
            thousands(v.memberships),
            thousands(expired)
        );
        let _ = writeln!(
            s,
            "              {} polls over {:.2} s; model {:.1} MiB",
            v.polls,
            v.waited_secs,
            v.model_bytes as f64 / (1 << 20) as f64
        );
        for m in c.mismatches.iter().take(10) {
            let _ = writeln!(
                s,
                "              {}: server {} expected {} (range {}..={})",
                m.segment, m.actual, m.expected, m.expected_min, m.expected_max
            );
        }
        if c.mismatches.len() > 10 {
            let _ = writeln!(s, "              ... and {} more", c.mismatches.len() - 10);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatting() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
        let mut s = Summary {
            protocol: "grpc",
            pairs_generated: 10,
            ..Summary::default()
        };
        s.errors.insert("RESOURCE_EXHAUSTED".into(), 3);
        let h = s.human();
        assert!(h.contains("RESOURCE_EXHAUSTED 3"), "{h}");
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["errors"]["RESOURCE_EXHAUSTED"], 3);
        assert_eq!(v["verify"], serde_json::Value::Null);
        assert_eq!(v["rate_limit_pairs_per_sec"], serde_json::Value::Null);
        assert!(!h.contains("paced"), "{h}");
    }

    #[test]
    fn rate_limit() {
        let s = Summary {
            protocol: "http",
            pairs_accepted: 2_000_000,
            elapsed_secs: 10.0,
            pairs_per_sec: 199_000.0,
            rate_limit_pairs_per_sec: Some(200_000.0),
            ..Summary::default()
        };
        let h = s.human();
        assert!(
            h.contains(
                "throughput  199,000 pairs/s  (paced: --rate 200,000 pairs/s, 99.5% of it)\n"
            ),
            "{h}"
        );
        let v: serde_json::Value = serde_json::from_str(&s.to_json()).unwrap();
        assert_eq!(v["rate_limit_pairs_per_sec"], 200_000.0);
        assert_eq!(v["pairs_per_sec"], 199_000.0);
        assert_eq!(rate(0.5), "0.5");
    }

    #[test]
    fn verify_lines() {
        let mismatch = |k: u64| crate::model::Mismatch {
            segment: format!("seg-{k}"),
            actual: 5,
            expected: 7,
            expected_min: 6,
            expected_max: 8,
        };
        let s = Summary {
            protocol: "http",
            verify: Some(VerifyReport {
                ok: false,
                exact: true,
                memberships: 1000,
                comparison: Comparison {
                    segments_checked: 20,
                    expected_users: 900,
                    actual_users: 880,
                    mismatches: (0..12).map(mismatch).collect(),
                    ..Comparison::default()
                },
                ..VerifyReport::default()
            }),
            ..Summary::default()
        };
        let h = s.human();
        assert!(
            h.contains("  verify      FAILED: 12 of 20 segments differ\n"),
            "{h}"
        );
        assert!(
            h.contains("server 880, expected 900 (of 1,000 memberships sent, 100 expired)"),
            "{h}"
        );
        assert!(
            h.contains("seg-9: server 5 expected 7 (range 6..=8)\n"),
            "{h}"
        );
        assert!(!h.contains("seg-10:"), "{h}");
        assert!(h.contains("... and 2 more\n"), "{h}");
    }
}
