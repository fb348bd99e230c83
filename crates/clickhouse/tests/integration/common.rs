use std::time::Duration;

use userseg_clickhouse::{migrate, ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Pair, UnixSeconds, Window};

/// The test server's URL; fails the test with instructions when it is not set.
pub fn server_url() -> String {
    userseg_testkit::servers::clickhouse()
}

/// A config pointing at the test server with a database name no other test uses.
pub fn fresh_config() -> ClickHouseConfig {
    let database = userseg_testkit::unique("userseg_test");
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
