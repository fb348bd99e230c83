//! Migrations: applied in order, recorded, idempotent, and guarded against edits.

use userseg_clickhouse::{
    applied_migrations, latest_version, migrate, migrate_to, quote_string, ClickHouseError,
    ClickHouseStore, MIGRATIONS,
};
use userseg_domain::Window;
use userseg_usecase::{Mode, PortError, SegmentCounter, SegmentWriter};

use crate::common::{fresh_config, pair, scalar};

const T: i64 = 1_763_942_400;

async fn tables(store: &ClickHouseStore) -> Vec<String> {
    let body = store
        .client()
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = {} ORDER BY name FORMAT TabSeparated",
            quote_string(store.database())
        ))
        .await
        .expect("list tables");
    String::from_utf8(body.to_vec())
        .expect("utf-8")
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn migrations_are_applied_once_recorded_and_idempotent() {
    let config = fresh_config();
    let store = ClickHouseStore::new(config.clone(), Window::DEFAULT).unwrap();

    // Before: the database does not exist, and the store says so without giving up.
    match store.check_ready().await {
        Err(PortError::Transient(m)) => assert!(m.contains("migrate"), "{m}"),
        other => panic!("an unmigrated store must be transiently unready, got {other:?}"),
    }

    let applied = migrate(&config).await.expect("first migrate");
    let versions: Vec<u32> = applied.iter().map(|m| m.version).collect();
    assert_eq!(versions, (1..=latest_version()).collect::<Vec<_>>());
    assert_eq!(applied[0].name, "pairs");
    assert_eq!(applied[1].name, "approx_sketches");
    assert_eq!(applied[2].name, "history");
    assert_eq!(applied[3].name, "pairs_by_user");

    let again = migrate(&config).await.expect("second migrate");
    assert!(
        again.is_empty(),
        "re-running must be a no-op, applied {again:?}"
    );

    let recorded = applied_migrations(&config)
        .await
        .expect("read schema_migrations");
    assert_eq!(recorded, applied, "each migration recorded exactly once");
    for (r, m) in recorded.iter().zip(MIGRATIONS) {
        assert_eq!(r.checksum, m.checksum());
    }
    let rows = scalar(
        &store,
        &format!(
            "SELECT toUInt64(count()) FROM `{}`.schema_migrations FINAL FORMAT RowBinary",
            config.database
        ),
    )
    .await;
    assert_eq!(rows, u64::from(latest_version()));

    assert_eq!(
        tables(&store).await,
        vec![
            "agg_day",
            "agg_day_mv",
            "change_marks",
            "history",
            "pairs",
            "pairs_by_user",
            "pairs_by_user_mv",
            "schema_migrations"
        ]
    );
    store.check_ready().await.expect("ready once migrated");
}

#[tokio::test]
async fn sketch_migration_backfills_existing_pairs() {
    let config = fresh_config();
    let applied = migrate_to(&config, 1).await.expect("migrate to 1");
    assert_eq!(applied.len(), 1);
    let store = ClickHouseStore::new(config.clone(), Window::DEFAULT).unwrap();
    match store.check_ready().await {
        Err(PortError::Transient(m)) => assert!(m.contains("version 1"), "{m}"),
        other => panic!("a store behind the latest schema must be unready, got {other:?}"),
    }
    store
        .write(
            vec![
                pair("u1", "s", T),
                pair("u2", "s", T - 7200),
                pair("u3", "t", T),
            ]
            .into(),
        )
        .await
        .expect("write at version 1");

    let applied = migrate(&config).await.expect("migrate the rest");
    assert_eq!(applied.len(), MIGRATIONS.len() - 1);
    store.check_ready().await.expect("ready");
    // Pairs written before the sketch tables existed are in the sketches.
    assert_eq!(store.count("s", T, Mode::Approx).await.unwrap(), (2, false));
    assert_eq!(store.count("t", T, Mode::Approx).await.unwrap(), (1, false));
    // And in the copy ordered by user that lookups read (migration 4).
    let found = userseg_usecase::SegmentAnalytics::user_segments(&store, "u2", T)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].segment.as_str(), found[0].last_seen),
        ("s", T - 7200)
    );
    // And later writes reach them through the views.
    store.write(vec![pair("u4", "s", T)].into()).await.unwrap();
    assert_eq!(store.count("s", T, Mode::Approx).await.unwrap(), (3, false));
    assert_eq!(store.count("s", T, Mode::Exact).await.unwrap(), (3, true));
}

#[tokio::test]
async fn an_edited_applied_migration_is_refused() {
    let config = fresh_config();
    migrate_to(&config, 1).await.expect("migrate to 1");
    let store = ClickHouseStore::new(config.clone(), Window::DEFAULT).unwrap();
    // Pretend version 2 had been applied from different SQL.
    let mut row = Vec::new();
    row.extend_from_slice(&2u32.to_le_bytes());
    row.push(15);
    row.extend_from_slice(b"approx_sketches");
    row.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    row.extend_from_slice(&(T as u32).to_le_bytes());
    store
        .client()
        .insert(
            &format!(
                "INSERT INTO `{}`.schema_migrations (version, name, checksum, applied_at) FORMAT RowBinary",
                config.database
            ),
            row,
        )
        .await
        .expect("insert a forged record");
    match migrate(&config).await {
        Err(ClickHouseError::Migration(m)) => {
            assert!(m.contains("migration 2") && m.contains("deadbeef"), "{m}")
        }
        other => panic!("expected a checksum error, got {other:?}"),
    }
}
