//! Versioned schema migrations, embedded in the binary and applied in order.
//!
//! Each migration is a file of `;`-terminated statements in which `{db}` stands for the quoted
//! database name. Every statement is idempotent (`IF NOT EXISTS`, or an insert of sketches,
//! which are unions), so a migration interrupted half-way is simply applied again. Once all of
//! its statements succeeded, a row (version, name, checksum, applied_at) goes into
//! `schema_migrations`; versions found there are skipped next time.

use crate::client::{quote_ident, rowbinary, ClickHouseClient};
use crate::config::ClickHouseConfig;
use crate::error::ClickHouseError;

/// The least request timeout for migration statements.
const MIGRATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);

/// One embedded migration.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub version: u32,
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    /// CRC-32 of the SQL text, recorded so that editing an applied migration is caught.
    pub fn checksum(&self) -> u32 {
        crc32fast::hash(self.sql.as_bytes())
    }

    /// The statements with `{db}` replaced by the quoted database name.
    pub fn statements(&self, database: &str) -> Vec<String> {
        let db = quote_ident(database);
        let without_comments: String = self
            .sql
            .lines()
            .filter(|l| !l.trim_start().starts_with("--"))
            .collect::<Vec<_>>()
            .join("\n");
        without_comments
            .split(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.replace("{db}", &db))
            .collect()
    }
}

/// Every migration, in order. Append only: never edit or reorder an entry once released.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "pairs",
        sql: include_str!("../migrations/0001_pairs.sql"),
    },
    Migration {
        version: 2,
        name: "approx_sketches",
        sql: include_str!("../migrations/0002_approx_sketches.sql"),
    },
    Migration {
        version: 3,
        name: "history",
        sql: include_str!("../migrations/0003_history.sql"),
    },
    Migration {
        version: 4,
        name: "pairs_by_user",
        sql: include_str!("../migrations/0004_pairs_by_user.sql"),
    },
    Migration {
        version: 5,
        name: "change_marks",
        sql: include_str!("../migrations/0005_change_marks.sql"),
    },
];

/// The schema version this binary needs.
pub fn latest_version() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}

/// A migration as recorded in `schema_migrations`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedMigration {
    pub version: u32,
    pub name: String,
    pub checksum: u32,
}

/// Creates the database if missing and applies every migration not yet recorded, in order.
/// Returns the migrations applied by this call (empty when the schema was up to date).
pub async fn migrate(config: &ClickHouseConfig) -> Result<Vec<AppliedMigration>, ClickHouseError> {
    migrate_to(config, latest_version()).await
}

/// Like [`migrate`], stopping after version `target` (for staged upgrades and tests).
///
/// On a cluster ([`ClickHouseConfig::nodes`]) it migrates every node's local database
/// (`node_database`) and returns what it applied on all of them; the cluster database itself
/// is made once by `deploy/clickhouse-cluster/cluster.sql`.
pub async fn migrate_to(
    config: &ClickHouseConfig,
    target: u32,
) -> Result<Vec<AppliedMigration>, ClickHouseError> {
    if !config.nodes.is_empty() {
        let mut all = Vec::new();
        for node in config.node_configs() {
            all.extend(Box::pin(migrate_to(&node, target)).await?);
        }
        return Ok(all);
    }
    // Backfilling sketches from a large pairs table can take minutes: allow it.
    let mut long = config.clone();
    long.request_timeout = long.request_timeout.max(MIGRATION_TIMEOUT);
    let client = ClickHouseClient::new(&long)?;
    let db = quote_ident(&config.database);
    client
        .execute(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
        .await?;
    client
        .execute(&format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
             (version UInt32, name String, checksum UInt32, applied_at DateTime('UTC')) \
             ENGINE = ReplacingMergeTree(applied_at) ORDER BY version"
        ))
        .await?;

    let done = read_applied(&client, &config.database).await?;
    for applied in &done {
        match MIGRATIONS.iter().find(|m| m.version == applied.version) {
            Some(m) if m.checksum() != applied.checksum => {
                return Err(ClickHouseError::Migration(format!(
                    "migration {} ({}) was applied with checksum {:08x} but this binary's copy has {:08x}: applied migrations must never be edited",
                    m.version,
                    m.name,
                    applied.checksum,
                    m.checksum()
                )));
            }
            Some(_) => {}
            None => tracing::warn!(
                database = %config.database,
                version = applied.version,
                name = %applied.name,
                "database has a migration this binary does not know; it is newer than this binary"
            ),
        }
    }

    let mut applied_now = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| m.version <= target) {
        if done.iter().any(|a| a.version == m.version) {
            continue;
        }
        tracing::info!(database = %config.database, version = m.version, name = m.name, "applying migration");
        for statement in m.statements(&config.database) {
            client.execute(&statement).await?;
        }
        let mut row = Vec::new();
        rowbinary::put_u32(&mut row, m.version);
        rowbinary::put_string(&mut row, m.name);
        rowbinary::put_u32(&mut row, m.checksum());
        rowbinary::put_u32(&mut row, now_u32());
        client
            .insert(
                &format!(
                    "INSERT INTO {db}.schema_migrations (version, name, checksum, applied_at) FORMAT RowBinary"
                ),
                row,
            )
            .await?;
        applied_now.push(AppliedMigration {
            version: m.version,
            name: m.name.to_string(),
            checksum: m.checksum(),
        });
    }
    if applied_now.is_empty() {
        tracing::info!(database = %config.database, version = latest_version(), "schema is up to date");
    }
    Ok(applied_now)
}

/// The migrations recorded in the database, by version.
pub async fn applied_migrations(
    config: &ClickHouseConfig,
) -> Result<Vec<AppliedMigration>, ClickHouseError> {
    let client = ClickHouseClient::new(config)?;
    read_applied(&client, &config.database).await
}

async fn read_applied(
    client: &ClickHouseClient,
    database: &str,
) -> Result<Vec<AppliedMigration>, ClickHouseError> {
    let body = client
        .query(&format!(
            "SELECT version, any(name), any(checksum) FROM {}.schema_migrations \
             GROUP BY version ORDER BY version FORMAT RowBinary",
            quote_ident(database)
        ))
        .await?;
    let mut r = rowbinary::Reader::new(&body);
    let mut out = Vec::new();
    while !r.is_empty() {
        let version = r.u32().map_err(ClickHouseError::Decode)?;
        let name = r.string().map_err(ClickHouseError::Decode)?;
        let checksum = r.u32().map_err(ClickHouseError::Decode)?;
        out.push(AppliedMigration {
            version,
            name,
            checksum,
        });
    }
    Ok(out)
}

/// The schema version recorded in the database (0 when none).
pub(crate) async fn current_version(
    client: &ClickHouseClient,
    database: &str,
) -> Result<u32, ClickHouseError> {
    let body = client
        .query(&format!(
            "SELECT toUInt32(max(version)) FROM {}.schema_migrations FORMAT RowBinary",
            quote_ident(database)
        ))
        .await?;
    let mut r = rowbinary::Reader::new(&body);
    if r.is_empty() {
        return Ok(0);
    }
    r.u32().map_err(ClickHouseError::Decode)
}

fn now_u32() -> u32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    u32::try_from(secs).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_consecutive_from_one() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1, "{}", m.name);
        }
        assert_eq!(latest_version(), MIGRATIONS.len() as u32);
    }

    #[test]
    fn statements_are_split_and_qualified() {
        for m in MIGRATIONS {
            let statements = m.statements("userseg_x");
            assert!(!statements.is_empty(), "{}", m.name);
            for s in &statements {
                assert!(!s.contains("{db}"), "{s}");
                assert!(!s.contains(';'), "{s}");
                assert!(!s.starts_with("--"), "{s}");
            }
        }
        let s = MIGRATIONS[0].statements("userseg_x");
        assert_eq!(s.len(), 1);
        assert!(
            s[0].starts_with("CREATE TABLE IF NOT EXISTS `userseg_x`.pairs"),
            "{}",
            s[0]
        );
        assert_eq!(MIGRATIONS[1].statements("d").len(), 3);
    }
}
