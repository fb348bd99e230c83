//! Connection settings: a plain typed struct the binary fills and validates (naming the
//! variable to fix), handed to [`ClickHouseStore::new`](crate::ClickHouseStore::new) or
//! [`migrate`](crate::migrate).

use std::fmt;
use std::time::Duration;

/// Where and how to reach ClickHouse.
#[derive(Clone, PartialEq, Eq)]
pub struct ClickHouseConfig {
    /// Base URL of the HTTP interface, e.g. `http://127.0.0.1:8123`.
    pub addr: String,
    /// Database holding userseg's tables; created by [`migrate`](crate::migrate). A plain
    /// identifier ([`check_database_name`]).
    pub database: String,
    /// The user, `default` by default.
    pub user: String,
    /// Empty by default. Never printed by `Debug`.
    pub password: String,
    /// Upper bound on one HTTP request, and the server-side `max_execution_time` of reads
    /// (e.g. `30s`).
    pub request_timeout: Duration,
    /// Upper bound on opening a TCP connection (e.g. `5s`).
    pub connect_timeout: Duration,
    /// A write of more pairs is split into several INSERTs of at most this many rows
    ///.
    pub max_rows_per_insert: usize,
    /// PEM CA certificates trusted for an `https://` address, besides the system's (a private
    /// CA that signed ClickHouse's certificate).
    pub ca_pem: Option<Vec<u8>>,
    /// On a cluster (`deploy/clickhouse-cluster/`): the HTTP addresses of every node. Then
    /// `database` is the cluster database (Distributed tables), and what cannot go through
    /// Distributed tables runs on every node's `node_database` instead: migrations, user
    /// deletions, the drop of expired partitions, history pruning. Empty: one server.
    pub nodes: Vec<String>,
    /// The local database of every node (with `nodes`), `userseg` by default.
    pub node_database: String,
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
            ca_pem: None,
            nodes: Vec::new(),
            node_database: "userseg".into(),
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
            .field("ca_pem_bytes", &self.ca_pem.as_ref().map(Vec::len))
            .field("nodes", &self.nodes)
            .field("node_database", &self.node_database)
            .finish()
    }
}

/// Longest database name accepted (ClickHouse allows more; nobody needs more).
const MAX_DATABASE_LEN: usize = 64;

impl ClickHouseConfig {
    /// The same settings pointing at another database (tests use one database each).
    pub fn with_database(mut self, database: impl Into<String>) -> Self {
        self.database = database.into();
        self
    }

    /// The settings of each node's local database (empty on one server).
    pub fn node_configs(&self) -> Vec<ClickHouseConfig> {
        self.nodes
            .iter()
            .map(|addr| ClickHouseConfig {
                addr: addr.clone(),
                database: self.node_database.clone(),
                nodes: Vec::new(),
                ..self.clone()
            })
            .collect()
    }
}

/// Database names become SQL identifiers, so only a plain identifier is accepted.
pub fn check_database_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !ok_first
        || name.len() > MAX_DATABASE_LEN
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(format!(
            "{name:?} is not a valid database name: 1..={MAX_DATABASE_LEN} characters of [A-Za-z0-9_], not starting with a digit"
        ));
    }
    if matches!(
        name,
        "system" | "default" | "INFORMATION_SCHEMA" | "information_schema"
    ) {
        return Err(format!(
            "{name:?} is reserved; use a database of userseg's own"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_names() {
        assert_eq!(check_database_name("userseg"), Ok(()));
        assert_eq!(check_database_name("_seg_2"), Ok(()));
        for bad in [
            "",
            "1abc",
            "a-b",
            "x`; DROP",
            "system",
            "default",
            &"a".repeat(65),
        ] {
            assert!(check_database_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_redacts_the_password() {
        let c = ClickHouseConfig {
            password: "s3cret".into(),
            ..ClickHouseConfig::default()
        };
        assert!(!format!("{c:?}").contains("s3cret"));
    }
}
