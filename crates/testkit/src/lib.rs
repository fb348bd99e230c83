//! Helpers shared by userseg's tests (a dev-dependency only, never published): free ports, the
//! clock, names no other test uses, waiting for a condition, the real test servers that
//! `scripts/test.sh` starts, child processes of the real binary, and their Prometheus metrics.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub mod feed;
pub mod keys;
pub mod metrics;
pub mod process;
pub mod tansu;
pub mod tls;

pub use process::Proc;

/// A loopback port nothing listens on right now (the OS picked it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Now, in unix seconds.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `name` made unique to this process and call: topics, groups, databases of one test.
pub fn unique(name: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!(
        "{name}_{}_{nanos}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Test logs at `warn` (or `RUST_LOG`) through the test writer, once per process.
pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// Polls `f` every 25 ms until it holds; fails the test after `secs` seconds.
pub async fn until<F>(what: &str, secs: u64, mut f: F)
where
    F: AsyncFnMut() -> bool,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {secs} s waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The real test servers. Tests never skip: without a server they fail, saying how to start it.
pub mod servers {
    /// The variable holding the Kafka-protocol broker (tansu) under test.
    pub const KAFKA_VAR: &str = "USERSEG_TEST_KAFKA";
    /// The variable holding the ClickHouse HTTP URL under test.
    pub const CLICKHOUSE_VAR: &str = "USERSEG_TEST_CLICKHOUSE_URL";

    /// The variable `name`; without it the test fails saying to run `make test`, or `how`.
    pub fn required(name: &str, how: &str) -> String {
        match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => panic!(
                "{name} is not set: these tests need the real servers. Run them with `make test` \
                 or `scripts/test.sh -p CRATE --test NAME` (it starts tansu and ClickHouse and \
                 exports the variables), or {how}"
            ),
        }
    }

    /// The broker's bootstrap address.
    pub fn kafka() -> String {
        required(
            KAFKA_VAR,
            "`scripts/tansu.sh start DIR && . DIR/tansu.env && export USERSEG_TEST_KAFKA`",
        )
    }

    /// ClickHouse's HTTP URL.
    pub fn clickhouse() -> String {
        required(
            CLICKHOUSE_VAR,
            "`scripts/clickhouse.sh start DIR && set -a && . DIR/clickhouse.env && set +a`",
        )
    }
}
