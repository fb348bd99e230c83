//! Hostile input against the real `userseg` binary (standalone): bad values in valid syntax,
//! bytes that are not what they claim, bodies and headers over the limits, and clients that
//! hold connections (slow headers, HTTP/2 stream and reset floods). Each class gets a specific
//! error, nothing of a refused request is stored, and normal clients keep being served with
//! bounded memory throughout. docs/RELIABILITY.md ("Hostile input") summarises the limits.

use std::future::Future as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use userseg_proto::v1::{Pair, PushRequest};
use userseg_testkit::{free_port, now, until, Proc};

fn spawn(data: &Path, extra: &[(&str, &str)]) -> Proc {
    let mut env = vec![
        ("DATA_DIR".to_string(), data.to_string_lossy().into_owned()),
        ("FLUSH_INTERVAL".to_string(), "50ms".to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Proc::spawn(
        env!("CARGO_BIN_EXE_userseg"),
        &["standalone"],
        &env,
        free_port(),
        data.with_extension("log"),
    )
}

async fn server(extra: &[(&str, &str)]) -> (tempfile::TempDir, Proc) {
    let dir = tempfile::tempdir().unwrap();
    let mut p = spawn(&dir.path().join("data"), extra);
    p.ready().await;
    (dir, p)
}

async fn post(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(format!("{base}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.body(body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn segments(base: &str) -> Value {
    reqwest::get(format!("{base}/v1/segments"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["segments"]
        .clone()
}

/// A normal client pushing a pair and reading the counts every 50 ms until stopped; reports
/// the failures and the slowest round trip.
struct NormalClient {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<(u64, u64, Duration)>,
}

impl NormalClient {
    fn start(base: &str) -> NormalClient {
        let stop = tokio_util::sync::CancellationToken::new();
        let (s, base) = (stop.clone(), base.to_string());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap();
            let (mut ok, mut failed, mut slowest) = (0u64, 0u64, Duration::ZERO);
            let mut i = 0u64;
            while !s.is_cancelled() {
                let t = Instant::now();
                let push = client
                    .post(format!("{base}/v1/pairs"))
                    .json(&json!({"pairs": [{"user_id": format!("normal-{i}"), "segment": "normal"}]}))
                    .send()
                    .await;
                let read = client
                    .get(format!("{base}/v1/segments/normal"))
                    .send()
                    .await;
                slowest = slowest.max(t.elapsed());
                match (push, read) {
                    (Ok(a), Ok(b)) if a.status() == 200 && b.status() == 200 => ok += 1,
                    (a, b) => {
                        failed += 1;
                        eprintln!(
                            "normal client failed: push {:?} read {:?}",
                            a.map(|r| r.status()),
                            b.map(|r| r.status())
                        );
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (ok, failed, slowest)
        });
        NormalClient { stop, task }
    }

    /// Stops it; asserts it was served every time, each round trip within `slowest`.
    async fn check(self, slowest: Duration) -> u64 {
        self.stop.cancel();
        let (ok, failed, worst) = self.task.await.unwrap();
        assert_eq!(
            failed, 0,
            "a normal client was refused during the attack ({ok} ok)"
        );
        assert!(ok > 0, "the normal client made no request");
        assert!(worst <= slowest, "a normal round trip took {worst:?}");
        ok
    }
}

// --- raw HTTP/2 and gRPC --------------------------------------------------------------------

async fn h2_connect(
    port: u16,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .max_concurrent_reset_streams(1_000_000)
        .handshake(tcp)
        .await
        .unwrap();
    (client, tokio::spawn(conn))
}

/// One gRPC message frame (uncompressed): flag, big-endian length, message.
fn grpc_frame(declared_len: u32, msg: &[u8]) -> Bytes {
    let mut out = vec![0u8];
    out.extend_from_slice(&declared_len.to_be_bytes());
    out.extend_from_slice(msg);
    Bytes::from(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(v) if b[i] == b'%' => {
                out.push(v);
                i += 3;
            }
            _ => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Calls `method` with the raw `body` (gRPC frames); returns the gRPC status code and message.
async fn grpc_raw(port: u16, method: &str, body: Bytes, headers: &[(&str, &str)]) -> (i32, String) {
    let (client, _conn) = h2_connect(port).await;
    let mut client = client.ready().await.unwrap();
    let mut req = http::Request::post(format!(
        "http://127.0.0.1:{port}/userseg.v1.Segments/{method}"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let (resp, mut send) = client.send_request(req.body(()).unwrap(), false).unwrap();
    send.send_data(body, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("a gRPC answer")
        .unwrap();
    let (parts, mut body) = resp.into_parts();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status").map(|s| {
            (
                s.to_str().unwrap().parse::<i32>().unwrap(),
                percent_decode(h.get("grpc-message").map_or("", |m| m.to_str().unwrap())),
            )
        })
    };
    if let Some(s) = status(&parts.headers) {
        return s;
    }
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    status(&trailers).expect("grpc-status")
}

const INVALID_ARGUMENT: i32 = 3;
const UNIMPLEMENTED: i32 = 12;

fn push_msg(pairs: &[(&str, &str, Option<i64>)]) -> Vec<u8> {
    PushRequest {
        pairs: pairs
            .iter()
            .map(|(u, s, ts)| Pair {
                user_id: u.to_string(),
                segment: s.to_string(),
                ts: *ts,
            })
            .collect(),
    }
    .encode_to_vec()
}

// --- the tests --------------------------------------------------------------------------------

/// ts at the ends of i64, past them, as a float; duplicate keys; deep nesting; over HTTP JSON,
/// NDJSON and gRPC: each a 400 / INVALID_ARGUMENT naming the problem, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_and_nothing_is_stored() {
    let (_dir, p) = server(&[]).await;
    let base = p.base.clone();
    let good = r#"{"user_id":"u1","segment":"s"}"#;
    let cases: Vec<(String, &str)> = vec![
        (
            format!(
                r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":{}}}]}}"#,
                i64::MIN
            ),
            "ts",
        ),
        (
            format!(
                r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":{}}}]}}"#,
                i64::MAX
            ),
            "ts",
        ),
        (
            format!(
                r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":9223372036854775808}}]}}"#
            ),
            "pairs[1].ts",
        ),
        (
            format!(
                r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":-9223372036854775809}}]}}"#
            ),
            "pairs[1].ts",
        ),
        (
            format!(
                r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":{}.5}}]}}"#,
                now()
            ),
            "pairs[1].ts",
        ),
        (
            format!(r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":1.8e9}}]}}"#),
            "pairs[1].ts",
        ),
        (
            format!(r#"{{"pairs":[{good},{{"user_id":"u2","segment":"s","ts":"1800000000"}}]}}"#),
            "pairs[1].ts",
        ),
        (
            format!(r#"{{"pairs":[{good},{{"user_id":"u2","user_id":"u3","segment":"s"}}]}}"#),
            "duplicate field `user_id`",
        ),
        (
            format!(r#"{{"pairs":[{good}],"pairs":[{good}]}}"#),
            "duplicate field `pairs`",
        ),
        (
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            "invalid JSON body",
        ),
        (
            format!(
                r#"{{"pairs":[{good},{}{}]}}"#,
                "{\"a\":".repeat(50_000),
                "}".repeat(50_000)
            ),
            "invalid JSON body",
        ),
        (
            format!(r#"{{"pairs":[{good},{{"user_id":"\ud800","segment":"s"}}]}}"#),
            "invalid JSON body",
        ),
    ];
    for (body, says) in &cases {
        let (status, err) = post(
            &base,
            "/v1/pairs",
            &[("content-type", "application/json")],
            body.clone(),
        )
        .await;
        assert_eq!(status, 400, "{}: {err}", &body[..body.len().min(120)]);
        assert_eq!(err["error"]["code"], "invalid_argument");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{msg:?} does not say {says:?}");
    }
    // NDJSON: the line and index of the bad pair.
    let nd = format!("{good}\n{{\"user_id\":\"u2\",\"segment\":\"s\",\"ts\":1.5}}\n");
    let (status, err) = post(
        &base,
        "/v1/pairs",
        &[("content-type", "application/x-ndjson")],
        nd,
    )
    .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(
        (
            err["error"]["line"].as_u64(),
            err["error"]["index"].as_u64()
        ),
        (Some(2), Some(1))
    );
    // gRPC: ts at the ends of i64.
    for ts in [i64::MIN, i64::MAX, i64::MIN + 1] {
        let msg = push_msg(&[("u1", "s", None), ("u2", "s", Some(ts))]);
        let (code, message) =
            grpc_raw(p.port, "Push", grpc_frame(msg.len() as u32, &msg), &[]).await;
        assert_eq!(code, INVALID_ARGUMENT, "ts {ts}: {message}");
        assert!(message.contains("pair 1"), "{message}");
    }
    assert_eq!(
        segments(&base).await,
        json!([]),
        "a refused request stored something"
    );
    let (status, _) = post(&base, "/v1/pairs", &[], format!(r#"{{"pairs":[{good}]}}"#)).await;
    assert_eq!(status, 200);
}

/// Bytes that are no PushRequest (a string that is not UTF-8, a cut message, a frame longer
/// than the limit, one that only claims to be) answer INVALID_ARGUMENT; compression that is
/// not enabled answers UNIMPLEMENTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_protobuf_and_oversized_messages_are_invalid_argument() {
    let (_dir, p) = server(&[("MAX_REQUEST_BYTES", "64KiB")]).await;
    // Pair { user_id: [0xff, 0xfe], segment: "s" } inside PushRequest.pairs.
    let pair = [0x0a, 2, 0xff, 0xfe, 0x12, 1, b's'];
    let mut msg = vec![0x0a, pair.len() as u8];
    msg.extend_from_slice(&pair);
    let (code, message) = grpc_raw(p.port, "Push", grpc_frame(msg.len() as u32, &msg), &[]).await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");
    assert!(
        message.contains("invalid protobuf message") && message.contains("UTF-8"),
        "{message}"
    );

    let good = push_msg(&[("u1", "s", None)]);
    let cut = &good[..good.len() - 1];
    let (code, message) = grpc_raw(p.port, "Push", grpc_frame(cut.len() as u32, cut), &[]).await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");

    let users: Vec<String> = (0..3000).map(|i| format!("user-{i:030}")).collect();
    let pairs: Vec<(&str, &str, Option<i64>)> =
        users.iter().map(|u| (u.as_str(), "s", None)).collect();
    let big = push_msg(&pairs);
    assert!(big.len() > 64 << 10);
    let (code, message) = grpc_raw(p.port, "Push", grpc_frame(big.len() as u32, &big), &[]).await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");
    assert!(message.contains("MAX_REQUEST_BYTES"), "{message}");
    // A header claiming 1 GiB, and nothing after it: refused at the header, nothing buffered.
    let (code, message) = grpc_raw(p.port, "Push", grpc_frame(1 << 30, &[]), &[]).await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");
    // The same in a stream: the stream's error names the batch.
    let (code, message) = grpc_raw(
        p.port,
        "PushStream",
        grpc_frame(big.len() as u32, &big),
        &[],
    )
    .await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");

    let (code, message) = grpc_raw(
        p.port,
        "Push",
        grpc_frame(good.len() as u32, &good),
        &[("grpc-encoding", "gzip")],
    )
    .await;
    assert_eq!(code, UNIMPLEMENTED, "{message}");
    assert_eq!(segments(&p.base).await, json!([]));
    let (code, message) = grpc_raw(p.port, "Push", grpc_frame(good.len() as u32, &good), &[]).await;
    assert_eq!(code, 0, "{message}");
}

/// Compressed request bodies are refused before they are read (415), so none is inflated past
/// MAX_REQUEST_BYTES.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_bodies_are_refused() {
    let (_dir, p) = server(&[]).await;
    // A gzip bomb would start like this; the bytes are never read.
    let gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3];
    for enc in ["gzip", "zstd", "br", "deflate", "gzip, identity"] {
        for path in ["/v1/pairs", "/v1/users/delete"] {
            let (status, err) =
                post(&p.base, path, &[("content-encoding", enc)], gzip.clone()).await;
            assert_eq!(status, 415, "{enc} {path}: {err}");
            assert_eq!(err["error"]["code"], "unsupported");
            assert!(
                err["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("content-encoding"),
                "{err}"
            );
        }
    }
    let (status, err) = post(
        &p.base,
        "/v1/pairs",
        &[("content-encoding", "identity")],
        r#"{"pairs":[{"user_id":"u","segment":"s"}]}"#,
    )
    .await;
    assert_eq!(status, 200, "{err}");
}

/// Request heads over the limit: HTTP/1 gets 431, HTTP/2 a refused stream; the server goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_are_refused() {
    let (_dir, p) = server(&[]).await;
    let big = "a".repeat(100 << 10);
    for head in [
        format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n"),
        format!(
            "GET /healthz HTTP/1.1\r\nhost: x\r\n{}\r\n",
            (0..200)
                .map(|i| format!("x-{i}: v\r\n"))
                .collect::<String>()
        ),
        format!("GET /{big} HTTP/1.1\r\nhost: x\r\n\r\n"),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        let _ = s.write_all(head.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 431"),
            "answer {:?}",
            &answer[..answer.len().min(80)]
        );
    }
    // HTTP/2: a header list over 64 KiB.
    let (client, conn) = h2_connect(p.port).await;
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://127.0.0.1:{}/healthz", p.port))
        .header("x-big", big.as_str())
        .body(())
        .unwrap();
    let answered = match client.send_request(req, true) {
        Ok((resp, _)) => match tokio::time::timeout(Duration::from_secs(10), resp).await {
            Ok(Ok(r)) => Some(r.status().as_u16()),
            Ok(Err(_)) => None,
            Err(_) => panic!("no answer to an oversized HTTP/2 header list"),
        },
        Err(_) => None,
    };
    assert!(
        answered.is_none() || answered == Some(431),
        "answered {answered:?}"
    );
    drop(conn);
    let r = reqwest::get(format!("{}/healthz", p.base)).await.unwrap();
    assert_eq!(r.status(), 200);
}

/// Clients that connect and send nothing, or their headers (HTTP/1) or preface (HTTP/2) a byte
/// at a time, are cut off after the first-request deadline (10 s); normal clients are served
/// meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_header_clients_are_cut_off() {
    let (_dir, p) = server(&[]).await;
    let normal = NormalClient::start(&p.base);
    let before = p.rss_kib() * 1024;
    let start = Instant::now();
    let mut slow = Vec::new();
    for i in 0..150 {
        let port = p.port;
        slow.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            // Nothing at all; HTTP/1 headers that never end; the HTTP/2 preface, then silence.
            let (head, endless): (&[u8], bool) = match i % 3 {
                0 => (b"", false),
                1 => (b"POST /v1/pairs HTTP/1.1\r\nhost: x\r\nx-slow: ", true),
                _ => (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", false),
            };
            let mut sent = 0;
            loop {
                if start.elapsed() > Duration::from_secs(30) {
                    return None;
                }
                let next = head.get(sent).copied().or(endless.then_some(b'a'));
                if let Some(b) = next {
                    if s.write_all(&[b]).await.is_err() {
                        return Some(start.elapsed());
                    }
                    sent += 1;
                }
                let mut buf = [0u8; 512];
                match tokio::time::timeout(Duration::from_millis(250), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
                    Ok(Ok(_)) | Err(_) => {}
                }
            }
        }));
    }
    for (i, t) in slow.into_iter().enumerate() {
        let closed = t.await.unwrap();
        let at = closed.unwrap_or_else(|| panic!("slow client {i} was still connected after 30 s"));
        assert!(
            at >= Duration::from_secs(9),
            "slow client {i} was cut after {at:?}, before the deadline"
        );
        assert!(
            at <= Duration::from_secs(20),
            "slow client {i} was cut only after {at:?}"
        );
    }
    normal.check(Duration::from_secs(2)).await;
    let grown = (p.rss_kib() * 1024).saturating_sub(before);
    assert!(grown < 64 << 20, "RSS grew by {} MiB", grown >> 20);
}

/// HTTP/2 abuse on a few connections: as many stalled uploads as the stream limit lets open,
/// and a rapid-reset flood (HEADERS then RST_STREAM, CVE-2023-44487). Normal clients keep
/// pushing and reading throughout, and memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_stream_and_reset_floods_leave_normal_clients_served() {
    let (_dir, p) = server(&[("MAX_REQUEST_BYTES", "1MiB")]).await;
    let port = p.port;
    // Warm up, then measure.
    let normal = NormalClient::start(&p.base);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = p.rss_kib() * 1024;

    // Stalled uploads: each declares a large body, sends 1 KiB of it and stops. Every one holds
    // only the bytes it sent, never the in-flight budget of other clients.
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let stalled_conn = Arc::new(std::sync::Mutex::new(conn));
    let polled = stalled_conn.clone();
    let stalled_task = tokio::spawn(std::future::poll_fn(move |cx| {
        std::pin::Pin::new(&mut *polled.lock().unwrap()).poll(cx)
    }));
    let mut client = client.ready().await.unwrap();
    // One request first, so that the server's SETTINGS (its stream limit) have arrived.
    let (resp, _) = client
        .send_request(
            http::Request::get(format!("http://127.0.0.1:{port}/healthz"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(resp.await.unwrap().status(), 200);
    let mut client = client.ready().await.unwrap();
    let mut held = Vec::new();
    let mut opened = 0;
    for _ in 0..1000 {
        let req = http::Request::post(format!("http://127.0.0.1:{port}/v1/pairs"))
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let Ok((resp, mut send)) = client.send_request(req, false) else {
            break;
        };
        let _ = send.send_data(Bytes::from(vec![b' '; 1024]), false);
        held.push((resp, send));
        opened += 1;
        match tokio::time::timeout(Duration::from_millis(500), client.ready()).await {
            Ok(Ok(ready)) => client = ready,
            // SETTINGS_MAX_CONCURRENT_STREAMS reached: the next stream waits for room.
            _ => break,
        }
    }
    assert!(opened >= 256, "only {opened} stalled streams");
    let limit = stalled_conn.lock().unwrap().max_concurrent_send_streams();
    assert_eq!(limit, 256, "the server's SETTINGS_MAX_CONCURRENT_STREAMS");

    // Rapid reset on three more connections.
    let resets = Arc::new(AtomicU64::new(0));
    let mut floods = Vec::new();
    for _ in 0..3 {
        let resets = resets.clone();
        floods.push(tokio::spawn(async move {
            let (client, conn) = h2_connect(port).await;
            let t = Instant::now();
            for _ in 0..20_000 {
                let Ok(mut c) = client.clone().ready().await else {
                    break;
                };
                let req = http::Request::get(format!("http://127.0.0.1:{port}/v1/segments"))
                    .body(())
                    .unwrap();
                let Ok((_resp, mut send)) = c.send_request(req, false) else {
                    break;
                };
                send.send_reset(h2::Reason::CANCEL);
                resets.fetch_add(1, Ordering::Relaxed);
                if t.elapsed() > Duration::from_secs(15) {
                    break;
                }
            }
            // The server either took them all or closed the connection (GOAWAY).
            tokio::time::timeout(Duration::from_secs(10), conn)
                .await
                .ok()
                .map(|r| r.map_err(|e| e.to_string()))
        }));
    }
    for f in floods {
        let outcome = f.await.unwrap();
        eprintln!("reset flood connection ended: {outcome:?}");
    }
    eprintln!("{} resets sent", resets.load(Ordering::Relaxed));
    let served = normal.check(Duration::from_secs(3)).await;
    eprintln!("normal client served {served} times during the floods");
    let grown = (p.rss_kib() * 1024).saturating_sub(before);
    eprintln!("RSS grew by {} KiB", grown >> 10);
    assert!(grown < 96 << 20, "RSS grew by {} MiB", grown >> 20);
    drop(held);
    stalled_task.abort();
    // The stalled uploads were never accepted.
    let count: Value = reqwest::get(format!("{}/v1/segments/normal", p.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(count["users"].as_u64().unwrap() >= served);
}

/// Extreme query parameters answer 4xx or a valid empty answer, never a 5xx; in particular a
/// history range wholly before what retention keeps (it used to panic in the file store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_query_parameters_never_fail_the_server() {
    let (_dir, p) = server(&[("HISTORY_INTERVAL", "1s"), ("HISTORY_RETENTION", "1h")]).await;
    let base = p.base.clone();
    let (status, _) = post(
        &base,
        "/v1/pairs",
        &[],
        r#"{"pairs":[{"user_id":"u","segment":"s"}]}"#,
    )
    .await;
    assert_eq!(status, 200);
    // Once a tick was sampled, retention has pruned everything before now - 1 h.
    until("a history sample", 30, async || {
        let h: Value = reqwest::get(format!(
            "{base}/v1/segments/s/history?from={}&step=1s",
            now() - 60
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        h["points"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    let r = reqwest::get(format!(
        "{base}/v1/segments/s/history?from=0&to=100000&step=1d"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["points"], json!([]));
    for q in [
        format!("/v1/segments/s/history?from={}&to={}", i64::MIN, i64::MAX),
        format!(
            "/v1/segments/s/history?from={}&to={}&step=1s",
            i64::MIN,
            i64::MAX
        ),
        format!(
            "/v1/segments/s/history?from={}&to={}&step=18446744073709551615s",
            i64::MIN,
            i64::MAX
        ),
        format!("/v1/segments/s/history?from={}", i64::MAX),
        "/v1/segments/s/history?from=1.5".to_string(),
        "/v1/segments/s?within=18446744073709551616s".to_string(),
        "/v1/segments/s?within=99999999999999999999w".to_string(),
        "/v1/segments?within=0s".to_string(),
        "/v1/segments?within=%FF".to_string(),
        format!("/v1/count?q={}", "(".repeat(10_000)),
        format!("/v1/count?q={}", "NOT%20".repeat(10_000) + "s"),
        "/v1/overlap?segments=".to_string() + &"s,".repeat(5000),
        format!("/v1/users/{}/segments", "%FF%FE"),
    ] {
        let r = reqwest::get(format!("{base}{q}")).await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        assert!(
            status == 200 || (400..500).contains(&status),
            "{}: {status} {body}",
            &q[..q.len().min(100)]
        );
        if status != 200 {
            let v: Value =
                serde_json::from_str(&body).unwrap_or_else(|_| panic!("{q}: not JSON: {body}"));
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{body}"
            );
        }
    }
    assert!(
        !p.logs().contains("panicked"),
        "the server panicked:\n{}",
        p.logs()
    );
}
