//! HTTPS and gRPC over TLS on one port, with certificates made by rcgen: TLS on, a client
//! trusting another CA refused, mutual TLS without (or with a wrong) client certificate
//! refused, plaintext to the TLS port refused at once, and a rotated certificate reloaded
//! without dropping open connections.

mod support;

use std::time::Duration;

use support::{https_client, write_tls_files, Ca};
use userseg_api::TlsReloader;
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{ListEstimatesRequest, Pair as PbPair, PushRequest};
use userseg_testkit::metrics::value;

/// Standalone mode serving over `tls`.
async fn start_tls(tls: TlsReloader) -> support::Server {
    support::start_with(&[], |config, _| config.service.tls = Some(tls)).await
}

fn pair(user: &str, segment: &str) -> PbPair {
    PbPair {
        user_id: user.into(),
        segment: segment.into(),
        ts: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_grpc_over_tls_on_one_port() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let files = write_tls_files(dir.path(), &ca.server(), None);
    let server = start_tls(TlsReloader::load(files).unwrap()).await;

    let http = https_client(&ca, None);
    let r = http
        .post(format!("{}/v1/pairs", server.https()))
        .json(&serde_json::json!({"pairs": [{"user_id": "u1", "segment": "tls"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    let channel = support::grpc_tls(&server, &ca, None).await.unwrap();
    let mut grpc = SegmentsClient::new(channel);
    grpc.push(PushRequest {
        pairs: vec![pair("u2", "tls")],
    })
    .await
    .unwrap();
    // Both pairs are counted (the processor applies within its 20 ms flush interval).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let list = grpc
            .list_estimates(ListEstimatesRequest {
                mode: 0,
                within_seconds: 0,
            })
            .await
            .unwrap()
            .into_inner();
        if list
            .segments
            .iter()
            .any(|s| s.segment == "tls" && s.users == 2)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{list:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // reqwest speaks HTTP/1.1 here (gRPC above took h2 through ALPN).
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_another_ca_is_refused() {
    let ca = Ca::new("server CA");
    let other = Ca::new("some other CA");
    let dir = tempfile::tempdir().unwrap();
    let files = write_tls_files(dir.path(), &ca.server(), None);
    let server = start_tls(TlsReloader::load(files).unwrap()).await;

    let err = https_client(&other, None)
        .get(format!("{}/healthz", server.https()))
        .send()
        .await
        .unwrap_err();
    let chain = format!("{:?}", err);
    assert!(
        chain.contains("UnknownIssuer") || chain.contains("certificate"),
        "{chain}"
    );
    let grpc = support::grpc_tls(&server, &other, None).await;
    assert!(grpc.is_err(), "a gRPC client trusting another CA connected");
    // The server is unharmed.
    let r = https_client(&ca, None)
        .get(format!("{}/healthz", server.https()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_tls_port_fails_at_once() {
    let metrics = support::metrics();
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let files = write_tls_files(dir.path(), &ca.server(), None);
    let server = start_tls(TlsReloader::load(files).unwrap()).await;

    // A plaintext HTTP client reads a 400 saying to use https.
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        reqwest::Client::new()
            .get(format!("{}/healthz", server.http()))
            .send(),
    )
    .await
    .expect("plaintext HTTP must not hang")
    .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("TLS"));

    // A plaintext gRPC client fails (no hang).
    let result = tokio::time::timeout(Duration::from_secs(5), async {
        let channel = tonic::transport::Endpoint::from_shared(server.http())
            .unwrap()
            .connect()
            .await?;
        SegmentsClient::new(channel)
            .list_estimates(ListEstimatesRequest {
                mode: 0,
                within_seconds: 0,
            })
            .await
            .map(|_| ())
            .map_err(|s| -> Box<dyn std::error::Error + Send + Sync> { Box::new(s) })?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    })
    .await
    .expect("plaintext gRPC must not hang");
    assert!(result.is_err(), "plaintext gRPC to the TLS port succeeded");

    // A raw TCP client that sends garbage is closed, not left hanging.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    raw.write_all(b"\x00\x01garbage").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut buf))
        .await
        .expect("the server closes a garbage connection")
        .ok();
    // Counted (the other tests of this binary only add to the counter).
    let plaintext = value(
        &metrics.render(),
        "userseg_tls_handshake_failures_total",
        &[("reason", "plaintext")],
    );
    assert!(plaintext >= 3.0, "{}", metrics.render());
    // And still serves TLS.
    let r = https_client(&ca, None)
        .get(format!("{}/healthz", server.https()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate_of_the_client_ca() {
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let rogue_ca = Ca::new("rogue CA");
    let dir = tempfile::tempdir().unwrap();
    let files = write_tls_files(dir.path(), &server_ca.server(), Some(&client_ca));
    let server = start_tls(TlsReloader::load(files).unwrap()).await;
    let url = format!("{}/healthz", server.https());

    let without = https_client(&server_ca, None).get(&url).send().await;
    assert!(without.is_err(), "no client certificate: {without:?}");
    let rogue = rogue_ca.client("mallory");
    let wrong = https_client(&server_ca, Some(&rogue))
        .get(&url)
        .send()
        .await;
    assert!(
        wrong.is_err(),
        "client certificate of another CA: {wrong:?}"
    );

    let good = client_ca.client("producer-1");
    let r = https_client(&server_ca, Some(&good))
        .get(&url)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // gRPC the same way.
    let anon = match support::grpc_tls(&server, &server_ca, None).await {
        Ok(ch) => SegmentsClient::new(ch)
            .list_estimates(ListEstimatesRequest {
                mode: 0,
                within_seconds: 0,
            })
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(anon.is_err(), "gRPC without a client certificate succeeded");
    let ch = support::grpc_tls(&server, &server_ca, Some(&good))
        .await
        .unwrap();
    SegmentsClient::new(ch)
        .list_estimates(ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_reloaded_and_open_connections_stay() {
    let old_ca = Ca::new("old CA");
    let new_ca = Ca::new("new CA");
    let dir = tempfile::tempdir().unwrap();
    let files = write_tls_files(dir.path(), &old_ca.server(), None);
    let tls = TlsReloader::load(files.clone()).unwrap();
    let server = start_tls(tls.clone()).await;
    let url = format!("{}/healthz", server.https());

    // One HTTP/2 connection opened before the rotation.
    let before = https_client(&old_ca, None);
    assert_eq!(
        before.get(&url).send().await.unwrap().status().as_u16(),
        200
    );
    let channel = support::grpc_tls(&server, &old_ca, None).await.unwrap();
    let mut grpc_before = SegmentsClient::new(channel);

    // A broken file on reload keeps the certificate in use.
    std::fs::write(&files.cert, "not a certificate").unwrap();
    let err = tls.reload().unwrap_err().to_string();
    assert!(err.starts_with("TLS_CERT_FILE"), "{err}");
    assert_eq!(
        https_client(&old_ca, None)
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );

    write_tls_files(dir.path(), &new_ca.server(), None);
    tls.reload().unwrap();

    // New connections get the new certificate...
    let r = https_client(&new_ca, None).get(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        https_client(&old_ca, None).get(&url).send().await.is_err(),
        "a new connection still got the old certificate"
    );
    // ...and the connections opened before keep working.
    for _ in 0..3 {
        assert_eq!(
            before.get(&url).send().await.unwrap().status().as_u16(),
            200
        );
        grpc_before
            .list_estimates(ListEstimatesRequest {
                mode: 0,
                within_seconds: 0,
            })
            .await
            .unwrap();
    }
}

#[test]
fn bad_tls_files_name_the_variable() {
    let ca = Ca::new("test CA");
    let dir = tempfile::tempdir().unwrap();
    let mut files = write_tls_files(dir.path(), &ca.server(), None);
    let other_key = ca.server().key_pem;
    std::fs::write(&files.key, other_key).unwrap();
    let e = TlsReloader::load(files.clone()).unwrap_err().to_string();
    assert!(e.contains("does not fit"), "{e}");
    files.key = dir.path().join("missing.key");
    let e = TlsReloader::load(files.clone()).unwrap_err().to_string();
    assert!(e.starts_with("TLS_KEY_FILE: cannot read"), "{e}");
    files.client_ca = Some(dir.path().join("server.crt"));
    std::fs::write(dir.path().join("empty.pem"), "").unwrap();
    files.key = dir.path().join("server.key");
    files.client_ca = Some(dir.path().join("empty.pem"));
    let e = TlsReloader::load(files).unwrap_err().to_string();
    assert!(e.starts_with("TLS_CLIENT_CA_FILE"), "{e}");
}
