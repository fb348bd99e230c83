//! The cluster layout of `deploy/clickhouse-cluster/` on a real 2-shard ClickHouse cluster: two
//! servers started by `scripts/clickhouse-cluster.sh` (through `scripts/clickhouse.sh`),
//! non-replicated local tables made by the crate's migrations on each, the Distributed tables
//! of `cluster.sql`, pairs written through the Distributed `pairs` by the crate's writer. Every
//! answer is compared with a single server holding the same pairs: the crate's own reads on
//! the cluster database, and every query of `queries.sql`; then a deletion and retention run
//! per node, and the answers are compared again.
//!
//! Its own test binary: it starts (and stops) its own servers, so it needs no
//! `USERSEG_TEST_CLICKHOUSE_URL`, only `clickhouse-server` (it fails when that is missing).

#[path = "support/cluster_sql.rs"]
mod cluster_sql;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use userseg_clickhouse::{
    applied_migrations, migrate, quote_string, ClickHouseConfig, ClickHouseStore, MIGRATIONS,
};
use userseg_domain::{Expr, Pair, UserDeletion, Window, Within};
use userseg_usecase::{
    HistoryStore, LiveScan, Member, Mode, SegmentAnalytics, SegmentCounter, SegmentWriter,
};

const DAY: i64 = 86_400;
/// The instant everything is asked at: 2025-11-24 16:00:00 UTC.
const T: i64 = 1_764_000_000;
const SEGMENTS: [&str; 5] = ["sports", "news", "music", "a.b:c-d_e", "rare"];

/// Two ClickHouse servers forming the cluster `userseg`, stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    shards: Vec<String>,
    name: String,
}

/// Clusters start one at a time: `scripts/clickhouse.sh` picks free ports by probing, so two
/// starts probing at once can pick the same port. The script starts a server that lost a port
/// again on other ports; one at a time, a cluster never takes one from its sibling test.
static STARTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    fn start(shards: usize) -> Cluster {
        let one_at_a_time = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().to_str().expect("utf-8 temp path").to_string();
        let out = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/clickhouse-cluster.sh"
        ))
        .args(["start", &path, &shards.to_string()])
        .output()
        .expect("run scripts/clickhouse-cluster.sh");
        assert!(
            out.status.success(),
            "scripts/clickhouse-cluster.sh start failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        drop(one_at_a_time);
        let env = std::fs::read_to_string(Path::new(&path).join("cluster.env"))
            .expect("cluster.env written by the script");
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from cluster.env: {env}"))
                .to_string()
        };
        let shards: Vec<String> = var("USERSEG_TEST_CLICKHOUSE_SHARDS")
            .split(',')
            .map(String::from)
            .collect();
        Cluster {
            name: var("USERSEG_TEST_CLICKHOUSE_CLUSTER"),
            shards,
            dir,
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(path) = self.dir.path().to_str() {
            let t = std::time::Instant::now();
            let _ = Command::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../scripts/clickhouse-cluster.sh"
            ))
            .args(["stop", path])
            .output();
            eprintln!("stopped in {:?}", t.elapsed());
            if t.elapsed() > Duration::from_secs(10) {
                for i in 1..=self.shards.len() {
                    let log = std::fs::read_to_string(format!(
                        "{path}/shard{i}/log/clickhouse-server.log"
                    ))
                    .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(25).collect();
                    eprintln!(
                        "shard{i}:\n{}",
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
            }
        }
    }
}

fn config(addr: &str, database: &str) -> ClickHouseConfig {
    ClickHouseConfig {
        addr: addr.to_string(),
        database: database.to_string(),
        request_timeout: Duration::from_secs(60),
        ..ClickHouseConfig::default()
    }
}

/// The pairs: 3,000 users (a few with quotes and backslashes in their ids) over 18 days
/// before `T` (some expired), Zipf-like segment sizes, and re-sent pairs.
fn data() -> Vec<Pair> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut pairs = Vec::new();
    for i in 0..40_000u64 {
        let u = next() % 3_000;
        let user = if u % 97 == 0 {
            format!("o'brien \\ {u}")
        } else {
            format!("u-{u}")
        };
        let r = next() % 100;
        let segment = SEGMENTS[match r {
            0..=44 => 0,
            45..=69 => 1,
            70..=84 => 2,
            85..=97 => 3,
            _ => 4,
        }];
        let ts = T - (next() % (18 * DAY as u64)) as i64;
        pairs.push(Pair {
            user_id: user,
            segment: segment.into(),
            ts,
        });
        if i % 7 == 0 {
            // Re-sent later (still before T).
            let p = pairs.last().cloned().expect("just pushed");
            pairs.push(Pair {
                ts: (p.ts + 2 * DAY).min(T),
                ..p
            });
        }
    }
    pairs
}

async fn text(store: &ClickHouseStore, sql: &str) -> String {
    answer(store, sql, "TabSeparated").await
}

async fn answer(store: &ClickHouseStore, sql: &str, format: &str) -> String {
    let body = store
        .client()
        .query(&format!("{sql} FORMAT {format}"))
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    String::from_utf8(body.to_vec()).expect("utf-8 answer")
}

fn sorted_lines(s: &str) -> Vec<&str> {
    let mut v: Vec<&str> = s.lines().collect();
    v.sort_unstable();
    v
}

/// The distinct user ids of one database's `table` on one server.
async fn users_of(addr: &str, database: &str, table: &str) -> BTreeSet<String> {
    let store = ClickHouseStore::new(config(addr, database), Window::DEFAULT).expect("store");
    text(
        &store,
        &format!("SELECT DISTINCT hex(user_id) FROM `{database}`.{table} ORDER BY hex(user_id)"),
    )
    .await
    .lines()
    .map(String::from)
    .collect()
}

/// Every query of queries.sql on the cluster database and on the single server's database
/// (where the setting changes nothing): the same answers, row for row; and the anchor answers
/// of the crate's own reads on the single server.
async fn compare_queries(single: &ClickHouseStore, cluster: &ClickHouseStore, cdb: &str) {
    let sdb = format!("`{}`", single.database());
    let window = single.window();
    for bound in [T - window.secs() as i64, T - 3 * DAY] {
        let first_day = (bound + 1).div_euclid(DAY) * DAY + DAY;
        let (bound_s, first_s) = (bound.to_string(), first_day.to_string());
        let (a, b, c) = (
            quote_string("sports"),
            quote_string("news"),
            quote_string("music"),
        );
        for name in cluster_sql::query_names() {
            let template = cluster_sql::query(name, &[("cdb", "x"), ("bound", "0")]);
            // Per segment and user where the query has them, once otherwise.
            let segments: &[&str] = if template.contains("{segment}") {
                &SEGMENTS
            } else {
                &SEGMENTS[..1]
            };
            let users: Vec<String> = if template.contains("{user}") {
                vec!["u-7".into(), "u-1500".into(), "o'brien \\ 194".into()]
            } else {
                vec![String::new()]
            };
            for seg in segments {
                for user in &users {
                    let seg_q = quote_string(seg);
                    let user_q = quote_string(user);
                    let subs = |db: &str| {
                        cluster_sql::query(
                            name,
                            &[
                                ("cdb", db),
                                ("segment", &seg_q),
                                ("bound", &bound_s),
                                ("first_day", &first_s),
                                ("user", &user_q),
                                ("a", &a),
                                ("b", &b),
                                ("c", &c),
                            ],
                        )
                    };
                    let on_single = text(single, &subs(&sdb)).await;
                    let on_cluster = text(cluster, &subs(cdb)).await;
                    assert_eq!(
                        sorted_lines(&on_cluster),
                        sorted_lines(&on_single),
                        "{name} for {seg} / {user} with bound {bound}: the cluster answers otherwise"
                    );
                    assert!(
                        !on_single.is_empty(),
                        "{name} for {seg} / {user}: empty answer"
                    );
                }
            }
        }
        // Anchors: the file's exact count gives the crate's answer on one server.
        for seg in SEGMENTS {
            let exact = text(
                single,
                &cluster_sql::query(
                    "count_exact",
                    &[
                        ("cdb", &sdb),
                        ("segment", &quote_string(seg)),
                        ("bound", &bound_s),
                    ],
                ),
            )
            .await;
            let within = Within::from_secs((T - bound) as u64, window).expect("within");
            let want = single
                .count_within(seg, T, Some(within))
                .await
                .expect("count");
            assert_eq!(exact.trim(), want.to_string(), "count_exact of {seg}");
        }
    }
    let bound = T - window.secs() as i64;
    let first_day = ((bound + 1).div_euclid(DAY) * DAY + DAY).to_string();
    for seg in SEGMENTS {
        let approx = text(
            single,
            &cluster_sql::query(
                "count_approx",
                &[
                    ("cdb", &sdb),
                    ("segment", &quote_string(seg)),
                    ("bound", &bound.to_string()),
                    ("first_day", &first_day),
                ],
            ),
        )
        .await;
        let (want, _) = single.count(seg, T, Mode::Approx).await.expect("approx");
        assert_eq!(approx.trim(), want.to_string(), "count_approx of {seg}");
    }
    let expr = text(
        single,
        &cluster_sql::query(
            "count_expr",
            &[
                ("cdb", &sdb),
                ("bound", &bound.to_string()),
                ("a", &quote_string("sports")),
                ("b", &quote_string("news")),
                ("c", &quote_string("music")),
            ],
        ),
    )
    .await;
    let e = Expr::parse("sports AND news AND NOT music").expect("expression");
    let want = single.count_expr(&e, T, None).await.expect("count_expr");
    assert!(want > 0, "the expression selects someone");
    assert_eq!(expr.trim(), want.to_string(), "count_expr");
}

/// The crate's own reads (unchanged SQL) on the cluster database equal the single server's.
async fn compare_store_reads(single: &ClickHouseStore, cluster: &ClickHouseStore) {
    for mode in [Mode::Exact, Mode::Approx] {
        let (s, _) = single.count_all(T, mode).await.expect("count_all");
        let (c, _) = cluster.count_all(T, mode).await.expect("count_all");
        assert_eq!(c, s, "count_all {mode:?}");
        assert_eq!(s.len(), SEGMENTS.len());
        for seg in SEGMENTS {
            let s = single.count(seg, T, mode).await.expect("count");
            let c = cluster.count(seg, T, mode).await.expect("count");
            assert_eq!(c, s, "count {seg} {mode:?}");
        }
    }
    for u in (0..3_000).step_by(37) {
        let user = if u % 97 == 0 {
            format!("o'brien \\ {u}")
        } else {
            format!("u-{u}")
        };
        let s = single.user_segments(&user, T).await.expect("lookup");
        let c = cluster.user_segments(&user, T).await.expect("lookup");
        assert_eq!(c, s, "user_segments of {user}");
    }
    let within = Within::from_secs(3 * DAY as u64, single.window()).ok();
    for q in [
        "sports AND news AND NOT music",
        "NOT sports",
        "rare OR a.b:c-d_e",
    ] {
        let e = Expr::parse(q).expect("expression");
        for w in [None, within] {
            let s = single.count_expr(&e, T, w).await.expect("expr");
            let c = cluster.count_expr(&e, T, w).await.expect("expr");
            assert_eq!(c, s, "count_expr {q} within {w:?}");
        }
    }
    let all: Vec<String> = SEGMENTS.map(String::from).into();
    let s = single.overlap(&all, T, None).await.expect("overlap");
    let c = cluster.overlap(&all, T, None).await.expect("overlap");
    assert_eq!(c, s, "overlap");
    for seg in ["news", "rare"] {
        assert_eq!(
            export(cluster, seg).await,
            export(single, seg).await,
            "export of {seg}"
        );
    }
    // The scan that loads ES's index: the same live pairs, each with the same latest ts.
    assert_eq!(scan(cluster).await, scan(single).await, "live scan");
}

async fn export(store: &ClickHouseStore, segment: &str) -> Vec<Member> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let collect = tokio::spawn(async move {
        let mut all = Vec::new();
        while let Some(chunk) = rx.recv().await {
            all.extend(chunk);
        }
        all
    });
    store
        .export_members(segment, T, None, 500, tx)
        .await
        .expect("export");
    let mut all: Vec<Member> = collect.await.expect("collector");
    all.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    assert!(!all.is_empty(), "{segment} has members");
    all
}

async fn scan(store: &ClickHouseStore) -> std::collections::BTreeMap<(String, String), i64> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Pair>>(4);
    let collect = tokio::spawn(async move {
        let mut latest = std::collections::BTreeMap::new();
        while let Some(chunk) = rx.recv().await {
            for p in chunk {
                let ts = latest.entry((p.segment, p.user_id)).or_insert(p.ts);
                *ts = (*ts).max(p.ts);
            }
        }
        latest
    });
    store.scan_live(T, 1_000, tx).await.expect("scan");
    let latest = collect.await.expect("collector");
    assert!(latest.len() > 1_000, "{} live pairs", latest.len());
    latest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_shard_cluster_answers_like_one_server() {
    let cluster = Cluster::start(2);
    assert_eq!(cluster.shards.len(), 2);
    let local = userseg_testkit::unique("userseg_local");
    let cdb_name = userseg_testkit::unique("userseg_cluster");
    let single_db = userseg_testkit::unique("userseg_single");
    let window = Window::DEFAULT;

    // ES's settings on the cluster: the cluster database on any node (here the second), and
    // every node's local database (CLICKHOUSE_NODES, CLICKHOUSE_NODE_DATABASE).
    let ccfg = ClickHouseConfig {
        nodes: cluster.shards.clone(),
        node_database: local.clone(),
        ..config(&cluster.shards[1], &cdb_name)
    };
    // Local tables: `userseg migrate` with the nodes migrates every node's local database;
    // then cluster.sql on every node.
    let applied = migrate(&ccfg).await.expect("migrate every node");
    assert_eq!(
        applied.len(),
        2 * MIGRATIONS.len(),
        "every migration on both nodes"
    );
    for shard in &cluster.shards {
        assert_eq!(
            applied_migrations(&config(shard, &local))
                .await
                .expect("a node's versions")
                .len(),
            MIGRATIONS.len()
        );
        let admin = ClickHouseStore::new(config(shard, &local), window).expect("store");
        for st in cluster_sql::statements(
            cluster_sql::CLUSTER_SQL,
            &[
                ("db", &format!("`{local}`")),
                ("cdb", &format!("`{cdb_name}`")),
                ("db_name", &quote_string(&local)),
                ("cluster", &cluster.name),
            ],
        ) {
            admin
                .client()
                .execute(&st)
                .await
                .unwrap_or_else(|e| panic!("{st}: {e}"));
        }
    }
    assert!(
        migrate(&ccfg).await.expect("migrate again").is_empty(),
        "every node is up to date"
    );
    migrate(&config(&cluster.shards[0], &single_db))
        .await
        .expect("migrate the single-server database");
    let single =
        ClickHouseStore::new(config(&cluster.shards[0], &single_db), window).expect("store");
    // Without the nodes, the cluster database alone: `userseg migrate` has nothing to do there.
    let plain_cfg = config(&cluster.shards[1], &cdb_name);
    assert!(
        migrate(&plain_cfg)
            .await
            .expect("migrate on the cluster database")
            .is_empty(),
        "`userseg migrate` against the cluster database has nothing to do"
    );
    let versions: Vec<u32> = applied_migrations(&plain_cfg)
        .await
        .expect("versions")
        .iter()
        .map(|m| m.version)
        .collect();
    assert_eq!(
        versions,
        MIGRATIONS.iter().map(|m| m.version).collect::<Vec<_>>()
    );
    let plain = ClickHouseStore::new(plain_cfg, window).expect("store");
    let on_cluster = ClickHouseStore::new(ccfg, window).expect("store");
    on_cluster
        .check_ready()
        .await
        .expect("ready on the cluster");

    // The same pairs into both, by the crate's writer, in the same batches.
    let pairs = data();
    for batch in pairs.chunks(16_000) {
        let batch: Arc<[Pair]> = batch.into();
        single.write(batch.clone()).await.expect("write single");
        on_cluster.write(batch).await.expect("write cluster");
    }

    // Every user on exactly one shard, with its pairs_by_user rows and sketches there.
    let mut union = BTreeSet::new();
    for shard in &cluster.shards {
        let users = users_of(shard, &local, "pairs").await;
        assert!(users.len() > 1_000, "a shard holds {} users", users.len());
        assert_eq!(
            users_of(shard, &local, "pairs_by_user").await,
            users,
            "pairs_by_user on {shard}"
        );
        assert!(union.is_disjoint(&users), "a user is on two shards");
        union.extend(users);
        let store = ClickHouseStore::new(config(shard, &local), window).expect("store");
        let sketches = text(&store, &format!("SELECT count() FROM `{local}`.agg_day")).await;
        assert_ne!(sketches.trim(), "0", "no sketches on {shard}");
    }
    assert_eq!(
        union,
        users_of(&cluster.shards[0], &single_db, "pairs").await
    );

    // distributed_group_by_no_merge makes each shard answer whole: one row per shard.
    let rows = text(
        &on_cluster,
        &format!(
            "SELECT count() FROM (SELECT uniqExact(user_id) FROM `{cdb_name}`.pairs) \
             SETTINGS distributed_group_by_no_merge = 1"
        ),
    )
    .await;
    assert_eq!(rows.trim(), "2");

    let cdb = format!("`{cdb_name}`");
    // The crate's single-server statements through the Distributed tables (no nodes), and
    // its per-shard forms (with the nodes).
    compare_store_reads(&single, &plain).await;
    compare_store_reads(&single, &on_cluster).await;
    compare_queries(&single, &on_cluster, &cdb).await;

    // History through the Distributed table (a tick's sample on one shard): samples of the
    // day before T and of T's day.
    let (counts, _) = single.count_all(T, Mode::Exact).await.expect("counts");
    let ticks = [T - DAY - 600, T - DAY, T - 3600, T - 3000, T - 2400];
    for tick in ticks {
        single.record(tick, &counts).await.expect("record");
        on_cluster
            .record(tick, &counts)
            .await
            .expect("record on the cluster");
    }
    for seg in SEGMENTS {
        let read = single.read(seg, T - 2 * DAY, T, 600).await.expect("read");
        assert_eq!(read.len(), ticks.len(), "history of {seg}");
        assert_eq!(
            on_cluster
                .read(seg, T - 2 * DAY, T, 600)
                .await
                .expect("read"),
            read,
            "history of {seg}"
        );
    }
    assert_eq!(
        on_cluster.last_tick().await.expect("last tick"),
        single.last_tick().await.expect("last tick")
    );

    // Deletion and retention: the crate's procedures on every node's local database.
    let victims: Vec<String> = (0..3_000)
        .step_by(61)
        .map(|u| {
            if u % 97 == 0 {
                format!("o'brien \\ {u}")
            } else {
                format!("u-{u}")
            }
        })
        .collect();
    let deletion = UserDeletion::new(victims.clone()).expect("deletion");
    // Not through the Distributed tables alone: the id table would exist on one node only.
    assert!(
        plain.delete_users(deletion.clone()).await.is_err(),
        "a deletion through the Distributed tables fails"
    );
    single
        .delete_users(deletion.clone())
        .await
        .expect("delete on one server");
    let mut dropped_single = BTreeSet::new();
    for p in single.drop_expired_partitions(T).await.expect("retention") {
        dropped_single.insert((p.table, p.partition_id));
    }
    assert!(
        !dropped_single.is_empty(),
        "18 days of pairs: some days expire"
    );
    let nodes: Vec<ClickHouseStore> = cluster
        .shards
        .iter()
        .map(|shard| ClickHouseStore::new(config(shard, &local), window).expect("store"))
        .collect();
    // With the nodes, the store deletes on each node's local database.
    on_cluster
        .delete_users(deletion.clone())
        .await
        .expect("delete on every node");
    // Retention per node by retention.sql: the ALTERs it prints, run on that node, are the
    // partitions the crate drops on one server.
    let retention = |name: &str, now: i64, history: i64| {
        cluster_sql::named(
            cluster_sql::RETENTION_SQL,
            name,
            &[
                ("db", &format!("`{local}`")),
                ("db_name", &quote_string(&local)),
                ("window", &window.secs().to_string()),
                ("history_retention", &history.to_string()),
                ("now", &now.to_string()),
            ],
        )
    };
    let mut dropped_cluster = BTreeSet::new();
    // The history before T's day expires (a bound at a day start: reads of the single store
    // hide ticks before its last prune bound, the cluster's reads do not need to).
    let t_day = T - T.rem_euclid(DAY);
    single.prune(t_day).await.expect("history prune");
    let mut history_drops = 0;
    for node in &nodes {
        // Raw: TabSeparated would escape the quotes (clickhouse-client --format TSVRaw).
        let alters = answer(node, &retention("expired_partitions", T, 0), "TSVRaw").await;
        let history = answer(
            node,
            &retention("expired_history_partitions", t_day + DAY, DAY),
            "TSVRaw",
        )
        .await;
        for alter in alters.lines().chain(history.lines()) {
            node.client()
                .execute(alter)
                .await
                .unwrap_or_else(|e| panic!("{alter}: {e}"));
        }
        history_drops += history.lines().count();
        for line in alters.lines() {
            let (table, id) = line
                .strip_prefix(&format!("ALTER TABLE `{local}`."))
                .and_then(|r| r.split_once(" DROP PARTITION ID "))
                .unwrap_or_else(|| panic!("unexpected statement {line}"));
            let table = *userseg_clickhouse::PARTITIONED_TABLES
                .iter()
                .find(|t| **t == table)
                .unwrap_or_else(|| panic!("unexpected table in {line}"));
            dropped_cluster.insert((
                table,
                id.trim_end_matches(';').trim_matches('\'').to_string(),
            ));
        }
    }
    assert!(history_drops >= 1, "the day before T's samples expire");
    for seg in SEGMENTS {
        let read = single.read(seg, T - 2 * DAY, T, 600).await.expect("read");
        assert_eq!(read.len(), 3, "T's day is left of {seg}'s history");
        assert_eq!(
            on_cluster
                .read(seg, T - 2 * DAY, T, 600)
                .await
                .expect("read"),
            read,
            "history of {seg} after retention"
        );
    }
    assert_eq!(dropped_cluster, dropped_single);
    for v in &victims {
        assert!(
            on_cluster
                .user_segments(v, T)
                .await
                .expect("lookup")
                .is_empty(),
            "{v} deleted"
        );
    }
    compare_store_reads(&single, &on_cluster).await;
    compare_queries(&single, &on_cluster, &cdb).await;

    // Two days later: the store's own retention and history pruning, on every node.
    let later = T + 2 * DAY;
    let mut want = BTreeSet::new();
    for p in single
        .drop_expired_partitions(later)
        .await
        .expect("retention")
    {
        want.insert((p.table, p.partition_id));
    }
    assert!(!want.is_empty(), "two more days expire");
    let mut got = BTreeSet::new();
    for p in on_cluster
        .drop_expired_partitions(later)
        .await
        .expect("retention on every node")
    {
        got.insert((p.table, p.partition_id));
    }
    assert_eq!(got, want);
    assert!(
        plain
            .drop_expired_partitions(later + DAY)
            .await
            .expect("no-op")
            .is_empty(),
        "the Distributed tables alone have no partitions"
    );
    single.prune(t_day + DAY).await.expect("prune");
    on_cluster
        .prune(t_day + DAY)
        .await
        .expect("prune every node");
    for node in &nodes {
        let left = text(
            node,
            &format!(
                "SELECT count() FROM system.parts WHERE database = {} AND table = 'history' AND active",
                quote_string(&local)
            ),
        )
        .await;
        assert_eq!(left.trim(), "0", "history left on a node");
    }
    compare_store_reads(&single, &on_cluster).await;
    compare_queries(&single, &on_cluster, &cdb).await;
}

/// local-replicated.sql needs ZooKeeper, which this machine has not: ClickHouse 18.16 must at
/// least parse every statement (it refuses them only for want of the distributed DDL queue,
/// code 49, or of the database the first statement would create, code 81), and its recorded
/// checksums must be the crate's, or `userseg migrate` would refuse the cluster's schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replicated_layout_parses_on_18_16_and_records_the_crates_checksums() {
    for m in MIGRATIONS {
        let row = format!("({}, '{}', {}, now())", m.version, m.name, m.checksum());
        assert!(
            cluster_sql::LOCAL_REPLICATED_SQL.contains(&row),
            "local-replicated.sql does not record migration {} as {row}",
            m.version
        );
    }
    let cluster = Cluster::start(1);
    let db = userseg_testkit::unique("userseg_repl");
    let store =
        ClickHouseStore::new(config(&cluster.shards[0], &db), Window::DEFAULT).expect("store");
    let statements = cluster_sql::statements(
        cluster_sql::LOCAL_REPLICATED_SQL,
        &[
            ("db", &format!("`{db}`")),
            ("db_path", &db),
            ("cluster", &cluster.name),
        ],
    );
    assert_eq!(statements.len(), 10);
    for st in &statements {
        let err = store
            .client()
            .execute(st)
            .await
            .expect_err("no ZooKeeper here: refused");
        let msg = err.to_string();
        let want = if st.contains(" ON CLUSTER ") {
            "Code: 49"
        } else {
            "Code: 81"
        };
        assert!(msg.contains(want), "{st}: expected {want}, got {msg}");
    }
}
