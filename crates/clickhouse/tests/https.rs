//! ClickHouse over https with a private CA: a ClickHouse 18.16 server of this test's own
//! (started by scripts/clickhouse.sh with a certificate made here by rcgen) answers migrate,
//! writes and exact counts over TLS; a client that does not trust the CA is refused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use userseg_clickhouse::{migrate, ClickHouseConfig, ClickHouseError, ClickHouseStore};
use userseg_domain::{Pair, Window};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A ClickHouse server serving https, stopped on drop.
struct Server {
    dir: tempfile::TempDir,
    https: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/clickhouse.sh"))
            .arg("stop")
            .arg(self.dir.path().join("srv"))
            .status();
    }
}

fn start(cert: &Path, key: &Path) -> Server {
    // A server that loses a port it was given to another process before binding it is started
    // again on other ports by the script itself.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join("scripts/clickhouse.sh"))
        .arg("start")
        .arg(dir.path().join("srv"))
        .env("CLICKHOUSE_HTTPS_CERT", cert)
        .env("CLICKHOUSE_HTTPS_KEY", key)
        .output()
        .expect("run scripts/clickhouse.sh (install ClickHouse with scripts/install-deps.sh)");
    assert!(
        out.status.success(),
        "clickhouse.sh start failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let env = std::fs::read_to_string(dir.path().join("srv/clickhouse.env")).unwrap();
    let https = env
        .lines()
        .find_map(|l| l.strip_prefix("USERSEG_TEST_CLICKHOUSE_HTTPS_URL="))
        .expect("an https URL in clickhouse.env")
        .to_owned();
    Server { dir, https }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_write_and_count_over_https_with_a_private_ca() {
    let files = tempfile::tempdir().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let cert_path = files.path().join("server.crt");
    let key_path = files.path().join("server.key");
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let server = start(&cert_path, &key_path);

    let config = ClickHouseConfig {
        addr: server.https.clone(),
        database: format!("userseg_https_{}", std::process::id()),
        ca_pem: Some(ca.pem().into_bytes()),
        ..ClickHouseConfig::default()
    };
    migrate(&config).await.expect("migrate over https");
    let window = Window::from_secs(3600).unwrap();
    let store = ClickHouseStore::new(config.clone(), window).unwrap();
    store.ready().await.expect("ping over https");
    let ts = now() as i64 - 10;
    let pairs: Vec<Pair> = (0..50)
        .map(|i| Pair {
            user_id: format!("u{i}"),
            segment: "secure".into(),
            ts: ts as _,
        })
        .collect();
    store.insert_pairs(&pairs).await.expect("insert over https");
    let users = store
        .count_exact("secure", now() as _)
        .await
        .expect("count over https");
    assert_eq!(users, 50);

    // Without the CA the server's certificate is not trusted.
    let untrusted = ClickHouseStore::new(
        ClickHouseConfig {
            ca_pem: None,
            ..config
        },
        window,
    )
    .unwrap();
    let err = untrusted.ready().await.unwrap_err();
    assert!(
        matches!(err, ClickHouseError::Unreachable { .. }),
        "{err:?}"
    );
    let text = format!("{err}");
    assert!(
        text.contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
}
