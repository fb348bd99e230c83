#!/usr/bin/env bash
# Starts and stops a local tansu broker (Kafka-protocol compatible) for tests.
#
#   scripts/tansu.sh start DIR [PORT]   start on 127.0.0.1:PORT (a free port when omitted); data,
#                                       log and pid under DIR; waits until the port accepts
#                                       connections; writes DIR/tansu.env with
#                                       USERSEG_TEST_KAFKA=127.0.0.1:PORT
#   scripts/tansu.sh stop DIR           stops the broker started with DIR
#
# A restart (stop, then start with the same DIR) reuses the previous port and storage unless
# given again, so clients keep their address; with TANSU_STORAGE=sqlite the topics, messages and
# committed offsets survive it. A free port is probed before tansu binds it, so another process
# can take it in between (tansu then exits during its start): a start on a port it picked itself
# (neither given nor reused) then tries again on a freshly probed one, three tries in all.
#
# Environment:
#   TANSU_BIN       the tansu binary (default: $HOME/.cache/userseg/tansu-0.6.0/bin/tansu)
#   TANSU_STORAGE   memory (default, fast, lost on stop) or sqlite (DIR/tansu.db, survives a
#                   restart with the same DIR and PORT) or any storage URL tansu accepts
#   TANSU_WAIT_SECS how long to wait for the port (default 30)
#   TANSU_ADVERTISED the listener URL the broker advertises to clients (default
#                   tcp://127.0.0.1:PORT), e.g. a TLS-terminating proxy's address
#
# Typical test run:
#   scripts/tansu.sh start /tmp/userseg-kafka && . /tmp/userseg-kafka/tansu.env && export USERSEG_TEST_KAFKA
#   cargo test -p userseg-kafka
#   scripts/tansu.sh stop /tmp/userseg-kafka
set -euo pipefail
# shellcheck source=scripts/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

TANSU_BIN="${TANSU_BIN:-$HOME/.cache/userseg/tansu-0.6.0/bin/tansu}"

usage() {
  echo "usage: $0 start DIR [PORT] | stop DIR" >&2
  exit 2
}

# True when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

running_pid() {
  local dir="$1" pid
  [ -f "$dir/tansu.pid" ] || return 1
  pid="$(cat "$dir/tansu.pid")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

start() {
  local dir="$1" port="${2:-}"
  [ -x "$TANSU_BIN" ] || {
    echo "tansu.sh: $TANSU_BIN not found or not executable (run scripts/install-deps.sh)" >&2
    exit 1
  }
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if pid="$(running_pid "$dir")"; then
    echo "tansu.sh: already running in $dir (pid $pid)" >&2
    exit 1
  fi
  if [ -z "$port" ] && [ -f "$dir/tansu.env" ]; then
    port="$(sed -n 's/^USERSEG_TEST_KAFKA=127\.0\.0\.1://p' "$dir/tansu.env")"
  fi
  # Only a port picked here may be changed when tansu loses it.
  local fixed_port="$port"

  local storage kind="${TANSU_STORAGE:-}"
  if [ -z "$kind" ] && [ -f "$dir/tansu.storage" ]; then
    kind="$(cat "$dir/tansu.storage")"
  fi
  kind="${kind:-memory}"
  echo "$kind" >"$dir/tansu.storage"
  case "$kind" in
    memory) storage="memory://tansu/" ;;
    # tansu resolves the sqlite path relative to its working directory, which is DIR.
    sqlite) storage="sqlite://tansu.db" ;;
    *) storage="$kind" ;;
  esac

  local attempt
  for attempt in 1 2 3; do
    port="${fixed_port:-$(free_port)}"
    if port_open "$port"; then
      echo "tansu.sh: port $port is already in use" >&2
      exit 1
    fi
    launch "$dir" "$port" "$storage"
    [ "$LAUNCHED" = 1 ] && break
    if [ -n "$fixed_port" ] || [ "$attempt" = 3 ]; then
      exit 1
    fi
    echo "tansu.sh: trying again on a freshly probed port (attempt $((attempt + 1)) of 3)" >&2
  done

  echo "USERSEG_TEST_KAFKA=127.0.0.1:$port" >"$dir/tansu.env"
  echo "tansu.sh: tansu $storage listening on 127.0.0.1:$port (pid $(cat "$dir/tansu.pid"), log $dir/tansu.log)"
}

# Starts tansu in DIR on PORT with STORAGE and waits until the port accepts connections. Sets
# LAUNCHED=1 when tansu listens there, LAUNCHED=0 when it exited during its start or another
# process listens on its port (a port taken since it was probed); exits on a timeout.
launch() {
  local dir="$1" port="$2" storage="$3"
  LAUNCHED=0
  # setsid: the broker outlives this script and is not hit by the caller's Ctrl-C.
  (cd "$dir" && exec setsid "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "${TANSU_ADVERTISED:-tcp://127.0.0.1:$port}" \
    --storage-engine "$storage" \
    >"$dir/tansu.log" 2>&1 </dev/null) &
  local pid=$!
  echo "$pid" >"$dir/tansu.pid"

  local wait_secs="${TANSU_WAIT_SECS:-30}" waited=0
  until port_open "$port"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "tansu.sh: tansu exited during startup; last log lines:" >&2
      tail -n 20 "$dir/tansu.log" >&2 || true
      rm -f "$dir/tansu.pid"
      return 0
    fi
    if [ "$waited" -ge $((wait_secs * 10)) ]; then
      echo "tansu.sh: port $port not open after ${wait_secs}s; stopping tansu" >&2
      kill "$pid" 2>/dev/null || true
      rm -f "$dir/tansu.pid"
      exit 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  if lost_port "$port" "$pid" tansu.sh; then
    rm -f "$dir/tansu.pid"
    return 0
  fi
  LAUNCHED=1
}

stop() {
  local dir="$1" pid
  if ! pid="$(running_pid "$dir")"; then
    echo "tansu.sh: not running in $dir"
    rm -f "$dir/tansu.pid"
    return 0
  fi
  kill "$pid"
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "tansu.sh: pid $pid ignored SIGTERM for 10s; sending SIGKILL" >&2
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/tansu.pid"
  echo "tansu.sh: stopped (pid $pid)"
}

[ $# -ge 2 ] || usage
case "$1" in
  start) start "$2" "${3:-}" ;;
  stop) stop "$2" ;;
  *) usage ;;
esac
