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
