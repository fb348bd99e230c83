//! Integration tests against a real ClickHouse server.
//!
//! Start one with `scripts/clickhouse.sh start /tmp/userseg-ch` and export the variable it
//! writes (`set -a; . /tmp/userseg-ch/clickhouse.env; set +a`). Without
//! `USERSEG_TEST_CLICKHOUSE_URL` every test here fails: they are never skipped silently.

mod common;

mod analytics;
mod approx;
mod deletion;
mod errors;
mod marks;
mod migrations;
mod names;
mod perf;
mod retention;
mod suite;
