//! Failure classification: an unreachable or slow server is transient (retried forever), data
//! that ClickHouse refuses is permanent (dead-lettered), a missing schema is transient.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use userseg_clickhouse::{migrate, ClickHouseConfig, ClickHouseError, ClickHouseStore};
use userseg_domain::Window;
use userseg_usecase::{Mode, PortError, SegmentCounter, SegmentWriter};

use crate::common::{fresh_config, fresh_store, pair};

const T0: i64 = 1_763_942_400;

fn assert_transient<T: std::fmt::Debug>(r: Result<T, PortError>, what: &str) -> String {
    match r {
        Err(PortError::Transient(m)) => m,
        other => panic!("{what}: expected a transient error, got {other:?}"),
    }
}

fn assert_permanent<T: std::fmt::Debug>(r: Result<T, PortError>, what: &str) -> String {
    match r {
        Err(PortError::Permanent(m)) => m,
        other => panic!("{what}: expected a permanent error, got {other:?}"),
    }
}

async fn assert_all_transient(store: &ClickHouseStore) -> String {
    let m = assert_transient(store.write(vec![pair("u", "s", T0)].into()).await, "write");
    assert_transient(store.count("s", T0, Mode::Exact).await, "count");
    assert_transient(store.count("s", T0, Mode::Approx).await, "count approx");
    assert_transient(store.count_all(T0, Mode::Exact).await, "count_all");
    assert_transient(store.check_ready().await, "check_ready");
    m
}

#[tokio::test]
async fn nothing_listening_is_transient() {
    let config = ClickHouseConfig {
        addr: format!("http://127.0.0.1:{}", userseg_testkit::free_port()),
        connect_timeout: Duration::from_secs(2),
        ..ClickHouseConfig::default()
    };
    let store = ClickHouseStore::new(config, Window::DEFAULT).unwrap();
    let m = assert_all_transient(&store).await;
    assert!(m.contains("unreachable"), "{m}");
    let e = store.client().ping().await.expect_err("nothing to ping");
    assert!(e.is_transient(), "{e}");
}

#[tokio::test]
async fn a_server_that_never_answers_is_transient() {
    // Accepts connections and reads, but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = ClickHouseConfig {
        addr: format!("http://{addr}"),
        request_timeout: Duration::from_millis(300),
        ..ClickHouseConfig::default()
    };
    let store = ClickHouseStore::new(config, Window::DEFAULT).unwrap();
    let m = assert_all_transient(&store).await;
    assert!(m.contains("timed out"), "{m}");
    silent.abort();
}

#[tokio::test]
async fn an_unmigrated_database_is_transient_with_a_hint() {
    let store = ClickHouseStore::new(fresh_config(), Window::DEFAULT).unwrap();
    let m = assert_all_transient(&store).await;
    assert!(m.contains("userseg migrate"), "{m}");
}

#[tokio::test]
async fn data_clickhouse_refuses_is_permanent() {
    let store = fresh_store(Window::DEFAULT).await;
    let db = store.database().to_string();
    // Text ClickHouse cannot parse (code 27).
    let e = store
        .client()
        .insert(
            &format!("INSERT INTO `{db}`.pairs (segment, user_id, ts) FORMAT TabSeparated"),
            b"seg\tuser\tnot-a-time\n".to_vec(),
        )
        .await
        .expect_err("garbage must be refused");
    assert!(!e.is_transient(), "{e}");
    assert!(e.code().is_some(), "{e}");
    assert_permanent(Err::<(), _>(PortError::from(e)), "tsv garbage");
    // A truncated RowBinary row (code 33).
    let e = store
        .client()
        .insert(
            &format!("INSERT INTO `{db}`.pairs (segment, user_id, ts) FORMAT RowBinary"),
            vec![3, b's', b'e', b'g', 1, b'u', 0x00],
        )
        .await
        .expect_err("a truncated row must be refused");
    assert!(!e.is_transient(), "{e}");
    // A pair whose ts does not fit ClickHouse's DateTime never leaves the process.
    let m = assert_permanent(
        store
            .write(vec![pair("u", "s", T0), pair("u", "s", -1)].into())
            .await,
        "negative ts",
    );
    assert!(m.contains("-1"), "{m}");
    assert_permanent(
        store.write(vec![pair("u", "s", 1 << 33)].into()).await,
        "ts past 2106",
    );
    // Nothing of the refused batches was stored.
    assert_eq!(store.count_all(T0, Mode::Exact).await.unwrap().0, vec![]);
    // And an unknown table is not the data's fault.
    let e = store
        .client()
        .insert(
            &format!("INSERT INTO `{db}`.nope (a) FORMAT TabSeparated"),
            b"1\n".to_vec(),
        )
        .await
        .expect_err("no such table");
    assert!(e.is_transient() && e.is_misconfiguration(), "{e}");
    assert!(
        matches!(e, ClickHouseError::Server { code: Some(60), .. }),
        "{e:?}"
    );
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/clickhouse.sh")
}

fn run_script(args: &[&str]) {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run scripts/clickhouse.sh");
    assert!(
        out.status.success(),
        "clickhouse.sh {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stops the private server when the test ends, pass or fail.
struct ServerDir(PathBuf);

impl Drop for ServerDir {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .args(["stop", &self.0.to_string_lossy()])
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn a_stopped_server_is_transient_and_a_restart_keeps_the_data() {
    // A private server, so stopping it disturbs no other test.
    crate::common::server_url(); // fail loudly like every other test when unconfigured
    let dir = std::env::temp_dir().join(format!("userseg-ch-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let guard = ServerDir(dir.clone());
    let dir_s = dir.to_string_lossy().to_string();
    let port = userseg_testkit::free_port().to_string();
    run_script(&["start", &dir_s, &port]);
    let env = std::fs::read_to_string(dir.join("clickhouse.env")).expect("clickhouse.env");
    assert_eq!(
        env.trim(),
        format!("USERSEG_TEST_CLICKHOUSE_URL=http://127.0.0.1:{port}")
    );

    let config = ClickHouseConfig {
        addr: format!("http://127.0.0.1:{port}"),
        connect_timeout: Duration::from_secs(2),
        ..ClickHouseConfig::default()
    };
    migrate(&config).await.expect("migrate");
    let store = ClickHouseStore::new(config, Window::DEFAULT).unwrap();
    store.write(vec![pair("u1", "s", T0)].into()).await.unwrap();

    run_script(&["stop", &dir_s]);
    assert_all_transient(&store).await;

    run_script(&["start", &dir_s, &port]);
    store.client().ping().await.expect("ping after restart");
    store.check_ready().await.expect("ready after restart");
    assert_eq!(store.count("s", T0, Mode::Exact).await.unwrap(), (1, true));
    store.write(vec![pair("u2", "s", T0)].into()).await.unwrap();
    assert_eq!(store.count("s", T0, Mode::Exact).await.unwrap(), (2, true));
    assert_eq!(
        store.count("s", T0, Mode::Approx).await.unwrap(),
        (2, false)
    );
    drop(guard);
}
