//! Retention: whole expired days are dropped from every table, live days stay, counts hold.

use userseg_clickhouse::{quote_string, ClickHouseStore, DroppedPartition};
use userseg_domain::Window;
use userseg_usecase::{Mode, SegmentCounter, SegmentWriter};

use crate::common::{fresh_store, pair};

const DAY: i64 = 86_400;
/// 2025-11-24T00:00:00Z.
const T0: i64 = 1_763_942_400;

async fn partitions(store: &ClickHouseStore) -> Vec<(String, String)> {
    let body = store
        .client()
        .query(&format!(
            "SELECT table, partition_id FROM system.parts WHERE database = {} AND active \
             GROUP BY table, partition_id ORDER BY table, partition_id FORMAT TabSeparated",
            quote_string(store.database())
        ))
        .await
        .expect("list partitions");
    String::from_utf8(body.to_vec())
        .expect("utf-8")
        .lines()
        .map(|l| {
            let (t, p) = l.split_once('\t').expect("two columns");
            (t.to_string(), p.to_string())
        })
        .collect()
}

async fn counts(store: &ClickHouseStore, at: i64) -> (Vec<(String, u64)>, Vec<(String, u64)>) {
    let exact = store.count_all(at, Mode::Exact).await.unwrap().0;
    let approx = store.count_all(at, Mode::Approx).await.unwrap().0;
    let f = |l: Vec<userseg_usecase::SegmentCount>| {
        l.into_iter().map(|c| (c.segment, c.users)).collect()
    };
    (f(exact), f(approx))
}

#[tokio::test]
async fn drops_expired_days_and_keeps_live_ones() {
    let store = fresh_store(Window::DEFAULT).await;
    let now = T0 + 20 * DAY + 3600; // now - window = T0 + 6 days + 1 hour
    store
        .write(
            vec![
                // 2025-11-24: long expired.
                pair("old1", "s", T0 + 10),
                pair("old2", "t", T0 + 12 * 3600),
                // 2025-11-29, last second: expired, and so is its whole day.
                pair("old3", "s", T0 + 6 * DAY - 1),
                // 2025-11-30: the day straddles now - window; one pair expired, one live.
                pair("edge-expired", "s", T0 + 6 * DAY + 60),
                pair("edge-live", "s", T0 + 6 * DAY + 7200),
                // 2025-12-14: live.
                pair("new1", "s", now - 60),
                pair("new1", "t", now - 60),
            ]
            .into(),
        )
        .await
        .unwrap();
    let before = counts(&store, now).await;
    assert_eq!(
        before.0,
        vec![("s".to_string(), 2), ("t".to_string(), 1)],
        "exact before retention"
    );
    assert_eq!(before.1, before.0, "approx before retention");

    let mut dropped = store.drop_expired_partitions(now).await.expect("retention");
    dropped.sort_by(|a, b| (a.table, &a.partition_id).cmp(&(b.table, &b.partition_id)));
    let want = |table: &'static str, id: &str, day: i64| DroppedPartition {
        table,
        partition_id: id.to_string(),
        day_start: T0 + day * DAY,
    };
    assert_eq!(
        dropped,
        vec![
            want("agg_day", "20251124", 0),
            want("agg_day", "20251129", 5),
            want("pairs", "20251124", 0),
            want("pairs", "20251129", 5),
            want("pairs_by_user", "20251124", 0),
            want("pairs_by_user", "20251129", 5),
        ]
    );

    let left = partitions(&store).await;
    for table in ["pairs", "agg_day", "pairs_by_user"] {
        let ids: Vec<&str> = left
            .iter()
            .filter(|(t, _)| t == table)
            .map(|(_, p)| p.as_str())
            .collect();
        assert_eq!(ids, vec!["20251130", "20251214"], "{table}");
    }
    assert_eq!(
        counts(&store, now).await,
        before,
        "retention never changes a count"
    );
    assert!(
        store.drop_expired_partitions(now).await.unwrap().is_empty(),
        "a second run drops nothing"
    );

    // A day later the straddling day has expired too.
    let later = now + DAY;
    let dropped = store.drop_expired_partitions(later).await.unwrap();
    assert_eq!(dropped.len(), 3, "pairs, agg_day and pairs_by_user");
    assert!(dropped.iter().all(|d| d.partition_id == "20251130"));
    assert_eq!(
        store.count("s", later, Mode::Exact).await.unwrap(),
        (1, true),
        "new1 is still live"
    );
}
