//! The behaviour every [`ExitMarks`] adapter must have, written once: each adapter calls
//! [`run`] on a fresh, empty store of marks.

use std::collections::BTreeMap;

use crate::ExitMarks;

/// Marks are per partition, only rise, and a partition never saved has none.
pub async fn run(marks: &dyn ExitMarks) {
    assert!(
        marks.load().await.expect("load").is_empty(),
        "fresh: no marks"
    );
    marks
        .save(&BTreeMap::from([(0, 1_800_000_000), (3, 1_800_000_100)]))
        .await
        .expect("save");
    assert_eq!(
        marks.load().await.expect("load"),
        BTreeMap::from([(0, 1_800_000_000), (3, 1_800_000_100)])
    );
    // A later mark of one partition; a lower one of another changes nothing.
    marks
        .save(&BTreeMap::from([(0, 1_800_000_050), (3, 1_800_000_010)]))
        .await
        .expect("save");
    marks.save(&BTreeMap::new()).await.expect("save nothing");
    assert_eq!(
        marks.load().await.expect("load"),
        BTreeMap::from([(0, 1_800_000_050), (3, 1_800_000_100)])
    );
}
