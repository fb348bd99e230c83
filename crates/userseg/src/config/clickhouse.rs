//! The ClickHouse settings of `es` and `migrate`: each declared once, as a flag with its
//! environment variable, and validated into the adapter's typed [`ClickHouseConfig`].

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use userseg_clickhouse::{check_database_name, ClickHouseConfig};

use super::duration;

#[derive(Args, Debug, Clone)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP interface.
    #[arg(long, env = "CLICKHOUSE_ADDR", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_addr: String,
    /// Database of userseg's tables (created by `userseg migrate`).
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "userseg")]
    pub clickhouse_database: String,
    /// ClickHouse user.
    #[arg(long, env = "CLICKHOUSE_USER", default_value = "default")]
    pub clickhouse_user: String,
    /// ClickHouse password.
    #[arg(
        long,
        env = "CLICKHOUSE_PASSWORD",
        default_value = "",
        hide_env_values = true
    )]
    pub clickhouse_password: String,
    /// Timeout of one ClickHouse request (and the server-side max_execution_time of reads).
    #[arg(long, env = "CLICKHOUSE_REQUEST_TIMEOUT", default_value = "30s")]
    pub clickhouse_request_timeout: String,
    /// Timeout of opening a connection to ClickHouse.
    #[arg(long, env = "CLICKHOUSE_CONNECT_TIMEOUT", default_value = "5s")]
    pub clickhouse_connect_timeout: String,
    /// A batch of more pairs is written as several INSERTs of at most this many rows.
    #[arg(
        long,
        env = "CLICKHOUSE_MAX_ROWS_PER_INSERT",
        default_value_t = 500_000
    )]
    pub clickhouse_max_rows_per_insert: usize,
    /// PEM CA certificates to trust for an https:// CLICKHOUSE_ADDR, besides the system's.
    #[arg(long, env = "CLICKHOUSE_CA_FILE")]
    pub clickhouse_ca_file: Option<std::path::PathBuf>,
    /// On a ClickHouse cluster (deploy/clickhouse-cluster): every node's HTTP address,
    /// comma-separated. CLICKHOUSE_DATABASE is then the cluster database, and migrations,
    /// deletions, retention and history pruning run on each node's CLICKHOUSE_NODE_DATABASE.
    #[arg(long, env = "CLICKHOUSE_NODES", default_value = "")]
    pub clickhouse_nodes: String,
    /// The local database of every node of CLICKHOUSE_NODES.
    #[arg(long, env = "CLICKHOUSE_NODE_DATABASE", default_value = "userseg")]
    pub clickhouse_node_database: String,
}

impl ClickHouseArgs {
    pub fn validate(&self) -> Result<ClickHouseConfig> {
        let c = ClickHouseConfig {
            addr: addr(&self.clickhouse_addr)?,
            database: self.clickhouse_database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            request_timeout: at_least_1ms(
                "CLICKHOUSE_REQUEST_TIMEOUT",
                &self.clickhouse_request_timeout,
            )?,
            connect_timeout: at_least_1ms(
                "CLICKHOUSE_CONNECT_TIMEOUT",
                &self.clickhouse_connect_timeout,
            )?,
            max_rows_per_insert: self.clickhouse_max_rows_per_insert,
            ca_pem: match &self.clickhouse_ca_file {
                Some(path) => Some(ca_file(path)?),
                None => None,
            },
            nodes: self
                .clickhouse_nodes
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(|n| url_of("CLICKHOUSE_NODES", n))
                .collect::<Result<Vec<_>>>()?,
            node_database: self.clickhouse_node_database.clone(),
        };
        if let Err(e) = check_database_name(&c.node_database) {
            bail!("CLICKHOUSE_NODE_DATABASE: {e}");
        }

        if let Err(e) = check_database_name(&c.database) {
            bail!("CLICKHOUSE_DATABASE: {e}");
        }
        if c.user.is_empty() {
            bail!("CLICKHOUSE_USER: must not be empty");
        }
        if c.user.chars().any(|c| c.is_control() || c == ':') {
            bail!("CLICKHOUSE_USER: must not contain ':' or control characters");
        }
        if c.max_rows_per_insert == 0 {
            bail!("CLICKHOUSE_MAX_ROWS_PER_INSERT: must be at least 1");
        }
        Ok(c)
    }
}

fn addr(addr: &str) -> Result<String> {
    url_of("CLICKHOUSE_ADDR", addr)
}

fn url_of(var: &str, addr: &str) -> Result<String> {
    let url = match reqwest::Url::parse(addr) {
        Ok(url) => url,
        Err(e) => bail!("{var}: {addr:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8123"),
    };
    if url.scheme() != "http" && url.scheme() != "https" {
        bail!(
            "{var}: scheme {:?} is not supported; use http:// or https://",
            url.scheme()
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        bail!("{var}: {addr:?} has no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        bail!(
            "{var}: must not hold credentials; set CLICKHOUSE_USER and CLICKHOUSE_PASSWORD instead"
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        bail!("{var}: must not have a query or fragment");
    }
    Ok(addr.to_owned())
}

fn ca_file(path: &std::path::Path) -> Result<Vec<u8>> {
    let var = "CLICKHOUSE_CA_FILE";
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) => bail!("{var}: cannot read {}: {e}", path.display()),
    };
    match reqwest::Certificate::from_pem_bundle(&pem) {
        Ok(certs) if !certs.is_empty() => Ok(pem),
        Ok(_) => bail!("{var}: {} holds no PEM certificate", path.display()),
        Err(e) => bail!("{var}: {}: {e}", path.display()),
    }
}

fn at_least_1ms(var: &str, value: &str) -> Result<Duration> {
    let d = duration(var, value)?;
    if d < Duration::from_millis(1) {
        bail!("{var}: must be at least 1ms");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: ClickHouseArgs,
    }

    fn parse(args: &[&str]) -> Result<ClickHouseConfig> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v)?.c.validate()
    }

    #[test]
    fn defaults_are_the_adapters_defaults() {
        assert_eq!(parse(&[]).unwrap(), ClickHouseConfig::default());
    }

    #[test]
    fn cluster_nodes() {
        let c = parse(&[
            "--clickhouse-database",
            "userseg_cluster",
            "--clickhouse-nodes",
            "http://ch1:8123, http://ch2:8123",
        ])
        .unwrap();
        assert_eq!(c.nodes, ["http://ch1:8123", "http://ch2:8123"]);
        assert_eq!(c.node_database, "userseg");
        assert_eq!(c.node_configs()[1].addr, "http://ch2:8123");
        assert_eq!(c.node_configs()[1].database, "userseg");
        assert!(c.node_configs()[1].nodes.is_empty());
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: &[(&str, &str, &str)] = &[
            ("--clickhouse-addr", "not a url", "CLICKHOUSE_ADDR"),
            ("--clickhouse-addr", "ftp://ch:8443", "CLICKHOUSE_ADDR"),
            (
                "--clickhouse-ca-file",
                "/nonexistent/ca.pem",
                "CLICKHOUSE_CA_FILE",
            ),
            ("--clickhouse-addr", "http://u:p@ch:8123", "CLICKHOUSE_ADDR"),
            (
                "--clickhouse-addr",
                "http://ch:8123/?database=x",
                "CLICKHOUSE_ADDR",
            ),
            ("--clickhouse-database", "", "CLICKHOUSE_DATABASE"),
            ("--clickhouse-database", "1abc", "CLICKHOUSE_DATABASE"),
            ("--clickhouse-database", "x`; DROP", "CLICKHOUSE_DATABASE"),
            ("--clickhouse-database", "system", "CLICKHOUSE_DATABASE"),
            ("--clickhouse-user", "", "CLICKHOUSE_USER"),
            ("--clickhouse-user", "a:b", "CLICKHOUSE_USER"),
            (
                "--clickhouse-request-timeout",
                "soon",
                "CLICKHOUSE_REQUEST_TIMEOUT",
            ),
            (
                "--clickhouse-request-timeout",
                "0s",
                "CLICKHOUSE_REQUEST_TIMEOUT",
            ),
            (
                "--clickhouse-connect-timeout",
                "0ms",
                "CLICKHOUSE_CONNECT_TIMEOUT",
            ),
            (
                "--clickhouse-max-rows-per-insert",
                "0",
                "CLICKHOUSE_MAX_ROWS_PER_INSERT",
            ),
            (
                "--clickhouse-nodes",
                "http://a:8123,ch2",
                "CLICKHOUSE_NODES",
            ),
            (
                "--clickhouse-node-database",
                "x-y",
                "CLICKHOUSE_NODE_DATABASE",
            ),
        ];
        for (flag, value, var) in cases {
            let e = match parse(&[flag, value]) {
                Ok(_) => panic!("{flag} {value:?} should fail"),
                Err(e) => e.to_string(),
            };
            assert!(e.starts_with(&format!("{var}: ")), "{value:?}: {e}");
        }
    }
}
