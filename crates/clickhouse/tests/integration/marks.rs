//! The change feed's side of the store: the exit marks (the shared [`ExitMarks`] suite) and
//! the memberships of a time band.

use userseg_domain::Window;
use userseg_usecase::SegmentWriter;

use crate::common::{fresh_store, pair};

#[tokio::test]
async fn exit_marks_pass_the_shared_suite() {
    let store = fresh_store(Window::DEFAULT).await;
    userseg_usecase::exit_marks_suite::run(&store).await;
}

#[tokio::test]
async fn latest_in_gives_each_membership_of_the_band_with_its_latest_ts_there() {
    let store = fresh_store(Window::DEFAULT).await;
    let t = 1_800_000_000;
    store
        .write(
            vec![
                pair("a", "s", t - 10),
                pair("a", "s", t + 5),
                pair("a", "s", t + 500),
                pair("b", "s", t + 1),
                pair("b", "x", t + 100),
                pair("c", "s", t - 1),
            ]
            .into(),
        )
        .await
        .unwrap();
    let mut got: Vec<(String, String, i64)> = store
        .latest_in(t, t + 100)
        .await
        .unwrap()
        .into_iter()
        .map(|p| (p.user_id, p.segment, p.ts))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a".into(), "s".into(), t + 5),
            ("b".into(), "s".into(), t + 1),
            ("b".into(), "x".into(), t + 100),
        ]
    );
    assert!(store.latest_in(t, t).await.unwrap().is_empty());
}
