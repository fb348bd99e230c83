//! Names with quotes, backslashes, control characters and unicode reach ClickHouse only as data
//! or as escaped literals, and come back unchanged.

use userseg_domain::Window;
use userseg_usecase::{Mode, SegmentCounter, SegmentWriter};

use crate::common::{fresh_store, pair};

const T0: i64 = 1_763_942_400;

const NASTY: &[&str] = &[
    "o'brien",
    "back\\slash",
    "trailing\\",
    "\\'",
    "'; DROP TABLE pairs; --",
    "x' OR '1'='1",
    "double \"quoted\"",
    "back`tick`",
    "new\nline\ttab\rcr",
    "nul\0byte",
    "del\u{7f}",
    "用户-セグメント-é",
    "emoji 🦀",
    "{db}",
    "%27%22",
    "\\x41",
];

#[tokio::test]
async fn odd_names_never_break_sql() {
    let store = fresh_store(Window::DEFAULT).await;
    // Each odd name as a segment with two users (one of them odd too), plus a plain segment
    // whose count an injection would disturb.
    let mut batch = vec![pair("plain-user", "plain", T0)];
    for (i, name) in NASTY.iter().enumerate() {
        batch.push(pair(name, name, T0));
        batch.push(pair(&format!("user-{i}"), name, T0 - 60));
        batch.push(pair(name, "plain", T0));
    }
    store.write(batch.clone().into()).await.expect("write");
    store.write(batch.into()).await.expect("re-send");

    for mode in [Mode::Exact, Mode::Approx] {
        for name in NASTY {
            let (n, _) = store.count(name, T0, mode).await.expect("count");
            assert_eq!(n, 2, "{mode:?} count of {name:?}");
        }
        let (plain, _) = store.count("plain", T0, mode).await.unwrap();
        assert_eq!(plain, NASTY.len() as u64 + 1, "{mode:?}");
        // Names that were never written count zero, even when they look like SQL.
        for ghost in ["o'brien'", "x' OR 1=1 --", "\\", "'"] {
            assert_eq!(
                store.count(ghost, T0, mode).await.unwrap().0,
                0,
                "{ghost:?}"
            );
        }
        let (list, _) = store.count_all(T0, mode).await.expect("count_all");
        let mut want: Vec<(String, u64)> = NASTY.iter().map(|n| (n.to_string(), 2)).collect();
        want.push(("plain".to_string(), NASTY.len() as u64 + 1));
        want.sort();
        let got: Vec<(String, u64)> = list.into_iter().map(|c| (c.segment, c.users)).collect();
        assert_eq!(got, want, "{mode:?}: names come back byte for byte, sorted");
    }
    // And the tables are all still there.
    store.check_ready().await.expect("ready");
}

/// User ids as the API accepts them (no control characters) that are hostile to SQL.
const NASTY_USERS: &[&str] = &[
    "o'brien",
    "back\\slash",
    "trailing\\",
    "\\'",
    "'; DROP TABLE pairs; --",
    "x' OR '1'='1",
    "double \"quoted\"",
    "back`tick`",
    "用户-セグメント-é",
    "emoji 🦀",
    "{db}",
    "%27%22",
    "\\x41",
    "\\0",
    "a/b c",
];

/// Every analytics read, the deletion and the history, with hostile names and ids: each reaches
/// ClickHouse as escaped literals or RowBinary data and comes back byte for byte.
#[tokio::test]
async fn odd_names_never_break_analytics_deletion_or_history() {
    use userseg_domain::{Expr, UserDeletion};
    use userseg_usecase::{HistoryStore, SegmentAnalytics, SegmentCount};

    let store = fresh_store(Window::DEFAULT).await;
    let mut batch = vec![pair("plain-user", "plain", T0)];
    for (i, user) in NASTY_USERS.iter().enumerate() {
        let segment = NASTY[i % NASTY.len()];
        batch.push(pair(user, segment, T0 - 60 * i as i64));
        batch.push(pair(user, "plain", T0));
    }
    store.write(batch.into()).await.expect("write");
    let n = NASTY_USERS.len() as u64;

    for (i, user) in NASTY_USERS.iter().enumerate() {
        let got = store.user_segments(user, T0).await.expect("lookup");
        let mut want = vec![NASTY[i % NASTY.len()].to_string(), "plain".to_string()];
        want.sort();
        assert_eq!(
            got.iter().map(|m| m.segment.clone()).collect::<Vec<_>>(),
            want,
            "{user:?}"
        );
    }
    // Names that look like a user but are not one find nothing.
    for ghost in ["o'brien'", "' OR 1=1 --", "\\", "'"] {
        assert!(store.user_segments(ghost, T0).await.unwrap().is_empty());
    }
    let seg = |i: usize| NASTY[i % NASTY.len()].to_string();
    for i in 0..NASTY_USERS.len() {
        assert_eq!(
            store.count_within(&seg(i), T0, None).await.expect("count"),
            1,
            "{:?}",
            seg(i)
        );
    }
    // Expressions and overlaps over hostile names, built directly (the parser would refuse
    // them, the store must not rely on that).
    let names: Vec<String> = (0..4).map(seg).collect();
    let any = Expr::Or(names.iter().cloned().map(Expr::Segment).collect());
    assert_eq!(store.count_expr(&any, T0, None).await.expect("expr"), 4);
    let not_any = Expr::Not(Box::new(any));
    assert_eq!(
        store.count_expr(&not_any, T0, None).await.expect("expr"),
        n + 1 - 4
    );
    let both = Expr::And(vec![Expr::Segment("plain".into()), Expr::Segment(seg(0))]);
    assert_eq!(store.count_expr(&both, T0, None).await.expect("expr"), 1);
    let mut asked = names.clone();
    asked.push("plain".into());
    let o = store.overlap(&asked, T0, None).await.expect("overlap");
    assert_eq!(o.users, vec![1, 1, 1, 1, n + 1]);
    assert_eq!(o.both[0][4], 1);
    assert_eq!(o.both[0][1], 0);
    // The export gives the ids back byte for byte.
    let (tx, mut rx) = tokio::sync::mpsc::channel(2);
    let export = store.export_members("plain", T0, None, 3, tx);
    let collect = async {
        let mut ids = Vec::new();
        while let Some(c) = rx.recv().await {
            ids.extend(c.into_iter().map(|m| m.user_id));
        }
        ids.sort();
        ids
    };
    let (sent, ids) = tokio::join!(export, collect);
    assert_eq!(sent.expect("export"), n + 1);
    let mut want: Vec<String> = NASTY_USERS.iter().map(|u| u.to_string()).collect();
    want.push("plain-user".into());
    want.sort();
    assert_eq!(ids, want);

    // Deleting the hostile users removes exactly them.
    let ids: Vec<String> = NASTY_USERS.iter().map(|u| u.to_string()).collect();
    store
        .delete_users(UserDeletion::new(ids).expect("valid ids"))
        .await
        .expect("delete");
    assert_eq!(store.count_within("plain", T0, None).await.unwrap(), 1);
    assert_eq!(store.count("plain", T0, Mode::Approx).await.unwrap().0, 1);
    for user in NASTY_USERS {
        assert!(store.user_segments(user, T0).await.unwrap().is_empty());
    }

    // History with hostile segment names.
    let counts: Vec<SegmentCount> = NASTY
        .iter()
        .enumerate()
        .map(|(i, s)| SegmentCount {
            segment: s.to_string(),
            users: i as u64 + 1,
        })
        .collect();
    store.record(T0, &counts).await.expect("record");
    for (i, s) in NASTY.iter().enumerate() {
        let points = store.read(s, T0, T0, 60).await.expect("read");
        assert_eq!(points.len(), 1);
        assert_eq!(points[0].users, i as u64 + 1, "{s:?}");
    }
    assert_eq!(store.read("'", T0, T0, 60).await.unwrap()[0].users, 0);
    store.check_ready().await.expect("ready");
}
