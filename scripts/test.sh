#!/usr/bin/env bash
# The project's test command (README: `make test`): installs what the tests need, starts a real
# Kafka-protocol broker (tansu) and a real ClickHouse on loopback, runs every test of the
# workspace against them, and stops both servers at the end, even on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# shellcheck source=scripts/servers.sh
. scripts/servers.sh
servers_start "${USERSEG_TEST_SERVERS_DIR:-$PWD/.test-servers}"
echo "test servers: kafka=$USERSEG_TEST_KAFKA clickhouse=$USERSEG_TEST_CLICKHOUSE_URL"

# The end-to-end tests start the real binaries; build them first so test time is test time.
cargo build --workspace --bins --quiet
cargo test --workspace --no-fail-fast "$@"
# The clickhouse crate's statements, just recorded on 18.16 by the run above, replayed on a
# current ClickHouse (chdb): a few seconds. Only on a full run (a filtered one may not record).
if [ $# -eq 0 ]; then
  scripts/chdb-check.sh --replay-only
fi
