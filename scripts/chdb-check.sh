#!/usr/bin/env bash
# `make chdb-check`: the clickhouse crate's SQL on a current ClickHouse. Records every statement
# the crate sends, with ClickHouse 18.16's answers (crates/clickhouse/tests/statements.rs, on a
# server this script starts unless USERSEG_TEST_CLICKHOUSE_URL points at one), then replays them
# on chdb (ClickHouse 26.x) and compares (scripts/chdb_check.py). `--replay-only` skips the
# recording (scripts/test.sh, whose test run has just written target/chdb/statements.json).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-chdb.sh
if [ "${1:-}" != "--replay-only" ]; then
  if [ -z "${USERSEG_TEST_CLICKHOUSE_URL:-}" ]; then
    dir="$(mktemp -d)"
    trap 'scripts/clickhouse.sh stop "$dir/ch" || true; rm -rf "$dir"' EXIT
    scripts/clickhouse.sh start "$dir/ch"
    set -a
    # shellcheck disable=SC1091
    . "$dir/ch/clickhouse.env"
    set +a
  fi
  cargo test -p userseg-clickhouse --test statements --quiet
fi
python3 scripts/chdb_check.py target/chdb/statements.json --report target/chdb/report.txt
