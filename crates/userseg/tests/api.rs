//! HTTP and gRPC API tests against standalone mode started in process by the same
//! `userseg::standalone::start` the binary runs: axum + tonic on one port, ingest into the real
//! write-ahead log, the batch processor, the embedded store.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{start, Server};
use tokio_util::sync::CancellationToken;
use userseg_domain::{Pair, UserDeletion};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{
    EstimateRequest, ListEstimatesRequest, Mode as PbMode, Pair as PbPair, PushRequest,
};
use userseg_testkit::now;
use userseg_usecase::{PortError, SegmentWriter};

async fn post(s: &Server, body: Value) -> (u16, Value) {
    post_raw(s, "application/json", body.to_string().into_bytes()).await
}

async fn post_raw(s: &Server, content_type: &str, body: Vec<u8>) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/pairs", s.base))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(s: &Server, path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{}{path}", s.base)).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits until `GET /v1/segments` shows exactly `want` (pairs are applied a moment after the
/// acknowledgement).
async fn until_counts(s: &Server, want: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = get(s, "/v1/segments").await;
        assert_eq!(status, 200);
        if body["segments"] == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "counts never became {want}; last {body}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_push_and_estimate() {
    let s = start(&[]).await;
    let (status, body) = post(
        &s,
        json!({"pairs": [
            {"user_id": "u1", "segment": "sports"},
            {"user_id": "u2", "segment": "sports", "ts": now() - 60},
            {"user_id": "u1", "segment": "sports"},
            {"user_id": "u1", "segment": "news", "ts": now() + 60},
        ]}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"accepted": 4})));
    let (status, body) = post_raw(
        &s,
        "application/x-ndjson",
        b"{\"user_id\":\"u3\",\"segment\":\"news\"}\n\n{\"user_id\":\"u3\",\"segment\":\"news\"}\n"
            .to_vec(),
    )
    .await;
    assert_eq!((status, body), (200, json!({"accepted": 2})));
    let list = until_counts(
        &s,
        json!([{"segment": "news", "users": 2}, {"segment": "sports", "users": 2}]),
    )
    .await;
    assert_eq!(list["exact"], true);
    assert_eq!(list["window_seconds"], 1_209_600);
    assert!((list["as_of"].as_i64().unwrap() - now()).abs() <= 2);
    let (status, one) = get(&s, "/v1/segments/sports").await;
    assert_eq!(status, 200);
    assert_eq!(one["segment"], "sports");
    assert_eq!(one["users"], 2);
    assert_eq!(one["exact"], true);
    let (status, unknown) = get(&s, "/v1/segments/nobody?mode=approx").await;
    assert_eq!(status, 200);
    assert_eq!(unknown["users"], 0);
}

/// Every class of bad input gets a specific 4xx with a JSON error body, and nothing of a
/// rejected request is stored, even its valid pairs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_is_rejected_whole_with_specific_errors() {
    let s = start(&[
        "--max-pairs-per-request",
        "3",
        "--max-request-bytes",
        "4096",
    ])
    .await;
    let ok = json!({"user_id": "good", "segment": "kept-out"});
    let n = now();
    let cases: Vec<(&str, Value, u16, &str, Option<u64>)> = vec![
        (
            "empty user",
            json!({"pairs": [ok, {"user_id": "", "segment": "s"}]}),
            400,
            "user_id is empty",
            Some(1),
        ),
        (
            "long user",
            json!({"pairs": [ok, {"user_id": "x".repeat(257), "segment": "s"}]}),
            400,
            "257 bytes",
            Some(1),
        ),
        (
            "control char",
            json!({"pairs": [ok, {"user_id": "a\u{1}b", "segment": "s"}]}),
            400,
            "control character U+0001",
            Some(1),
        ),
        (
            "bad segment",
            json!({"pairs": [ok, {"user_id": "u", "segment": "a/b"}]}),
            400,
            "segment contains '/'",
            Some(1),
        ),
        (
            "long segment",
            json!({"pairs": [ok, {"user_id": "u", "segment": "s".repeat(129)}]}),
            400,
            "129 characters",
            Some(1),
        ),
        (
            "future ts",
            json!({"pairs": [ok, {"user_id": "u", "segment": "s", "ts": n + 3600}]}),
            400,
            "ahead of the server clock",
            Some(1),
        ),
        (
            "expired ts",
            json!({"pairs": [ok, {"user_id": "u", "segment": "s", "ts": n - 15 * 86_400}]}),
            400,
            "already expired",
            Some(1),
        ),
        (
            "wrong type",
            json!({"pairs": [ok, {"user_id": "u", "segment": "s", "ts": "soon"}]}),
            400,
            "pairs[1].ts: invalid type",
            Some(1),
        ),
        (
            "number user",
            json!({"pairs": [ok, {"user_id": 7, "segment": "s"}]}),
            400,
            "pairs[1].user_id: invalid type",
            Some(1),
        ),
        (
            "unknown field",
            json!({"pairs": [ok, {"user_id": "u", "segment": "s", "extra": 1}]}),
            400,
            "unknown field `extra`",
            Some(1),
        ),
        (
            "missing field",
            json!({"pairs": [ok, {"user_id": "u"}]}),
            400,
            "missing field `segment`",
            Some(1),
        ),
        (
            "unknown top field",
            json!({"pairs": [ok], "more": true}),
            400,
            "unknown field `more`",
            None,
        ),
        (
            "no pairs field",
            json!({}),
            400,
            "missing field `pairs`",
            None,
        ),
        (
            "too many pairs",
            json!({"pairs": [ok, ok, ok, ok]}),
            413,
            "at most 3 are allowed",
            None,
        ),
    ];
    for (name, body, status, needle, index) in cases {
        let (got, err) = post(&s, body).await;
        assert_eq!(got, status, "{name}: {err}");
        let msg = err["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}");
        let code = if status == 413 {
            "payload_too_large"
        } else {
            "invalid_argument"
        };
        assert_eq!(err["error"]["code"], code, "{name}");
        assert_eq!(err["error"]["index"].as_u64(), index, "{name}: {err}");
    }
    // Malformed JSON, trailing garbage, a body over the byte limit, a bad NDJSON line, a wrong
    // content type.
    let (st, err) = post_raw(&s, "application/json", b"{\"pairs\": [".to_vec()).await;
    assert_eq!(st, 400);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid JSON body"));
    let (st, _) = post_raw(&s, "application/json", b"{\"pairs\": []} x".to_vec()).await;
    assert_eq!(st, 400);
    let one = json!({"user_id": "u".repeat(256), "segment": "s"});
    let big = json!({ "pairs": vec![one; 20] }).to_string();
    let (st, err) = post_raw(&s, "application/json", big.into_bytes()).await;
    assert_eq!(st, 413);
    assert_eq!(err["error"]["code"], "payload_too_large");
    let nd =
        b"{\"user_id\":\"good\",\"segment\":\"kept-out\"}\n{\"user_id\":\"u\",\"segment\":\"s\"\n"
            .to_vec();
    let (st, err) = post_raw(&s, "application/x-ndjson", nd).await;
    assert_eq!(st, 400);
    assert_eq!(err["error"]["line"], 2);
    assert_eq!(err["error"]["index"], 1);
    let (st, err) = post_raw(&s, "text/csv", b"u,s".to_vec()).await;
    assert_eq!(st, 415);
    assert_eq!(err["error"]["code"], "unsupported");
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("application/x-ndjson"));
    // Bad estimate queries.
    let (st, err) = get(&s, "/v1/segments/bad%20name").await;
    assert_eq!(st, 400);
    assert!(err["error"]["message"]
        .as_str()
        .unwrap()
        .contains("invalid segment name"));
    let (st, _) = get(&s, "/v1/segments?mode=fuzzy").await;
    assert_eq!(st, 400);
    let (st, err) = get(&s, "/v2/nothing").await;
    assert_eq!(st, 404);
    assert_eq!(err["error"]["code"], "not_found");
    // A valid request afterwards is counted, and nothing of the rejected ones is.
    let (st, _) = post(
        &s,
        json!({"pairs": [{"user_id": "late", "segment": "after"}]}),
    )
    .await;
    assert_eq!(st, 200);
    until_counts(&s, json!([{"segment": "after", "users": 1}])).await;
}

fn pb(user: &str, segment: &str, ts: Option<i64>) -> PbPair {
    PbPair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_push_stream_and_estimates() {
    let s = start(&[]).await;
    let mut client = SegmentsClient::connect(s.base.clone()).await.unwrap();
    let r = client
        .push(PushRequest {
            pairs: vec![pb("a", "g1", None), pb("b", "g1", Some(now() - 10))],
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().accepted, 2);
    let batches: Vec<PushRequest> = (0..50)
        .map(|i| PushRequest {
            pairs: (0..100)
                .map(|j| pb(&format!("user-{}", i * 100 + j), "g2", None))
                .collect(),
        })
        .collect();
    let r = client
        .push_stream(tokio_stream::iter(batches))
        .await
        .unwrap();
    assert_eq!(r.into_inner().accepted, 5000);
    until_counts(
        &s,
        json!([{"segment": "g1", "users": 2}, {"segment": "g2", "users": 5000}]),
    )
    .await;
    let e = client
        .estimate(EstimateRequest {
            segment: "g2".into(),
            mode: PbMode::Exact as i32,
            within_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((e.segment.as_str(), e.users, e.exact), ("g2", 5000, true));
    assert_eq!(e.window_seconds, 1_209_600);
    let l = client
        .list_estimates(ListEstimatesRequest {
            mode: PbMode::Approx as i32,
            within_seconds: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<_> = l
        .segments
        .iter()
        .map(|s| (s.segment.as_str(), s.users))
        .collect();
    assert_eq!(names, [("g1", 2), ("g2", 5000)]);
    assert!(l.exact, "the embedded store always answers exactly");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_bad_input_is_invalid_argument() {
    let s = start(&[
        "--max-pairs-per-request",
        "10",
        "--max-request-bytes",
        "2048",
    ])
    .await;
    let mut client = SegmentsClient::connect(s.base.clone()).await.unwrap();
    let err = client
        .push(PushRequest {
            pairs: vec![pb("a", "ok", None), pb("b", "not ok", None)],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("pair 1: segment contains ' '"),
        "{}",
        err.message()
    );
    let err = client
        .push(PushRequest {
            pairs: vec![pb("a", "ok", Some(now() + 600))],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .push(PushRequest {
            pairs: (0..11).map(|i| pb(&i.to_string(), "ok", None)).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("at most 10"));
    let err = client
        .push(PushRequest {
            pairs: (0..10)
                .map(|i| pb(&format!("{i}{}", "x".repeat(250)), "ok", None))
                .collect(),
        })
        .await
        .unwrap_err();
    assert_ne!(
        err.code(),
        tonic::Code::Ok,
        "an oversized message must be refused"
    );
    let err = client
        .estimate(EstimateRequest {
            segment: "".into(),
            mode: 0,
            within_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = client
        .list_estimates(ListEstimatesRequest {
            mode: 99,
            within_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // A stream with a bad third batch: the first two stay accepted and are counted.
    let batches = vec![
        PushRequest {
            pairs: vec![pb("s1", "stream", None)],
        },
        PushRequest {
            pairs: vec![pb("s2", "stream", None)],
        },
        PushRequest {
            pairs: vec![pb("s3", "bad seg", None)],
        },
    ];
    let err = client
        .push_stream(tokio_stream::iter(batches))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("batch 2"), "{}", err.message());
    until_counts(&s, json!([{"segment": "stream", "users": 2}])).await;
}

/// A store that holds every write until `release` fires: what was acknowledged stays in
/// flight (uncommitted) however idle the server is.
struct HeldWriter {
    inner: Arc<dyn SegmentWriter>,
    release: CancellationToken,
}

#[async_trait::async_trait]
impl SegmentWriter for HeldWriter {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        self.release.cancelled().await;
        self.inner.write(pairs).await
    }

    async fn delete_users(&self, deletion: UserDeletion) -> Result<(), PortError> {
        self.release.cancelled().await;
        self.inner.delete_users(deletion).await
    }
}

/// Past MAX_INFLIGHT_PAIRS accepted but not yet applied (the store holds its writes), HTTP
/// answers 503 `overloaded` with retry-after and gRPC RESOURCE_EXHAUSTED, once the log's
/// enqueue wait (5 s) ran out; once the store takes the writes, the budget is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_and_resource_exhausted() {
    let release = CancellationToken::new();
    let held = release.clone();
    let s = support::start_with(
        &["--max-pairs-per-request", "5", "--max-inflight-pairs", "5"],
        move |_, seams| {
            seams.writer = Some(Box::new(move |inner| {
                Arc::new(HeldWriter {
                    inner,
                    release: held,
                })
            }))
        },
    )
    .await;
    let five: Vec<Value> = (0..5)
        .map(|i| json!({"user_id": format!("u{i}"), "segment": "s"}))
        .collect();
    let (st, _) = post(&s, json!({ "pairs": five })).await;
    assert_eq!(st, 200);
    let http = async {
        reqwest::Client::new()
            .post(format!("{}/v1/pairs", s.base))
            .json(&json!({"pairs": [{"user_id": "x", "segment": "s"}]}))
            .send()
            .await
            .unwrap()
    };
    let grpc = async {
        let mut client = SegmentsClient::connect(s.base.clone()).await.unwrap();
        client
            .push(PushRequest {
                pairs: vec![pb("x", "s", None)],
            })
            .await
            .unwrap_err()
    };
    let (r, e) = tokio::join!(http, grpc);
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "overloaded");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    assert!(
        e.message().contains("waiting to be applied"),
        "{}",
        e.message()
    );

    // Nothing acknowledged was lost, and the budget comes back once the store takes writes.
    release.cancel();
    until_counts(&s, json!([{"segment": "s", "users": 5}])).await;
    let (st, _) = post(&s, json!({"pairs": [{"user_id": "x", "segment": "s"}]})).await;
    assert_eq!(st, 200);
    until_counts(&s, json!([{"segment": "s", "users": 6}])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_token_guards_the_api_but_not_probes() {
    let token = "0123456789abcdef-secret";
    let s = start(&["--api-token", token]).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/v1/pairs", s.base))
        .json(&json!({"pairs": [{"user_id": "u", "segment": "s"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"]["code"], "unauthenticated");
    let r = http
        .get(format!("{}/v1/segments", s.base))
        .bearer_auth("wrong-token-wrong-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http
        .get(format!("{}/v1/segments", s.base))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(get(&s, "/healthz").await.0, 200);
    assert_eq!(get(&s, "/readyz").await.0, 200);

    let channel = tonic::transport::Endpoint::from_shared(s.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut anon = SegmentsClient::new(channel.clone());
    let e = anon
        .list_estimates(ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
    let mut authed =
        SegmentsClient::with_interceptor(channel.clone(), move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        });
    authed
        .list_estimates(ListEstimatesRequest {
            mode: 0,
            within_seconds: 0,
        })
        .await
        .unwrap();
    // The gRPC health service stays open for load balancers.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let h = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "userseg.v1.Segments".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    let s = start(&[]).await;
    let channel = tonic::transport::Endpoint::from_shared(s.base.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // One listing per protocol version; v1alpha as grpcio-reflection, Postman or Evans speak it.
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut client = ServerReflectionClient::new(channel.clone());
            let mut stream = client
                .server_reflection_info(tokio_stream::iter(vec![req]))
                .await
                .unwrap()
                .into_inner();
            let resp = stream.message().await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
                panic!("unexpected reflection response");
            };
            let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }};
    }
    let v1 = list_services!(v1);
    let v1alpha = list_services!(v1alpha);
    assert_eq!(
        v1,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "userseg.v1.Segments",
        ]
    );
    assert_eq!(v1alpha, v1);
}
