//! Analytics over HTTP and gRPC against the real stack in process (write-ahead log, batch
//! processor, embedded store, history files), checked against the brute-force model of
//! `userseg_usecase::analytics_suite::Model`; every bad input answered 400 / INVALID_ARGUMENT;
//! the OpenAPI document lists every route and its examples are answered as documented.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use userseg_api::ApiState;
use userseg_domain::{Expr, Limits, Pair, Window, Within};
use userseg_embedded::{
    open_standalone, EmbeddedStore, FileDeadLetters, FileHistory, WalConfig, WalHandle,
};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{
    CountRequest, DeleteUsersRequest, EstimateRequest, ExportMembersRequest,
    GetUserSegmentsRequest, HistoryRequest, ListEstimatesRequest, OverlapRequest, Pair as PbPair,
    PushRequest,
};
use userseg_usecase::analytics_suite::Model;
use userseg_usecase::{
    Analytics, BatchConfig, BatchProcessor, Clock, Estimation, History, HistoryConfig,
    HistorySampler, Ingest, ManualClock, Member, Membership, Overlap, SegmentCount,
};

/// Minute-aligned, so the store's 60 s buckets match the model exactly.
const T0: i64 = 1_763_942_400;
const W: i64 = 14 * 86_400;

struct Server {
    base: String,
    clock: Arc<ManualClock>,
    wal: WalHandle,
    sampler: HistorySampler,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let window = Window::DEFAULT;
    let opened = open_standalone(dir.path(), window, WalConfig::new("")).unwrap();
    let store = EmbeddedStore(opened.store.clone());
    let stop = CancellationToken::new();
    let processor = BatchProcessor::new(
        Arc::new(store.clone()),
        Arc::new(FileDeadLetters::new(dir.path().join("dlq"))),
        BatchConfig {
            flush_interval: Duration::from_millis(100),
            ..BatchConfig::default()
        },
    );
    let s = stop.clone();
    let source = opened.source;
    tokio::spawn(async move { processor.run(source, s).await });
    let clock = Arc::new(ManualClock::new(T0));
    let log = Arc::new(opened.log);
    let ingest = Ingest::new(log.clone(), clock.clone(), window, Limits::default());
    let estimation = Estimation::new(
        Arc::new(store.clone()),
        clock.clone(),
        window,
        Duration::ZERO,
    );
    let history_store = Arc::new(FileHistory::open(&dir.path().join("history")).unwrap());
    let config = HistoryConfig {
        interval: 60,
        retention: 35 * 86_400,
    };
    let sampler = HistorySampler::new(
        Arc::new(store.clone()),
        history_store.clone(),
        clock.clone(),
        config,
    );
    let mut state = ApiState::new(Some(ingest), Some(estimation));
    state.analytics = Some(Analytics::new(Arc::new(store), log, clock.clone(), window));
    state.history = Some(History::new(history_store, clock.clone(), config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(userseg_api::serve(
        listener,
        userseg_api::router(state),
        stop.clone(),
    ));
    Server {
        base: format!("http://{addr}"),
        clock,
        wal: opened.wal,
        sampler,
        _dir: dir,
        stop,
    }
}

impl Server {
    async fn grpc(&self) -> SegmentsClient<tonic::transport::Channel> {
        SegmentsClient::connect(self.base.clone()).await.unwrap()
    }

    /// Waits until everything acknowledged is applied (a condition, not a sleep).
    async fn applied(&self) {
        let written = self.wal.written();
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.wal.committed() < written {
            assert!(
                Instant::now() < deadline,
                "acknowledged records not applied in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get_text(&self, path: &str) -> (u16, String, String) {
        let r = reqwest::get(format!("{}{path}", self.base)).await.unwrap();
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        (status, ct, r.text().await.unwrap())
    }

    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let c = reqwest::Client::new();
        let url = format!("{}{path}", self.base);
        let req = match method {
            "POST" => c.post(url),
            "DELETE" => c.delete(url),
            _ => c.get(url),
        };
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(b.to_string()),
            None => req,
        };
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }
}

/// Percent-encodes everything but unreserved characters.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn users_of(v: &Value) -> Vec<Membership> {
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Membership {
            segment: m["segment"].as_str().unwrap().into(),
            last_seen: m["last_seen"].as_i64().unwrap(),
            expires_at: m["expires_at"].as_i64().unwrap(),
        })
        .collect()
}

fn counts_of(v: &Value) -> Vec<SegmentCount> {
    v["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| SegmentCount {
            segment: m["segment"].as_str().unwrap().into(),
            users: m["users"].as_u64().unwrap(),
        })
        .collect()
}

fn sorted(mut v: Vec<Member>) -> Vec<Member> {
    v.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    v
}

const USERS: [&str; 8] = [
    "u0",
    "u/1",
    "user two",
    "用户3",
    "u4?x=1&y",
    "u5%2F",
    "o'brien \"6\"",
    "u7",
];

fn random_expr(rng: &mut StdRng, segs: usize, depth: u32) -> Expr {
    if depth == 0 || rng.random_bool(0.35) {
        return Expr::Segment(format!("s{}", rng.random_range(0..=segs)));
    }
    let e = match rng.random_range(0..3) {
        0 => Expr::Not(Box::new(random_expr(rng, segs, depth - 1))),
        k => {
            let items = (0..rng.random_range(2..4))
                .map(|_| random_expr(rng, segs, depth - 1))
                .collect();
            if k == 1 {
                Expr::And(items)
            } else {
                Expr::Or(items)
            }
        }
    };
    Expr::parse(&e.to_string()).unwrap()
}

/// Random pushes and deletions over both protocols and clock moves; after each step every read
/// over both protocols equals the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_answers_match_the_brute_force_model() {
    for seed in 0..4u64 {
        let s = start().await;
        let mut grpc = s.grpc().await;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut m = Model::new(Window::DEFAULT);
        let segs = 4;
        for step in 0..24 {
            let ctx = format!("seed {seed} step {step}");
            let now = s.clock.now();
            match rng.random_range(0..10) {
                0..=5 => {
                    let pairs: Vec<Pair> = (0..rng.random_range(1..30))
                        .map(|_| Pair {
                            user_id: USERS[rng.random_range(0..USERS.len())].into(),
                            segment: format!("s{}", rng.random_range(0..segs)),
                            ts: now - rng.random_range(0..W / 60) * 60,
                        })
                        .collect();
                    m.apply(&pairs);
                    if rng.random_bool(0.5) {
                        let body = json!({"pairs": pairs.iter().map(|p| json!({"user_id": p.user_id, "segment": p.segment, "ts": p.ts})).collect::<Vec<_>>()});
                        let (st, v) = s.send("POST", "/v1/pairs", Some(body)).await;
                        assert_eq!(
                            (st, v["accepted"].as_u64()),
                            (200, Some(pairs.len() as u64)),
                            "{ctx}"
                        );
                    } else {
                        grpc.push(PushRequest {
                            pairs: pairs
                                .iter()
                                .map(|p| PbPair {
                                    user_id: p.user_id.clone(),
                                    segment: p.segment.clone(),
                                    ts: Some(p.ts),
                                })
                                .collect(),
                        })
                        .await
                        .unwrap();
                    }
                }
                6 => {
                    let ids: Vec<String> = (0..rng.random_range(1..3))
                        .map(|_| USERS[rng.random_range(0..USERS.len())].to_string())
                        .collect();
                    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
                    match rng.random_range(0..3) {
                        0 => {
                            m.delete(&ids[..1]);
                            let (st, v) = s
                                .send("DELETE", &format!("/v1/users/{}", enc(&ids[0])), None)
                                .await;
                            assert_eq!((st, v["deleted"].as_u64()), (200, Some(1)), "{ctx}");
                        }
                        1 => {
                            m.delete(&ids);
                            let (st, v) = s
                                .send("POST", "/v1/users/delete", Some(json!({"user_ids": ids})))
                                .await;
                            assert_eq!(
                                (st, v["deleted"].as_u64()),
                                (200, Some(distinct as u64)),
                                "{ctx}"
                            );
                        }
                        _ => {
                            m.delete(&ids);
                            let r = grpc
                                .delete_users(DeleteUsersRequest {
                                    user_ids: ids.clone(),
                                })
                                .await
                                .unwrap()
                                .into_inner();
                            assert_eq!(r.deleted, distinct as u64, "{ctx}");
                        }
                    }
                }
                7 => s.clock.advance(rng.random_range(1..3 * 24 * 60) * 60),
                _ => s.clock.advance(rng.random_range(0..10) * 60),
            }
            s.applied().await;
            let now = s.clock.now();
            let within_secs = match rng.random_range(0..3) {
                0 => None,
                _ => Some(rng.random_range(1..=W / 60) as u64 * 60),
            };
            let within = within_secs.map(|d| Within::from_secs(d, Window::DEFAULT).unwrap());
            let wq = within_secs.map_or(String::new(), |d| format!("within={d}s"));
            let wg = within_secs.unwrap_or(0);

            // Counts with a lookback.
            let want = m.count_all(now, within);
            let (st, v) = s.get(&format!("/v1/segments?{wq}")).await;
            assert_eq!(st, 200, "{ctx}: {v}");
            assert_eq!(counts_of(&v), want, "{ctx}: /v1/segments?{wq}");
            assert_eq!(
                v["within_seconds"].as_u64(),
                Some(within_secs.unwrap_or(W as u64))
            );
            let l = grpc
                .list_estimates(ListEstimatesRequest {
                    mode: 0,
                    within_seconds: wg,
                })
                .await
                .unwrap()
                .into_inner();
            let got: Vec<SegmentCount> = l
                .segments
                .into_iter()
                .map(|e| SegmentCount {
                    segment: e.segment,
                    users: e.users,
                })
                .collect();
            assert_eq!(got, want, "{ctx}: ListEstimates within {wg}");
            let one = format!("s{}", rng.random_range(0..segs));
            let (_, v) = s.get(&format!("/v1/segments/{one}?{wq}")).await;
            assert_eq!(
                v["users"].as_u64(),
                Some(m.count(&one, now, within)),
                "{ctx}: {one}"
            );
            let e = grpc
                .estimate(EstimateRequest {
                    segment: one.clone(),
                    mode: 0,
                    within_seconds: wg,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(e.users, m.count(&one, now, within), "{ctx}: Estimate {one}");

            // An expression.
            let expr = random_expr(&mut rng, segs, 3);
            let want = m.count_expr(&expr, now, within);
            let q = expr.to_string().to_lowercase();
            let (st, v) = s.get(&format!("/v1/count?q={}&{wq}", enc(&q))).await;
            assert_eq!(
                (st, v["users"].as_u64()),
                (200, Some(want)),
                "{ctx}: count {q}: {v}"
            );
            assert_eq!(v["query"], json!(q));
            let c = grpc
                .count(CountRequest {
                    query: q.clone(),
                    within_seconds: wg,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(c.users, want, "{ctx}: Count {q}");

            // Overlap.
            let names: Vec<String> = (0..rng.random_range(2..=segs + 1))
                .map(|i| format!("s{i}"))
                .collect();
            let want: Overlap = m.overlap(&names, now, within);
            let (st, v) = s
                .get(&format!("/v1/overlap?segments={}&{wq}", names.join(",")))
                .await;
            assert_eq!(st, 200, "{ctx}: {v}");
            assert_eq!(v["users"], json!(want.users), "{ctx}: overlap");
            assert_eq!(v["both"], json!(want.both), "{ctx}: overlap");
            let o = grpc
                .overlap(OverlapRequest {
                    segments: names.clone(),
                    within_seconds: wg,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(o.users, want.users);
            assert_eq!(
                o.both.into_iter().map(|r| r.both).collect::<Vec<_>>(),
                want.both
            );

            // A user's memberships.
            let user = USERS[rng.random_range(0..USERS.len())];
            let want = m.user_segments(user, now);
            let (st, v) = s.get(&format!("/v1/users/{}/segments", enc(user))).await;
            assert_eq!(st, 200, "{ctx}: {v}");
            assert_eq!(v["user_id"], json!(user));
            assert_eq!(users_of(&v), want, "{ctx}: segments of {user:?}");
            let u = grpc
                .get_user_segments(GetUserSegmentsRequest {
                    user_id: user.into(),
                })
                .await
                .unwrap()
                .into_inner();
            let got: Vec<Membership> = u
                .segments
                .into_iter()
                .map(|x| Membership {
                    segment: x.segment,
                    last_seen: x.last_seen,
                    expires_at: x.expires_at,
                })
                .collect();
            assert_eq!(got, want, "{ctx}: GetUserSegments {user:?}");

            // A segment's members.
            let seg = format!("s{}", rng.random_range(0..segs));
            let want = m.members(&seg, now, within);
            let (st, ct, body) = s
                .get_text(&format!("/v1/segments/{seg}/members?{wq}"))
                .await;
            assert_eq!((st, ct.as_str()), (200, "application/x-ndjson"), "{ctx}");
            let got: Vec<Member> = body
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    Member {
                        user_id: v["user_id"].as_str().unwrap().into(),
                        last_seen: v["last_seen"].as_i64().unwrap(),
                    }
                })
                .collect();
            assert_eq!(sorted(got), want, "{ctx}: members of {seg}");
            let mut stream = grpc
                .export_members(ExportMembersRequest {
                    segment: seg.clone(),
                    within_seconds: wg,
                })
                .await
                .unwrap()
                .into_inner();
            let mut got = Vec::new();
            while let Some(chunk) = stream.message().await.unwrap() {
                got.extend(chunk.members.into_iter().map(|x| Member {
                    user_id: x.user_id,
                    last_seen: x.last_seen,
                }));
            }
            assert_eq!(sorted(got), want, "{ctx}: ExportMembers {seg}");
        }
    }
}

/// Every bad input: HTTP 400 (413 for too many ids) with a JSON error, gRPC INVALID_ARGUMENT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_input_is_rejected_with_a_clear_error() {
    let s = start().await;
    let many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let cases: Vec<(&str, String, Option<Value>, u16, &str)> = vec![
        (
            "GET",
            "/v1/segments?within=7x".into(),
            None,
            400,
            "not a duration",
        ),
        (
            "GET",
            "/v1/segments?within=0m".into(),
            None,
            400,
            "longer than 0",
        ),
        (
            "GET",
            "/v1/segments?within=15d".into(),
            None,
            400,
            "longer than the window",
        ),
        (
            "GET",
            "/v1/segments/sports?within=-1d".into(),
            None,
            400,
            "not a duration",
        ),
        (
            "GET",
            "/v1/segments?within=1d&within=2d".into(),
            None,
            400,
            "given twice",
        ),
        (
            "GET",
            "/v1/segments?when=1d".into(),
            None,
            400,
            "unknown query parameter",
        ),
        (
            "GET",
            "/v1/count".into(),
            None,
            400,
            "missing query parameter q",
        ),
        ("GET", "/v1/count?q=".into(), None, 400, "empty"),
        (
            "GET",
            format!("/v1/count?q={}", enc("a AND")),
            None,
            400,
            "position 5",
        ),
        (
            "GET",
            format!("/v1/count?q={}", enc("(a OR b")),
            None,
            400,
            "position 7",
        ),
        (
            "GET",
            format!("/v1/count?q={}", enc("a b")),
            None,
            400,
            "position 2",
        ),
        (
            "GET",
            format!("/v1/count?q={}", enc("a & b")),
            None,
            400,
            "position 2",
        ),
        (
            "GET",
            format!("/v1/count?q={}", enc(&vec!["s"; 65].join(" OR "))),
            None,
            400,
            "more than 64",
        ),
        (
            "GET",
            "/v1/count?q=a&within=15d".to_string(),
            None,
            400,
            "longer than the window",
        ),
        (
            "GET",
            "/v1/overlap?segments=a".into(),
            None,
            400,
            "give 2 to 64",
        ),
        ("GET", "/v1/overlap?segments=a,a".into(), None, 400, "twice"),
        (
            "GET",
            "/v1/overlap?segments=a,b%20c".into(),
            None,
            400,
            "segment 1",
        ),
        (
            "GET",
            format!(
                "/v1/overlap?segments={}",
                (0..65)
                    .map(|i| format!("s{i}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            None,
            400,
            "give 2 to 64",
        ),
        (
            "GET",
            "/v1/overlap".into(),
            None,
            400,
            "missing query parameter segments",
        ),
        (
            "GET",
            "/v1/users/a%0Ab/segments".into(),
            None,
            400,
            "control character",
        ),
        (
            "GET",
            format!("/v1/users/{}/segments", "x".repeat(257)),
            None,
            400,
            "at most 256",
        ),
        (
            "GET",
            "/v1/users/%FF/segments".into(),
            None,
            400,
            "invalid path",
        ),
        (
            "DELETE",
            "/v1/users/a%0Ab".into(),
            None,
            400,
            "control character",
        ),
        (
            "POST",
            "/v1/users/delete".into(),
            Some(json!({"user_ids": []})),
            400,
            "empty",
        ),
        (
            "POST",
            "/v1/users/delete".into(),
            Some(json!({"user_ids": ["ok", ""]})),
            400,
            "user_ids[1]",
        ),
        (
            "POST",
            "/v1/users/delete".into(),
            Some(json!({"ids": ["x"]})),
            400,
            "invalid JSON body",
        ),
        (
            "POST",
            "/v1/users/delete".into(),
            Some(json!({"user_ids": many})),
            413,
            "at most 10000",
        ),
        (
            "GET",
            "/v1/segments/bad%20name/members".into(),
            None,
            400,
            "segment",
        ),
        (
            "GET",
            "/v1/segments/s/members?within=99d".into(),
            None,
            400,
            "longer than the window",
        ),
        (
            "GET",
            "/v1/segments/s/history?from=10&to=5".into(),
            None,
            400,
            "after to",
        ),
        (
            "GET",
            "/v1/segments/s/history?from=x".into(),
            None,
            400,
            "unix seconds",
        ),
        (
            "GET",
            "/v1/segments/s/history?step=0s".into(),
            None,
            400,
            "step",
        ),
        (
            "GET",
            "/v1/segments/s/history?step=1s&from=0&to=100000".into(),
            None,
            400,
            "at most 10000",
        ),
        (
            "GET",
            "/v1/segments/s%3B/history".into(),
            None,
            400,
            "segment",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let (st, v) = s.send(method, &path, body).await;
        assert_eq!(st, status, "{method} {path}: {v}");
        let code = if status == 413 {
            "payload_too_large"
        } else {
            "invalid_argument"
        };
        assert_eq!(v["error"]["code"], json!(code), "{method} {path}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} should mention {needle:?}"
        );
    }
    // The same classes over gRPC.
    let mut g = s.grpc().await;
    let invalid = |r: Result<(), tonic::Status>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{what}: {e:?}");
        assert!(!e.message().is_empty());
    };
    invalid(
        g.count(CountRequest {
            query: "a AND".into(),
            within_seconds: 0,
        })
        .await
        .map(|_| ()),
        "malformed expression",
    );
    invalid(
        g.count(CountRequest {
            query: "a".into(),
            within_seconds: W as u64 + 1,
        })
        .await
        .map(|_| ()),
        "within beyond the window",
    );
    invalid(
        g.overlap(OverlapRequest {
            segments: vec!["a".into()],
            within_seconds: 0,
        })
        .await
        .map(|_| ()),
        "one segment",
    );
    invalid(
        g.get_user_segments(GetUserSegmentsRequest {
            user_id: "a\u{1}".into(),
        })
        .await
        .map(|_| ()),
        "control character",
    );
    invalid(
        g.get_user_segments(GetUserSegmentsRequest {
            user_id: String::new(),
        })
        .await
        .map(|_| ()),
        "empty user id",
    );
    invalid(
        g.delete_users(DeleteUsersRequest { user_ids: vec![] })
            .await
            .map(|_| ()),
        "no ids",
    );
    invalid(
        g.delete_users(DeleteUsersRequest {
            user_ids: many.clone(),
        })
        .await
        .map(|_| ()),
        "too many ids",
    );
    invalid(
        g.estimate(EstimateRequest {
            segment: "s".into(),
            mode: 0,
            within_seconds: W as u64 * 2,
        })
        .await
        .map(|_| ()),
        "estimate within",
    );
    invalid(
        g.list_estimates(ListEstimatesRequest {
            mode: 0,
            within_seconds: W as u64 + 60,
        })
        .await
        .map(|_| ()),
        "list within",
    );
    invalid(
        g.history(HistoryRequest {
            segment: "s".into(),
            from: Some(10),
            to: Some(5),
            step_seconds: 0,
        })
        .await
        .map(|_| ()),
        "from after to",
    );
    let r = g
        .export_members(ExportMembersRequest {
            segment: "bad name".into(),
            within_seconds: 0,
        })
        .await;
    assert_eq!(
        r.err().map(|e| e.code()),
        Some(tonic::Code::InvalidArgument)
    );
    // Nothing of a rejected deletion was applied: a valid id next to an invalid one survives.
    let (st, _) = s
        .send(
            "POST",
            "/v1/pairs",
            Some(json!({"pairs": [{"user_id": "keep", "segment": "s"}]})),
        )
        .await;
    assert_eq!(st, 200);
    let (st, _) = s
        .send(
            "POST",
            "/v1/users/delete",
            Some(json!({"user_ids": ["keep", "bad\n"]})),
        )
        .await;
    assert_eq!(st, 400);
    s.applied().await;
    let (_, v) = s.get("/v1/users/keep/segments").await;
    assert_eq!(v["segments"].as_array().map(Vec::len), Some(1));
}

/// History over both protocols from samples taken by the sampler at ticks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_answers_latest_sample_per_step() {
    let s = start().await;
    for k in 0..6i64 {
        let body = json!({"pairs": [{"user_id": format!("h{k}"), "segment": "grow"}]});
        assert_eq!(s.send("POST", "/v1/pairs", Some(body)).await.0, 200);
        s.applied().await;
        s.sampler.sample(s.clock.now()).await.unwrap();
        s.clock.advance(60);
    }
    let (st, v) = s
        .get(&format!(
            "/v1/segments/grow/history?from={T0}&to={}&step=2m",
            T0 + 300
        ))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        v,
        json!({"segment": "grow", "step_seconds": 120, "points": [
            {"ts": T0 + 60, "users": 2}, {"ts": T0 + 180, "users": 4}, {"ts": T0 + 300, "users": 6}
        ]})
    );
    let h = s
        .grpc()
        .await
        .history(HistoryRequest {
            segment: "grow".into(),
            from: Some(T0),
            to: Some(T0 + 300),
            step_seconds: 60,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        h.points.iter().map(|p| p.users).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    // Defaults: to = now, from = to - 7d, step = 1h: the latest sample of the last hour.
    let (_, v) = s.get("/v1/segments/grow/history").await;
    assert_eq!(v["step_seconds"], json!(3600));
    assert_eq!(v["points"], json!([{"ts": T0 + 300, "users": 6}]));
}

/// JSON values of the same shape: same keys, same types, arrays compared by their first item.
fn same_shape(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_shape(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => match (x.first(), y.first()) {
            (Some(p), Some(q)) => same_shape(p, q),
            _ => true,
        },
        (Value::Number(_), Value::Number(_)) => true,
        (Value::String(_), Value::String(_)) => true,
        (Value::Bool(_), Value::Bool(_)) => true,
        (Value::Null, Value::Null) => true,
        _ => false,
    }
}

/// Every route is in /openapi.json; every operation answers its parameter examples with the
/// documented 200 example's shape, and a bad request with the documented error example's
/// status and code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_lists_every_route_and_its_examples_hold() {
    let s = start().await;
    let (st, doc) = s.get("/openapi.json").await;
    assert_eq!(st, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    // Every route of the access table this server answers (not 404) is documented.
    let documented_pattern = |m: &str, p: &str| {
        paths.iter().any(|(path, ops)| {
            userseg_api::auth::normalize_pattern(path) == p && ops.get(m).is_some()
        })
    };
    let mut routes = 0usize;
    for (method, pattern, _) in userseg_api::auth::HTTP_ACCESS {
        let m = method.to_lowercase();
        // The web console's pages are HTML for browsers, not part of the JSON API.
        if pattern.starts_with("/ui") {
            continue;
        }
        if documented_pattern(&m, pattern) {
            routes += 1;
            continue;
        }
        let probe = pattern.replace("{*}", "x").replace("{}", "x");
        let (st, _) = s.send(method, &probe, None).await;
        assert_eq!(
            st, 404,
            "{method} {pattern} is served but not in /openapi.json"
        );
    }
    let documented: usize = paths.values().map(|v| v.as_object().unwrap().len()).sum();
    assert_eq!(
        documented, routes,
        "the document lists a route the access table does not have"
    );

    // Data matching the examples: sports {u1, u2}, news {u1, u3}.
    let body = json!({"pairs": [
        {"user_id": "u1", "segment": "sports"}, {"user_id": "u2", "segment": "sports"},
        {"user_id": "u1", "segment": "news"}, {"user_id": "u3", "segment": "news"},
    ]});
    assert_eq!(s.send("POST", "/v1/pairs", Some(body)).await.0, 200);
    s.applied().await;
    s.sampler.sample(T0).await.unwrap();

    // A bad variant of each operation that documents a 400.
    let bad: std::collections::HashMap<(&str, &str), (&str, Option<Value>)> = [
        (
            ("post", "/v1/pairs"),
            (
                "/v1/pairs",
                Some(json!({"pairs": [{"user_id": "u", "segment": "no spaces"}]})),
            ),
        ),
        (("get", "/v1/segments"), ("/v1/segments?within=0m", None)),
        (
            ("get", "/v1/segments/{segment}"),
            ("/v1/segments/sports?within=7x", None),
        ),
        (
            ("get", "/v1/users/{user_id}/segments"),
            ("/v1/users/u%0A1/segments", None),
        ),
        (("delete", "/v1/users/{user_id}"), ("/v1/users/u%0A1", None)),
        (
            ("post", "/v1/users/delete"),
            ("/v1/users/delete", Some(json!({"user_ids": []}))),
        ),
        (("get", "/v1/count"), ("/v1/count?q=sports%20AND", None)),
        (
            ("get", "/v1/overlap"),
            ("/v1/overlap?segments=sports", None),
        ),
        (
            ("get", "/v1/segments/{segment}/members"),
            ("/v1/segments/news/members?within=15d", None),
        ),
        (
            ("get", "/v1/segments/{segment}/history"),
            (
                "/v1/segments/sports/history?from=1764003600&to=1764000000",
                None,
            ),
        ),
    ]
    .into_iter()
    .collect();

    let mut checked = 0;
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            // The change feed streams without end (and this server has no change log): its
            // examples are checked against the binary in crates/userseg/tests/changes.rs.
            if path == "/v1/changes" {
                checked += 1;
                continue;
            }
            // The request from the parameter examples.
            let mut url = path.clone();
            let mut query = Vec::new();
            for p in op["parameters"].as_array().cloned().unwrap_or_default() {
                let name = p["name"].as_str().unwrap();
                let ex = if p["example"].is_null() {
                    &p["schema"]["example"]
                } else {
                    &p["example"]
                };
                assert!(
                    !ex.is_null(),
                    "{method} {path}: parameter {name} has no example: {p}"
                );
                let val = ex
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| ex.to_string());
                if p["in"] == "path" {
                    url = url.replace(&format!("{{{name}}}"), &enc(&val));
                } else {
                    query.push(format!("{name}={}", enc(&val)));
                }
            }
            assert!(
                !url.contains('{'),
                "{method} {path}: a path parameter has no example"
            );
            if !query.is_empty() {
                url = format!("{url}?{}", query.join("&"));
            }
            let req_body = op["requestBody"]["content"]["application/json"]["example"].clone();
            let req_body = (!req_body.is_null()).then_some(req_body);
            let responses = op["responses"].as_object().unwrap();
            let ok = &responses["200"]["content"];
            let (ct, media) = ok.as_object().unwrap().iter().next().unwrap();
            let example = &media["example"];
            if ct == "application/x-ndjson" {
                let (st, got_ct, text) = s.get_text(&url).await;
                assert_eq!((st, got_ct.as_str()), (200, ct.as_str()), "{method} {url}");
                let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
                assert!(
                    same_shape(&first, example),
                    "{method} {url}: {first} vs {example}"
                );
            } else if ct.starts_with("text/plain") {
                let (st, _, _) = s.get_text(&url).await;
                // Metrics are not installed in this in-process server: 404 is its documented
                // fallback elsewhere; the binary's test checks the text.
                assert!(st == 200 || st == 404, "{method} {url}: {st}");
            } else {
                let (st, got) = s.send(&method.to_uppercase(), &url, req_body).await;
                assert_eq!(st, 200, "{method} {url}: {got}");
                if path == "/openapi.json" {
                    assert!(got["openapi"].is_string());
                } else {
                    assert!(
                        same_shape(&got, example),
                        "{method} {url}: {got} vs documented {example}"
                    );
                }
            }
            if let Some(err) = responses.get("400") {
                let (bad_url, bad_body) = bad
                    .get(&(method.as_str(), path.as_str()))
                    .unwrap_or_else(|| panic!("no bad request for {method} {path}"));
                let (st, got) = s
                    .send(&method.to_uppercase(), bad_url, bad_body.clone())
                    .await;
                let ex = &err["content"]["application/json"]["example"];
                assert_eq!(st, 400, "{method} {bad_url}: {got}");
                assert!(same_shape(&got["error"]["code"], &ex["error"]["code"]));
                assert_eq!(
                    got["error"]["code"], ex["error"]["code"],
                    "{method} {bad_url}"
                );
            }
            checked += 1;
        }
    }
    assert_eq!(checked, routes);
}
