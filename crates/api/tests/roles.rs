//! The API of a process that serves neither ingest nor estimates, and a client whose request
//! stream breaks: every error is the one ApiError mapping's (HTTP status + JSON body, gRPC
//! code), over a real listener.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::{Buf, BufMut};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;
use userseg_api::ApiState;
use userseg_domain::{Limits, Pair, Window};
use userseg_proto::v1::segments_client::SegmentsClient;
use userseg_proto::v1::{EstimateRequest, PushRequest, PushResponse};
use userseg_usecase::{Ingest, PairPublisher, PortError, SystemClock};

/// Serves `state` on a free port until the returned token is cancelled.
async fn serve(state: ApiState) -> (SocketAddr, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(userseg_api::serve(
        listener,
        userseg_api::router(state),
        stop.clone(),
    ));
    (addr, stop)
}

async fn error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_process_does_not_serve_is_not_found_or_unimplemented() {
    let (addr, stop) = serve(ApiState::new(None, None)).await;
    let base = format!("http://{addr}");
    let http = reqwest::Client::new();
    let (st, body) = error_of(
        http.post(format!("{base}/v1/pairs"))
            .body(r#"{"pairs":[]}"#)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(st, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not serve ingest"));
    for path in ["/v1/segments", "/v1/segments/sports"] {
        let (st, body) = error_of(http.get(format!("{base}{path}")).send().await.unwrap()).await;
        assert_eq!(st, 404, "{path}");
        assert_eq!(body["error"]["code"], "not_found", "{path}");
    }
    let (st, body) = error_of(http.get(format!("{base}/nothing")).send().await.unwrap()).await;
    assert_eq!(st, 404);
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["error"]["message"], "no route for GET /nothing");

    let mut client = SegmentsClient::connect(base).await.unwrap();
    let e = client
        .push(PushRequest { pairs: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    let e = client
        .estimate(EstimateRequest {
            segment: "s".into(),
            mode: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unimplemented, "{e}");
    stop.cancel();
}

/// Sends raw bytes as request messages and decodes `PushResponse`s: a client that can send
/// what no well-behaved client sends.
#[derive(Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = PushResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = PushResponse;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<PushResponse>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        prost::Message::decode(bytes)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }
}

/// A log that takes everything (this test is about the API alone).
struct AcceptAll;

#[async_trait::async_trait]
impl PairPublisher for AcceptAll {
    async fn publish(&self, _pairs: Vec<Pair>) -> Result<(), PortError> {
        Ok(())
    }

    async fn check_ready(&self) -> Result<(), PortError> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_request_stream_is_invalid_argument_not_internal() {
    let ingest = Ingest::new(
        Arc::new(AcceptAll),
        Arc::new(SystemClock),
        Window::DEFAULT,
        Limits::default(),
    );
    let (addr, stop) = serve(ApiState::new(Some(ingest), None)).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // 0xff is not a valid protobuf field key: the server cannot decode the message.
    let messages = tokio_stream::iter(vec![vec![0xff, 0xff, 0xff]]);
    let e = grpc
        .client_streaming(
            tonic::Request::new(messages),
            "/userseg.v1.Segments/PushStream".parse().unwrap(),
            RawCodec,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("the request stream broke"), "{e}");
    stop.cancel();
}
