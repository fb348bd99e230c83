//! `--rate` end to end against fake servers (real clock): every protocol is paced to the rate,
//! and a timed run ends on time even when a paced gRPC stream would outlast it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status, Streaming};
use userseg_loadgen::{run, LoadArgs, Summary};
use userseg_proto::v1::segments_server::{Segments, SegmentsServer};
use userseg_proto::v1::{
    EstimateRequest, EstimateResponse, ListEstimatesRequest, ListEstimatesResponse, PushRequest,
    PushResponse,
};

/// Accepts everything, counting pairs.
struct Svc(Arc<AtomicU64>);

#[tonic::async_trait]
impl Segments for Svc {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let n = request.into_inner().pairs.len() as u64;
        self.0.fetch_add(n, Ordering::SeqCst);
        Ok(Response::new(PushResponse { accepted: n }))
    }

    async fn push_stream(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> Result<Response<PushResponse>, Status> {
        let mut stream = request.into_inner();
        let mut n = 0;
        while let Some(req) = stream.message().await? {
            n += req.pairs.len() as u64;
        }
        self.0.fetch_add(n, Ordering::SeqCst);
        Ok(Response::new(PushResponse { accepted: n }))
    }

    async fn estimate(
        &self,
        _: Request<EstimateRequest>,
    ) -> Result<Response<EstimateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }

    async fn list_estimates(
        &self,
        _: Request<ListEstimatesRequest>,
    ) -> Result<Response<ListEstimatesResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

/// A server answering gRPC and `POST /v1/pairs` (JSON) on one port.
async fn fake() -> (String, Arc<AtomicU64>) {
    use axum::body::Bytes;
    use axum::routing::{get, post};

    let pairs = Arc::new(AtomicU64::new(0));
    let p = pairs.clone();
    let http = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/pairs",
            post(move |body: Bytes| {
                let p = p.clone();
                async move {
                    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    let n = v["pairs"].as_array().map_or(0, Vec::len) as u64;
                    p.fetch_add(n, Ordering::SeqCst);
                    format!(r#"{{"accepted":{n}}}"#)
                }
            }),
        );
    let grpc = tonic::service::Routes::new(SegmentsServer::new(Svc(pairs.clone())))
        .prepare()
        .into_axum_router();
    let app = grpc.merge(http);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), pairs)
}

async fn paced(target: &str, extra: &[&str]) -> (Summary, Duration) {
    let mut f = vec!["--target", target, "--json", "--concurrency", "3"];
    f.extend_from_slice(extra);
    let args = LoadArgs::try_from_flags(f).expect("flags");
    let t = Instant::now();
    let s = run(args).await.expect("run");
    (s, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_protocol_is_paced() {
    let (target, server) = fake().await;
    // 30 batches of 1000 at 20,000 pairs/s: the last one goes at 29/20 s = 1.45 s.
    for protocol in ["grpc", "grpc-unary", "http"] {
        let before = server.load(Ordering::SeqCst);
        let (s, took) = paced(
            &target,
            &[
                "--protocol",
                protocol,
                "--pairs",
                "30000",
                "--batch",
                "1000",
                "--stream-batches",
                "4",
                "--rate",
                "20000",
            ],
        )
        .await;
        assert!(s.errors.is_empty(), "{protocol}: {:?}", s.errors);
        assert_eq!(s.pairs_generated, 30_000, "{protocol}");
        assert_eq!(s.pairs_accepted, 30_000, "{protocol}");
        assert_eq!(s.pairs_sent, 30_000, "{protocol}");
        assert_eq!(server.load(Ordering::SeqCst) - before, 30_000, "{protocol}");
        assert_eq!(s.rate_limit_pairs_per_sec, Some(20_000.0));
        assert!(
            took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
            "{protocol}: {took:?}"
        );
        assert!(
            s.pairs_per_sec <= 21_500.0 && s.pairs_per_sec > 7_000.0,
            "{protocol}: {} pairs/s",
            s.pairs_per_sec
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_run_ends_on_time() {
    let (target, server) = fake().await;
    for protocol in ["grpc", "http"] {
        let before = server.load(Ordering::SeqCst);
        // Streams of 32 batches of 500 at 10,000 pairs/s over 3 workers would each last ~5 s:
        // the deadline cuts them, and what was cut is not counted.
        let (s, took) = paced(
            &target,
            &[
                "--protocol",
                protocol,
                "--duration",
                "1s",
                "--batch",
                "500",
                "--rate",
                "10000",
            ],
        )
        .await;
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
            "{protocol}: {took:?}"
        );
        assert!(s.errors.is_empty(), "{protocol}: {:?}", s.errors);
        assert_eq!(s.pairs_accepted, s.pairs_generated, "{protocol}");
        assert_eq!(s.pairs_sent, s.pairs_generated, "{protocol}");
        assert_eq!(
            server.load(Ordering::SeqCst) - before,
            s.pairs_accepted,
            "{protocol}"
        );
        // Slots at 0, 0.05, ..., 0.95 s: 20 batches of 500.
        assert!(
            (9_000..=10_500).contains(&s.pairs_accepted),
            "{protocol}: {} pairs",
            s.pairs_accepted
        );
        assert!(s.resends <= s.pairs_generated);
    }
}
