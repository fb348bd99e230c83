//! The gRPC service `userseg.v1.Segments`, plus the standard health and reflection services.

use futures::stream::{FuturesUnordered, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use userseg_domain::{ErrorKind, RawPair};
use userseg_proto::v1::segments_server::{Segments, SegmentsServer};
use userseg_proto::v1::{
    EstimateRequest, EstimateResponse, ListEstimatesRequest, ListEstimatesResponse, Mode as PbMode,
    PushRequest, PushResponse, SegmentEstimate,
};
use userseg_usecase::{Ingest, Mode};

use crate::{ApiError, ApiState};

pub(crate) fn routes(state: ApiState) -> axum::Router {
    let max = state.max_request_bytes;
    let service = SegmentsServer::new(GrpcApi { state })
        .max_decoding_message_size(max)
        .max_encoding_message_size(64 << 20);
    let (reporter, health) = tonic_health::server::health_reporter();
    // The service is "serving" as long as the process is up; /readyz tells dependency health.
    tokio::spawn(async move {
        reporter.set_serving::<SegmentsServer<GrpcApi>>().await;
    });
    let mut routes = tonic::service::Routes::new(service).add_service(health);
    // Reflection in both versions: grpcurl and current clients speak v1, older tools (and
    // Python's grpcio-reflection, Postman, Evans) only v1alpha. Each lists both.
    match (reflection().build_v1(), reflection().build_v1alpha()) {
        (Ok(v1), Ok(v1alpha)) => routes = routes.add_service(v1).add_service(v1alpha),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "grpc reflection is unavailable")
        }
    }
    routes.into_axum_router()
}

/// What reflection describes: our service, health, and the reflection services themselves.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    use tonic_reflection::pb::{v1, v1alpha};
    tonic_reflection::server::Builder::configure()
        .include_reflection_service(false)
        .register_encoded_file_descriptor_set(userseg_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(v1alpha::FILE_DESCRIPTOR_SET)
}

pub(crate) struct GrpcApi {
    state: ApiState,
}

fn raw_pairs(req: PushRequest) -> Vec<RawPair> {
    req.pairs
        .into_iter()
        .map(|p| RawPair {
            user_id: p.user_id,
            segment: p.segment,
            ts: p.ts,
        })
        .collect()
}

fn mode(m: i32) -> Result<Mode, Status> {
    match PbMode::try_from(m) {
        Ok(PbMode::Unspecified | PbMode::Exact) => Ok(Mode::Exact),
        Ok(PbMode::Approx) => Ok(Mode::Approx),
        Err(_) => Err(ApiError::invalid(format!("unknown mode {m}")).into()),
    }
}

/// A method of a service this role does not serve (a USS for estimates, an ES for ingest).
fn not_served(what: &str) -> Status {
    ApiError::new(
        ErrorKind::Unsupported,
        format!("this process does not serve {what}"),
    )
    .into()
}

impl GrpcApi {
    fn ingest(&self) -> Result<&Ingest, Status> {
        self.state
            .ingest
            .as_ref()
            .ok_or_else(|| not_served("ingest"))
    }
}

#[tonic::async_trait]
impl Segments for GrpcApi {
    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let ingest = self.ingest()?;
        let accepted = ingest
            .push(raw_pairs(request.into_inner()))
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(PushResponse {
            accepted: accepted as u64,
        }))
    }

    async fn push_stream(
        &self,
        request: Request<Streaming<PushRequest>>,
    ) -> Result<Response<PushResponse>, Status> {
        let ingest = self.ingest()?.clone();
        let mut stream = request.into_inner();
        let mut inflight = FuturesUnordered::new();
        let mut accepted: u64 = 0;
        let mut batch_no: u64 = 0;
        let mut failure: Option<(u64, ApiError)> = None;
        let pipeline = self.state.stream_pipeline.max(1);
        // Validate each batch as it arrives and make up to `pipeline` batches durable at once,
        // so one stream keeps the group commit busy.
        loop {
            if inflight.len() >= pipeline {
                match inflight.next().await {
                    Some((_, Ok(n))) => accepted += n as u64,
                    Some((b, Err(e))) => {
                        failure = Some((b, ApiError::from(e)));
                        break;
                    }
                    None => {}
                }
                continue;
            }
            let msg = tokio::select! {
                biased;
                done = inflight.next(), if !inflight.is_empty() => {
                    match done {
                        Some((_, Ok(n))) => accepted += n as u64,
                        Some((b, Err(e))) => { failure = Some((b, ApiError::from(e))); break; }
                        None => {}
                    }
                    continue;
                }
                msg = stream.message() => msg,
            };
            match msg {
                Ok(Some(req)) => {
                    let ingest = ingest.clone();
                    let b = batch_no;
                    batch_no += 1;
                    inflight.push(async move { (b, ingest.push(raw_pairs(req)).await) });
                }
                Ok(None) => break,
                Err(status) => {
                    // The client went away or sent garbage: what was acknowledged stays.
                    failure = Some((
                        batch_no,
                        ApiError::invalid(format!(
                            "the request stream broke: {}",
                            status.message()
                        )),
                    ));
                    break;
                }
            }
        }
        while let Some((b, r)) = inflight.next().await {
            match r {
                Ok(n) => accepted += n as u64,
                Err(e) => {
                    if failure.is_none() {
                        failure = Some((b, ApiError::from(e)));
                    }
                }
            }
        }
        match failure {
            None => Ok(Response::new(PushResponse { accepted })),
            Some((b, e)) => {
                let mut e = e;
                e.message = format!(
                    "batch {b}: {}; {accepted} pairs of other batches in this stream were accepted",
                    e.message
                );
                Err(e.into())
            }
        }
    }

    async fn estimate(
        &self,
        request: Request<EstimateRequest>,
    ) -> Result<Response<EstimateResponse>, Status> {
        let est = self
            .state
            .estimation
            .as_ref()
            .ok_or_else(|| not_served("estimates"))?;
        let req = request.into_inner();
        let e = est
            .estimate(&req.segment, mode(req.mode)?)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(EstimateResponse {
            segment: e.segment,
            users: e.users,
            exact: e.exact,
            window_seconds: e.window_seconds,
            as_of: e.as_of,
        }))
    }

    async fn list_estimates(
        &self,
        request: Request<ListEstimatesRequest>,
    ) -> Result<Response<ListEstimatesResponse>, Status> {
        let est = self
            .state
            .estimation
            .as_ref()
            .ok_or_else(|| not_served("estimates"))?;
        let l = est
            .list(mode(request.into_inner().mode)?)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(ListEstimatesResponse {
            segments: l
                .segments
                .into_iter()
                .map(|s| SegmentEstimate {
                    segment: s.segment,
                    users: s.users,
                })
                .collect(),
            exact: l.exact,
            window_seconds: l.window_seconds,
            as_of: l.as_of,
        }))
    }
}
