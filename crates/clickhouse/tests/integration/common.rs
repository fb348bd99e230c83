use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use userseg_clickhouse::{migrate, ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Pair, UnixSeconds, Window};

pub const URL_VAR: &str = "USERSEG_TEST_CLICKHOUSE_URL";

/// The test server's URL; panics with instructions when it is not set.
pub fn server_url() -> String {
    match std::env::var(URL_VAR) {
        Ok(url) if !url.trim().is_empty() => url.trim().to_string(),
        _ => panic!(
            "{URL_VAR} is not set: these tests need a real ClickHouse server. Start one with \
             `scripts/clickhouse.sh start /tmp/userseg-ch` and then \
             `set -a; . /tmp/userseg-ch/clickhouse.env; set +a` before `cargo test -p userseg-clickhouse`"
        ),
    }
}

/// A config pointing at the test server with a database name no other test uses.
pub fn fresh_config() -> ClickHouseConfig {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let database = format!(
        "userseg_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        nanos
    );
    ClickHouseConfig {
        addr: server_url(),
        database,
        request_timeout: Duration::from_secs(60),
        ..ClickHouseConfig::default()
    }
}

/// A migrated store on a fresh database.
pub async fn fresh_store(window: Window) -> ClickHouseStore {
    let config = fresh_config();
    migrate(&config).await.expect("migrate a fresh database");
    ClickHouseStore::new(config, window).expect("build the store")
}

pub fn pair(user: &str, segment: &str, ts: UnixSeconds) -> Pair {
    Pair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

/// Runs a query whose RowBinary result is a single UInt64.
pub async fn scalar(store: &ClickHouseStore, sql: &str) -> u64 {
    let body = store.client().query(sql).await.expect(sql);
    assert_eq!(
        body.len(),
        8,
        "{sql}: expected one UInt64, got {} bytes",
        body.len()
    );
    let mut a = [0u8; 8];
    a.copy_from_slice(&body);
    u64::from_le_bytes(a)
}
