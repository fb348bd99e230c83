//! User deletion on the real server: gone from every read (exact and approximate) and from the
//! table when `delete_users` returns; pairs written afterwards count again, merges included; a
//! timed-out deletion is retried without a second mutation; 10,000 long ids in one call.

use std::time::Duration;

use userseg_clickhouse::{quote_string, ClickHouseStore};
use userseg_domain::{Expr, Pair, UserDeletion, Window};
use userseg_usecase::{Mode, PortError, SegmentAnalytics, SegmentCounter, SegmentWriter};

use crate::common::{fresh_store, pair, scalar};

const DAY: i64 = 86_400;
/// 2025-11-24T00:00:00Z.
const T0: i64 = 1_763_942_400;
/// Counts are asked at noon: the window's first day is partial (read raw by approximate
/// counts) and 13 whole days come from the day sketches.
const AT: i64 = T0 + 12 * 3600;

const SEGMENTS: [&str; 3] = ["s1", "s2", "s3"];

/// 300 users, each in one to three segments, with pairs on several days of the window: the
/// partial first day, whole days, and today.
fn workload() -> Vec<Pair> {
    let mut out = Vec::new();
    for u in 0..300i64 {
        let user = format!("user-{u}");
        for (k, seg) in SEGMENTS.iter().enumerate() {
            if (u + k as i64) % 3 == 0 || k == 0 {
                for back in [0, 2 + u % 5, 13] {
                    let ts = AT - back * DAY - (u % 7) * 3600 + 60;
                    out.push(pair(&user, seg, ts));
                }
            }
        }
    }
    out
}

/// Rows of the users in `pairs` and in its copy ordered by user.
async fn raw_rows(store: &ClickHouseStore, users: &[String]) -> u64 {
    let list: Vec<String> = users.iter().map(|u| quote_string(u)).collect();
    let mut n = 0;
    for table in ["pairs", "pairs_by_user"] {
        n += scalar(
            store,
            &format!(
                "SELECT toUInt64(count()) FROM `{}`.{table} WHERE user_id IN ({}) FORMAT RowBinary",
                store.database(),
                list.join(", ")
            ),
        )
        .await;
    }
    n
}

async fn mutations(store: &ClickHouseStore) -> u64 {
    scalar(
        store,
        &format!(
            "SELECT toUInt64(count()) FROM system.mutations WHERE database = {} AND table IN ('pairs', 'pairs_by_user') FORMAT RowBinary",
            quote_string(store.database())
        ),
    )
    .await
}

/// Every count, exact and approximate, of every segment.
async fn all_counts(store: &ClickHouseStore) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for seg in SEGMENTS {
        let exact = store.count(seg, AT, Mode::Exact).await.expect("count").0;
        let approx = store.count(seg, AT, Mode::Approx).await.expect("approx").0;
        out.push((exact, approx));
    }
    out
}

fn deletion(ids: &[String]) -> UserDeletion {
    UserDeletion::new(ids.to_vec()).expect("valid ids")
}

#[tokio::test]
async fn deleted_users_leave_every_read_and_the_table() {
    let store = fresh_store(Window::DEFAULT).await;
    store.write(workload().into()).await.expect("write");
    let before = all_counts(&store).await;
    for (exact, approx) in &before {
        assert_eq!(exact, approx, "small sets are exact in the sketches");
    }
    let gone: Vec<String> = (0..300).step_by(3).map(|u| format!("user-{u}")).collect();
    assert!(raw_rows(&store, &gone).await > 0);
    store
        .delete_users(deletion(&gone))
        .await
        .expect("delete_users");

    // Right when the call returns: no rows, no counts, exact or approximate.
    assert_eq!(raw_rows(&store, &gone).await, 0, "rows left in pairs");
    let after = all_counts(&store).await;
    // The workload's memberships: every user in s1, u % 3 == 2 in s2, u % 3 == 1 in s3.
    let kept = |k: i64| {
        (0..300i64)
            .filter(|u| u % 3 != 0 && ((u + k) % 3 == 0 || k == 0))
            .count() as u64
    };
    for (k, (exact, approx)) in after.iter().enumerate() {
        assert_eq!(*exact, kept(k as i64), "{}: exact", SEGMENTS[k]);
        assert_eq!(
            *approx, *exact,
            "{}: the sketches still count them",
            SEGMENTS[k]
        );
    }
    let (list, _) = store.count_all(AT, Mode::Approx).await.expect("count_all");
    assert_eq!(
        list.iter().map(|c| c.users).collect::<Vec<_>>(),
        after.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    for u in gone.iter().take(5) {
        assert!(store.user_segments(u, AT).await.expect("lookup").is_empty());
    }
    let e = Expr::parse("NOT s3").expect("expr");
    assert_eq!(
        store.count_expr(&e, AT, None).await.expect("expr"),
        (0..300).filter(|u| u % 3 != 0 && (u + 2) % 3 != 0).count() as u64
    );
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    let export = store.export_members("s1", AT, None, 50, tx);
    let collect = async {
        let mut ids = Vec::new();
        while let Some(c) = rx.recv().await {
            ids.extend(c.into_iter().map(|m| m.user_id));
        }
        ids
    };
    let (sent, ids) = tokio::join!(export, collect);
    assert_eq!(sent.expect("export"), 200);
    assert!(ids.iter().all(|u| !gone.contains(u)));
    // Every day sketch agrees with the raw rows, day by day.
    let db = store.database();
    let stale = scalar(
        &store,
        &format!(
            "SELECT toUInt64(countIf(s != r)) FROM \
             (SELECT segment, bucket, uniqCombinedMerge(users) AS s FROM `{db}`.agg_day GROUP BY segment, bucket) \
             ANY FULL OUTER JOIN \
             (SELECT segment, toDateTime(intDiv(toUInt32(ts), 86400) * 86400, 'UTC') AS bucket, uniqExact(user_id) AS r \
              FROM `{db}`.pairs GROUP BY segment, bucket) USING (segment, bucket) FORMAT RowBinary"
        ),
    )
    .await;
    assert_eq!(stale, 0, "a day sketch differs from its rows");

    // Deleting again, or users never seen, issues no mutation and changes nothing.
    let issued = mutations(&store).await;
    assert_eq!(issued, 2, "one mutation of each table");
    store.delete_users(deletion(&gone)).await.expect("again");
    store
        .delete_users(deletion(&["nobody".to_string()]))
        .await
        .expect("unknown");
    assert_eq!(mutations(&store).await, issued);
    assert_eq!(all_counts(&store).await, after);
}

#[tokio::test]
async fn pairs_written_after_a_deletion_count_again_after_merges() {
    let store = fresh_store(Window::DEFAULT).await;
    let pairs = workload();
    store.write(pairs.clone().into()).await.expect("write");
    let before = all_counts(&store).await;
    let everyone: Vec<String> = (0..300).map(|u| format!("user-{u}")).collect();
    store
        .delete_users(deletion(&everyone))
        .await
        .expect("delete everyone");
    assert_eq!(all_counts(&store).await, vec![(0, 0); 3]);
    assert_eq!(raw_rows(&store, &everyone).await, 0);
    // The same pairs again, at once: they land in parts newer than the mutation.
    store.write(pairs.into()).await.expect("write again");
    assert_eq!(all_counts(&store).await, before);
    // Merging every part (new ones with whatever the mutation left) must not apply the
    // deletion to the new rows.
    store
        .client()
        .execute(&format!(
            "OPTIMIZE TABLE `{}`.pairs FINAL",
            store.database()
        ))
        .await
        .expect("optimize");
    store
        .client()
        .execute(&format!(
            "OPTIMIZE TABLE `{}`.agg_day FINAL",
            store.database()
        ))
        .await
        .expect("optimize");
    assert_eq!(all_counts(&store).await, before);
    assert_eq!(
        store
            .user_segments("user-1", AT)
            .await
            .expect("lookup")
            .len(),
        2
    );
}

#[tokio::test]
async fn a_timed_out_deletion_is_transient_and_its_retry_reuses_the_mutation() {
    let store = fresh_store(Window::DEFAULT)
        .await
        .with_mutation_timeout(Duration::from_millis(300));
    store.write(workload().into()).await.expect("write");
    let db = store.database().to_string();
    let client = store.client().clone();
    // Mutations run with merges: hold them back.
    client
        .execute(&format!("SYSTEM STOP MERGES `{db}`.pairs"))
        .await
        .expect("stop merges");
    client
        .execute(&format!("SYSTEM STOP MERGES `{db}`.pairs_by_user"))
        .await
        .expect("stop merges");
    let gone = vec!["user-1".to_string(), "user-2".to_string()];
    let r = store.delete_users(deletion(&gone)).await;
    assert!(
        matches!(&r, Err(PortError::Transient(m)) if m.contains("still running")),
        "{r:?}"
    );
    assert_eq!(mutations(&store).await, 2);
    client
        .execute(&format!("SYSTEM START MERGES `{db}`.pairs"))
        .await
        .expect("start merges");
    client
        .execute(&format!("SYSTEM START MERGES `{db}`.pairs_by_user"))
        .await
        .expect("start merges");
    // An insert wakes the background pool that applies mutations.
    store
        .write(vec![pair("someone-else", "s9", AT)].into())
        .await
        .expect("write");
    let retry = store.with_mutation_timeout(Duration::from_secs(60));
    retry.delete_users(deletion(&gone)).await.expect("retry");
    assert_eq!(raw_rows(&retry, &gone).await, 0);
    assert_eq!(
        mutations(&retry).await,
        2,
        "the retry waited for the first mutation"
    );
    for (exact, approx) in all_counts(&retry).await {
        assert_eq!(exact, approx);
    }
    assert!(retry
        .user_segments("user-1", AT)
        .await
        .expect("lookup")
        .is_empty());
}

#[tokio::test]
async fn ten_thousand_long_ids_in_one_deletion() {
    let store = fresh_store(Window::DEFAULT).await;
    // 256-byte ids full of quotes and backslashes: the statement is several MB, far above
    // ClickHouse's default max_query_size of 256 KiB.
    let id = |i: usize| {
        let head = format!("{i:05}'\\\"");
        format!("{head}{}", "é'\\".repeat((256 - head.len()) / 4))
    };
    let ids: Vec<String> = (0..10_000).map(id).collect();
    assert!(ids.iter().all(|u| u.len() <= 256 && u.len() > 240));
    let pairs: Vec<Pair> = ids
        .iter()
        .enumerate()
        .map(|(i, u)| pair(u, SEGMENTS[i % 3], AT - (i as i64 % 14) * DAY))
        .chain([pair("keeper", "s1", AT)])
        .collect();
    store.write(pairs.into()).await.expect("write");
    assert_eq!(store.count("s1", AT, Mode::Exact).await.unwrap().0, 3335);
    store.delete_users(deletion(&ids)).await.expect("delete");
    assert_eq!(raw_rows(&store, &ids[..100]).await, 0);
    for mode in [Mode::Exact, Mode::Approx] {
        assert_eq!(store.count("s1", AT, mode).await.unwrap().0, 1, "{mode:?}");
        assert_eq!(store.count("s2", AT, mode).await.unwrap().0, 0, "{mode:?}");
    }
}
