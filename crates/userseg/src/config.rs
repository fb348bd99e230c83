//! Command-line flags (each also an environment variable) and their validation into typed
//! configuration, once, at start-up. Every error names the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use userseg_api::{Authenticator, TlsFiles, TlsReloader};
use userseg_domain::{Limits, Window};
use userseg_usecase::BatchConfig;

mod clickhouse;
mod distributed;
#[cfg(test)]
mod documented;
mod kafka;

pub use clickhouse::ClickHouseArgs;
pub use distributed::{EsArgs, EsConfig, IndexMode, MigrateArgs, UssArgs, UssConfig};
pub use kafka::KafkaArgs;

pub fn duration(var: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value.trim()).with_context(|| {
        format!("{var}: {value:?} is not a duration (write e.g. 200ms, 30s, 5m, 14d)")
    })
}

#[derive(Args, Debug, Clone)]
pub struct ServiceArgs {
    /// Address to listen on (gRPC and HTTP share the port).
    #[arg(long, env = "SERVICE_HOST", default_value = "127.0.0.1")]
    pub service_host: String,
    /// Port to listen on.
    #[arg(long, env = "SERVICE_PORT", default_value_t = 8080)]
    pub service_port: u16,
    /// When set, the API requires `Authorization: Bearer <API_TOKEN>` (probes and /metrics do not):
    /// a shortcut for one key with the admin role.
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// TOML file of API keys with roles (`[[key]]` name, sha256, roles); reloaded on SIGHUP.
    #[arg(long, env = "API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// PEM certificate chain: serve HTTPS and gRPC over TLS (with TLS_KEY_FILE); reloaded on SIGHUP.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA certificates: when set, clients must present a certificate they signed (mutual TLS).
    #[arg(long, env = "TLS_CLIENT_CA_FILE", requires = "tls_cert_file")]
    pub tls_client_ca_file: Option<PathBuf>,
    /// How long a membership lives after the latest ts of its pair.
    #[arg(long, env = "WINDOW", default_value = "14d")]
    pub window: String,
    /// Most pairs in one request.
    #[arg(long, env = "MAX_PAIRS_PER_REQUEST", default_value_t = 100_000)]
    pub max_pairs_per_request: usize,
    /// Largest request body or gRPC message, e.g. 16MiB.
    #[arg(long, env = "MAX_REQUEST_BYTES", default_value = "16MiB")]
    pub max_request_bytes: String,
}

#[derive(Args, Debug, Clone)]
pub struct BatchArgs {
    /// Pairs per batch written to the store (1 to 2,000,000) [default: standalone 1000, es 100000].
    #[arg(long, env = "BATCH_SIZE")]
    pub batch_size: Option<usize>,
    /// Longest time a pair waits in a batch before the batch is written [default: standalone 100ms, es 30s].
    #[arg(long, env = "FLUSH_INTERVAL")]
    pub flush_interval: Option<String>,
    /// Retries of a batch the store rejects for good, before it is dead-lettered.
    #[arg(long, env = "RETRY_ATTEMPTS", default_value_t = 3)]
    pub retry_attempts: u32,
    /// First retry backoff (doubles each retry up to RETRY_BACKOFF_MAX).
    #[arg(long, env = "RETRY_BACKOFF", default_value = "100ms")]
    pub retry_backoff: String,
    /// Longest retry backoff.
    #[arg(long, env = "RETRY_BACKOFF_MAX", default_value = "10s")]
    pub retry_backoff_max: String,
}

#[derive(Clone)]
pub struct ServiceConfig {
    pub addr: SocketAddr,
    /// API keys (API_TOKEN, API_KEYS_FILE); `None`: the API is open.
    pub auth: Option<Authenticator>,
    /// TLS_CERT_FILE, TLS_KEY_FILE, TLS_CLIENT_CA_FILE; `None`: plaintext.
    pub tls: Option<TlsReloader>,
    pub window: Window,
    pub limits: Limits,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("addr", &self.addr)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("window", &self.window)
            .field("limits", &self.limits)
            .finish()
    }
}

fn bytes(var: &str, value: &str) -> Result<usize> {
    let v = value.trim();
    let (num, mult) = if let Some(n) = v.strip_suffix("GiB") {
        (n, 1 << 30)
    } else if let Some(n) = v.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = v.strip_suffix("KiB") {
        (n, 1 << 10)
    } else if let Some(n) = v.strip_suffix('B') {
        (n, 1)
    } else {
        (v, 1)
    };
    let n: usize = num
        .trim()
        .parse()
        .with_context(|| format!("{var}: {value:?} is not a size (write e.g. 16MiB or 1048576)"))?;
    n.checked_mul(mult)
        .with_context(|| format!("{var}: {value:?} is too large"))
}

impl ServiceArgs {
    pub fn validate(&self) -> Result<ServiceConfig> {
        let ip: std::net::IpAddr = self
            .service_host
            .parse()
            .or_else(|_| {
                if self.service_host == "localhost" {
                    Ok("127.0.0.1".parse().expect("literal"))
                } else {
                    Err(())
                }
            })
            .map_err(|_| {
                anyhow::anyhow!(
                    "SERVICE_HOST: {:?} is not an IP address (use e.g. 127.0.0.1 or 0.0.0.0)",
                    self.service_host
                )
            })?;
        let w = duration("WINDOW", &self.window)?;
        if w.subsec_nanos() != 0 {
            bail!(
                "WINDOW: {:?} must be a whole number of seconds",
                self.window
            );
        }
        let window = Window::from_secs(w.as_secs()).map_err(|e| anyhow::anyhow!("WINDOW: {e}"))?;
        if !(1..=1_000_000).contains(&self.max_pairs_per_request) {
            bail!(
                "MAX_PAIRS_PER_REQUEST: {} must be between 1 and 1000000",
                self.max_pairs_per_request
            );
        }
        let max_request_bytes = bytes("MAX_REQUEST_BYTES", &self.max_request_bytes)?;
        if !(1024..=(256 << 20)).contains(&max_request_bytes) {
            bail!("MAX_REQUEST_BYTES: must be between 1KiB and 256MiB");
        }
        if let Some(t) = &self.api_token {
            if t.len() < 16 {
                bail!("API_TOKEN: must be at least 16 characters");
            }
        }
        let auth = Authenticator::new(self.api_token.as_deref(), self.api_keys_file.as_deref())?;
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsReloader::load(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca_file.clone(),
            })?),
            _ => None,
        };
        Ok(ServiceConfig {
            addr: SocketAddr::new(ip, self.service_port),
            auth,
            tls,
            window,
            limits: Limits {
                max_pairs_per_request: self.max_pairs_per_request,
                max_request_bytes,
            },
        })
    }
}

impl BatchArgs {
    /// `default_size` and `default_flush` are the role's defaults: small batches for the
    /// embedded store (it applies a batch in microseconds), large ones for ClickHouse (every
    /// insert makes a part: 1,000-pair inserts cap ES at about a third of what 100,000-pair
    /// inserts reach, docs/BENCHMARKS.md).
    pub fn validate(&self, default_size: usize, default_flush: Duration) -> Result<BatchConfig> {
        let batch_size = self.batch_size.unwrap_or(default_size);
        if !(1..=2_000_000).contains(&batch_size) {
            bail!("BATCH_SIZE: {batch_size} must be between 1 and 2000000");
        }
        let flush_interval = match &self.flush_interval {
            Some(v) => duration("FLUSH_INTERVAL", v)?,
            None => default_flush,
        };
        if flush_interval.is_zero() || flush_interval > Duration::from_secs(3600) {
            bail!("FLUSH_INTERVAL: must be more than 0 and at most 1h");
        }
        if self.retry_attempts > 100 {
            bail!(
                "RETRY_ATTEMPTS: {} must be at most 100",
                self.retry_attempts
            );
        }
        let backoff_initial = duration("RETRY_BACKOFF", &self.retry_backoff)?;
        let backoff_max = duration("RETRY_BACKOFF_MAX", &self.retry_backoff_max)?;
        if backoff_initial.is_zero() || backoff_max < backoff_initial {
            bail!("RETRY_BACKOFF / RETRY_BACKOFF_MAX: need 0 < RETRY_BACKOFF <= RETRY_BACKOFF_MAX");
        }
        Ok(BatchConfig {
            batch_size,
            flush_interval,
            retry_attempts: self.retry_attempts,
            backoff_initial,
            backoff_max,
            ..BatchConfig::default()
        })
    }
}

/// Sampling of every segment's count for `/v1/segments/{s}/history`.
#[derive(Args, Debug, Clone)]
pub struct HistoryArgs {
    /// How often every segment's count is sampled (whole seconds, at least 1s).
    #[arg(long, env = "HISTORY_INTERVAL", default_value = "1m")]
    pub history_interval: String,
    /// How long samples are kept.
    #[arg(long, env = "HISTORY_RETENTION", default_value = "35d")]
    pub history_retention: String,
}

impl HistoryArgs {
    pub fn validate(&self) -> Result<userseg_usecase::HistoryConfig> {
        let interval = duration("HISTORY_INTERVAL", &self.history_interval)?;
        if interval < Duration::from_secs(1) || interval.subsec_nanos() != 0 {
            bail!("HISTORY_INTERVAL: must be whole seconds, at least 1s");
        }
        let retention = duration("HISTORY_RETENTION", &self.history_retention)?;
        if retention < interval {
            bail!("HISTORY_RETENTION: must be at least HISTORY_INTERVAL");
        }
        if retention > Duration::from_secs(10 * 366 * 86_400) {
            bail!("HISTORY_RETENTION: must be at most 10 years");
        }
        Ok(userseg_usecase::HistoryConfig {
            interval: interval.as_secs(),
            retention: retention.as_secs(),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct StandaloneArgs {
    #[command(flatten)]
    pub service: ServiceArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub history: HistoryArgs,
    /// Where the log and snapshots live.
    #[arg(long, env = "DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Pairs accepted but not yet counted, at most (bounds memory; ingest answers 503 past it).
    #[arg(long, env = "MAX_INFLIGHT_PAIRS")]
    pub max_inflight_pairs: Option<usize>,
    /// Snapshot at least this often while there is new data.
    #[arg(long, env = "CHECKPOINT_INTERVAL", default_value = "5m")]
    pub checkpoint_interval: String,
    /// Snapshot once this much log is not covered by a snapshot.
    #[arg(long, env = "CHECKPOINT_LOG_BYTES", default_value = "256MiB")]
    pub checkpoint_log_bytes: String,
    /// How long the change feed (`GET /v1/changes`) keeps events in DATA_DIR/changes; 0 turns
    /// the feed off.
    #[arg(long, env = "CHANGES_RETENTION", default_value = "7d")]
    pub changes_retention: String,
}

#[derive(Debug, Clone)]
pub struct StandaloneConfig {
    pub service: ServiceConfig,
    pub batch: BatchConfig,
    pub data_dir: PathBuf,
    pub max_inflight_pairs: usize,
    pub checkpoint_interval: Duration,
    pub checkpoint_log_bytes: u64,
    pub history: userseg_usecase::HistoryConfig,
    /// CHANGES_RETENTION; `None`: the change feed is off.
    pub changes_retention: Option<Duration>,
}

impl StandaloneArgs {
    pub fn validate(&self) -> Result<StandaloneConfig> {
        let service = self.service.validate()?;
        let batch = self.batch.validate(1000, Duration::from_millis(100))?;
        let max_inflight_pairs = self
            .max_inflight_pairs
            .unwrap_or_else(|| (2 * batch.batch_size).max(1_000_000));
        if max_inflight_pairs < service.limits.max_pairs_per_request {
            bail!(
                "MAX_INFLIGHT_PAIRS: {max_inflight_pairs} must be at least MAX_PAIRS_PER_REQUEST ({})",
                service.limits.max_pairs_per_request
            );
        }
        if max_inflight_pairs > u32::MAX as usize / 2 {
            bail!("MAX_INFLIGHT_PAIRS: {max_inflight_pairs} is too large");
        }
        let checkpoint_interval = duration("CHECKPOINT_INTERVAL", &self.checkpoint_interval)?;
        if checkpoint_interval < Duration::from_secs(1) {
            bail!("CHECKPOINT_INTERVAL: must be at least 1s");
        }
        let checkpoint_log_bytes =
            bytes("CHECKPOINT_LOG_BYTES", &self.checkpoint_log_bytes)? as u64;
        if checkpoint_log_bytes < 1 << 20 {
            bail!("CHECKPOINT_LOG_BYTES: must be at least 1MiB");
        }
        let changes_retention = duration("CHANGES_RETENTION", &self.changes_retention)?;
        if changes_retention > Duration::from_secs(10 * 366 * 86_400) {
            bail!("CHANGES_RETENTION: must be at most 10 years");
        }
        if !changes_retention.is_zero() && changes_retention < Duration::from_secs(1) {
            bail!("CHANGES_RETENTION: must be 0 (no change feed) or at least 1s");
        }
        Ok(StandaloneConfig {
            service,
            batch,
            data_dir: self.data_dir.clone(),
            max_inflight_pairs,
            checkpoint_interval,
            checkpoint_log_bytes,
            history: self.history.validate()?,
            changes_retention: (!changes_retention.is_zero()).then_some(changes_retention),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        s: StandaloneArgs,
    }

    fn parse(args: &[&str]) -> Result<StandaloneConfig> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v)?.s.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.service.window.secs(), 14 * 86_400);
        assert_eq!(c.batch.batch_size, 1000);
        assert_eq!(c.batch.flush_interval, Duration::from_millis(100));
        assert_eq!(c.batch.retry_attempts, 3);
        assert_eq!(c.service.limits.max_request_bytes, 16 << 20);
        assert_eq!(c.service.addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn human_durations() {
        let c = parse(&["--window", "2s", "--flush-interval", "200ms"]).unwrap();
        assert_eq!(c.service.window.secs(), 2);
        assert_eq!(c.batch.flush_interval, Duration::from_millis(200));
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&[&str], &str)] = &[
            (&["--window", "soon"], "WINDOW"),
            (&["--window", "0s"], "WINDOW"),
            (&["--window", "1500ms"], "WINDOW"),
            (&["--batch-size", "0"], "BATCH_SIZE"),
            (&["--batch-size", "2000001"], "BATCH_SIZE"),
            (&["--flush-interval", "0s"], "FLUSH_INTERVAL"),
            (&["--service-host", "my host"], "SERVICE_HOST"),
            (&["--max-request-bytes", "lots"], "MAX_REQUEST_BYTES"),
            (&["--max-inflight-pairs", "10"], "MAX_INFLIGHT_PAIRS"),
            (&["--api-token", "short"], "API_TOKEN"),
            (&["--retry-attempts", "1000"], "RETRY_ATTEMPTS"),
            (&["--changes-retention", "500ms"], "CHANGES_RETENTION"),
            (&["--changes-retention", "a week"], "CHANGES_RETENTION"),
        ];
        for (args, var) in cases {
            let err = match parse(args) {
                Ok(_) => panic!("{args:?} should fail"),
                Err(e) => e.to_string(),
            };
            assert!(err.starts_with(var), "{args:?}: {err}");
        }
        assert!(parse(&["--batch-size", "2000000"]).is_ok());
        // The change feed: on for 7 days by default, off with 0.
        assert_eq!(
            parse(&[]).unwrap().changes_retention,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            parse(&["--changes-retention", "0"])
                .unwrap()
                .changes_retention,
            None
        );
        assert_eq!(
            parse(&["--changes-retention", "1s"])
                .unwrap()
                .changes_retention,
            Some(Duration::from_secs(1))
        );
    }
}
