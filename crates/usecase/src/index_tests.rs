use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::Mutex;

use tokio::sync::mpsc;

use super::*;
use crate::ManualClock;

const WINDOW: i64 = 100;
const NOW: i64 = 10_000;

fn pair(user: &str, segment: &str, ts: i64) -> Pair {
    Pair {
        user_id: user.into(),
        segment: segment.into(),
        ts,
    }
}

type Events = Arc<Mutex<Vec<String>>>;

fn log(events: &Events, e: impl Into<String>) {
    events.lock().unwrap().push(e.into());
}

/// What the fakes send into a scan or export sink: its receiver gone is a transient error.
async fn send<T>(sink: &mpsc::Sender<T>, v: T) -> Result<(), PortError> {
    sink.send(v)
        .await
        .map_err(|_| PortError::Transient("closed".into()))
}

/// An exact index: latest ts per membership; fails the first `fail_writes` writes and
/// deletions.
#[derive(Default)]
struct MapIndex {
    latest: Mutex<HashMap<(String, String), i64>>,
    fail_writes: AtomicU32,
}

impl MapIndex {
    fn fail(&self) -> Result<(), PortError> {
        if self
            .fail_writes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(PortError::Transient("injected".into()));
        }
        Ok(())
    }

    /// Live (segment, user, ts) at `at` under `within` (the window when none).
    fn live(&self, at: i64, within: Option<Within>) -> Vec<(String, String, i64)> {
        let d = within.map_or(WINDOW, |w| w.secs() as i64);
        let m = self.latest.lock().unwrap();
        let mut v: Vec<_> = m
            .iter()
            .filter(|(_, &ts)| ts > at - d)
            .map(|((s, u), &ts)| (s.clone(), u.clone(), ts))
            .collect();
        v.sort();
        v
    }
}

#[async_trait]
impl SegmentWriter for MapIndex {
    async fn write(&self, pairs: Arc<[Pair]>) -> Result<(), PortError> {
        self.fail()?;
        let mut m = self.latest.lock().unwrap();
        for p in pairs.iter() {
            let e = m
                .entry((p.segment.clone(), p.user_id.clone()))
                .or_insert(p.ts);
            *e = (*e).max(p.ts);
        }
        Ok(())
    }

    async fn delete_users(&self, deletion: UserDeletion) -> Result<(), PortError> {
        self.fail()?;
        let users = deletion.user_ids();
        self.latest
            .lock()
            .unwrap()
            .retain(|(_, u), _| !users.contains(u));
        Ok(())
    }
}

#[async_trait]
impl SegmentAnalytics for MapIndex {
    async fn user_segments(&self, user: &str, at: i64) -> Result<Vec<Membership>, PortError> {
        Ok(self
            .live(at, None)
            .into_iter()
            .filter(|(_, u, _)| u == user)
            .map(|(segment, _, ts)| Membership {
                segment,
                last_seen: ts,
                expires_at: ts + WINDOW,
            })
            .collect())
    }
    async fn count_within(&self, s: &str, at: i64, w: Option<Within>) -> Result<u64, PortError> {
        Ok(self
            .live(at, w)
            .iter()
            .filter(|(seg, _, _)| seg == s)
            .count() as u64)
    }
    async fn count_all_within(
        &self,
        at: i64,
        w: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        let mut v: Vec<SegmentCount> = Vec::new();
        for (segment, _, _) in self.live(at, w) {
            match v.last_mut() {
                Some(c) if c.segment == segment => c.users += 1,
                _ => v.push(SegmentCount { segment, users: 1 }),
            }
        }
        Ok(v)
    }
    async fn count_expr(&self, e: &Expr, at: i64, w: Option<Within>) -> Result<u64, PortError> {
        let live = self.live(at, w);
        let mut users: Vec<&str> = live.iter().map(|(_, u, _)| u.as_str()).collect();
        users.sort_unstable();
        users.dedup();
        Ok(users
            .iter()
            .filter(|u| e.matches(&|s| live.iter().any(|(seg, x, _)| seg == s && x == *u)))
            .count() as u64)
    }
    async fn overlap(
        &self,
        _s: &[String],
        _at: i64,
        _w: Option<Within>,
    ) -> Result<Overlap, PortError> {
        Ok(Overlap {
            users: vec![1],
            both: vec![vec![1]],
        })
    }
    async fn export_members(
        &self,
        s: &str,
        at: i64,
        w: Option<Within>,
        _chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let members: Vec<Member> = self
            .live(at, w)
            .into_iter()
            .filter(|(seg, _, _)| seg == s)
            .map(|(_, user_id, last_seen)| Member { user_id, last_seen })
            .collect();
        let n = members.len() as u64;
        send(&sink, members).await?;
        Ok(n)
    }
}

#[async_trait]
impl SegmentCounter for MapIndex {
    async fn count(&self, s: &str, at: i64, _m: Mode) -> Result<(u64, bool), PortError> {
        let m = self.latest.lock().unwrap();
        let n = m
            .iter()
            .filter(|((seg, _), &ts)| seg == s && ts > at - WINDOW)
            .count();
        Ok((n as u64, true))
    }
    async fn count_all(&self, at: i64, _m: Mode) -> Result<(Vec<SegmentCount>, bool), PortError> {
        let m = self.latest.lock().unwrap();
        let mut by: HashMap<String, u64> = HashMap::new();
        for ((seg, _), &ts) in m.iter() {
            if ts > at - WINDOW {
                *by.entry(seg.clone()).or_default() += 1;
            }
        }
        let mut v: Vec<_> = by
            .into_iter()
            .map(|(segment, users)| SegmentCount { segment, users })
            .collect();
        v.sort_by(|a, b| a.segment.cmp(&b.segment));
        Ok((v, true))
    }
    async fn check_ready(&self) -> Result<(), PortError> {
        Ok(())
    }
}

/// The store of record's answers: recognisable and flagged inexact.
struct Fallback;

#[async_trait]
impl SegmentCounter for Fallback {
    async fn count(&self, _s: &str, _at: i64, _m: Mode) -> Result<(u64, bool), PortError> {
        Ok((999, false))
    }
    async fn count_all(&self, _at: i64, _m: Mode) -> Result<(Vec<SegmentCount>, bool), PortError> {
        Ok((
            vec![SegmentCount {
                segment: "fallback".into(),
                users: 999,
            }],
            false,
        ))
    }
    async fn check_ready(&self) -> Result<(), PortError> {
        Err(PortError::Transient("fallback down".into()))
    }
}

/// The store of record's analytics: recognisable answers.
#[async_trait]
impl SegmentAnalytics for Fallback {
    async fn user_segments(&self, _u: &str, _at: i64) -> Result<Vec<Membership>, PortError> {
        Ok(vec![Membership {
            segment: "fallback".into(),
            last_seen: 1,
            expires_at: 2,
        }])
    }
    async fn count_within(&self, _s: &str, _at: i64, _w: Option<Within>) -> Result<u64, PortError> {
        Ok(999)
    }
    async fn count_all_within(
        &self,
        _at: i64,
        _w: Option<Within>,
    ) -> Result<Vec<SegmentCount>, PortError> {
        Ok(vec![SegmentCount {
            segment: "fallback".into(),
            users: 999,
        }])
    }
    async fn count_expr(&self, _e: &Expr, _at: i64, _w: Option<Within>) -> Result<u64, PortError> {
        Ok(999)
    }
    async fn overlap(
        &self,
        _s: &[String],
        _at: i64,
        _w: Option<Within>,
    ) -> Result<Overlap, PortError> {
        Ok(Overlap {
            users: vec![999],
            both: vec![vec![999]],
        })
    }
    async fn export_members(
        &self,
        _s: &str,
        _at: i64,
        _w: Option<Within>,
        _chunk: usize,
        sink: mpsc::Sender<Vec<Member>>,
    ) -> Result<u64, PortError> {
        let m = Member {
            user_id: "fallback".into(),
            last_seen: 1,
        };
        send(&sink, vec![m]).await?;
        Ok(1)
    }
}

struct FakeScan {
    pairs: Vec<Pair>,
    fail_times: AtomicU32,
    events: Events,
    seen_at: Mutex<Vec<i64>>,
}

#[async_trait]
impl LiveScan for FakeScan {
    async fn scan_live(
        &self,
        at: UnixSeconds,
        chunk: usize,
        sink: mpsc::Sender<Vec<Pair>>,
    ) -> Result<u64, PortError> {
        self.seen_at.lock().unwrap().push(at);
        if self
            .fail_times
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            log(&self.events, "scan-fail");
            // Part of the data went out before the failure: a retry sends it again.
            let _ = sink.send(self.pairs[..1].to_vec()).await;
            return Err(PortError::Transient("injected".into()));
        }
        let mut n = 0;
        for c in self.pairs.chunks(chunk) {
            assert!(c.len() <= chunk);
            send(&sink, c.to_vec()).await?;
            n += c.len() as u64;
        }
        log(&self.events, "scan-ok");
        Ok(n)
    }
}

struct FakeFollower {
    rx: mpsc::UnboundedReceiver<Result<Followed, PortError>>,
}

impl LogFollower for FakeFollower {
    async fn next(&mut self) -> Result<Followed, PortError> {
        match self.rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }
    fn lag(&self) -> Option<u64> {
        Some(self.rx.len() as u64)
    }
}

struct Harness {
    replica: SegmentIndex,
    index: Arc<MapIndex>,
    scan: Arc<FakeScan>,
    events: Events,
    tx: mpsc::UnboundedSender<Result<Followed, PortError>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

fn config() -> IndexConfig {
    IndexConfig {
        scan_chunk_pairs: 2,
        scan_buffer_chunks: 1,
        ..IndexConfig::default()
    }
}

/// Starts an index whose `open` fails `open_failures` times and whose scan fails
/// `scan_failures` times.
fn start(scanned: Vec<Pair>, open_failures: u32, scan_failures: u32) -> Harness {
    let events: Events = Arc::default();
    let index = Arc::new(MapIndex::default());
    let replica = SegmentIndex::new(index.clone(), Arc::new(Fallback), config());
    let scan = Arc::new(FakeScan {
        pairs: scanned,
        fail_times: AtomicU32::new(scan_failures),
        events: events.clone(),
        seen_at: Mutex::default(),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut rx = Some(rx);
    let mut failures = open_failures;
    let open_events = events.clone();
    let open = move || {
        let r = if failures > 0 {
            failures -= 1;
            log(&open_events, "open-fail");
            Err(PortError::Transient("broker down".into()))
        } else {
            log(&open_events, "open-ok");
            match rx.take() {
                Some(rx) => Ok(FakeFollower { rx }),
                None => Err(PortError::Permanent("opened twice".into())),
            }
        };
        async move { r }
    };
    let cancel = CancellationToken::new();
    let task = tokio::spawn(replica.clone().run(
        open,
        scan.clone(),
        Arc::new(ManualClock::new(NOW)),
        cancel.clone(),
    ));
    Harness {
        replica,
        index,
        scan,
        events,
        tx,
        cancel,
        task,
    }
}

/// An index on an exact MapIndex whose `open` and scan succeed at once.
fn started(scanned: Vec<Pair>) -> Harness {
    start(scanned, 0, 0)
}

impl Harness {
    /// Waits until the scan went through (after any failed attempts).
    async fn scanned(&self) {
        until("the scan", || {
            self.events.lock().unwrap().last().map(String::as_str) == Some("scan-ok")
        })
        .await;
    }

    /// The follower hands out `pairs`.
    fn follow(&self, pairs: Vec<Pair>) {
        self.tx.send(Ok(Followed::Pairs(pairs))).unwrap();
    }

    /// The follower reaches the end of the log; waits until the index serves.
    async fn catch_up(&self) {
        self.tx.send(Ok(Followed::CaughtUp)).unwrap();
        until("serving", || self.replica.status().serving).await;
    }

    /// The segments the index answers for `user` now.
    async fn segments_of(&self, user: &str) -> Vec<String> {
        let m = self.replica.user_segments(user, NOW).await.unwrap();
        m.into_iter().map(|m| m.segment).collect()
    }

    /// Cancels the index's task and waits for it to end.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn counts(v: &[SegmentCount]) -> Vec<(&str, u64)> {
    v.iter().map(|c| (c.segment.as_str(), c.users)).collect()
}

#[tokio::test(start_paused = true)]
async fn answers_from_the_fallback_until_caught_up_then_from_scan_and_log() {
    let scanned = vec![
        pair("u1", "a", NOW - 10),
        pair("u2", "a", NOW - 200), // expired by `at`
        pair("u1", "b", NOW - 50),
        pair("u3", "b", NOW - 5),
        pair("u3", "b", NOW - 90), // an older duplicate
    ];
    let h = started(scanned);
    until("the scan", || h.replica.status().scanned_pairs == 5).await;
    h.follow(vec![
        pair("u2", "a", NOW - 1), // refreshes an expired membership
        pair("u4", "c", NOW),
        pair("u1", "a", NOW - 80), // older than what the scan had
    ]);
    until("the followed pairs", || {
        h.replica.status().followed_pairs == 3
    })
    .await;

    // Loaded but not caught up: still the store of record.
    assert!(!h.replica.status().serving);
    assert_eq!(
        h.replica.count("a", NOW, Mode::Exact).await,
        Ok((999, false))
    );
    assert!(h.replica.check_ready().await.is_err());

    h.catch_up().await;
    let (all, exact) = h.replica.count_all(NOW, Mode::Approx).await.unwrap();
    assert!(exact);
    assert_eq!(counts(&all), [("a", 2), ("b", 2), ("c", 1)]);
    assert_eq!(h.replica.count("b", NOW, Mode::Exact).await, Ok((2, true)));
    // Time moves on: u1/b (NOW-50) and u3/b (NOW-5) expire at different instants.
    assert_eq!(
        h.replica.count("b", NOW + 60, Mode::Exact).await,
        Ok((1, true))
    );
    assert!(h.replica.check_ready().await.is_ok());

    // Pairs after catching up keep flowing in.
    h.follow(vec![pair("u9", "c", NOW)]);
    until("a later pair", || h.replica.status().followed_pairs == 4).await;
    assert_eq!(h.replica.count("c", NOW, Mode::Exact).await, Ok((2, true)));
    assert_eq!(*h.scan.seen_at.lock().unwrap(), [NOW]);

    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn opens_the_follower_before_scanning_and_retries_each_step() {
    let h = start(vec![pair("u1", "a", NOW), pair("u2", "a", NOW)], 2, 1);
    h.scanned().await;
    // The follower is opened once, before any scan; a failed scan is retried with the same
    // follower (its start positions are still behind everything the store holds).
    assert_eq!(
        *h.events.lock().unwrap(),
        ["open-fail", "open-fail", "open-ok", "scan-fail", "scan-ok"]
    );
    h.catch_up().await;
    assert_eq!(h.replica.count("a", NOW, Mode::Exact).await, Ok((2, true)));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn failed_writes_and_log_errors_lose_nothing() {
    let h = started(vec![]);
    h.scanned().await;
    h.index.fail_writes.store(3, Ordering::SeqCst);
    h.tx.send(Err(PortError::Transient("broker away".into())))
        .unwrap();
    h.follow(vec![pair("u1", "a", NOW), pair("u2", "a", NOW)]);
    h.catch_up().await;
    assert_eq!(h.index.fail_writes.load(Ordering::SeqCst), 0);
    assert_eq!(h.replica.count("a", NOW, Mode::Exact).await, Ok((2, true)));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn cancelling_while_the_follower_cannot_open_stops_the_task() {
    let h = start(vec![], u32::MAX, 0);
    until("a failed open", || !h.events.lock().unwrap().is_empty()).await;
    h.cancel.cancel();
    h.task.await.unwrap();
    assert!(!h.replica.status().serving);
    let (_, exact) = h.replica.count_all(NOW, Mode::Exact).await.unwrap();
    assert!(!exact, "answered by the fallback");
}

fn deletion(users: &[&str]) -> UserDeletion {
    UserDeletion::new(users.iter().map(|u| u.to_string()).collect()).unwrap()
}

async fn export(replica: &SegmentIndex, segment: &str) -> Vec<String> {
    let (tx, mut rx) = mpsc::channel(4);
    let n = replica
        .export_members(segment, NOW, None, 10, tx)
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(c) = rx.recv().await {
        out.extend(c.into_iter().map(|m| m.user_id));
    }
    assert_eq!(n, out.len() as u64);
    out
}

#[tokio::test(start_paused = true)]
async fn deletions_apply_in_log_order_with_the_pairs_and_scanned_pairs() {
    // The scan holds pairs logged before a deletion the follower hands out later.
    let h = started(vec![pair("u1", "a", NOW - 10), pair("u2", "a", NOW - 10)]);
    until("the scan", || h.replica.status().scanned_pairs == 2).await;
    for f in [
        Followed::Pairs(vec![pair("u1", "b", NOW - 5), pair("u3", "b", NOW - 5)]),
        Followed::Delete(deletion(&["u1", "u3", "never-seen"])),
        Followed::Pairs(vec![pair("u1", "c", NOW - 1)]),
        Followed::CaughtUp,
    ] {
        h.tx.send(Ok(f)).unwrap();
    }
    until("serving", || h.replica.status().serving).await;
    assert_eq!(h.replica.status().followed_deletions, 1);
    // u1 is only in what was logged after its deletion; u3 is gone; u2 untouched.
    assert_eq!(h.segments_of("u1").await, ["c"]);
    assert!(h.segments_of("u3").await.is_empty());
    let (all, _) = h.replica.count_all(NOW, Mode::Exact).await.unwrap();
    assert_eq!(counts(&all), [("a", 1), ("c", 1)]);
    assert_eq!(h.replica.count_within("a", NOW, None).await, Ok(1));
    let expr = Expr::parse("a OR c").unwrap();
    assert_eq!(h.replica.count_expr(&expr, NOW, None).await, Ok(2));
    assert_eq!(export(&h.replica, "a").await, ["u2"]);

    // A deletion the index fails to apply is retried, never skipped; pairs after it wait.
    h.index.fail_writes.store(2, Ordering::SeqCst);
    h.tx.send(Ok(Followed::Delete(deletion(&["u2"])))).unwrap();
    h.follow(vec![pair("u2", "d", NOW)]);
    until("the retried deletion", || {
        h.replica.status().followed_deletions == 2
    })
    .await;
    until("the pair after it", || {
        h.replica.status().followed_pairs == 4
    })
    .await;
    assert_eq!(h.index.fail_writes.load(Ordering::SeqCst), 0);
    assert_eq!(h.segments_of("u2").await, ["d"]);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn analytics_come_from_the_store_of_record_until_the_index_serves() {
    let h = started(vec![pair("u1", "a", NOW)]);
    until("the scan", || h.replica.status().scanned_pairs == 1).await;
    let w = Some(
        Within::from_secs(
            50,
            userseg_domain::Window::from_secs(WINDOW as u64).unwrap(),
        )
        .unwrap(),
    );
    let expr = Expr::parse("NOT a").unwrap();
    let segs = vec!["a".to_string(), "b".to_string()];
    // Loaded, not caught up: every read is the store of record's.
    assert_eq!(h.segments_of("u1").await, ["fallback"]);
    assert_eq!(h.replica.count_within("a", NOW, w).await, Ok(999));
    assert_eq!(
        h.replica.count_all_within(NOW, w).await.unwrap()[0].users,
        999
    );
    assert_eq!(h.replica.count_expr(&expr, NOW, None).await, Ok(999));
    assert_eq!(
        h.replica.overlap(&segs, NOW, None).await.unwrap().users,
        [999]
    );
    assert_eq!(export(&h.replica, "a").await, ["fallback"]);

    h.catch_up().await;
    assert_eq!(
        h.replica.user_segments("u1", NOW).await.unwrap(),
        [Membership {
            segment: "a".into(),
            last_seen: NOW,
            expires_at: NOW + WINDOW
        }]
    );
    assert_eq!(h.replica.count_within("a", NOW, w).await, Ok(1));
    assert_eq!(
        h.replica.count_all_within(NOW, w).await.unwrap()[0].users,
        1
    );
    assert_eq!(h.replica.count_expr(&expr, NOW, None).await, Ok(0));
    assert_eq!(
        h.replica.overlap(&segs, NOW, None).await.unwrap().users,
        [1]
    );
    assert_eq!(export(&h.replica, "a").await, ["u1"]);
    h.stop().await;
}
