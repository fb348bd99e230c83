//! The internal routes between the ES of a sharded index (`ES_INDEX=partitioned`): a peer asks
//! for the answers of this ES's loaded shards (`POST /internal/v1/shards`), or for the members
//! of a segment in some of them (`POST /internal/v1/shards/members`, NDJSON ending with a
//! `{"done":N}` line so a cut stream is never taken for a complete one). Both need the
//! `members` role when keys are on (answers may hold user ids). The wire types are public: the
//! peers' client (`crates/userseg/src/peers.rs`) uses the very same ones.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use userseg_domain::{ErrorKind, Expr, UnixSeconds, Within};
use userseg_usecase::{
    Membership, Overlap, PortError, SegmentCount, ShardAnswer, ShardAnswers, ShardQuery,
    ShardServer,
};

use crate::ApiError;

/// The route of shard answers.
pub const SHARDS_ROUTE: &str = "/internal/v1/shards";
/// The route of a member export of shards.
pub const SHARD_MEMBERS_ROUTE: &str = "/internal/v1/shards/members";

/// A query of shards, as sent to a peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireQuery {
    /// `ready`, `count_all`, `count`, `count_expr`, `overlap`, `user_segments`.
    pub query: String,
    pub partitions: Vec<i32>,
    #[serde(default)]
    pub at: UnixSeconds,
    #[serde(default)]
    pub within_secs: Option<u64>,
    #[serde(default)]
    pub segment: Option<String>,
    #[serde(default)]
    pub expr: Option<String>,
    #[serde(default)]
    pub segments: Option<Vec<String>>,
    #[serde(default)]
    pub user_id: Option<String>,
}

/// One shard's answer on the wire (one field set, by the query).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WireAnswer {
    pub partition: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counts: Option<Vec<(String, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub users: Option<Vec<u64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub both: Option<Vec<Vec<u64>>>,
    /// `(segment, last_seen, expires_at)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memberships: Option<Vec<(String, UnixSeconds, UnixSeconds)>>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct WireAnswers {
    pub shards: Vec<WireAnswer>,
}

/// An export of shards, as sent to a peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireExport {
    pub partitions: Vec<i32>,
    pub segment: String,
    pub at: UnixSeconds,
    #[serde(default)]
    pub within_secs: Option<u64>,
}

/// A line of an export: a member, or the end with the count sent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireMemberLine {
    Member { user_id: String, last_seen: i64 },
    Done { done: u64 },
}

impl WireQuery {
    pub fn new(query: &ShardQuery, partitions: &[i32]) -> WireQuery {
        let mut w = WireQuery {
            query: String::new(),
            partitions: partitions.to_vec(),
            at: 0,
            within_secs: None,
            segment: None,
            expr: None,
            segments: None,
            user_id: None,
        };
        let secs = |within: &Option<Within>| within.map(|w| w.secs());
        match query {
            ShardQuery::Ready => w.query = "ready".into(),
            ShardQuery::CountAll { at, within } => {
                w.query = "count_all".into();
                w.at = *at;
                w.within_secs = secs(within);
            }
            ShardQuery::Count {
                segment,
                at,
                within,
            } => {
                w.query = "count".into();
                w.at = *at;
                w.within_secs = secs(within);
                w.segment = Some(segment.clone());
            }
            ShardQuery::CountExpr { expr, at, within } => {
                w.query = "count_expr".into();
                w.at = *at;
                w.within_secs = secs(within);
                w.expr = Some(expr.to_string());
            }
            ShardQuery::Overlap {
                segments,
                at,
                within,
            } => {
                w.query = "overlap".into();
                w.at = *at;
                w.within_secs = secs(within);
                w.segments = Some(segments.clone());
            }
            ShardQuery::UserSegments { user_id, at } => {
                w.query = "user_segments".into();
                w.at = *at;
                w.user_id = Some(user_id.clone());
            }
        }
        w
    }

    /// The query; a clear error for a malformed one.
    pub fn decode(self, window: userseg_domain::Window) -> Result<ShardQuery, String> {
        let within = match self.within_secs {
            None => None,
            Some(s) => Some(Within::from_secs(s, window).map_err(|e| format!("within: {e}"))?),
        };
        let need = |v: Option<String>, what: &str| v.ok_or_else(|| format!("{what} is missing"));
        let at = self.at;
        Ok(match self.query.as_str() {
            "ready" => ShardQuery::Ready,
            "count_all" => ShardQuery::CountAll { at, within },
            "count" => ShardQuery::Count {
                segment: need(self.segment, "segment")?,
                at,
                within,
            },
            "count_expr" => ShardQuery::CountExpr {
                expr: Expr::parse(&need(self.expr, "expr")?).map_err(|e| format!("expr: {e}"))?,
                at,
                within,
            },
            "overlap" => ShardQuery::Overlap {
                segments: self.segments.ok_or("segments is missing")?,
                at,
                within,
            },
            "user_segments" => ShardQuery::UserSegments {
                user_id: need(self.user_id, "user_id")?,
                at,
            },
            other => return Err(format!("unknown shard query {other:?}")),
        })
    }
}

impl WireAnswers {
    pub fn new(answers: ShardAnswers) -> WireAnswers {
        let shards = answers
            .into_iter()
            .map(|(partition, a)| {
                let mut w = WireAnswer {
                    partition,
                    ..WireAnswer::default()
                };
                match a {
                    ShardAnswer::Ready => {}
                    ShardAnswer::Count(n) => w.count = Some(n),
                    ShardAnswer::Counts(v) => {
                        w.counts = Some(v.into_iter().map(|c| (c.segment, c.users)).collect())
                    }
                    ShardAnswer::Overlap(o) => {
                        w.users = Some(o.users);
                        w.both = Some(o.both);
                    }
                    ShardAnswer::Memberships(v) => {
                        w.memberships = Some(
                            v.into_iter()
                                .map(|m| (m.segment, m.last_seen, m.expires_at))
                                .collect(),
                        )
                    }
                }
                w
            })
            .collect();
        WireAnswers { shards }
    }

    /// The answers, read as answers of `query`.
    pub fn decode(self, query: &ShardQuery) -> Result<ShardAnswers, PortError> {
        let bad = |p: i32| {
            PortError::Transient(format!(
                "a peer's answer for partition {p} does not fit the query"
            ))
        };
        let mut out = ShardAnswers::new();
        for w in self.shards {
            let p = w.partition;
            let a = match query {
                ShardQuery::Ready => ShardAnswer::Ready,
                ShardQuery::CountAll { .. } => ShardAnswer::Counts(
                    w.counts
                        .ok_or_else(|| bad(p))?
                        .into_iter()
                        .map(|(segment, users)| SegmentCount { segment, users })
                        .collect(),
                ),
                ShardQuery::Count { .. } | ShardQuery::CountExpr { .. } => {
                    ShardAnswer::Count(w.count.ok_or_else(|| bad(p))?)
                }
                ShardQuery::Overlap { .. } => ShardAnswer::Overlap(Overlap {
                    users: w.users.ok_or_else(|| bad(p))?,
                    both: w.both.ok_or_else(|| bad(p))?,
                }),
                ShardQuery::UserSegments { .. } => ShardAnswer::Memberships(
                    w.memberships
                        .ok_or_else(|| bad(p))?
                        .into_iter()
                        .map(|(segment, last_seen, expires_at)| Membership {
                            segment,
                            last_seen,
                            expires_at,
                        })
                        .collect(),
                ),
            };
            out.insert(p, a);
        }
        Ok(out)
    }
}

pub(crate) fn routes(server: Arc<dyn ShardServer>) -> Router {
    Router::new()
        .route(SHARDS_ROUTE, post(answer))
        .route(SHARD_MEMBERS_ROUTE, post(members))
        .with_state(server)
}

fn port_error(e: PortError) -> ApiError {
    let kind = match &e {
        PortError::Overloaded(_) => ErrorKind::Overloaded,
        PortError::Transient(_) => ErrorKind::Unavailable,
        PortError::Permanent(_) => ErrorKind::Internal,
    };
    ApiError::new(kind, e.to_string())
}

fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::invalid(format!("invalid body: {e}")))
}

async fn answer(
    State(server): State<Arc<dyn ShardServer>>,
    bytes: Bytes,
) -> Result<Json<WireAnswers>, ApiError> {
    let wire: WireQuery = body(&bytes)?;
    let partitions = wire.partitions.clone();
    let query = wire.decode(server.window()).map_err(ApiError::invalid)?;
    let answers = server
        .answer(&query, &partitions)
        .await
        .map_err(port_error)?;
    Ok(Json(WireAnswers::new(answers)))
}

/// Members per chunk of an internal export.
const EXPORT_CHUNK: usize = 4096;

async fn members(
    State(server): State<Arc<dyn ShardServer>>,
    bytes: Bytes,
) -> Result<Response, ApiError> {
    let wire: WireExport = body(&bytes)?;
    let within = match wire.within_secs {
        None => None,
        Some(s) => Some(
            Within::from_secs(s, server.window())
                .map_err(|e| ApiError::invalid(format!("within: {e}")))?,
        ),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    // Fails before anything is streamed when a partition is not loaded here.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<u64, PortError>>();
    let exporting = tokio::spawn(async move {
        let r = server
            .export(
                &wire.partitions,
                &wire.segment,
                wire.at,
                within,
                EXPORT_CHUNK,
                tx,
            )
            .await;
        let _ = first_tx.send(r);
    });
    let first = rx.recv().await;
    let Some(first) = first else {
        // Nothing to stream: the export ended (done or failed).
        let _ = exporting.await;
        let done = first_rx
            .await
            .map_err(|_| ApiError::new(ErrorKind::Internal, "the export task failed"))?
            .map_err(port_error)?;
        let line = serde_json::to_string(&WireMemberLine::Done { done }).unwrap_or_default();
        return Ok((
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            line + "\n",
        )
            .into_response());
    };
    let stream = async_stream(first, rx, first_rx);
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

fn lines(members: Vec<userseg_usecase::Member>) -> Bytes {
    let mut out = String::new();
    for m in members {
        let line = WireMemberLine::Member {
            user_id: m.user_id,
            last_seen: m.last_seen,
        };
        if let Ok(s) = serde_json::to_string(&line) {
            out.push_str(&s);
            out.push('\n');
        }
    }
    Bytes::from(out)
}

/// The NDJSON body: the chunks, then the `done` line only when the export succeeded (a failed
/// one ends the body without it, which the peer reads as a failure).
fn async_stream(
    first: Vec<userseg_usecase::Member>,
    rx: tokio::sync::mpsc::Receiver<Vec<userseg_usecase::Member>>,
    done: tokio::sync::oneshot::Receiver<Result<u64, PortError>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
    use futures::StreamExt as _;
    let head = futures::stream::once(async move { Ok(lines(first)) });
    let body = tokio_stream::wrappers::ReceiverStream::new(rx).map(|c| Ok(lines(c)));
    let tail = futures::stream::once(async move {
        match done.await {
            Ok(Ok(n)) => Ok(Bytes::from(
                serde_json::to_string(&WireMemberLine::Done { done: n }).unwrap_or_default() + "\n",
            )),
            Ok(Err(e)) => Err(std::io::Error::other(e.to_string())),
            Err(_) => Err(std::io::Error::other("the export task failed")),
        }
    });
    head.chain(body).chain(tail)
}
