#!/usr/bin/env bash
# A throwaway ClickHouse cluster on loopback: SHARDS servers (default 2), one shard each, no
# replicas and no ZooKeeper, each started by scripts/clickhouse.sh in DIR/shardN, all knowing the
# cluster `userseg` (remote_servers naming every shard's native port). Enough for Distributed
# tables over non-replicated MergeTree locals (deploy/clickhouse-cluster/), not for ON CLUSTER
# DDL or Replicated* engines (those need ZooKeeper/Keeper).
#
#   scripts/clickhouse-cluster.sh start DIR [SHARDS]   start (idempotent); waits until every server lists all shards
#   scripts/clickhouse-cluster.sh stop DIR             stop every shard's server
#
# `start` writes DIR/cluster.env holding USERSEG_TEST_CLICKHOUSE_SHARDS=http://127.0.0.1:P1,http://127.0.0.1:P2
# (the HTTP interfaces, in shard order) and USERSEG_TEST_CLICKHOUSE_CLUSTER=userseg.
# Every server's default profile gets insert_distributed_sync=1 (DIR/shardN/users.d/), so an
# INSERT into a Distributed table returns once every shard has the rows, as it should for a
# writer that acknowledges what it inserted.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
CLUSTER=userseg

die() {
  echo "clickhouse-cluster.sh: $*" >&2
  exit 1
}

usage() {
  die "usage: $0 start DIR [SHARDS] | stop DIR"
}

shard_dirs() {
  local dir=$1
  find "$dir" -maxdepth 1 -type d -name 'shard[0-9]*' | sort -V
}

cmd_start() {
  local dir=$1 shards=${2:-2}
  [[ "$shards" =~ ^[1-9][0-9]*$ ]] || die "SHARDS must be a positive number, got '$shards'"
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  local i
  for i in $(seq 1 "$shards"); do
    "$here/clickhouse.sh" start "$dir/shard$i" >/dev/null
  done
  # Every server gets the same cluster definition: the native ports of all shards.
  local xml="" urls="" http tcp
  for i in $(seq 1 "$shards"); do
    # shellcheck disable=SC1091
    . "$dir/shard$i/ports"
    xml="$xml
            <shard><replica><host>127.0.0.1</host><port>$TCP_PORT</port></replica></shard>"
    urls="${urls:+$urls,}http://127.0.0.1:$HTTP_PORT"
  done
  for i in $(seq 1 "$shards"); do
    mkdir -p "$dir/shard$i/config.d" "$dir/shard$i/users.d"
    cat >"$dir/shard$i/config.d/remote_servers.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <remote_servers>
        <$CLUSTER>$xml
        </$CLUSTER>
    </remote_servers>
</yandex>
EOF
    cat >"$dir/shard$i/users.d/distributed.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <insert_distributed_sync>1</insert_distributed_sync>
        </default>
    </profiles>
</yandex>
EOF
  done
  # The servers reload config.d and users.d by themselves (every few seconds): wait until each
  # lists every shard and applies the profile.
  local deadline=$((SECONDS + 60))
  for i in $(seq 1 "$shards"); do
    # shellcheck disable=SC1091
    . "$dir/shard$i/ports"
    http=$HTTP_PORT
    tcp=$TCP_PORT
    until [ "$(curl -fsS --max-time 2 "http://127.0.0.1:$http/" --data-binary \
      "SELECT toString(count()) || '/' || (SELECT value FROM system.settings WHERE name = 'insert_distributed_sync') FROM system.clusters WHERE cluster = '$CLUSTER'" \
      2>/dev/null)" = "$shards/1" ]; do
      [ $SECONDS -lt $deadline ] || die "shard $i (http $http, tcp $tcp) did not load the cluster config within 60 s (see $dir/shard$i/log)"
      sleep 0.5
    done
  done
  printf 'USERSEG_TEST_CLICKHOUSE_SHARDS=%s\nUSERSEG_TEST_CLICKHOUSE_CLUSTER=%s\n' "$urls" "$CLUSTER" >"$dir/cluster.env"
  echo "clickhouse-cluster.sh: cluster $CLUSTER of $shards shards: $urls"
}

cmd_stop() {
  local dir=$1 d pids=() failed=0
  [ -d "$dir" ] || die "no such directory: $dir"
  # All at once: a server's shutdown waits for the connections the other servers' Distributed
  # tables keep open to it, which close when those servers shut down too.
  for d in $(shard_dirs "$dir"); do
    "$here/clickhouse.sh" stop "$d" &
    pids+=($!)
  done
  for p in "${pids[@]}"; do
    wait "$p" || failed=1
  done
  [ "$failed" = 0 ] || die "a server did not stop cleanly"
}

[ $# -ge 2 ] || usage
case "$1" in
start) [ $# -le 3 ] || usage; cmd_start "$2" "${3:-}" ;;
stop) [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
*) usage ;;
esac
