//! Overload handling against fake servers: RESOURCE_EXHAUSTED / 503 are retried (and counted),
//! other errors stop the run.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};
use userseg_loadgen::{run, LoadArgs, LoadError};
use userseg_proto::v1::segments_server::{Segments, SegmentsServer};
use userseg_proto::v1::{
    EstimateRequest, EstimateResponse, ListEstimatesRequest, ListEstimatesResponse, PushRequest,
    PushResponse,
};

/// Fails the first `failures` calls with `code`, then accepts everything.
struct Fake {
    failures: AtomicU32,
    code: tonic::Code,
    pairs: AtomicU64,
}

impl Fake {
    fn fail(&self) -> Result<(), Status> {
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(Status::new(self.code, "busy"));
        }
        Ok(())
    }
}

/// The service around the shared fake (the trait is foreign, so `Arc<Fake>` cannot have it).
struct Svc(Arc<Fake>);

#[tonic::async_trait]
impl Segments for Svc {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        self.0.fail()?;
        let n = request.into_inner().pairs.len() as u64;
        self.0.pairs.fetch_add(n, Ordering::SeqCst);
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
        self.0.fail()?;
        self.0.pairs.fetch_add(n, Ordering::SeqCst);
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

async fn grpc_fake(failures: u32, code: tonic::Code) -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake {
        failures: AtomicU32::new(failures),
        code,
        pairs: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let svc = SegmentsServer::new(Svc(fake.clone()));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), fake)
}

fn flags(target: &str, extra: &[&str]) -> LoadArgs {
    let mut f = vec!["--target", target, "--json", "--concurrency", "2"];
    f.extend_from_slice(extra);
    LoadArgs::try_from_flags(f).expect("flags")
}

#[tokio::test]
async fn grpc_overload_is_retried() {
    for protocol in ["grpc", "grpc-unary"] {
        let (target, fake) = grpc_fake(3, tonic::Code::ResourceExhausted).await;
        let s = run(flags(
            &target,
            &[
                "--protocol",
                protocol,
                "--pairs",
                "20000",
                "--batch",
                "1000",
            ],
        ))
        .await
        .unwrap_or_else(|e| panic!("{protocol}: {e}"));
        assert_eq!(s.errors.get("RESOURCE_EXHAUSTED"), Some(&3), "{protocol}");
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.retries, 3);
        assert_eq!(s.pairs_accepted, 20_000);
        assert_eq!(s.pairs_generated, 20_000);
        assert!(s.pairs_sent > 20_000, "retransmissions are counted as sent");
        assert_eq!(fake.pairs.load(Ordering::SeqCst), 20_000);
    }
    let (target, _) = grpc_fake(2, tonic::Code::Unavailable).await;
    let s = run(flags(&target, &["--pairs", "5000"]))
        .await
        .expect("run");
    assert_eq!(s.errors.get("UNAVAILABLE"), Some(&2));
}

#[tokio::test]
async fn grpc_rejection_stops_the_run() {
    let (target, _) = grpc_fake(1, tonic::Code::InvalidArgument).await;
    let mut args = flags(&target, &["--pairs", "100000"]);
    args.concurrency = 1;
    match run(args).await {
        Err(LoadError::Stopped { message, summary }) => {
            assert!(message.starts_with("INVALID_ARGUMENT: busy"), "{message}");
            assert_eq!(summary.errors.get("INVALID_ARGUMENT"), Some(&1));
            assert_eq!(summary.pairs_accepted, 0);
        }
        other => panic!("expected a stop, got {other:?}"),
    }
}

#[tokio::test]
async fn http_503_is_retried() {
    use axum::body::Bytes;
    use axum::http::StatusCode;
    use axum::routing::{get, post};

    let failures = Arc::new(AtomicU32::new(4));
    let pairs = Arc::new(AtomicU64::new(0));
    let (f, p) = (failures.clone(), pairs.clone());
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/v1/pairs",
            post(move |body: Bytes| {
                let (f, p) = (f.clone(), p.clone());
                async move {
                    if f.load(Ordering::SeqCst) > 0 {
                        f.fetch_sub(1, Ordering::SeqCst);
                        return (
                            StatusCode::SERVICE_UNAVAILABLE,
                            r#"{"error":{"code":"overloaded","message":"busy"}}"#.to_string(),
                        );
                    }
                    let v: serde_json::Value = match serde_json::from_slice(&body) {
                        Ok(v) => v,
                        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()),
                    };
                    let n = v["pairs"].as_array().map_or(0, Vec::len) as u64;
                    p.fetch_add(n, Ordering::SeqCst);
                    (StatusCode::OK, format!(r#"{{"accepted":{n}}}"#))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let target = format!("http://{addr}");
    let s = run(flags(&target, &["--protocol", "http", "--pairs", "10000"]))
        .await
        .expect("run");
    assert_eq!(s.errors.get("http_503"), Some(&4));
    assert_eq!(s.retries, 4);
    assert_eq!(s.pairs_accepted, 10_000);
    assert_eq!(pairs.load(Ordering::SeqCst), 10_000);
}
