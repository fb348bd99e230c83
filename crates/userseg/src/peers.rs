//! [`HttpPeers`]: the ES of a sharded index (`ES_INDEX=partitioned`) asking each other for their
//! shards' answers over the internal routes of `userseg_api::shards_http`, with the bearer
//! token ES_PEER_TOKEN when set.
//!
//! Peers are the static list ES_PEERS, not found through the consumer group: Kafka's group
//! description names members by client id and host, not by the address their API listens on,
//! and tansu 0.6's group description could not be relied on (see docs/ARCHITECTURE.md). The
//! list needs no care for correctness: every peer says which partitions it has a loaded shard
//! of, a read takes one answer per partition, and a partition no peer answers for makes it
//! incomplete. A peer that is down is skipped.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use userseg_api::shards_http::{
    WireAnswers, WireExport, WireMemberLine, WireQuery, SHARDS_ROUTE, SHARD_MEMBERS_ROUTE,
};
use userseg_domain::{UnixSeconds, Within};
use userseg_usecase::{Member, PortError, ShardAnswers, ShardPeers, ShardQuery};

/// Longest wait for a peer's answer (an export: for each chunk of it).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct HttpPeers {
    urls: Vec<String>,
    token: Option<String>,
    client: reqwest::Client,
}

impl HttpPeers {
    pub fn new(urls: Vec<String>, token: Option<String>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .read_timeout(PEER_TIMEOUT)
            .build()?;
        Ok(HttpPeers {
            urls,
            token,
            client,
        })
    }

    fn post(&self, peer: usize, route: &str) -> Result<reqwest::RequestBuilder, PortError> {
        let base = self
            .urls
            .get(peer)
            .ok_or_else(|| PortError::Permanent(format!("no peer {peer}")))?;
        let mut req = self.client.post(format!("{base}{route}"));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        Ok(req)
    }

    async fn send(
        &self,
        peer: usize,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, PortError> {
        let url = &self.urls[peer];
        let resp = req
            .send()
            .await
            .map_err(|e| PortError::Transient(format!("peer {url}: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            return Err(PortError::Transient(format!(
                "peer {url}: HTTP {status}: {}",
                body.chars().take(300).collect::<String>()
            )));
        }
        Ok(resp)
    }
}

fn transient(peer: &str, e: impl std::fmt::Display) -> PortError {
    PortError::Transient(format!("peer {peer}: {e}"))
}

#[async_trait]
impl ShardPeers for HttpPeers {
    fn len(&self) -> usize {
        self.urls.len()
    }

    async fn query(
        &self,
        peer: usize,
        query: &ShardQuery,
        partitions: &[i32],
    ) -> Result<ShardAnswers, PortError> {
        let wire = WireQuery::new(query, partitions);
        let req = self
            .post(peer, SHARDS_ROUTE)?
            .timeout(PEER_TIMEOUT)
            .json(&wire);
        let resp = self.send(peer, req).await?;
        let answers: WireAnswers = resp
            .json()
            .await
            .map_err(|e| transient(&self.urls[peer], e))?;
        answers.decode(query)
    }

    async fn export(
        &self,
        peer: usize,
        partitions: &[i32],
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let url = self.urls[peer].clone();
        let wire = WireExport {
            partitions: partitions.to_vec(),
            segment: segment.to_string(),
            at,
            within_secs: within.map(|w| w.secs()),
        };
        let req = self.post(peer, SHARD_MEMBERS_ROUTE)?.json(&wire);
        let mut resp = self.send(peer, req).await?;
        let chunk = chunk.max(1);
        let mut buf: Vec<u8> = Vec::new();
        let mut out: Vec<Member> = Vec::with_capacity(chunk);
        let mut sent = 0u64;
        let mut done: Option<u64> = None;
        while let Some(bytes) = resp.chunk().await.map_err(|e| transient(&url, e))? {
            buf.extend_from_slice(&bytes);
            let mut start = 0;
            while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
                let line = &buf[start..start + nl];
                start += nl + 1;
                if done.is_some() {
                    return Err(transient(&url, "member lines after the end of an export"));
                }
                match serde_json::from_slice::<WireMemberLine>(line)
                    .map_err(|e| transient(&url, format!("bad export line: {e}")))?
                {
                    WireMemberLine::Member { user_id, last_seen } => {
                        out.push(Member { user_id, last_seen });
                        if out.len() >= chunk {
                            sent += out.len() as u64;
                            let full = std::mem::replace(&mut out, Vec::with_capacity(chunk));
                            sink.send(full)
                                .await
                                .map_err(|_| PortError::Transient("export closed".into()))?;
                        }
                    }
                    WireMemberLine::Done { done: n } => done = Some(n),
                }
            }
            buf.drain(..start);
        }
        if !out.is_empty() {
            sent += out.len() as u64;
            sink.send(out)
                .await
                .map_err(|_| PortError::Transient("export closed".into()))?;
        }
        match done {
            Some(n) if n == sent => Ok(sent),
            Some(n) => Err(transient(
                &url,
                format!("export said {n} members, {sent} arrived"),
            )),
            None => Err(transient(&url, "the export ended before its end line")),
        }
    }
}
