//! The sharded ES index (`ES_INDEX=partitioned`): each ES holds the live memberships of the
//! topic partitions its consumer-group member owns (one shard per partition, users are
//! partitioned by user id), and answers any read by combining its own shards' answers with
//! those of its peers — the Kafka Streams interactive-queries pattern.
//!
//! - A shard is loaded when its partition is assigned: a [`SegmentIndex`] of its own, whose
//!   follower reads only that partition (from the group's committed offset) and whose scan of
//!   the store of record keeps only the pairs of that partition's users. It answers once its
//!   follower caught up; it is exact from then on, whoever owns the partition, because it
//!   follows the log itself. It is dropped when a later assignment no longer holds its
//!   partition (an eager rebalance revokes everything first: an empty assignment drops
//!   nothing until [`RELEASE_AFTER_EMPTY`]).
//! - A read asks the local shards, then (for the partitions still missing) every peer, and
//!   takes one answer per partition. Users never span partitions, so per-partition counts add
//!   up, overlaps add up cell by cell, a set expression (including `NOT`, relative to the
//!   users of the shard) adds up, and member lists are disjoint. A partition no loaded shard
//!   answers for (moving after a rebalance, its ES down) makes the read fail with
//!   [`PortError::Transient`] saying the index is incomplete — never a partial count.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, watch, RwLock};
use tokio_util::sync::CancellationToken;
use userseg_domain::{Expr, Pair, UnixSeconds, Window, Within};

use crate::{
    Clock, IndexConfig, LiveScan, LogFollower, Member, Membership, Mode, Overlap, PortError,
    SegmentAnalytics, SegmentCount, SegmentCounter, SegmentIndex, SegmentWriter,
};

/// An assignment that stays empty this long drops every shard (a member left with no
/// partitions); shorter empty spells are the first half of an eager rebalance.
pub const RELEASE_AFTER_EMPTY: Duration = Duration::from_secs(30);

/// The in-memory store of one shard.
pub trait ShardMemory: SegmentWriter + SegmentCounter + SegmentAnalytics {}
impl<T: SegmentWriter + SegmentCounter + SegmentAnalytics> ShardMemory for T {}

/// The partition of a user id (the publisher's partitioner over the topic's partition count).
pub type PartitionOf = Arc<dyn Fn(&str) -> i32 + Send + Sync>;

/// A read, as asked of every shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardQuery {
    /// Which partitions have a loaded shard (answered with [`ShardAnswer::Ready`]).
    Ready,
    CountAll {
        at: UnixSeconds,
        within: Option<Within>,
    },
    Count {
        segment: String,
        at: UnixSeconds,
        within: Option<Within>,
    },
    CountExpr {
        expr: Expr,
        at: UnixSeconds,
        within: Option<Within>,
    },
    Overlap {
        segments: Vec<String>,
        at: UnixSeconds,
        within: Option<Within>,
    },
    /// Answered only by the shard of the user's partition.
    UserSegments { user_id: String, at: UnixSeconds },
}

/// One shard's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardAnswer {
    Ready,
    Count(u64),
    Counts(Vec<SegmentCount>),
    Overlap(Overlap),
    Memberships(Vec<Membership>),
}

/// Answers per partition.
pub type ShardAnswers = BTreeMap<i32, ShardAnswer>;

/// The other ES of the group, asked for their shards' answers.
#[async_trait]
pub trait ShardPeers: Send + Sync + 'static {
    /// How many peers there are (they are numbered from 0).
    fn len(&self) -> usize;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Peer `peer`'s answers for those of `partitions` it has a loaded shard of.
    async fn query(
        &self,
        peer: usize,
        query: &ShardQuery,
        partitions: &[i32],
    ) -> Result<ShardAnswers, PortError>;

    /// Streams the live members of `segment` of `partitions` (all loaded on `peer`) to `sink`.
    #[allow(clippy::too_many_arguments)]
    async fn export(
        &self,
        peer: usize,
        partitions: &[i32],
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError>;
}

/// What an ES serves its peers: its loaded shards' answers (the internal route between ES).
#[async_trait]
pub trait ShardServer: Send + Sync + 'static {
    /// The window (to read a `within` off the wire).
    fn window(&self) -> Window;

    /// The answers of this ES's loaded shards among `partitions`.
    async fn answer(
        &self,
        query: &ShardQuery,
        partitions: &[i32],
    ) -> Result<ShardAnswers, PortError>;

    /// Streams the members of `segment` of `partitions`, all loaded here (else `Transient`
    /// before anything is sent).
    async fn export(
        &self,
        partitions: &[i32],
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError>;
}

#[async_trait]
impl<M: ShardMemory> ShardServer for ShardedIndex<M> {
    fn window(&self) -> Window {
        self.window
    }

    async fn answer(
        &self,
        query: &ShardQuery,
        partitions: &[i32],
    ) -> Result<ShardAnswers, PortError> {
        self.local
            .answer(query, partitions, &self.partition_of)
            .await
    }

    async fn export(
        &self,
        partitions: &[i32],
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        self.local
            .export(partitions, segment, at, within, chunk, sink)
            .await
    }
}

struct Shard<M> {
    memory: Arc<M>,
    index: SegmentIndex,
    stop: CancellationToken,
}

/// The shards this ES holds.
pub struct LocalShards<M> {
    shards: RwLock<BTreeMap<i32, Shard<M>>>,
}

impl<M: ShardMemory> LocalShards<M> {
    /// The partitions with a loaded shard.
    pub async fn ready(&self) -> BTreeSet<i32> {
        let shards = self.shards.read().await;
        shards
            .iter()
            .filter(|(_, s)| s.index.status().serving)
            .map(|(p, _)| *p)
            .collect()
    }

    /// The partitions with a shard, loaded or not.
    pub async fn held(&self) -> BTreeSet<i32> {
        self.shards.read().await.keys().copied().collect()
    }

    /// Every shard's memory (for expiry and size gauges).
    pub async fn memories(&self) -> Vec<Arc<M>> {
        let shards = self.shards.read().await;
        shards.values().map(|s| s.memory.clone()).collect()
    }

    /// The loaded shards among `partitions`.
    async fn loaded(&self, partitions: &[i32]) -> Vec<(i32, Arc<M>)> {
        let shards = self.shards.read().await;
        partitions
            .iter()
            .filter_map(|p| {
                let s = shards.get(p)?;
                s.index.status().serving.then(|| (*p, s.memory.clone()))
            })
            .collect()
    }

    /// The answers of the loaded shards among `partitions`.
    pub async fn answer(
        &self,
        query: &ShardQuery,
        partitions: &[i32],
        partition_of: &PartitionOf,
    ) -> Result<ShardAnswers, PortError> {
        let mut out = ShardAnswers::new();
        for (p, m) in self.loaded(partitions).await {
            let a = match query {
                ShardQuery::Ready => ShardAnswer::Ready,
                ShardQuery::CountAll { at, within: None } => {
                    ShardAnswer::Counts(m.count_all(*at, Mode::Exact).await?.0)
                }
                ShardQuery::CountAll { at, within } => {
                    ShardAnswer::Counts(m.count_all_within(*at, *within).await?)
                }
                ShardQuery::Count {
                    segment,
                    at,
                    within: None,
                } => ShardAnswer::Count(m.count(segment, *at, Mode::Exact).await?.0),
                ShardQuery::Count {
                    segment,
                    at,
                    within,
                } => ShardAnswer::Count(m.count_within(segment, *at, *within).await?),
                ShardQuery::CountExpr { expr, at, within } => {
                    ShardAnswer::Count(m.count_expr(expr, *at, *within).await?)
                }
                ShardQuery::Overlap {
                    segments,
                    at,
                    within,
                } => ShardAnswer::Overlap(m.overlap(segments, *at, *within).await?),
                ShardQuery::UserSegments { user_id, at } => {
                    if partition_of(user_id) != p {
                        continue;
                    }
                    ShardAnswer::Memberships(m.user_segments(user_id, *at).await?)
                }
            };
            out.insert(p, a);
        }
        Ok(out)
    }

    /// Streams the members of `segment` of `partitions`, every one of which must be loaded here.
    pub async fn export(
        &self,
        partitions: &[i32],
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let loaded = self.loaded(partitions).await;
        if loaded.len() != partitions.len() {
            let have: BTreeSet<i32> = loaded.iter().map(|(p, _)| *p).collect();
            let missing: Vec<i32> = partitions
                .iter()
                .filter(|p| !have.contains(p))
                .copied()
                .collect();
            return Err(PortError::Transient(format!(
                "no loaded shard of partitions {missing:?} here"
            )));
        }
        let mut n = 0;
        for (_, m) in loaded {
            n += m
                .export_members(segment, at, within, chunk, sink.clone())
                .await?;
        }
        Ok(n)
    }
}

/// Opens a log follower of one partition.
pub trait OpenPartition<F>: Fn(i32) -> Self::Fut + Send + Sync + 'static {
    type Fut: Future<Output = Result<F, PortError>> + Send + 'static;
}
impl<F, Fut, T> OpenPartition<F> for T
where
    T: Fn(i32) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<F, PortError>> + Send + 'static,
{
    type Fut = Fut;
}

/// The sharded index: the local shards, the peers, and how to combine their answers.
pub struct ShardedIndex<M> {
    local: Arc<LocalShards<M>>,
    peers: Arc<dyn ShardPeers>,
    partition_of: PartitionOf,
    /// The topic's partitions: 0..partitions.
    partitions: i32,
    window: Window,
}

impl<M> Clone for ShardedIndex<M> {
    fn clone(&self) -> Self {
        ShardedIndex {
            local: self.local.clone(),
            peers: self.peers.clone(),
            partition_of: self.partition_of.clone(),
            partitions: self.partitions,
            window: self.window,
        }
    }
}

/// The error of a read some partitions of which no loaded shard answered.
fn incomplete(missing: &[i32]) -> PortError {
    PortError::Transient(format!(
        "the sharded index is incomplete: no ES has a loaded shard of partitions {missing:?} \
         (a shard moving after a rebalance, or its ES down); retry shortly"
    ))
}

impl<M: ShardMemory> ShardedIndex<M> {
    pub fn new(
        peers: Arc<dyn ShardPeers>,
        partition_of: PartitionOf,
        partitions: i32,
        window: Window,
    ) -> Self {
        metrics::gauge!("userseg_index_serving").set(0.0);
        ShardedIndex {
            local: Arc::new(LocalShards {
                shards: RwLock::new(BTreeMap::new()),
            }),
            peers,
            partition_of,
            partitions,
            window,
        }
    }

    pub fn local(&self) -> &Arc<LocalShards<M>> {
        &self.local
    }

    pub fn partition_of(&self) -> &PartitionOf {
        &self.partition_of
    }

    /// Keeps the local shards in step with `assignment` until cancelled: a shard per partition
    /// assigned, loaded by [`SegmentIndex::run`] with `open(partition)` and a scan keeping the
    /// partition's users; a shard whose partition a non-empty assignment no longer holds is
    /// dropped (all of them after an empty assignment of [`RELEASE_AFTER_EMPTY`]).
    pub async fn run<F, O>(
        self,
        mut assignment: watch::Receiver<Arc<BTreeSet<i32>>>,
        new_memory: impl Fn() -> Arc<M> + Send + Sync,
        open: O,
        scan: Arc<dyn LiveScan>,
        clock: Arc<dyn Clock>,
        cancel: CancellationToken,
    ) where
        F: LogFollower,
        O: OpenPartition<F>,
    {
        let open = Arc::new(open);
        let mut empty_since: Option<tokio::time::Instant> = None;
        loop {
            let owned = assignment.borrow_and_update().clone();
            let mut gone: Vec<i32> = Vec::new();
            {
                let mut shards = self.local.shards.write().await;
                if owned.is_empty() {
                    let since = *empty_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= RELEASE_AFTER_EMPTY {
                        gone.extend(shards.keys().copied());
                    }
                } else {
                    empty_since = None;
                    gone.extend(shards.keys().filter(|p| !owned.contains(p)).copied());
                }
                for p in &gone {
                    if let Some(s) = shards.remove(p) {
                        s.stop.cancel();
                    }
                }
                for &p in owned.iter() {
                    if shards.contains_key(&p) {
                        continue;
                    }
                    let shard = self.start_shard(p, &new_memory, &open, &scan, &clock, &cancel);
                    shards.insert(p, shard);
                }
            }
            if !gone.is_empty() {
                tracing::info!(partitions = ?gone, "sharded index: dropped the shards of partitions no longer owned");
            }
            let held = self.local.held().await;
            tracing::info!(owned = ?owned, held = ?held, "sharded index: assignment");
            let recheck = tokio::time::sleep(RELEASE_AFTER_EMPTY / 3);
            let releasing = owned.is_empty() && !self.local.held().await.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = assignment.changed() => if changed.is_err() {
                    // The source is gone (shutting down): keep what is loaded.
                    cancel.cancelled().await;
                    break;
                },
                _ = recheck, if releasing => {}
            }
        }
        let mut shards = self.local.shards.write().await;
        for (_, s) in std::mem::take(&mut *shards) {
            s.stop.cancel();
        }
    }

    fn start_shard<F, O>(
        &self,
        partition: i32,
        new_memory: &impl Fn() -> Arc<M>,
        open: &Arc<O>,
        scan: &Arc<dyn LiveScan>,
        clock: &Arc<dyn Clock>,
        cancel: &CancellationToken,
    ) -> Shard<M>
    where
        F: LogFollower,
        O: OpenPartition<F>,
    {
        let memory = new_memory();
        let index = SegmentIndex::shard(memory.clone(), IndexConfig::default());
        let stop = cancel.child_token();
        let open = open.clone();
        let scan: Arc<dyn LiveScan> = Arc::new(PartitionScan {
            inner: scan.clone(),
            partition,
            partition_of: self.partition_of.clone(),
        });
        tracing::info!(
            partition,
            "sharded index: loading the shard of a partition assigned"
        );
        tokio::spawn(
            index
                .clone()
                .run(move || open(partition), scan, clock.clone(), stop.clone()),
        );
        Shard {
            memory,
            index,
            stop,
        }
    }

    /// The partitions a query needs answers of.
    fn needed(&self, query: &ShardQuery) -> Vec<i32> {
        match query {
            ShardQuery::UserSegments { user_id, .. } => vec![(self.partition_of)(user_id)],
            _ => (0..self.partitions).collect(),
        }
    }

    /// One answer per needed partition: the local shards', then the peers' for the rest.
    async fn gather(&self, query: &ShardQuery) -> Result<ShardAnswers, PortError> {
        let needed = self.needed(query);
        let mut got = self
            .local
            .answer(query, &needed, &self.partition_of)
            .await?;
        let missing = |got: &ShardAnswers| -> Vec<i32> {
            needed
                .iter()
                .filter(|p| !got.contains_key(p))
                .copied()
                .collect()
        };
        let mut rest = missing(&got);
        if !rest.is_empty() {
            let asked = (0..self.peers.len()).map(|peer| {
                let rest = rest.clone();
                async move { (peer, self.peers.query(peer, query, &rest).await) }
            });
            for (peer, answered) in futures_join_all(asked).await {
                match answered {
                    Ok(answers) => {
                        for (p, a) in answers {
                            if rest.contains(&p) {
                                got.entry(p).or_insert(a);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::debug!(peer, error = %e, "sharded index: a peer did not answer")
                    }
                }
            }
            rest = missing(&got);
        }
        if !rest.is_empty() {
            metrics::counter!("userseg_index_incomplete_reads_total").increment(1);
            return Err(incomplete(&rest));
        }
        Ok(got)
    }
}

/// Runs the futures concurrently, results in order (no `futures` dependency here).
async fn futures_join_all<T>(futs: impl Iterator<Item = impl Future<Output = T> + Send>) -> Vec<T> {
    let mut set = Vec::new();
    for f in futs {
        set.push(Box::pin(f));
    }
    let mut out: Vec<Option<T>> = (0..set.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in set.iter_mut().enumerate() {
            if out[i].is_some() {
                continue;
            }
            match f.as_mut().poll(cx) {
                std::task::Poll::Ready(v) => out[i] = Some(v),
                std::task::Poll::Pending => pending = true,
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// Combines per-partition answers of a query (users never span partitions, so they add up).
pub fn combine(answers: ShardAnswers) -> Result<ShardAnswer, PortError> {
    let wrong = |a: &ShardAnswer| PortError::Transient(format!("unexpected shard answer {a:?}"));
    let mut iter = answers.into_values();
    let Some(first) = iter.next() else {
        return Err(PortError::Transient("no shard answered".into()));
    };
    let mut acc = first;
    for a in iter {
        acc = match (acc, a) {
            (ShardAnswer::Ready, ShardAnswer::Ready) => ShardAnswer::Ready,
            (ShardAnswer::Count(x), ShardAnswer::Count(y)) => ShardAnswer::Count(x + y),
            (ShardAnswer::Counts(x), ShardAnswer::Counts(y)) => {
                let mut m: BTreeMap<String, u64> = BTreeMap::new();
                for c in x.into_iter().chain(y) {
                    *m.entry(c.segment).or_default() += c.users;
                }
                ShardAnswer::Counts(
                    m.into_iter()
                        .filter(|(_, u)| *u > 0)
                        .map(|(segment, users)| SegmentCount { segment, users })
                        .collect(),
                )
            }
            (ShardAnswer::Overlap(x), ShardAnswer::Overlap(y)) => {
                if x.users.len() != y.users.len() {
                    return Err(PortError::Transient(
                        "shards answered overlaps of different sizes".into(),
                    ));
                }
                ShardAnswer::Overlap(Overlap {
                    users: x.users.iter().zip(&y.users).map(|(a, b)| a + b).collect(),
                    both: x
                        .both
                        .iter()
                        .zip(&y.both)
                        .map(|(r, s)| r.iter().zip(s).map(|(a, b)| a + b).collect())
                        .collect(),
                })
            }
            (ShardAnswer::Memberships(mut x), ShardAnswer::Memberships(y)) => {
                x.extend(y);
                x.sort_by(|a, b| a.segment.cmp(&b.segment));
                ShardAnswer::Memberships(x)
            }
            (a, _) => return Err(wrong(&a)),
        };
    }
    Ok(acc)
}

impl<M: ShardMemory> ShardedIndex<M> {
    async fn read(&self, query: ShardQuery) -> Result<ShardAnswer, PortError> {
        combine(self.gather(&query).await?)
    }

    async fn read_count(&self, query: ShardQuery) -> Result<u64, PortError> {
        match self.read(query).await? {
            ShardAnswer::Count(n) => Ok(n),
            other => Err(PortError::Transient(format!(
                "unexpected shard answer {other:?}"
            ))),
        }
    }

    async fn read_counts(&self, query: ShardQuery) -> Result<Vec<SegmentCount>, PortError> {
        match self.read(query).await? {
            ShardAnswer::Counts(mut v) => {
                v.retain(|c| c.users > 0);
                Ok(v)
            }
            other => Err(PortError::Transient(format!(
                "unexpected shard answer {other:?}"
            ))),
        }
    }
}

#[async_trait]
impl<M: ShardMemory> SegmentCounter for ShardedIndex<M> {
    async fn count(
        &self,
        segment: &str,
        at: UnixSeconds,
        _mode: Mode,
    ) -> Result<(u64, bool), PortError> {
        let q = ShardQuery::Count {
            segment: segment.to_string(),
            at,
            within: None,
        };
        Ok((self.read_count(q).await?, true))
    }

    async fn count_all(
        &self,
        at: UnixSeconds,
        _mode: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError> {
        let q = ShardQuery::CountAll { at, within: None };
        Ok((self.read_counts(q).await?, true))
    }

    /// Ready when every partition has a loaded shard here or on a peer.
    async fn check_ready(&self) -> Result<(), PortError> {
        self.gather(&ShardQuery::Ready).await.map(|_| ())
    }
}

#[async_trait]
impl<M: ShardMemory> SegmentAnalytics for ShardedIndex<M> {
    async fn user_segments(
        &self,
        user_id: &str,
        at: UnixSeconds,
    ) -> Result<Vec<Membership>, PortError> {
        let q = ShardQuery::UserSegments {
            user_id: user_id.to_string(),
            at,
        };
        match self.read(q).await? {
            ShardAnswer::Memberships(v) => Ok(v),
            other => Err(PortError::Transient(format!(
                "unexpected shard answer {other:?}"
            ))),
        }
    }

    async fn count_within(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        let q = ShardQuery::Count {
            segment: segment.to_string(),
            at,
            within,
        };
        self.read_count(q).await
    }

    async fn count_all_within(
        &self,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        self.read_counts(ShardQuery::CountAll { at, within }).await
    }

    async fn count_expr(
        &self,
        expr: &Expr,
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<u64, PortError> {
        let q = ShardQuery::CountExpr {
            expr: expr.clone(),
            at,
            within,
        };
        self.read_count(q).await
    }

    async fn overlap(
        &self,
        segments: &[String],
        at: UnixSeconds,
        within: Option<Within>,
    ) -> Result<Overlap, PortError> {
        let q = ShardQuery::Overlap {
            segments: segments.to_vec(),
            at,
            within,
        };
        match self.read(q).await? {
            ShardAnswer::Overlap(o) => Ok(o),
            other => Err(PortError::Transient(format!(
                "unexpected shard answer {other:?}"
            ))),
        }
    }

    /// Plans one loaded shard per partition (local first), then streams each owner's members
    /// in turn: the partitions' member sets are disjoint, so each member comes once.
    async fn export_members(
        &self,
        segment: &str,
        at: UnixSeconds,
        within: Option<Within>,
        chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let all: Vec<i32> = (0..self.partitions).collect();
        let local: Vec<i32> = self.local.ready().await.into_iter().collect();
        let mut planned: BTreeSet<i32> = local.iter().copied().collect();
        let mut remote: Vec<(usize, Vec<i32>)> = Vec::new();
        for peer in 0..self.peers.len() {
            let rest: Vec<i32> = all
                .iter()
                .filter(|p| !planned.contains(p))
                .copied()
                .collect();
            if rest.is_empty() {
                break;
            }
            match self.peers.query(peer, &ShardQuery::Ready, &rest).await {
                Ok(ready) => {
                    let take: Vec<i32> =
                        ready.keys().filter(|p| rest.contains(p)).copied().collect();
                    if !take.is_empty() {
                        planned.extend(&take);
                        remote.push((peer, take));
                    }
                }
                Err(e) => tracing::debug!(peer, error = %e, "sharded index: a peer did not answer"),
            }
        }
        let missing: Vec<i32> = all
            .iter()
            .filter(|p| !planned.contains(p))
            .copied()
            .collect();
        if !missing.is_empty() {
            metrics::counter!("userseg_index_incomplete_reads_total").increment(1);
            return Err(incomplete(&missing));
        }
        let mut n = self
            .local
            .export(&local, segment, at, within, chunk, sink.clone())
            .await?;
        for (peer, partitions) in remote {
            n += self
                .peers
                .export(peer, &partitions, segment, at, within, chunk, sink.clone())
                .await?;
        }
        Ok(n)
    }
}

/// The store of record's live scan, keeping only the pairs of one partition's users.
/// (ClickHouse 18.16 has no function computing Kafka's murmur2 partitioner, so the filter runs
/// here, with the very function the publisher partitions by.)
struct PartitionScan {
    inner: Arc<dyn LiveScan>,
    partition: i32,
    partition_of: PartitionOf,
}

#[async_trait]
impl LiveScan for PartitionScan {
    async fn scan_live(
        &self,
        at: UnixSeconds,
        chunk_pairs: usize,
        sink: mpsc::Sender<Vec<Pair>>,
    ) -> Result<u64, PortError> {
        let (tx, mut rx) = mpsc::channel::<Vec<Pair>>(2);
        let filter = async {
            let mut kept = 0u64;
            while let Some(mut pairs) = rx.recv().await {
                pairs.retain(|p| (self.partition_of)(&p.user_id) == self.partition);
                if pairs.is_empty() {
                    continue;
                }
                kept += pairs.len() as u64;
                if sink.send(pairs).await.is_err() {
                    return Err(PortError::Transient("index closed".into()));
                }
            }
            Ok(kept)
        };
        let (scanned, kept) = tokio::join!(self.inner.scan_live(at, chunk_pairs, tx), filter);
        let kept = kept?;
        let total = scanned?;
        tracing::info!(
            partition = self.partition,
            scanned = total,
            kept,
            "sharded index: scanned the store of record for a partition"
        );
        Ok(kept)
    }
}

#[cfg(test)]
#[path = "shards_tests.rs"]
mod tests;
