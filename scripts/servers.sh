#!/usr/bin/env bash
# Sourced (not run) by scripts/test.sh and scripts/soak.sh: the real servers the integration
# tests run against.
#
#   servers_start DIR   empties DIR, starts tansu in DIR/tansu and ClickHouse in DIR/clickhouse,
#                       stops both when the calling script exits (even on failure: an EXIT
#                       trap, which replaces any the caller had set), and exports
#                       what the tests read: USERSEG_TEST_KAFKA and USERSEG_TEST_CLICKHOUSE_URL
#                       (from the servers' env files), USERSEG_TEST_TANSU_DIR and
#                       USERSEG_TEST_CLICKHOUSE_DIR (tests that restart a server need them)
#   servers_stop DIR    stops both servers; one that is not running is fine

_servers_scripts="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

servers_stop() {
  "$_servers_scripts/tansu.sh" stop "$1/tansu" || true
  "$_servers_scripts/clickhouse.sh" stop "$1/clickhouse" || true
}

servers_start() {
  local dir=$1
  rm -rf "$dir"
  mkdir -p "$dir/tansu" "$dir/clickhouse"
  dir="$(cd "$dir" && pwd)"
  # shellcheck disable=SC2064 # DIR is expanded now, on purpose
  trap "servers_stop $(printf '%q' "$dir")" EXIT
  "$_servers_scripts/tansu.sh" start "$dir/tansu"
  "$_servers_scripts/clickhouse.sh" start "$dir/clickhouse"
  set -a
  # shellcheck disable=SC1091
  . "$dir/tansu/tansu.env"
  # shellcheck disable=SC1091
  . "$dir/clickhouse/clickhouse.env"
  set +a
  export USERSEG_TEST_CLICKHOUSE_DIR="$dir/clickhouse"
  export USERSEG_TEST_TANSU_DIR="$dir/tansu"
}
