//! The gRPC service `userseg.v1.Segments`, plus the standard health and reflection services.

use futures::stream::{FuturesUnordered, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use userseg_domain::{ErrorKind, RawPair};
use userseg_proto::v1::segments_server::{Segments, SegmentsServer};
use userseg_proto::v1::{
    CountRequest, CountResponse, DeleteUsersRequest, DeleteUsersResponse, EstimateRequest,
    EstimateResponse, ExportMembersRequest, ExportMembersResponse, GetUserSegmentsRequest,
    GetUserSegmentsResponse, HistoryPoint, HistoryRequest, HistoryResponse, ListEstimatesRequest,
    ListEstimatesResponse, Member as PbMember, Mode as PbMode, OverlapRequest, OverlapResponse,
    OverlapRow, PushRequest, PushResponse, SegmentEstimate, UserSegment,
};
use userseg_usecase::{Analytics, Ingest, Mode};

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
    routes
        .into_axum_router()
        .layer(axum::middleware::map_response(invalid_message_status))
}

/// tonic answers a message over the size limit with OUT_OF_RANGE and bytes that are not a
/// valid protobuf message (bad wire format, a string that is not UTF-8) with INTERNAL; both
/// are the client's bad input, which this API answers with INVALID_ARGUMENT (README's error
/// table). Such errors come before the handler runs, as a trailers-only response, so the
/// status is in the headers.
async fn invalid_message_status(mut resp: axum::response::Response) -> axum::response::Response {
    let Some(status) = Status::from_header_map(resp.headers()) else {
        return resp;
    };
    let message = status.message();
    let replaced = match status.code() {
        tonic::Code::OutOfRange if message.contains("decoded message length too large") => {
            ApiError::new(
                ErrorKind::PayloadTooLarge,
                format!("the message is larger than the limit (MAX_REQUEST_BYTES): {message}"),
            )
        }
        tonic::Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            ApiError::invalid(format!("invalid protobuf message: {message}"))
        }
        _ => return resp,
    };
    let replaced: Status = replaced.into();
    if let Err(e) = replaced.add_header(resp.headers_mut()) {
        tracing::warn!(error = %e, "could not rewrite a gRPC status");
    }
    resp
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
/// The server stream of `ExportMembers`.
type ExportStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<ExportMembersResponse, Status>> + Send + 'static>,
>;

pub(crate) struct GrpcApi {
    state: ApiState,
}

pub(crate) fn raw_pairs(req: PushRequest) -> Vec<RawPair> {
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

    fn analytics(&self) -> Result<&Analytics, Status> {
        self.state
            .analytics
            .as_ref()
            .filter(|a| a.serves_reads())
            .ok_or_else(|| not_served("analytics"))
    }

    fn deletions(&self) -> Result<&Analytics, Status> {
        self.state
            .analytics
            .as_ref()
            .filter(|a| a.serves_deletions())
            .ok_or_else(|| not_served("user deletions"))
    }

    fn within(&self, secs: u64) -> Result<Option<userseg_domain::Within>, Status> {
        if secs == 0 {
            return Ok(None);
        }
        Ok(self
            .analytics()?
            .within_from_secs(secs)
            .map_err(ApiError::from)?)
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
        let m = mode(req.mode)?;
        if let Some(w) = self.within(req.within_seconds)? {
            let a = self.analytics()?;
            let c = a
                .count_segment(&req.segment, Some(w))
                .await
                .map_err(ApiError::from)?;
            return Ok(Response::new(EstimateResponse {
                segment: c.query,
                users: c.users,
                exact: true,
                window_seconds: a.window().secs(),
                as_of: c.as_of,
                within_seconds: c.within_seconds,
            }));
        }
        let e = est
            .estimate(&req.segment, m)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(EstimateResponse {
            segment: e.segment,
            users: e.users,
            exact: e.exact,
            window_seconds: e.window_seconds,
            as_of: e.as_of,
            within_seconds: e.window_seconds,
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
        let req = request.into_inner();
        let m = mode(req.mode)?;
        let list = |segments: Vec<userseg_usecase::SegmentCount>| -> Vec<SegmentEstimate> {
            segments
                .into_iter()
                .map(|s| SegmentEstimate {
                    segment: s.segment,
                    users: s.users,
                })
                .collect()
        };
        if let Some(w) = self.within(req.within_seconds)? {
            let a = self.analytics()?;
            let l = a.count_all(Some(w)).await.map_err(ApiError::from)?;
            return Ok(Response::new(ListEstimatesResponse {
                segments: list(l.segments),
                exact: true,
                window_seconds: a.window().secs(),
                as_of: l.as_of,
                within_seconds: l.within_seconds,
            }));
        }
        let l = est.list(m).await.map_err(ApiError::from)?;
        Ok(Response::new(ListEstimatesResponse {
            segments: list(l.segments),
            exact: l.exact,
            window_seconds: l.window_seconds,
            as_of: l.as_of,
            within_seconds: l.window_seconds,
        }))
    }

    async fn get_user_segments(
        &self,
        request: Request<GetUserSegmentsRequest>,
    ) -> Result<Response<GetUserSegmentsResponse>, Status> {
        let a = self.analytics()?;
        let u = a
            .user_segments(&request.into_inner().user_id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(GetUserSegmentsResponse {
            user_id: u.user_id,
            segments: u
                .segments
                .into_iter()
                .map(|m| UserSegment {
                    segment: m.segment,
                    last_seen: m.last_seen,
                    expires_at: m.expires_at,
                })
                .collect(),
            as_of: u.as_of,
        }))
    }

    async fn delete_users(
        &self,
        request: Request<DeleteUsersRequest>,
    ) -> Result<Response<DeleteUsersResponse>, Status> {
        let a = self.deletions()?;
        let n = a
            .delete_users(request.into_inner().user_ids)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(DeleteUsersResponse { deleted: n as u64 }))
    }

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<CountResponse>, Status> {
        let req = request.into_inner();
        let within = self.within(req.within_seconds)?;
        let c = self
            .analytics()?
            .count_expr(&req.query, within)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(CountResponse {
            query: c.query,
            users: c.users,
            exact: true,
            within_seconds: c.within_seconds,
            as_of: c.as_of,
        }))
    }

    async fn overlap(
        &self,
        request: Request<OverlapRequest>,
    ) -> Result<Response<OverlapResponse>, Status> {
        let req = request.into_inner();
        let within = self.within(req.within_seconds)?;
        let o = self
            .analytics()?
            .overlap(req.segments, within)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(OverlapResponse {
            segments: o.segments,
            users: o.overlap.users,
            both: o
                .overlap
                .both
                .into_iter()
                .map(|both| OverlapRow { both })
                .collect(),
            exact: true,
            within_seconds: o.within_seconds,
            as_of: o.as_of,
        }))
    }

    async fn export_members(
        &self,
        request: Request<ExportMembersRequest>,
    ) -> Result<Response<ExportStream>, Status> {
        let req = request.into_inner();
        let within = self.within(req.within_seconds)?;
        let export = self
            .analytics()?
            .export(&req.segment, within)
            .map_err(ApiError::from)?;
        type Done = tokio::task::JoinHandle<Result<u64, userseg_usecase::PortError>>;
        let st: (
            tokio::sync::mpsc::Receiver<Vec<userseg_usecase::Member>>,
            Option<Done>,
        ) = (export.members, Some(export.done));
        let stream = futures::stream::unfold(st, |(mut rx, mut done)| async move {
            match rx.recv().await {
                Some(chunk) => Some((
                    Ok(ExportMembersResponse {
                        members: chunk
                            .into_iter()
                            .map(|m| PbMember {
                                user_id: m.user_id,
                                last_seen: m.last_seen,
                            })
                            .collect(),
                    }),
                    (rx, done),
                )),
                None => match done.take()?.await {
                    Ok(Ok(_)) => None,
                    Ok(Err(e)) => Some((
                        Err(Status::unavailable(format!("export failed: {e}"))),
                        (rx, None),
                    )),
                    Err(e) => Some((
                        Err(Status::internal(format!("export task failed: {e}"))),
                        (rx, None),
                    )),
                },
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn history(
        &self,
        request: Request<HistoryRequest>,
    ) -> Result<Response<HistoryResponse>, Status> {
        let h = self
            .state
            .history
            .as_ref()
            .ok_or_else(|| not_served("history"))?;
        let req = request.into_inner();
        let step = (req.step_seconds > 0).then_some(req.step_seconds);
        let r = h
            .query(&req.segment, req.from, req.to, step)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(HistoryResponse {
            segment: r.segment,
            step_seconds: r.step_seconds,
            points: r
                .points
                .into_iter()
                .map(|p| HistoryPoint {
                    ts: p.ts,
                    users: p.users,
                })
                .collect(),
        }))
    }
}
