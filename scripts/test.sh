#!/usr/bin/env bash
# The project's test command (README: `make test`): installs what the tests need, starts a real
# Kafka-protocol broker (tansu) and a real ClickHouse on loopback, runs every test of the
# workspace against them, and stops both servers at the end, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

SERVERS_DIR="${USERSEG_TEST_SERVERS_DIR:-$PWD/.test-servers}"
rm -rf "$SERVERS_DIR"
mkdir -p "$SERVERS_DIR/tansu" "$SERVERS_DIR/clickhouse"

stop_servers() {
  scripts/tansu.sh stop "$SERVERS_DIR/tansu" || true
  scripts/clickhouse.sh stop "$SERVERS_DIR/clickhouse" || true
}
trap stop_servers EXIT

scripts/tansu.sh start "$SERVERS_DIR/tansu"
scripts/clickhouse.sh start "$SERVERS_DIR/clickhouse"
set -a
# shellcheck disable=SC1091
. "$SERVERS_DIR/tansu/tansu.env"
# shellcheck disable=SC1091
. "$SERVERS_DIR/clickhouse/clickhouse.env"
set +a
# Tests that restart ClickHouse need to know where its script and directory are.
export USERSEG_TEST_CLICKHOUSE_DIR="$SERVERS_DIR/clickhouse"
export USERSEG_TEST_TANSU_DIR="$SERVERS_DIR/tansu"
echo "test servers: kafka=$USERSEG_TEST_KAFKA clickhouse=$USERSEG_TEST_CLICKHOUSE_URL"

# The end-to-end tests start the real binaries; build them first so test time is test time.
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast "$@"
# The clickhouse crate's statements, just recorded on 18.16 by the run above, replayed on a
# current ClickHouse (chdb): a few seconds. Only on a full run (a filtered one may not record).
if [ $# -eq 0 ]; then
  scripts/chdb-check.sh --replay-only
fi
