//! Connection settings: built from the environment (or by hand), then validated, then handed to
//! [`ClickHouseStore::new`](crate::ClickHouseStore::new) or [`migrate`](crate::migrate).

use std::fmt;
use std::time::Duration;

/// The environment variables [`ClickHouseConfig::from_env`] reads.
pub mod env {
    pub const ADDR: &str = "CLICKHOUSE_ADDR";
    pub const DATABASE: &str = "CLICKHOUSE_DATABASE";
    pub const USER: &str = "CLICKHOUSE_USER";
    pub const PASSWORD: &str = "CLICKHOUSE_PASSWORD";
    pub const REQUEST_TIMEOUT: &str = "CLICKHOUSE_REQUEST_TIMEOUT";
    pub const CONNECT_TIMEOUT: &str = "CLICKHOUSE_CONNECT_TIMEOUT";
    pub const MAX_ROWS_PER_INSERT: &str = "CLICKHOUSE_MAX_ROWS_PER_INSERT";
}

/// Where and how to reach ClickHouse.
#[derive(Clone, PartialEq, Eq)]
pub struct ClickHouseConfig {
    /// Base URL of the HTTP interface, e.g. `http://127.0.0.1:8123` (`CLICKHOUSE_ADDR`).
    pub addr: String,
    /// Database holding userseg's tables; created by [`migrate`](crate::migrate)
    /// (`CLICKHOUSE_DATABASE`, default `userseg`).
    pub database: String,
    /// `CLICKHOUSE_USER`, default `default`.
    pub user: String,
    /// `CLICKHOUSE_PASSWORD`, default empty. Never printed by `Debug`.
    pub password: String,
    /// Upper bound on one HTTP request, and the server-side `max_execution_time` of reads
    /// (`CLICKHOUSE_REQUEST_TIMEOUT`, e.g. `30s`).
    pub request_timeout: Duration,
    /// Upper bound on opening a TCP connection (`CLICKHOUSE_CONNECT_TIMEOUT`, e.g. `5s`).
    pub connect_timeout: Duration,
    /// A write of more pairs is split into several INSERTs of at most this many rows
    /// (`CLICKHOUSE_MAX_ROWS_PER_INSERT`).
    pub max_rows_per_insert: usize,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            addr: "http://127.0.0.1:8123".into(),
            database: "userseg".into(),
            user: "default".into(),
            password: String::new(),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_rows_per_insert: 500_000,
        }
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("addr", &self.addr)
            .field("database", &self.database)
            .field("user", &self.user)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("max_rows_per_insert", &self.max_rows_per_insert)
            .finish()
    }
}

/// A setting that is missing or malformed; `var` names the environment variable to fix.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{var}: {reason}")]
pub struct ConfigError {
    pub var: &'static str,
    pub reason: String,
}

fn invalid(var: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        reason: reason.into(),
    }
}

/// Longest database name accepted (ClickHouse allows more; nobody needs more).
const MAX_DATABASE_LEN: usize = 64;

impl ClickHouseConfig {
    /// Reads the `CLICKHOUSE_*` variables over the defaults, then validates.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`from_env`](Self::from_env) with any source of variables (tests, config files).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = ClickHouseConfig::default();
        if let Some(v) = lookup(env::ADDR) {
            c.addr = v;
        }
        if let Some(v) = lookup(env::DATABASE) {
            c.database = v;
        }
        if let Some(v) = lookup(env::USER) {
            c.user = v;
        }
        if let Some(v) = lookup(env::PASSWORD) {
            c.password = v;
        }
        if let Some(v) = lookup(env::REQUEST_TIMEOUT) {
            c.request_timeout = parse_duration(env::REQUEST_TIMEOUT, &v)?;
        }
        if let Some(v) = lookup(env::CONNECT_TIMEOUT) {
            c.connect_timeout = parse_duration(env::CONNECT_TIMEOUT, &v)?;
        }
        if let Some(v) = lookup(env::MAX_ROWS_PER_INSERT) {
            c.max_rows_per_insert = v.trim().parse().map_err(|_| {
                invalid(
                    env::MAX_ROWS_PER_INSERT,
                    format!("expected a positive integer, got {v:?}"),
                )
            })?;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks every field; the error names the variable that sets the bad one.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = reqwest::Url::parse(&self.addr).map_err(|e| {
            invalid(
                env::ADDR,
                format!(
                    "{:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8123",
                    self.addr
                ),
            )
        })?;
        if url.scheme() != "http" {
            return Err(invalid(
                env::ADDR,
                format!(
                    "scheme {:?} is not supported; use http:// (put a TLS-terminating proxy in front for https)",
                    url.scheme()
                ),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid(env::ADDR, format!("{:?} has no host", self.addr)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                env::ADDR,
                "must not hold credentials; set CLICKHOUSE_USER and CLICKHOUSE_PASSWORD instead",
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(env::ADDR, "must not have a query or fragment"));
        }
        validate_database(&self.database)?;
        if self.user.is_empty() {
            return Err(invalid(env::USER, "must not be empty"));
        }
        if self.user.chars().any(|c| c.is_control() || c == ':') {
            return Err(invalid(
                env::USER,
                "must not contain ':' or control characters",
            ));
        }
        if self.request_timeout < Duration::from_millis(1) {
            return Err(invalid(env::REQUEST_TIMEOUT, "must be at least 1ms"));
        }
        if self.connect_timeout < Duration::from_millis(1) {
            return Err(invalid(env::CONNECT_TIMEOUT, "must be at least 1ms"));
        }
        if self.max_rows_per_insert == 0 {
            return Err(invalid(env::MAX_ROWS_PER_INSERT, "must be at least 1"));
        }
        Ok(())
    }

    /// The same settings pointing at another database (tests use one database each).
    pub fn with_database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }
}

fn parse_duration(var: &'static str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v.trim()).map_err(|e| {
        invalid(
            var,
            format!("{v:?} is not a duration like 30s or 500ms ({e})"),
        )
    })
}

/// Database names become SQL identifiers, so only a plain identifier is accepted.
fn validate_database(name: &str) -> Result<(), ConfigError> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_first
        || name.len() > MAX_DATABASE_LEN
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(invalid(
            env::DATABASE,
            format!(
                "{name:?} is not a valid database name: 1..={MAX_DATABASE_LEN} characters of [A-Za-z0-9_], not starting with a digit"
            ),
        ));
    }
    if matches!(
        name,
        "system" | "default" | "INFORMATION_SCHEMA" | "information_schema"
    ) {
        return Err(invalid(
            env::DATABASE,
            format!("{name:?} is reserved; use a database of userseg's own"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<ClickHouseConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ClickHouseConfig::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_valid() {
        let c = from(&[]).unwrap();
        assert_eq!(c, ClickHouseConfig::default());
        assert_eq!(c.database, "userseg");
    }

    #[test]
    fn reads_every_variable() {
        let c = from(&[
            (env::ADDR, "http://ch.internal:8123/"),
            (env::DATABASE, "seg_prod"),
            (env::USER, "writer"),
            (env::PASSWORD, "s3cret"),
            (env::REQUEST_TIMEOUT, "2s"),
            (env::CONNECT_TIMEOUT, "250ms"),
            (env::MAX_ROWS_PER_INSERT, "1000"),
        ])
        .unwrap();
        assert_eq!(c.addr, "http://ch.internal:8123/");
        assert_eq!(c.database, "seg_prod");
        assert_eq!(c.user, "writer");
        assert_eq!(c.password, "s3cret");
        assert_eq!(c.request_timeout, Duration::from_secs(2));
        assert_eq!(c.connect_timeout, Duration::from_millis(250));
        assert_eq!(c.max_rows_per_insert, 1000);
        assert!(!format!("{c:?}").contains("s3cret"), "Debug must redact");
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&str, &str)] = &[
            (env::ADDR, "not a url"),
            (env::ADDR, "https://ch:8443"),
            (env::ADDR, "http://u:p@ch:8123"),
            (env::ADDR, "http://ch:8123/?database=x"),
            (env::DATABASE, ""),
            (env::DATABASE, "1abc"),
            (env::DATABASE, "a-b"),
            (env::DATABASE, "x`; DROP"),
            (env::DATABASE, "system"),
            (env::USER, ""),
            (env::REQUEST_TIMEOUT, "soon"),
            (env::REQUEST_TIMEOUT, "0s"),
            (env::CONNECT_TIMEOUT, "0ms"),
            (env::MAX_ROWS_PER_INSERT, "0"),
            (env::MAX_ROWS_PER_INSERT, "-3"),
        ];
        for (var, value) in cases {
            let err = from(&[(var, value)]).expect_err(value);
            assert_eq!(err.var, *var, "{value:?}: {err}");
            assert!(err.to_string().starts_with(var), "{err}");
        }
    }
}
