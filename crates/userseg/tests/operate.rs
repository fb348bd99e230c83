//! The real binary with API keys and TLS: `userseg keys new` output that works, SIGHUP
//! reloading the keys file (a broken file keeps the old keys), a broken file at start naming
//! the line, TLS with a certificate rotated on SIGHUP while connections stay open.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{https_client, write_tls_files, Ca};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{ListEstimatesRequest, Pair, PushRequest};

struct Proc {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -HUP failed");
    }

    fn http(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(dir: &Path, extra: &[(&str, &str)]) -> Proc {
    let port = free_port();
    let log = dir.join(format!("userseg-{port}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_userseg"));
    cmd.arg("standalone")
        .env("DATA_DIR", dir.join("data"))
        .env("SERVICE_HOST", "127.0.0.1")
        .env("SERVICE_PORT", port.to_string())
        .env("FLUSH_INTERVAL", "20ms")
        .env_remove("API_TOKEN")
        .env_remove("API_KEYS_FILE")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Proc {
        child: cmd.spawn().unwrap(),
        port,
        log,
    }
}

fn read_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Waits until `check` holds, failing after 30 s (or when the process exits).
async fn until<F: AsyncFnMut() -> bool>(p: &mut Proc, what: &str, mut check: F) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        if let Ok(Some(status)) = p.child.try_wait() {
            panic!(
                "userseg exited with {status} waiting until {what}:\n{}",
                p.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting until {what}:\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn status(client: &reqwest::Client, url: &str, token: Option<&str>) -> u16 {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    match req.send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

fn keys_new(name: &str, roles: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
        .args(["keys", "new", "--name", name, "--roles", roles])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let (first, block) = stdout.split_once('\n').unwrap();
    let token = first
        .strip_prefix("token: ")
        .expect("token line")
        .to_owned();
    assert!(!block.contains(&token), "the block must not hold the token");
    (token, block.trim_start().to_owned())
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_new_output_parses_and_works_on_both_protocols() {
    let dir = tempfile::tempdir().unwrap();
    let (reader, reader_block) = keys_new("analyst", "read,members");
    let (producer, producer_block) = keys_new("producer", "ingest");
    assert_ne!(reader, producer);
    let file = dir.path().join("keys.toml");
    std::fs::write(&file, format!("{reader_block}\n{producer_block}")).unwrap();
    let mut p = spawn(dir.path(), &[("API_KEYS_FILE", file.to_str().unwrap())]);
    let http = reqwest::Client::new();
    let segments = format!("{}/v1/segments", p.http());
    // Probes stay open.
    let readyz = format!("{}/readyz", p.http());
    until(&mut p, "ready", async || {
        status(&http, &readyz, None).await == 200
    })
    .await;
    assert_eq!(status(&http, &segments, None).await, 401);
    assert_eq!(status(&http, &segments, Some(&reader)).await, 200);
    assert_eq!(status(&http, &segments, Some(&producer)).await, 403);
    let r = http
        .post(format!("{}/v1/pairs", p.http()))
        .bearer_auth(&reader)
        .json(&serde_json::json!({"pairs": [{"user_id": "u", "segment": "s"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "permission_denied");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("ingest"));

    let channel = tonic::transport::Endpoint::from_shared(p.http())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = SegmentsClient::new(channel);
    let push = PushRequest {
        pairs: vec![Pair {
            user_id: "u1".into(),
            segment: "keys".into(),
            ts: None,
        }],
    };
    grpc.push(authed(push.clone(), &producer)).await.unwrap();
    let e = grpc.push(authed(push, &reader)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    grpc.list_estimates(authed(
        ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        },
        &reader,
    ))
    .await
    .unwrap();
    let e = grpc
        .list_estimates(ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    // Never logged.
    let log = p.log();
    assert!(!log.contains(&reader) && !log.contains(&producer));
}

#[test]
fn keys_new_refuses_an_unknown_role() {
    let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
        .args(["keys", "new", "--name", "x", "--roles", "read,write"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown role \"write\""), "{err}");
    assert!(out.stdout.is_empty(), "no token printed on error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_keys_and_a_broken_file_keeps_them() {
    let dir = tempfile::tempdir().unwrap();
    let (old, old_block) = keys_new("old", "read");
    let (new, new_block) = keys_new("new", "read");
    let file = dir.path().join("keys.toml");
    std::fs::write(&file, &old_block).unwrap();
    let mut p = spawn(dir.path(), &[("API_KEYS_FILE", file.to_str().unwrap())]);
    let http = reqwest::Client::new();
    let segments = format!("{}/v1/segments", p.http());
    until(&mut p, "the old key works", async || {
        status(&http, &segments, Some(&old)).await == 200
    })
    .await;
    assert_eq!(status(&http, &segments, Some(&new)).await, 401);
    // A connection opened before the reload.
    let channel = tonic::transport::Endpoint::from_shared(p.http())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = SegmentsClient::new(channel);
    grpc.list_estimates(authed(
        ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        },
        &old,
    ))
    .await
    .unwrap();

    std::fs::write(&file, &new_block).unwrap();
    p.sighup();
    until(&mut p, "the new key works", async || {
        status(&http, &segments, Some(&new)).await == 200
    })
    .await;
    assert_eq!(status(&http, &segments, Some(&old)).await, 401);
    // The same connection goes on, now with the new key.
    grpc.list_estimates(authed(
        ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        },
        &new,
    ))
    .await
    .unwrap();

    // A broken file: logged with its line, the keys in use stay.
    std::fs::write(
        &file,
        format!("{new_block}\n[[key]]\nname = \"x\"\nroles = \"read\"\n"),
    )
    .unwrap();
    p.sighup();
    let log_path = p.log.clone();
    until(&mut p, "the failed reload is logged", async || {
        read_log(&log_path).contains("API keys not reloaded")
    })
    .await;
    let log = p.log();
    let line = log
        .lines()
        .find(|l| l.contains("API keys not reloaded"))
        .unwrap();
    assert!(line.contains("line 8: invalid type"), "{line}");
    assert_eq!(status(&http, &segments, Some(&new)).await, 200);
    grpc.list_estimates(authed(
        ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        },
        &new,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_keys_file_at_start_refuses_to_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys.toml");
    std::fs::write(
        &file,
        "[[key]]\nname = \"a\"\nsha256 = \"0000\"\nroles = [\"read\"]\n",
    )
    .unwrap();
    let mut p = spawn(dir.path(), &[("API_KEYS_FILE", file.to_str().unwrap())]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = p.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "userseg started with a broken keys file"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(!status.success());
    let log = p.log();
    assert!(
        log.contains(&format!("API_KEYS_FILE: {}: line 3: ", file.display())),
        "{log}"
    );
    // Missing file: named too.
    let mut p = spawn(dir.path(), &[("API_KEYS_FILE", "/nonexistent/keys.toml")]);
    let status = p.child.wait().unwrap();
    assert!(!status.success());
    assert!(
        p.log()
            .contains("API_KEYS_FILE: cannot read /nonexistent/keys.toml"),
        "{}",
        p.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_keys_and_a_certificate_rotated_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let files = write_tls_files(dir.path(), &old_ca.server(), None);
    let token = "admin-token-for-the-tls-test";
    let mut p = spawn(
        dir.path(),
        &[
            ("TLS_CERT_FILE", files.cert.to_str().unwrap()),
            ("TLS_KEY_FILE", files.key.to_str().unwrap()),
            ("API_TOKEN", token),
        ],
    );
    let url = format!("https://localhost:{}/v1/segments", p.port);
    let before = https_client(&old_ca, None);
    until(&mut p, "https answers", async || {
        status(&before, &url, Some(token)).await == 200
    })
    .await;
    assert_eq!(status(&before, &url, None).await, 401);
    // Plaintext to the TLS port: a clear 400.
    let r = reqwest::get(format!("{}/healthz", p.http())).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);

    let ca_path = dir.path().join("old-ca.pem");
    std::fs::write(&ca_path, old_ca.pem()).unwrap();
    // `userseg load` over https with --token and --ca-file.
    let out = Command::new(env!("CARGO_BIN_EXE_userseg"))
        .args([
            "load",
            "--target",
            &format!("https://localhost:{}", p.port),
            "--token",
            token,
            "--ca-file",
            ca_path.to_str().unwrap(),
            "--pairs",
            "2000",
            "--users",
            "500",
            "--segments",
            "3",
            "--verify",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "load over https failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    write_tls_files(dir.path(), &new_ca.server(), None);
    p.sighup();
    let after = https_client(&new_ca, None);
    until(&mut p, "the new certificate is served", async || {
        status(&https_client(&new_ca, None), &url, Some(token)).await == 200
    })
    .await;
    assert_eq!(status(&after, &url, Some(token)).await, 200);
    assert_eq!(
        status(&https_client(&old_ca, None), &url, Some(token)).await,
        0
    );
    // The connection opened before the rotation stays.
    assert_eq!(status(&before, &url, Some(token)).await, 200);
    assert!(p.log().contains("reloaded the TLS certificate"));
}

fn load(port: u16, extra: &[&str]) -> std::process::Output {
    let target = format!("https://localhost:{port}");
    let mut args = vec![
        "load",
        "--target",
        &target,
        "--pairs",
        "1000",
        "--users",
        "300",
        "--segments",
        "2",
        "--verify",
        "--json",
    ];
    args.extend_from_slice(extra);
    Command::new(env!("CARGO_BIN_EXE_userseg"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_with_a_client_certificate_against_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = write_tls_files(dir.path(), &server_ca.server(), Some(&client_ca));
    let mut p = spawn(
        dir.path(),
        &[
            ("TLS_CERT_FILE", files.cert.to_str().unwrap()),
            ("TLS_KEY_FILE", files.key.to_str().unwrap()),
            (
                "TLS_CLIENT_CA_FILE",
                files.client_ca.as_ref().unwrap().to_str().unwrap(),
            ),
        ],
    );
    let client = client_ca.client("loadgen");
    let ca = dir.path().join("server-ca.pem");
    let cert = dir.path().join("client.crt");
    let key = dir.path().join("client.key");
    std::fs::write(&ca, server_ca.pem()).unwrap();
    std::fs::write(&cert, &client.cert_pem).unwrap();
    std::fs::write(&key, &client.key_pem).unwrap();
    let with_cert = https_client(&server_ca, Some(&client));
    let url = format!("https://localhost:{}/healthz", p.port);
    until(&mut p, "mutual TLS answers", async || {
        status(&with_cert, &url, None).await == 200
    })
    .await;
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );

    for protocol in ["grpc", "http"] {
        let out = load(
            p.port,
            &[
                "--ca-file",
                ca,
                "--cert-file",
                cert,
                "--key-file",
                key,
                "--protocol",
                protocol,
                "--segment-prefix",
                protocol,
            ],
        );
        assert!(
            out.status.success(),
            "{protocol} load with a client certificate failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = load(p.port, &["--ca-file", ca]);
    assert!(
        !out.status.success(),
        "load without a client certificate succeeded"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("cannot reach the server"), "{text}");
}
