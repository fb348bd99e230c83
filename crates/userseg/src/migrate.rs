//! `userseg migrate`: applies the ClickHouse migrations.

use anyhow::{Context, Result};
use userseg_clickhouse::ClickHouseConfig;

/// Applies the migrations ClickHouse lacks and prints what it did.
pub async fn run(config: &ClickHouseConfig) -> Result<()> {
    let applied = userseg_clickhouse::migrate(config)
        .await
        .with_context(|| format!("migrating {} at {}", config.database, config.addr))?;
    if applied.is_empty() {
        println!(
            "database {} is up to date (schema version {})",
            config.database,
            userseg_clickhouse::latest_version()
        );
    } else {
        for m in applied {
            println!("applied {:04} {}", m.version, m.name);
        }
    }
    Ok(())
}
