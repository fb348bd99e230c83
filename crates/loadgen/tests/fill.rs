//! `--fill` end to end against a fake gRPC server that records every pair: each membership of
//! the solved workload arrives exactly once, a user's segments travel together, and
//! `--latency-log` writes one line per acknowledged unit.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status, Streaming};
use userseg_loadgen::{run, skew_for, LoadArgs, Workload};
use userseg_proto::v1::segments_server::{Segments, SegmentsServer};
use userseg_proto::v1::{
    EstimateRequest, EstimateResponse, ListEstimatesRequest, ListEstimatesResponse, PushRequest,
    PushResponse,
};

/// Every request's pairs as (user id, segment), in order.
type Seen = Arc<Mutex<Vec<Vec<(String, String)>>>>;

struct Svc(Seen);

impl Svc {
    fn record(&self, req: PushRequest) -> u64 {
        let pairs: Vec<(String, String)> = req
            .pairs
            .into_iter()
            .map(|p| (p.user_id, p.segment))
            .collect();
        let n = pairs.len() as u64;
        self.0.lock().expect("lock").push(pairs);
        n
    }
}

#[tonic::async_trait]
impl Segments for Svc {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let accepted = self.record(request.into_inner());
        Ok(Response::new(PushResponse { accepted }))
    }

    async fn push_stream(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> Result<Response<PushResponse>, Status> {
        let mut stream = request.into_inner();
        let mut accepted = 0;
        while let Some(req) = stream.message().await? {
            accepted += self.record(req);
        }
        Ok(Response::new(PushResponse { accepted }))
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

async fn fake() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = tonic::service::Routes::new(SegmentsServer::new(Svc(seen.clone())))
        .prepare()
        .into_axum_router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_sends_every_membership_once_user_by_user() {
    let dir = std::env::temp_dir().join(format!("userseg-fill-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let log = dir.join("latency.log");
    for protocol in ["grpc", "grpc-unary"] {
        let (target, seen) = fake().await;
        let (users, segments, live) = (3_000u32, 40u32, 30_000u64);
        let args = LoadArgs::try_from_flags([
            "--target",
            &target,
            "--json",
            "--protocol",
            protocol,
            "--fill",
            &live.to_string(),
            "--users",
            &users.to_string(),
            "--segments",
            &segments.to_string(),
            "--batch",
            "500",
            "--stream-batches",
            "3",
            "--concurrency",
            "3",
            "--seed",
            "4",
            "--latency-log",
            log.to_str().expect("utf-8 path"),
        ])
        .expect("flags");
        let s = run(args).await.expect("run");
        let fill = s.fill.clone().expect("a fill report");
        assert_eq!(fill.target_live_pairs, live);
        assert!(fill.memberships.abs_diff(live) < 300, "{fill:?}");
        assert_eq!(s.resends, 0, "{protocol}");
        assert_eq!(s.pairs_generated, fill.memberships, "{protocol}");
        assert_eq!(s.pairs_accepted, fill.memberships, "{protocol}");

        // The same workload, rebuilt: what the server got is exactly its memberships.
        let skew = skew_for(users, segments, live);
        assert_eq!(skew, fill.skew);
        let w = Workload::new(users, segments, skew, 0.0, 0, 4);
        let mut expected = HashSet::new();
        for seg in 0..segments {
            for k in 0..w.population(seg) {
                expected.insert((format!("user-{}", w.member(seg, k)), format!("seg-{seg}")));
            }
        }
        let requests = seen.lock().expect("lock").clone();
        let mut got = HashSet::new();
        // The requests each user's pairs went in.
        let mut requests_of_user: HashMap<String, usize> = HashMap::new();
        for (i, req) in requests.iter().enumerate() {
            assert!(req.len() <= 500);
            let mut users_here = Vec::new();
            for pair in req {
                assert!(got.insert(pair.clone()), "{protocol}: {pair:?} sent twice");
                if users_here.last() != Some(&pair.0) {
                    assert!(
                        !users_here.contains(&pair.0),
                        "{protocol}: a user's pairs are not consecutive in request {i}"
                    );
                    users_here.push(pair.0.clone());
                }
            }
            for u in users_here {
                *requests_of_user.entry(u).or_default() += 1;
            }
        }
        assert_eq!(got, expected, "{protocol}");
        assert!(
            requests_of_user.values().all(|&n| n <= 2),
            "{protocol}: a user's segments (at most {segments}) fit in two requests of 500"
        );
        // Users are in many segments: ~10 each here, in segment 0 always.
        assert_eq!(requests_of_user.len(), users as usize);

        let text = std::fs::read_to_string(&log).expect("latency log");
        let lines: Vec<Vec<u64>> = text
            .lines()
            .map(|l| l.split(' ').map(|v| v.parse().expect("a number")).collect())
            .collect();
        assert_eq!(lines.len() as u64, s.requests, "{protocol}");
        assert_eq!(
            lines.iter().map(|l| l[2]).sum::<u64>(),
            s.pairs_accepted,
            "{protocol}"
        );
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64;
        for l in &lines {
            assert_eq!(l.len(), 3);
            assert!(l[0] <= now_ms && l[0] + 60_000 > now_ms, "start {}", l[0]);
        }
        assert!(
            lines.windows(2).all(|w| w[0][0] <= w[1][0]),
            "sorted by start"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
