//! Command-line flags (each also a `LOAD_*` environment variable).

use std::time::Duration;

use clap::builder::BoolishValueParser;
use clap::{Args, Parser, ValueEnum};

use crate::encode::valid_prefix;
use crate::LoadError;

fn duration(v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v.trim())
        .map_err(|e| format!("{v:?} is not a duration (write e.g. 30s, 5m, 20d): {e}"))
}

fn rate(v: &str) -> Result<f64, String> {
    match v.trim().parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        Ok(_) => Err(format!(
            "{v:?}: the rate must be a number of pairs per second above 0"
        )),
        Err(e) => Err(format!("{v:?} is not a number of pairs per second: {e}")),
    }
}

/// How pairs are pushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Protocol {
    /// gRPC `PushStream`: each stream carries `--stream-batches` messages of `--batch` pairs.
    Grpc,
    /// gRPC `Push`: one request per batch.
    GrpcUnary,
    /// HTTP `POST /v1/pairs`: one request per batch.
    Http,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::GrpcUnary => "grpc-unary",
            Protocol::Http => "http",
        }
    }
}

/// The HTTP request body format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HttpBody {
    /// `{"pairs":[...]}` as application/json.
    Json,
    /// One pair per line as application/x-ndjson.
    Ndjson,
}

/// `userseg load`: pushes a synthetic, skewed workload and reports throughput and latency;
/// with `--verify`, checks the server's counts against what was sent.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server URL (gRPC and HTTP share the port), e.g. http://127.0.0.1:8080.
    #[arg(long, env = "LOAD_TARGET", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// grpc (PushStream), grpc-unary (Push) or http (POST /v1/pairs).
    #[arg(long, env = "LOAD_PROTOCOL", value_enum, default_value_t = Protocol::Grpc)]
    pub protocol: Protocol,
    /// Distinct users (user ids are --user-prefix plus 0..users).
    #[arg(long, env = "LOAD_USERS", default_value_t = 1_000_000)]
    pub users: u32,
    /// Segments (named --segment-prefix plus 0..segments); segment s holds users/(s+1)^skew users.
    #[arg(long, env = "LOAD_SEGMENTS", default_value_t = 100)]
    pub segments: u32,
    /// Total pairs to send [default: 1000000 unless --duration or --fill is given].
    #[arg(long, env = "LOAD_PAIRS", conflicts_with_all = ["duration", "fill"])]
    pub pairs: Option<u64>,
    /// Send for this long instead of a number of pairs, e.g. 30s.
    #[arg(long, env = "LOAD_DURATION", value_parser = duration, conflicts_with = "fill")]
    pub duration: Option<Duration>,
    /// Fill a store with about this many live pairs, fast: every membership of a workload
    /// whose Zipf exponent is solved for this total (--skew is ignored) is sent exactly once,
    /// user by user, so the segments of a user travel in the same request; no re-sends.
    #[arg(long, env = "LOAD_FILL", value_name = "LIVE_PAIRS")]
    pub fill: Option<u64>,
    /// Write one line per acknowledged request (or stream) to this file: its start (unix
    /// milliseconds), its latency (microseconds) and its pairs, space-separated.
    #[arg(long, env = "LOAD_LATENCY_LOG")]
    pub latency_log: Option<std::path::PathBuf>,
    /// Offer at most this many pairs per second, over all workers together (retransmissions
    /// included; a stall is caught up by at most 1 s of pairs). Unlimited when not given.
    #[arg(long, env = "LOAD_RATE", value_parser = rate, value_name = "PAIRS_PER_SEC")]
    pub rate: Option<f64>,
    /// Pairs per request (HTTP, gRPC Push) or per stream message (PushStream).
    #[arg(long, env = "LOAD_BATCH", default_value_t = 1000)]
    pub batch: usize,
    /// Parallel streams or requests, each on its own connection.
    #[arg(long, env = "LOAD_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Messages per PushStream call (a failed stream is retried whole).
    #[arg(long, env = "LOAD_STREAM_BATCHES", default_value_t = 32)]
    pub stream_batches: usize,
    /// Spread event times uniformly over this past interval (e.g. 20d; capped just below the
    /// server's window). 0: pairs carry no ts and the server uses its clock.
    #[arg(long, env = "LOAD_TS_SPREAD", default_value = "0s", value_parser = duration)]
    pub ts_spread: Duration,
    /// Fraction of pairs that are exact re-sends of recently sent pairs.
    #[arg(long, env = "LOAD_RESEND_RATIO", default_value_t = 0.1)]
    pub resend_ratio: f64,
    /// Zipf exponent of segment sizes: 0 makes all segments hold every user.
    #[arg(long, env = "LOAD_SKEW", default_value_t = 1.0)]
    pub skew: f64,
    /// Seed of the workload: the same seed, concurrency and pair count send the same (user,
    /// segment) pairs.
    #[arg(long, env = "LOAD_SEED", default_value_t = 1)]
    pub seed: u64,
    /// Prefix of user ids ([A-Za-z0-9_.:-]*).
    #[arg(long, env = "LOAD_USER_PREFIX", default_value = "user-")]
    pub user_prefix: String,
    /// Prefix of segment names ([A-Za-z0-9_.:-]*); use a fresh one to verify on a server that
    /// already holds data.
    #[arg(long, env = "LOAD_SEGMENT_PREFIX", default_value = "seg-")]
    pub segment_prefix: String,
    /// HTTP body format: json or ndjson.
    #[arg(long, env = "LOAD_HTTP_BODY", value_enum, default_value_t = HttpBody::Json)]
    pub http_body: HttpBody,
    /// Bearer token, when the server requires one: its API_TOKEN, or the token of a key with
    /// the ingest role (and read, for --verify and --ts-spread).
    #[arg(long, env = "LOAD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificates to trust for an https:// target (besides the system's), e.g. the CA
    /// that signed the server's TLS_CERT_FILE.
    #[arg(long, env = "LOAD_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// PEM client certificate for a server with mutual TLS (its TLS_CLIENT_CA_FILE), with
    /// --key-file.
    #[arg(long, env = "LOAD_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<std::path::PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, env = "LOAD_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<std::path::PathBuf>,
    /// Print the summary as one JSON object on stdout (and no progress bar).
    #[arg(long, env = "LOAD_JSON", value_parser = BoolishValueParser::new())]
    pub json: bool,
    /// After sending, compare the server's exact counts with the expected ones; fail on a
    /// difference.
    #[arg(long, env = "LOAD_VERIFY", value_parser = BoolishValueParser::new())]
    pub verify: bool,
    /// Where --verify (and the window for --ts-spread) reads the counts, when not --target:
    /// e.g. the estimation service while --target is the ingest service.
    #[arg(long, env = "LOAD_VERIFY_TARGET")]
    pub verify_target: Option<String>,
    /// Longest time --verify waits for the counts to match.
    #[arg(long, env = "LOAD_VERIFY_TIMEOUT", default_value = "60s", value_parser = duration)]
    pub verify_timeout: Duration,
    /// --verify gives up early when the counts differ and have not changed for this long (make
    /// it longer than the store's flush interval).
    #[arg(long, env = "LOAD_VERIFY_SETTLE", default_value = "5s", value_parser = duration)]
    pub verify_settle: Duration,
    /// --verify: seconds of client/server clock skew tolerated, and of delay between sending a
    /// pair without ts and the server stamping it (added to the store's expiry bucket).
    #[arg(long, env = "LOAD_VERIFY_SLACK", default_value = "2s", value_parser = duration)]
    pub verify_slack: Duration,
}

#[derive(Parser)]
#[command(name = "load")]
struct Standalone {
    #[command(flatten)]
    args: LoadArgs,
}

impl LoadArgs {
    /// Parses flags (without the program name), with the `LOAD_*` environment as fallback.
    pub fn try_from_flags<I, S>(flags: I) -> Result<LoadArgs, clap::Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        let all = std::iter::once(std::ffi::OsString::from("load"))
            .chain(flags.into_iter().map(Into::into));
        Standalone::try_parse_from(all).map(|s| s.args)
    }

    /// Pairs to send, or `None` for a timed run or a fill (which sends its workload's
    /// memberships).
    pub fn total_pairs(&self) -> Option<u64> {
        match (self.pairs, self.duration, self.fill) {
            (Some(p), _, _) => Some(p),
            (None, Some(_), _) | (None, None, Some(_)) => None,
            (None, None, None) => Some(1_000_000),
        }
    }

    pub(crate) fn validate(&self) -> Result<(), LoadError> {
        let bad = |m: String| Err(LoadError::Config(m));
        if self.users == 0 {
            return bad("LOAD_USERS: must be at least 1".into());
        }
        if !(1..=1_000_000).contains(&self.segments) {
            return bad("LOAD_SEGMENTS: must be between 1 and 1000000".into());
        }
        if self.pairs == Some(0) {
            return bad("LOAD_PAIRS: must be at least 1".into());
        }
        if let Some(fill) = self.fill {
            let most = u64::from(self.users) * u64::from(self.segments);
            if fill < u64::from(self.users) || fill > most {
                return bad(format!(
                    "LOAD_FILL: {fill} live pairs cannot be made of {} users (each in the first \
                     segment) and {} segments: give between {} and {most}",
                    self.users, self.segments, self.users
                ));
            }
        }
        if self.duration.is_some_and(|d| d.is_zero()) {
            return bad("LOAD_DURATION: must be more than 0".into());
        }
        if self.rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
            return bad("LOAD_RATE: must be a number of pairs per second above 0".into());
        }
        if !(1..=1_000_000).contains(&self.batch) {
            return bad("LOAD_BATCH: must be between 1 and 1000000".into());
        }
        if !(1..=4096).contains(&self.concurrency) {
            return bad("LOAD_CONCURRENCY: must be between 1 and 4096".into());
        }
        if !(1..=100_000).contains(&self.stream_batches) {
            return bad("LOAD_STREAM_BATCHES: must be between 1 and 100000".into());
        }
        if !(0.0..1.0).contains(&self.resend_ratio) {
            return bad(format!(
                "LOAD_RESEND_RATIO: {} must be at least 0 and below 1",
                self.resend_ratio
            ));
        }
        if !(0.0..=10.0).contains(&self.skew) {
            return bad(format!("LOAD_SKEW: {} must be between 0 and 10", self.skew));
        }
        if self.ts_spread.as_secs() > u64::from(u32::MAX) {
            return bad("LOAD_TS_SPREAD: too large".into());
        }
        for (var, p) in [
            ("LOAD_USER_PREFIX", &self.user_prefix),
            ("LOAD_SEGMENT_PREFIX", &self.segment_prefix),
        ] {
            if !valid_prefix(p) || p.len() > 100 {
                return bad(format!(
                    "{var}: {p:?} may only hold up to 100 characters of [A-Za-z0-9_.:-]"
                ));
            }
        }
        if self.verify_timeout.is_zero() {
            return bad("LOAD_VERIFY_TIMEOUT: must be more than 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_flags() {
        let a = LoadArgs::try_from_flags(["--target", "http://h:1"]).unwrap();
        assert_eq!(a.protocol, Protocol::Grpc);
        assert_eq!(a.total_pairs(), Some(1_000_000));
        assert!(a.validate().is_ok());
        let a = LoadArgs::try_from_flags([
            "--protocol",
            "http",
            "--duration",
            "30s",
            "--ts-spread",
            "20d",
        ])
        .unwrap();
        assert_eq!(a.total_pairs(), None);
        assert_eq!(a.ts_spread, Duration::from_secs(20 * 86_400));
        assert!(LoadArgs::try_from_flags(["--pairs", "5", "--duration", "1s"]).is_err());
        let a = LoadArgs::try_from_flags(["--json", "--verify"]).unwrap();
        assert!(a.json && a.verify);
        let a = LoadArgs::try_from_flags(["--resend-ratio", "1.5"]).unwrap();
        assert!(a.validate().is_err());
        let a = LoadArgs::try_from_flags(["--segment-prefix", "a b"]).unwrap();
        assert!(a.validate().is_err());
    }

    #[test]
    fn fill() {
        let a = LoadArgs::try_from_flags(["--fill", "1000000000", "--users", "10000000"]).unwrap();
        assert_eq!(a.fill, Some(1_000_000_000));
        assert_eq!(a.total_pairs(), None);
        let a = LoadArgs::try_from_flags([
            "--fill",
            "1000000000",
            "--users",
            "10000000",
            "--segments",
            "500",
        ])
        .unwrap();
        assert!(a.validate().is_ok());
        // More than users × segments, or fewer than one per user: no such workload.
        for bad in ["5000000001", "9999999"] {
            let a = LoadArgs::try_from_flags([
                "--fill",
                bad,
                "--users",
                "10000000",
                "--segments",
                "500",
            ])
            .unwrap();
            let e = a.validate().unwrap_err().to_string();
            assert!(e.starts_with("LOAD_FILL"), "{e}");
        }
        assert!(LoadArgs::try_from_flags(["--fill", "5", "--pairs", "5"]).is_err());
        assert!(LoadArgs::try_from_flags(["--fill", "5", "--duration", "5s"]).is_err());
    }

    #[test]
    fn rate() {
        let a = LoadArgs::try_from_flags(["--target", "http://h:1"]).unwrap();
        assert_eq!(a.rate, None, "unlimited by default");
        let a = LoadArgs::try_from_flags(["--rate", "200000", "--pairs", "2000000"]).unwrap();
        assert_eq!(a.rate, Some(200_000.0));
        assert_eq!(a.total_pairs(), Some(2_000_000));
        assert!(a.validate().is_ok());
        let a = LoadArgs::try_from_flags(["--rate", "0.5", "--duration", "10s"]).unwrap();
        assert_eq!(a.rate, Some(0.5));
        assert_eq!(a.total_pairs(), None);
        assert!(a.validate().is_ok());
        for bad in ["0", "-5", "0.0", "abc", "", "inf", "NaN", "1e400"] {
            let e = LoadArgs::try_from_flags([format!("--rate={bad}")]).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
            assert!(e.to_string().contains("--rate"), "{bad:?}: {e}");
        }
        // Set programmatically, it is still checked.
        let mut a = LoadArgs::try_from_flags(["--rate", "10"]).unwrap();
        a.rate = Some(0.0);
        assert!(a
            .validate()
            .unwrap_err()
            .to_string()
            .starts_with("LOAD_RATE"));
    }
}
