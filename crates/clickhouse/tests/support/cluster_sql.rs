//! The SQL files of `deploy/clickhouse-cluster/`, read the way their README says to run them:
//! `--` comment lines dropped, statements split at `;`, `{placeholder}`s replaced.

#![allow(dead_code)]

pub const CLUSTER_SQL: &str = include_str!("../../../../deploy/clickhouse-cluster/cluster.sql");
pub const LOCAL_REPLICATED_SQL: &str =
    include_str!("../../../../deploy/clickhouse-cluster/local-replicated.sql");
pub const QUERIES_SQL: &str = include_str!("../../../../deploy/clickhouse-cluster/queries.sql");
pub const RETENTION_SQL: &str = include_str!("../../../../deploy/clickhouse-cluster/retention.sql");

fn substitute(statement: &str, subs: &[(&str, &str)]) -> String {
    let mut s = statement.to_string();
    for (k, v) in subs {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    s
}

fn without_comments(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The statements of a DDL file, placeholders replaced.
pub fn statements(text: &str, subs: &[(&str, &str)]) -> Vec<String> {
    without_comments(text)
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| substitute(s, subs))
        .collect()
}

/// The query named `name` (`-- name: NAME` above it) of queries.sql, placeholders replaced,
/// on one line.
pub fn query(name: &str, subs: &[(&str, &str)]) -> String {
    named(QUERIES_SQL, name, subs)
}

/// The query named `name` of a file of named queries (queries.sql, retention.sql).
pub fn named(text: &str, name: &str, subs: &[(&str, &str)]) -> String {
    let marker = format!("-- name: {name}\n");
    let start = text
        .find(&marker)
        .unwrap_or_else(|| panic!("no query named {name}"))
        + marker.len();
    let rest = &text[start..];
    let end = rest.find("-- name: ").unwrap_or(rest.len());
    let sql = without_comments(&rest[..end]);
    let sql = sql.trim().trim_end_matches(';');
    let one_line = sql.split_whitespace().collect::<Vec<_>>().join(" ");
    let sql = substitute(&one_line, subs);
    assert!(
        !sql.contains("{cdb}") && !sql.contains("{bound}"),
        "{name}: a placeholder is left in {sql}"
    );
    sql
}

/// The names of every query of queries.sql, in order.
pub fn query_names() -> Vec<&'static str> {
    QUERIES_SQL
        .lines()
        .filter_map(|l| l.strip_prefix("-- name: "))
        .map(str::trim)
        .collect()
}
