use std::sync::Mutex;

use super::*;

fn counts(v: &[(&str, u64)]) -> ShardAnswer {
    ShardAnswer::Counts(
        v.iter()
            .map(|(s, u)| SegmentCount {
                segment: s.to_string(),
                users: *u,
            })
            .collect(),
    )
}

#[test]
fn per_partition_answers_add_up() {
    let got = combine(BTreeMap::from([
        (0, counts(&[("a", 2), ("b", 1)])),
        (1, counts(&[("b", 3), ("c", 4)])),
        (2, counts(&[])),
    ]))
    .expect("combine");
    assert_eq!(got, counts(&[("a", 2), ("b", 4), ("c", 4)]));

    let got = combine(BTreeMap::from([
        (0, ShardAnswer::Count(5)),
        (3, ShardAnswer::Count(7)),
    ]))
    .expect("combine");
    assert_eq!(got, ShardAnswer::Count(12));

    let o = |u: [u64; 2], b: u64| {
        ShardAnswer::Overlap(Overlap {
            users: u.to_vec(),
            both: vec![vec![u[0], b], vec![b, u[1]]],
        })
    };
    let got = combine(BTreeMap::from([(0, o([3, 2], 1)), (1, o([4, 5], 2))])).expect("combine");
    assert_eq!(got, o([7, 7], 3));

    // Answers of different kinds do not combine.
    assert!(combine(BTreeMap::from([
        (0, ShardAnswer::Count(1)),
        (1, counts(&[]))
    ]))
    .is_err());
    assert!(combine(BTreeMap::new()).is_err());
}

/// A shard memory that is never asked (no shard is loaded in these tests).
struct Unused;

/// The answer of what these tests never ask.
fn unused<T>() -> Result<T, PortError> {
    Err(PortError::Permanent("unused".into()))
}

#[async_trait]
impl SegmentWriter for Unused {
    async fn write(&self, _pairs: Arc<[Pair]>) -> Result<(), PortError> {
        unused()
    }
}

#[async_trait]
impl SegmentCounter for Unused {
    async fn count(&self, _: &str, _: UnixSeconds, _: Mode) -> Result<(u64, bool), PortError> {
        unused()
    }
    async fn count_all(
        &self,
        _: UnixSeconds,
        _: Mode,
    ) -> Result<(Vec<SegmentCount>, bool), PortError> {
        unused()
    }
    async fn check_ready(&self) -> Result<(), PortError> {
        Ok(())
    }
}

#[async_trait]
impl SegmentAnalytics for Unused {
    async fn user_segments(&self, _: &str, _: UnixSeconds) -> Result<Vec<Membership>, PortError> {
        unused()
    }
    async fn count_within(
        &self,
        _: &str,
        _: UnixSeconds,
        _: Option<Within>,
    ) -> Result<u64, PortError> {
        unused()
    }
    async fn count_all_within(
        &self,
        _: UnixSeconds,
        _: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        unused()
    }
    async fn count_expr(
        &self,
        _: &Expr,
        _: UnixSeconds,
        _: Option<Within>,
    ) -> Result<u64, PortError> {
        unused()
    }
    async fn overlap(
        &self,
        _: &[String],
        _: UnixSeconds,
        _: Option<Within>,
    ) -> Result<Overlap, PortError> {
        unused()
    }
    async fn export_members(
        &self,
        _: &str,
        _: UnixSeconds,
        _: Option<Within>,
        _: usize,
        _: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        unused()
    }
}

/// Peers answering per partition counts from fixed tables; `None` = unreachable. Records the
/// partitions each was asked for.
struct FakePeers {
    tables: Vec<Option<BTreeMap<i32, u64>>>,
    asked: Mutex<Vec<(usize, Vec<i32>)>>,
}

#[async_trait]
impl ShardPeers for FakePeers {
    fn len(&self) -> usize {
        self.tables.len()
    }
    async fn query(
        &self,
        peer: usize,
        _query: &ShardQuery,
        partitions: &[i32],
    ) -> Result<ShardAnswers, PortError> {
        self.asked.lock().unwrap().push((peer, partitions.to_vec()));
        let Some(t) = &self.tables[peer] else {
            return Err(PortError::Transient("down".into()));
        };
        Ok(t.iter()
            .filter(|(p, _)| partitions.contains(p))
            .map(|(p, n)| (*p, ShardAnswer::Count(*n)))
            .collect())
    }
    async fn export(
        &self,
        _: usize,
        _: &[i32],
        _: &str,
        _: UnixSeconds,
        _: Option<Within>,
        _: usize,
        _: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        unused()
    }
}

/// A peer answering `counts` for its partitions.
fn up(counts: &[(i32, u64)]) -> Option<BTreeMap<i32, u64>> {
    Some(counts.iter().copied().collect())
}

/// A peer that is unreachable.
const DOWN: Option<BTreeMap<i32, u64>> = None;

/// A sharded index of 4 partitions over peers answering from `tables`.
fn index(tables: Vec<Option<BTreeMap<i32, u64>>>) -> (ShardedIndex<Unused>, Arc<FakePeers>) {
    let peers = Arc::new(FakePeers {
        tables,
        asked: Mutex::default(),
    });
    let partition_of: PartitionOf = Arc::new(|u: &str| (u.len() % 4) as i32);
    (
        ShardedIndex::new(
            peers.clone(),
            partition_of,
            4,
            Window::from_secs(100).expect("window"),
        ),
        peers,
    )
}

#[tokio::test]
async fn a_read_takes_one_answer_per_partition_from_the_peers() {
    // Partition 1 is answered by two peers (a shard moving: the old owner still holds it):
    // it counts once. A peer that is down does not matter when the others cover everything.
    let (idx, peers) = index(vec![
        up(&[(0, 10), (1, 20)]),
        DOWN,
        up(&[(1, 20), (2, 30), (3, 40)]),
    ]);
    let (n, exact) = idx.count("s", 100, Mode::Exact).await.expect("count");
    assert_eq!((n, exact), (100, true));
    let asked = peers.asked.lock().unwrap().clone();
    assert!(
        asked.iter().all(|(_, p)| p == &vec![0, 1, 2, 3]),
        "{asked:?}"
    );
}

#[tokio::test]
async fn a_partition_nobody_answers_makes_the_read_incomplete_not_wrong() {
    let (idx, _) = index(vec![up(&[(0, 10), (1, 20)]), up(&[(3, 40)]), DOWN]);
    let err = idx
        .count("s", 100, Mode::Exact)
        .await
        .expect_err("incomplete");
    let PortError::Transient(msg) = &err else {
        panic!("{err:?}")
    };
    assert!(msg.contains("incomplete") && msg.contains("[2]"), "{msg}");
    assert!(idx.check_ready().await.is_err());
    // A user read needs only the user's partition ("abc": 3 % 4 = 3).
    let (idx, peers) = index(vec![up(&[(3, 1)])]);
    // The fake answers Count for any query: the combination then fails on the kind, which
    // shows only partition 3 was asked.
    let _ = idx.user_segments("abc", 100).await;
    assert_eq!(peers.asked.lock().unwrap().clone(), vec![(0, vec![3])]);
}

#[tokio::test]
async fn the_partition_scan_keeps_only_its_users() {
    struct All(Vec<Pair>);
    #[async_trait]
    impl LiveScan for All {
        async fn scan_live(
            &self,
            _: UnixSeconds,
            chunk: usize,
            sink: mpsc::Sender<Vec<Pair>>,
        ) -> Result<u64, PortError> {
            for c in self.0.chunks(chunk) {
                sink.send(c.to_vec())
                    .await
                    .map_err(|_| PortError::Transient("closed".into()))?;
            }
            Ok(self.0.len() as u64)
        }
    }
    let pairs: Vec<Pair> = (0..100)
        .map(|i| Pair {
            user_id: "u".repeat(1 + i % 7),
            segment: "s".into(),
            ts: i as i64,
        })
        .collect();
    let partition_of: PartitionOf = Arc::new(|u: &str| (u.len() % 3) as i32);
    let scan = PartitionScan {
        inner: Arc::new(All(pairs.clone())),
        partition: 1,
        partition_of: partition_of.clone(),
    };
    let (tx, mut rx) = mpsc::channel(100);
    let kept = scan.scan_live(0, 10, tx).await.expect("scan");
    let mut got = Vec::new();
    while let Some(c) = rx.recv().await {
        got.extend(c);
    }
    let want: Vec<Pair> = pairs
        .into_iter()
        .filter(|p| partition_of(&p.user_id) == 1)
        .collect();
    assert_eq!(kept, want.len() as u64);
    assert_eq!(got, want);
}
