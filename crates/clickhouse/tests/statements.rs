//! Records every statement this crate sends, with ClickHouse 18.16's answers, into
//! `target/chdb/statements.json` (or `USERSEG_CHDB_STATEMENTS`), for `scripts/chdb_check.py`
//! to replay on a current ClickHouse (chdb, 26.x) and compare: `make chdb-check`.
//!
//! The statements come from the crate's own calls (migrate, writes, every count, the scan,
//! retention, readiness) on fixed sample data and fixed instants, so both servers see the same
//! data and the answers can be compared byte for byte. A new statement in the crate needs one
//! more `step!` below; its answer is then checked on both versions.
//!
//! Its own test binary: the recording is process-wide.
//!
//! The cluster layout (`deploy/clickhouse-cluster/`) is checked as far as one server allows:
//! the queries of `queries.sql` run on this database's tables (where
//! `distributed_group_by_no_merge` changes nothing) and are replayed like the crate's own; the
//! Distributed and Replicated DDL, which needs a cluster (and ZooKeeper), is recorded as
//! `parse` statements that chdb only parses. `tests/cluster.rs` runs them on a real cluster.

#[path = "support/cluster_sql.rs"]
mod cluster_sql;

use std::sync::Arc;
use std::time::Duration;

use userseg_clickhouse::recording::{Recording, Statement};
use userseg_clickhouse::{applied_migrations, migrate, ClickHouseConfig, ClickHouseStore};
use userseg_domain::{Expr, Pair, UserDeletion, Window, Within};
use userseg_usecase::{
    HistoryStore, LiveScan, Mode, SegmentAnalytics, SegmentCounter, SegmentWriter,
};

const DAY: i64 = 86_400;
/// The instant the counts are asked at: 2025-11-24 16:00:00 UTC.
const T: i64 = 1_764_000_000;

/// Sample pairs over the 20 days before `T`: three segments, users in several of them, odd
/// user ids, and the same pair at several times.
fn sample() -> (Vec<Pair>, Vec<Pair>) {
    let segments = ["sports", "news", "a.b:c-d_e"];
    let mut first = Vec::new();
    for i in 0..240i64 {
        let user = match i % 7 {
            0 => format!("user-{i}-é"),
            1 => format!("user '{i}' \\ \"quoted\""),
            _ => format!("user-{}", i % 90),
        };
        first.push(Pair {
            user_id: user,
            segment: segments[(i % 3) as usize].to_string(),
            ts: T - 20 * DAY + i * (20 * DAY / 240) + i % 60,
        });
    }
    // Re-sent pairs (later ts for some, the same for others) in a second write.
    let second = first
        .iter()
        .step_by(5)
        .enumerate()
        .map(|(k, p)| Pair {
            ts: if k % 2 == 0 { p.ts } else { p.ts + 3 * DAY },
            ..p.clone()
        })
        .filter(|p| p.ts < T)
        .collect();
    (first, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_statements_with_their_answers() {
    let config = ClickHouseConfig {
        addr: userseg_testkit::servers::clickhouse(),
        database: userseg_testkit::unique("userseg_chdb"),
        request_timeout: Duration::from_secs(60),
        ..ClickHouseConfig::default()
    };
    let window = Window::from_secs(14 * DAY as u64).unwrap();
    let rec = Recording::start();
    let mut out: Vec<(&str, Statement)> = Vec::new();
    macro_rules! step {
        ($name:expr, $body:expr) => {{
            $body;
            let taken = rec.take();
            assert!(!taken.is_empty(), "step {} sent no statement", $name);
            out.extend(taken.into_iter().map(|s| ($name, s)));
        }};
    }

    step!("migrate", migrate(&config).await.unwrap());
    step!(
        "migrate again (up to date)",
        migrate(&config).await.unwrap()
    );
    step!(
        "applied migrations",
        applied_migrations(&config).await.unwrap()
    );
    let store = ClickHouseStore::new(config.clone(), window).unwrap();
    step!("ready", store.check_ready().await.unwrap());
    let (first, second) = sample();
    step!("insert", store.write(Arc::from(first)).await.unwrap());
    step!(
        "insert re-sent pairs",
        store.write(Arc::from(second)).await.unwrap()
    );
    // A write spanning more days than one INSERT may touch (it is split by day).
    let long: Vec<Pair> = (0..100)
        .map(|d| Pair {
            user_id: format!("backfill-{d}"),
            segment: "backfill".into(),
            ts: T - 130 * DAY + d * DAY,
        })
        .collect();
    step!(
        "insert long backfill",
        store.write(Arc::from(long)).await.unwrap()
    );
    for (name, at) in [
        ("now", T),
        ("a week ago", T - 7 * DAY),
        ("within the first window", 1000),
    ] {
        for mode in [Mode::Exact, Mode::Approx] {
            let label: &str = Box::leak(format!("count {mode:?} at {name}").into_boxed_str());
            step!(label, {
                store.count("sports", at, mode).await.unwrap();
                store.count("a.b:c-d_e", at, mode).await.unwrap();
                store.count("no-such-segment", at, mode).await.unwrap();
                store.count_all(at, mode).await.unwrap();
            });
        }
    }
    step!("scan live pairs", {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        store.scan_live(T, 1000, tx).await.unwrap();
        drain.await.unwrap();
    });
    step!("scan everything", {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        store.scan_live(1000, 1000, tx).await.unwrap();
        drain.await.unwrap();
    });
    // Analytics (lookups, lookbacks, expressions, overlap, export).
    let within = Some(Within::from_secs(3 * DAY as u64, window).unwrap());
    for (name, w) in [("window", None), ("within 3 days", within)] {
        let label: &str = Box::leak(format!("analytics, {name}").into_boxed_str());
        step!(label, {
            store.user_segments("user-3", T).await.unwrap();
            store
                .user_segments("user '1' \\ \"quoted\"", T)
                .await
                .unwrap();
            store.count_within("sports", T, w).await.unwrap();
            store.count_all_within(T, w).await.unwrap();
            for q in [
                "sports AND news",
                "sports OR NOT (news AND a.b:c-d_e)",
                "NOT sports",
            ] {
                store
                    .count_expr(&Expr::parse(q).unwrap(), T, w)
                    .await
                    .unwrap();
            }
            let segs: Vec<String> = ["sports", "news", "a.b:c-d_e", "backfill"]
                .map(String::from)
                .into();
            store.overlap(&segs, T, w).await.unwrap();
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            store.export_members("news", T, w, 100, tx).await.unwrap();
            drain.await.unwrap();
        });
    }
    // Count history.
    step!("history", {
        for k in 0..5 {
            let counts = store
                .count_all(T - 3600 + k * 600, Mode::Exact)
                .await
                .unwrap()
                .0;
            store.record(T - 3600 + k * 600, &counts).await.unwrap();
        }
        store.read("sports", T - 7200, T, 600).await.unwrap();
        store.read("news", T - 3600, T, 1).await.unwrap();
        store.last_tick().await.unwrap();
        store.prune(T - 1800).await.unwrap();
        store.read("sports", T - 7200, T, 600).await.unwrap();
    });
    step!("cluster queries on local tables", {
        let db = format!("`{}`", config.database);
        let bound = T - 14 * DAY;
        let first_day = ((bound + 1).div_euclid(DAY) * DAY + DAY).to_string();
        let bound = bound.to_string();
        let (sports, news, odd) = (
            userseg_clickhouse::quote_string("sports"),
            userseg_clickhouse::quote_string("news"),
            userseg_clickhouse::quote_string("a.b:c-d_e"),
        );
        let user = userseg_clickhouse::quote_string("user-3");
        for name in cluster_sql::query_names() {
            let sql = cluster_sql::query(
                name,
                &[
                    ("cdb", &db),
                    ("segment", &sports),
                    ("bound", &bound),
                    ("first_day", &first_day),
                    ("user", &user),
                    ("a", &sports),
                    ("b", &news),
                    ("c", &odd),
                ],
            );
            store
                .client()
                .query(&format!("{sql} FORMAT RowBinary"))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    });
    step!("per-shard forms (a store that knows cluster nodes)", {
        // On one server the setting changes nothing: the answers are this server's.
        let sharded = ClickHouseStore::new(
            ClickHouseConfig {
                nodes: vec![config.addr.clone()],
                node_database: config.database.clone(),
                ..config.clone()
            },
            window,
        )
        .unwrap();
        sharded.count("sports", T, Mode::Exact).await.unwrap();
        sharded.count_all(T, Mode::Exact).await.unwrap();
        let within = Within::from_secs(3 * DAY as u64, window).ok();
        sharded.count_within("news", T, within).await.unwrap();
        sharded.count_all_within(T, within).await.unwrap();
        for q in ["sports AND news", "NOT sports"] {
            sharded
                .count_expr(&Expr::parse(q).unwrap(), T, None)
                .await
                .unwrap();
        }
        let segs: Vec<String> = ["sports", "news", "a.b:c-d_e"].map(String::from).into();
        sharded.overlap(&segs, T, None).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
        sharded
            .export_members("news", T, None, 100, tx)
            .await
            .unwrap();
        drain.await.unwrap();
    });
    step!("drop expired partitions", {
        let dropped = store.drop_expired_partitions(T).await.unwrap();
        assert!(!dropped.is_empty(), "the backfill's old days expire");
    });
    step!("delete users (after retention)", {
        let d = UserDeletion::new(vec!["user-3".into(), "user-4".into(), "nobody".into()]).unwrap();
        store.delete_users(d).await.unwrap();
        store.count_all(T, Mode::Exact).await.unwrap();
        store.count_all(T, Mode::Approx).await.unwrap();
        store.user_segments("user-3", T).await.unwrap();
    });
    step!("count after retention", {
        store.count_all(T, Mode::Exact).await.unwrap();
        store.count_all(T, Mode::Approx).await.unwrap();
    });
    drop(rec);

    let statements: Vec<serde_json::Value> = out
        .iter()
        .map(|(step, s)| match s {
            Statement::Execute { sql } => serde_json::json!({"step": step, "kind": "execute", "sql": sql}),
            Statement::Insert { sql, data } => {
                serde_json::json!({"step": step, "kind": "insert", "sql": sql, "data_hex": hex(data)})
            }
            Statement::Query { sql, answer, text } => serde_json::json!({
                "step": step, "kind": "query", "sql": sql, "answer_hex": hex(answer), "answer_text": text,
            }),
        })
        .collect();
    // The cluster DDL, for chdb to parse (no cluster, no ZooKeeper there or here).
    let names = [
        ("db", "userseg"),
        ("cdb", "userseg_cluster"),
        ("db_name", "'userseg'"),
        ("db_path", "userseg"),
        ("cluster", "userseg"),
    ];
    let mut statements = statements;
    for (file, text) in [
        ("cluster.sql", cluster_sql::CLUSTER_SQL),
        ("local-replicated.sql", cluster_sql::LOCAL_REPLICATED_SQL),
    ] {
        for sql in cluster_sql::statements(text, &names) {
            statements.push(serde_json::json!({"step": file, "kind": "parse", "sql": sql}));
        }
    }
    let version = store
        .client()
        .query("SELECT version() FORMAT TabSeparated")
        .await
        .unwrap();
    let doc = serde_json::json!({
        "clickhouse_version": String::from_utf8_lossy(&version).trim(),
        "database": config.database,
        "statements": statements,
    });
    let path = std::env::var("USERSEG_CHDB_STATEMENTS").unwrap_or_else(|_| {
        format!(
            "{}/../../target/chdb/statements.json",
            env!("CARGO_MANIFEST_DIR")
        )
    });
    let path = std::path::Path::new(&path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let queries = out
        .iter()
        .filter(|(_, s)| matches!(s, Statement::Query { .. }))
        .count();
    eprintln!(
        "{} statements ({queries} queries) written to {}",
        out.len(),
        path.display()
    );
    assert!(queries >= 20, "only {queries} queries recorded");
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
