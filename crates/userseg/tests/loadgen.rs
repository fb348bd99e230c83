//! The load generator (`userseg load`, crate userseg-loadgen) end to end against the real
//! `userseg standalone` process: a free port, a temp DATA_DIR, readiness polled on `/readyz`.

use userseg_loadgen::{run, LoadArgs, LoadError, Summary};
use userseg_testkit::{free_port, Proc};

const TOKEN: &str = "loadgen-test-token-0123456789";

struct Server {
    _proc: Proc,
    url: String,
    _dir: tempfile::TempDir,
}

async fn start_server(window: &str) -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let env: Vec<(String, String)> = [
        (
            "DATA_DIR",
            dir.path().join("data").to_string_lossy().into_owned(),
        ),
        ("WINDOW", window.to_owned()),
        ("API_TOKEN", TOKEN.to_owned()),
        ("FLUSH_INTERVAL", "100ms".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut proc = Proc::spawn(
        env!("CARGO_BIN_EXE_userseg"),
        &["standalone"],
        &env,
        free_port(),
        dir.path().join("server.log"),
    );
    proc.ready().await;
    Server {
        url: proc.base.clone(),
        _proc: proc,
        _dir: dir,
    }
}

/// Flags for a run against `server` (with its token, JSON output), plus `extra`.
fn args(server: &Server, extra: &str) -> LoadArgs {
    let mut flags = vec!["--target", &server.url, "--token", TOKEN, "--json"];
    flags.extend(extra.split_whitespace());
    LoadArgs::try_from_flags(flags).expect("valid flags")
}

fn assert_clean(s: &Summary, pairs: u64, segments: usize) {
    assert!(s.errors.is_empty(), "errors: {:?}", s.errors);
    assert_eq!(s.fatal, None);
    assert_eq!(s.pairs_generated, pairs);
    assert_eq!(s.pairs_accepted, pairs);
    assert_eq!(s.pairs_sent, pairs);
    assert!(s.resends > 0, "the default resend ratio is 0.1");
    let v = s.verify.as_ref().expect("verified");
    assert!(v.ok, "{v:?}");
    assert!(v.exact);
    assert!(v.error.is_none());
    assert!(
        v.comparison.mismatches.is_empty(),
        "{:?}",
        v.comparison.mismatches
    );
    assert_eq!(v.comparison.segments_checked, segments);
    assert!(v.memberships > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_http_runs_verify_exactly() {
    // A one-minute window: the spread of event times covers all of it, so memberships expire
    // while the test runs (their edge is checked with the store's 1 s bucket as tolerance).
    let server = start_server("60s").await;

    // gRPC PushStream, ts spread over the whole window.
    let s = run(args(
        &server,
        "--pairs 200000 --users 500000 --segments 50 --ts-spread 60s --segment-prefix g- --verify",
    ))
    .await
    .unwrap_or_else(|e| panic!("grpc run: {e}"));
    assert_clean(&s, 200_000, 50);
    assert_eq!(s.protocol, "grpc");
    assert_eq!(s.ts_spread_secs, 58, "capped 2 s below the window");
    let v = s.verify.as_ref().expect("verified");
    assert_eq!(v.window_seconds, 60);
    assert_eq!(v.tolerance.expiry, 1, "explicit ts: only the 1 s bucket");
    assert!(s.latency.samples > 0 && s.latency.p50_ms > 0.0);

    // HTTP JSON, no ts (the server stamps the pairs).
    let s = run(args(
        &server,
        "--protocol http --pairs 200000 --users 300000 --segments 40 --segment-prefix h- --verify",
    ))
    .await
    .unwrap_or_else(|e| panic!("http run: {e}"));
    assert_clean(&s, 200_000, 40);
    assert_eq!(s.protocol, "http");
    assert_eq!(s.requests, 200);

    // Expiry: a timed run over the same spread. The oldest ts a pair gets is 57 s before the
    // (whole) second it is generated in, so it has expired 3 s later: at as_of, after a 4 s run,
    // the pairs of the first second or so with the oldest ts are no longer counted, and the
    // server must agree.
    let s = run(args(
        &server,
        "--duration 4s --users 5000000 --ts-spread 60s --segment-prefix e- --verify",
    ))
    .await
    .unwrap_or_else(|e| panic!("expiry run: {e}"));
    assert!(s.errors.is_empty() && s.fatal.is_none(), "{s:?}");
    assert_eq!(s.pairs_accepted, s.pairs_generated);
    let v = s.verify.as_ref().expect("verified");
    assert!(v.ok && v.comparison.mismatches.is_empty(), "{v:?}");
    assert!(
        v.comparison.expected_users < v.memberships,
        "some memberships expired: {} live of {}",
        v.comparison.expected_users,
        v.memberships
    );

    // The other encodings: gRPC unary and NDJSON, smaller.
    for (protocol, prefix) in [("grpc-unary", "u-"), ("http", "n-")] {
        // (--verify-target is the same server here: it only needs to serve estimates.)
        let extra = format!(
            "--protocol {protocol} --http-body ndjson --pairs 20000 --batch 500 --ts-spread 30s \
             --segment-prefix {prefix} --verify --verify-target {}/",
            server.url
        );
        let s = run(args(&server, &extra))
            .await
            .unwrap_or_else(|e| panic!("{protocol} run: {e}"));
        assert_clean(&s, 20_000, 100);
    }

    // Verification catches a difference: the h- segments already hold the HTTP run's users,
    // which this run's model does not know about.
    let err = run(args(
        &server,
        "--protocol http --pairs 1000 --users 300000 --segments 40 --segment-prefix h- \
         --seed 99 --verify --verify-timeout 2s",
    ))
    .await
    .expect_err("the counts include an earlier run");
    match &err {
        LoadError::Verify { summary, .. } => {
            let v = summary.verify.as_ref().expect("verified");
            assert!(!v.ok);
            let m = &v.comparison.mismatches;
            assert!(!m.is_empty());
            assert!(m.iter().all(|m| m.actual > m.expected_max), "{m:?}");
        }
        other => panic!("expected a verification failure, got {other}"),
    }

    // A wrong token stops the run at the first request.
    let mut bad = args(&server, "--pairs 1000");
    bad.token = Some("wrong-token-wrong-token".into());
    match run(bad).await {
        Err(LoadError::Stopped { summary, message }) => {
            assert!(message.starts_with("UNAUTHENTICATED"), "{message}");
            assert_eq!(summary.pairs_accepted, 0);
            assert!(summary.errors.contains_key("UNAUTHENTICATED"));
        }
        other => panic!("expected UNAUTHENTICATED, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fill_leaves_exactly_its_memberships_live() {
    let server = start_server("14d").await;
    // 2,000 users × 100 segments, 60,000 live pairs asked: 30 segments per user on average.
    let s = run(args(
        &server,
        "--fill 60000 --users 2000 --segments 100 --batch 700 --segment-prefix f- --verify",
    ))
    .await
    .unwrap_or_else(|e| panic!("fill: {e}"));
    let fill = s.fill.clone().expect("a fill report");
    assert!(fill.memberships.abs_diff(60_000) < 500, "{fill:?}");
    assert!(s.errors.is_empty() && s.fatal.is_none(), "{s:?}");
    assert_eq!(s.resends, 0);
    assert_eq!(s.pairs_accepted, fill.memberships);
    let v = s.verify.as_ref().expect("verified");
    assert!(v.ok && v.comparison.mismatches.is_empty(), "{v:?}");
    assert_eq!(v.memberships, fill.memberships, "every pair sent was new");
    // The server's counts are the workload's populations: segment s holds ceil(users/(s+1)^k).
    let w = userseg_loadgen::Workload::new(2000, 100, fill.skew, 0.0, 0, 1);
    let body = reqwest::Client::new()
        .get(format!("{}/v1/segments", server.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("GET /v1/segments")
        .text()
        .await
        .expect("a body");
    let listing: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let mut total = 0;
    for seg in listing["segments"].as_array().expect("segments") {
        let name = seg["segment"].as_str().expect("name");
        let index: u32 = name.trim_start_matches("f-").parse().expect("f-N");
        let users = seg["users"].as_u64().expect("users");
        assert_eq!(users, u64::from(w.population(index)), "{name}");
        total += users;
    }
    assert_eq!(total, fill.memberships);
    assert_eq!(w.population(0), 2000, "everyone is in the first segment");
}
