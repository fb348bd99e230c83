//! Talking to the server: pushing pre-encoded batches over gRPC (PushStream or Push) or HTTP, and
//! listing the counts (ListEstimates or `GET /v1/segments`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use futures::stream::{BoxStream, StreamExt};
use serde::Deserialize;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{ListEstimatesRequest, Mode, PushResponse};

use crate::pace::Gate;
use userseg_usecase::{Clock, SystemClock};

/// Why a request failed, and whether trying again later may help.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SendError {
    /// The gRPC code (e.g. `RESOURCE_EXHAUSTED`), `http_<status>`, or `transport`.
    pub kind: String,
    pub message: String,
    /// Overload or unavailability: back off and send the same batch again.
    pub retryable: bool,
}

/// The upper-snake name of a gRPC code, as in the gRPC spec.
pub(crate) fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<Status> for SendError {
    fn from(s: Status) -> Self {
        SendError {
            kind: code_name(s.code()).to_string(),
            message: s.message().to_string(),
            // Overload, unavailability, or the connection broke mid-call (the server was
            // killed or restarted): tonic reports that as UNKNOWN, or as CANCELLED when the
            // HTTP/2 stream was reset, with the transport error as its source, which a status
            // sent by a server never has.
            retryable: matches!(s.code(), Code::ResourceExhausted | Code::Unavailable)
                || (matches!(s.code(), Code::Unknown | Code::Cancelled)
                    && std::error::Error::source(&s).is_some()),
        }
    }
}

fn from_reqwest(e: reqwest::Error) -> SendError {
    SendError {
        kind: "transport".into(),
        // Connection refused/reset and timeouts: the server may be restarting or swamped.
        retryable: e.is_connect() || e.is_timeout() || e.is_request() || e.is_body(),
        message: format!("{e}"),
    }
}

async fn from_response(resp: reqwest::Response) -> SendError {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let e = &v["error"];
            Some(format!(
                "{}: {}",
                e["code"].as_str()?,
                e["message"].as_str()?
            ))
        })
        .unwrap_or_else(|| body.chars().take(500).collect());
    SendError {
        kind: format!("http_{}", status.as_u16()),
        message,
        retryable: status.as_u16() == 503 || status.as_u16() == 429,
    }
}

/// Sends bytes that already are an encoded `PushRequest`, decodes the `PushResponse`.
#[derive(Clone, Copy, Debug, Default)]
struct PreEncoded;

#[derive(Clone, Copy, Debug, Default)]
struct PassThrough;

impl Encoder for PassThrough {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.reserve(item.len());
        dst.put(item);
        Ok(())
    }
}

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = PushResponse;
    type Encoder = PassThrough;
    type Decoder = tonic_prost::ProstDecoder<PushResponse>;

    fn encoder(&mut self) -> PassThrough {
        PassThrough
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// The connection details shared by every client of a run.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// `http://host:port` or `https://host:port`, no trailing slash.
    pub base: String,
    /// `Bearer <token>`.
    pub auth: Option<String>,
    /// PEM CA certificates trusted for an https target, besides the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// PEM client certificate and key, for a server with mutual TLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Target {
    pub(crate) fn new(
        url: &str,
        token: Option<&str>,
        ca_pem: Option<Vec<u8>>,
    ) -> Result<Target, String> {
        let base = url.trim().trim_end_matches('/').to_string();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(format!(
                "LOAD_TARGET: {url:?} must be an http:// or https:// URL like http://127.0.0.1:8080"
            ));
        }
        if let Some(pem) = &ca_pem {
            reqwest::Certificate::from_pem_bundle(pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or("LOAD_CA_FILE: holds no PEM certificate")?;
        }
        if let Some(t) = token {
            if MetadataValue::try_from(format!("Bearer {t}")).is_err() {
                return Err("LOAD_TOKEN: the token must be printable ASCII".into());
            }
        }
        Ok(Target {
            base,
            auth: token.map(|t| format!("Bearer {t}")),
            ca_pem,
            identity: None,
        })
    }

    /// Presents this client certificate (PEM certificate, PEM key) to an https target.
    pub(crate) fn with_identity(
        mut self,
        identity: Option<(Vec<u8>, Vec<u8>)>,
    ) -> Result<Target, String> {
        if let Some((cert, key)) = &identity {
            reqwest::Identity::from_pem(&[cert.as_slice(), b"\n", key.as_slice()].concat())
                .map_err(|e| format!("LOAD_CERT_FILE / LOAD_KEY_FILE: {e}"))?;
        }
        self.identity = identity;
        Ok(self)
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        if let Some(a) = &self.auth {
            if let Ok(v) = MetadataValue::try_from(a.as_str()) {
                req.metadata_mut().insert("authorization", v);
            }
        }
        req
    }

    /// A gRPC connection (one HTTP/2 connection per worker, so the server can spread them).
    pub(crate) async fn channel(&self) -> Result<Channel, String> {
        let mut endpoint =
            Endpoint::from_shared(self.base.clone()).map_err(|e| format!("LOAD_TARGET: {e}"))?;
        if self.base.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(pem) = &self.ca_pem {
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            if let Some((cert, key)) = &self.identity {
                tls = tls.identity(Identity::from_pem(cert, key));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| format!("LOAD_TARGET: TLS: {e}"))?;
        }
        endpoint
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })
    }

    pub(crate) fn http_client(&self) -> Result<reqwest::Client, String> {
        let mut builder = reqwest::Client::builder();
        if let Some((cert, key)) = &self.identity {
            let pem = [cert.as_slice(), b"\n", key.as_slice()].concat();
            builder = builder.identity(
                reqwest::Identity::from_pem(&pem)
                    .map_err(|e| format!("LOAD_CERT_FILE / LOAD_KEY_FILE: {e}"))?,
            );
        }
        if let Some(pem) = &self.ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("LOAD_CA_FILE: {e}"))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        builder
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))
    }
}

/// One worker's connection.
pub(crate) enum Pusher {
    GrpcStream(tonic::client::Grpc<Channel>),
    GrpcUnary(tonic::client::Grpc<Channel>),
    Http {
        client: reqwest::Client,
        url: String,
        content_type: &'static str,
    },
}

#[derive(Deserialize)]
struct Accepted {
    accepted: u64,
}

const PUSH: &str = "/userseg.v1.Segments/Push";
const PUSH_STREAM: &str = "/userseg.v1.Segments/PushStream";

/// One encoded request body (or stream message), and the pairs it carries.
#[derive(Clone, Debug)]
pub(crate) struct Body {
    pub bytes: Bytes,
    pub pairs: u64,
}

/// The outcome of [`Pusher::send`].
#[derive(Debug)]
pub(crate) struct Sent {
    /// The pairs the server accepted, or why the unit failed.
    pub result: Result<u64, SendError>,
    /// `Some(n)` when the gate held back the bodies from index `n` on (their slot was after
    /// the deadline, or the run is stopping): only the first `n` went out, and the server saw
    /// at most those. `None`: no body was held back.
    pub cut: Option<usize>,
    /// When the first body went out, after its pacing wait: the start of the latency sample.
    pub began: Instant,
    /// The unix time each body that went out was released at (what the server stamps pairs
    /// without ts with, give or take the network).
    pub released: Vec<i64>,
}

/// Waits for the gate, if any; `false` when it holds the body back.
async fn pass(gate: &mut Option<Gate>, pairs: u64) -> bool {
    match gate {
        Some(g) => g.pass(pairs).await,
        None => true,
    }
}

/// The messages of a paced stream: the first at once (its slot was waited for before opening
/// the stream), each following one when the gate lets it through; their release times go to
/// `released`. A body held back ends the stream, and its index goes into `cut`.
fn paced(
    bodies: &[Body],
    gate: Gate,
    cut: Arc<AtomicUsize>,
    released: Arc<Mutex<Vec<i64>>>,
) -> BoxStream<'static, Bytes> {
    let first = bodies.first().map(|b| b.bytes.clone());
    let rest: Vec<Body> = bodies.iter().skip(1).cloned().collect();
    let tail = futures::stream::unfold(
        (rest.into_iter(), 1usize, gate),
        move |(mut rest, i, mut gate)| {
            let (cut, released) = (cut.clone(), released.clone());
            async move {
                let body = rest.next()?;
                if !gate.pass(body.pairs).await {
                    cut.store(i, Ordering::Relaxed);
                    return None;
                }
                lock(&released).push(SystemClock.now());
                Some((body.bytes, (rest, i + 1, gate)))
            }
        },
    );
    futures::stream::iter(first).chain(tail).boxed()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pusher {
    /// Sends one unit: the bodies of one stream (PushStream), or exactly one body (Push, HTTP).
    /// With a gate (`--rate`), each body waits for its slot first. Returns the pairs the server
    /// accepted, and whether the gate held bodies back.
    pub(crate) async fn send(
        &mut self,
        target: &Target,
        bodies: &[Body],
        mut gate: Option<Gate>,
    ) -> Sent {
        let mut began: Option<Instant> = None;
        let mut cut: Option<usize> = None;
        let mut released: Vec<i64> = Vec::with_capacity(bodies.len());
        let result = match self {
            Pusher::GrpcStream(grpc) => {
                let pairs = bodies.first().map_or(0, |b| b.pairs);
                if !pass(&mut gate, pairs).await {
                    return Sent {
                        result: Ok(0),
                        cut: Some(0),
                        began: Instant::now(),
                        released,
                    };
                }
                began = Some(Instant::now());
                let cut_at = Arc::new(AtomicUsize::new(usize::MAX));
                let now = SystemClock.now();
                let (stream, log) = match gate {
                    Some(g) => {
                        // The first body goes now; the stream logs the others as they go.
                        released.push(now);
                        let log = Arc::new(Mutex::new(released));
                        (paced(bodies, g, cut_at.clone(), log.clone()), log)
                    }
                    None => {
                        released.resize(bodies.len(), now);
                        let all: Vec<Bytes> = bodies.iter().map(|b| b.bytes.clone()).collect();
                        let log = Arc::new(Mutex::new(released));
                        (futures::stream::iter(all).boxed(), log)
                    }
                };
                let result = async {
                    grpc.ready().await.map_err(transport)?;
                    let resp = grpc
                        .client_streaming(
                            target.request(stream),
                            PathAndQuery::from_static(PUSH_STREAM),
                            PreEncoded,
                        )
                        .await?;
                    Ok(resp.into_inner().accepted)
                }
                .await;
                let at = cut_at.load(Ordering::Relaxed);
                cut = (at != usize::MAX).then_some(at);
                // What the stream logged (all of it on success: the server read it to the end).
                released = std::mem::take(&mut *lock(&log));
                result
            }
            Pusher::GrpcUnary(grpc) => {
                async {
                    let mut accepted = 0;
                    for (i, body) in bodies.iter().enumerate() {
                        if !pass(&mut gate, body.pairs).await {
                            cut = Some(i);
                            break;
                        }
                        began.get_or_insert_with(Instant::now);
                        released.push(SystemClock.now());
                        grpc.ready().await.map_err(transport)?;
                        let resp = grpc
                            .unary(
                                target.request(body.bytes.clone()),
                                PathAndQuery::from_static(PUSH),
                                PreEncoded,
                            )
                            .await?;
                        accepted += resp.into_inner().accepted;
                    }
                    Ok(accepted)
                }
                .await
            }
            Pusher::Http {
                client,
                url,
                content_type,
            } => {
                async {
                    let mut accepted = 0;
                    for (i, body) in bodies.iter().enumerate() {
                        if !pass(&mut gate, body.pairs).await {
                            cut = Some(i);
                            break;
                        }
                        began.get_or_insert_with(Instant::now);
                        released.push(SystemClock.now());
                        let mut req = client
                            .post(url.as_str())
                            .header(reqwest::header::CONTENT_TYPE, *content_type)
                            .body(body.bytes.clone());
                        if let Some(a) = &target.auth {
                            req = req.header(reqwest::header::AUTHORIZATION, a);
                        }
                        let resp = req.send().await.map_err(from_reqwest)?;
                        if !resp.status().is_success() {
                            return Err(from_response(resp).await);
                        }
                        let a: Accepted = resp.json().await.map_err(|e| SendError {
                            kind: "bad_response".into(),
                            message: format!("the response is not {{\"accepted\":N}}: {e}"),
                            retryable: false,
                        })?;
                        accepted += a.accepted;
                    }
                    Ok(accepted)
                }
                .await
            }
        };
        Sent {
            result,
            cut,
            began: began.unwrap_or_else(Instant::now),
            released,
        }
    }
}

fn transport(e: tonic::transport::Error) -> SendError {
    SendError {
        kind: "UNAVAILABLE".into(),
        message: e.to_string(),
        retryable: true,
    }
}

/// The server's counts of every segment it lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Listing {
    pub segments: HashMap<String, u64>,
    pub exact: bool,
    pub window_seconds: u64,
    pub as_of: i64,
}

#[derive(Deserialize)]
struct JsonListing {
    segments: Vec<JsonSegment>,
    exact: bool,
    window_seconds: u64,
    as_of: i64,
}

#[derive(Deserialize)]
struct JsonSegment {
    segment: String,
    users: u64,
}

/// Lists the counts, by gRPC `ListEstimates` or `GET /v1/segments` (exact mode).
pub(crate) enum Lister {
    Grpc(SegmentsClient<Channel>),
    Http(reqwest::Client),
}

impl Lister {
    pub(crate) async fn list(&mut self, target: &Target) -> Result<Listing, SendError> {
        match self {
            Lister::Grpc(client) => {
                let r = client
                    .list_estimates(target.request(ListEstimatesRequest {
                        mode: Mode::Exact as i32,
                        within_seconds: 0,
                    }))
                    .await?
                    .into_inner();
                Ok(Listing {
                    segments: r
                        .segments
                        .into_iter()
                        .map(|s| (s.segment, s.users))
                        .collect(),
                    exact: r.exact,
                    window_seconds: r.window_seconds,
                    as_of: r.as_of,
                })
            }
            Lister::Http(client) => {
                let mut req = client.get(format!("{}/v1/segments?mode=exact", target.base));
                if let Some(a) = &target.auth {
                    req = req.header(reqwest::header::AUTHORIZATION, a);
                }
                let resp = req.send().await.map_err(from_reqwest)?;
                if !resp.status().is_success() {
                    return Err(from_response(resp).await);
                }
                let l: JsonListing = resp.json().await.map_err(|e| SendError {
                    kind: "bad_response".into(),
                    message: format!("GET /v1/segments: unexpected body: {e}"),
                    retryable: false,
                })?;
                Ok(Listing {
                    segments: l
                        .segments
                        .into_iter()
                        .map(|s| (s.segment, s.users))
                        .collect(),
                    exact: l.exact,
                    window_seconds: l.window_seconds,
                    as_of: l.as_of,
                })
            }
        }
    }
}
