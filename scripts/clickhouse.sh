#!/usr/bin/env bash
# Runs a throwaway ClickHouse server for tests, as an ordinary background process with its own
# generated config, data and logs under one directory. Every port is bound to 127.0.0.1 only.
#
#   scripts/clickhouse.sh start DIR [HTTP_PORT]   start (or restart with the same data); waits for /ping
#   scripts/clickhouse.sh stop DIR                stop and wait for the process to exit
#   scripts/clickhouse.sh status DIR              exit 0 when the server in DIR answers /ping
#
# `start` writes DIR/clickhouse.env holding USERSEG_TEST_CLICKHOUSE_URL=http://127.0.0.1:PORT.
# With CLICKHOUSE_HTTPS_CERT and CLICKHOUSE_HTTPS_KEY (PEM files) set, the server also serves
# HTTPS on another free port, and clickhouse.env also holds
# USERSEG_TEST_CLICKHOUSE_HTTPS_URL=https://localhost:PORT.
# Without HTTP_PORT a restart reuses the ports of the previous run in DIR when they are still
# free, otherwise it picks free ones. The native TCP and interserver ports are always distinct
# free ports. A free port is probed before the server binds it, so another process can take it
# in between (the server then exits during its start): `start` then tries again on freshly
# probed ports (HTTP_PORT, when given, is kept), three tries in all.
set -euo pipefail
# shellcheck source=scripts/ports.sh
. "$(dirname "${BASH_SOURCE[0]}")/ports.sh"

die() {
  echo "clickhouse.sh: $*" >&2
  exit 1
}

usage() {
  die "usage: $0 start DIR [HTTP_PORT] | stop DIR | status DIR"
}

find_server() {
  if [ -n "${CLICKHOUSE_SERVER_BIN:-}" ]; then
    echo "$CLICKHOUSE_SERVER_BIN"
  elif command -v clickhouse-server >/dev/null 2>&1; then
    command -v clickhouse-server
  elif [ -x /usr/sbin/clickhouse-server ]; then
    echo /usr/sbin/clickhouse-server
  elif [ -x /usr/bin/clickhouse ]; then
    echo "/usr/bin/clickhouse server"
  else
    die "clickhouse-server not found: run scripts/install-deps.sh (or set CLICKHOUSE_SERVER_BIN)"
  fi
}

# Is anything listening on 127.0.0.1:PORT (or on a wildcard address with that port)?
port_in_use() {
  local port=$1
  ss -Hltn 2>/dev/null | awk '{print $4}' | grep -Eq "[:.]${port}\$"
}

ping_ok() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/ping" 2>/dev/null | grep -q '^Ok'
}

pid_alive() {
  [ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

read_pid() {
  [ -f "$1/clickhouse.pid" ] && cat "$1/clickhouse.pid" || true
}

write_config() {
  local dir=$1 http=$2 tcp=$3 inter=$4 https=${5:-}
  mkdir -p "$dir/data" "$dir/tmp" "$dir/user_files" "$dir/format_schemas" "$dir/log"
  local tls=""
  if [ -n "$https" ]; then
    tls="<https_port>$https</https_port>
    <openSSL>
        <server>
            <certificateFile>$CLICKHOUSE_HTTPS_CERT</certificateFile>
            <privateKeyFile>$CLICKHOUSE_HTTPS_KEY</privateKeyFile>
            <verificationMode>none</verificationMode>
            <loadDefaultCAFile>false</loadDefaultCAFile>
            <cacheSessions>true</cacheSessions>
            <disableProtocols>sslv2,sslv3,tlsv1,tlsv1_1</disableProtocols>
            <preferServerCiphers>true</preferServerCiphers>
        </server>
    </openSSL>"
  fi
  cat >"$dir/config.xml" <<EOF
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>$dir/log/clickhouse-server.log</log>
        <errorlog>$dir/log/clickhouse-server.err.log</errorlog>
        <size>100M</size>
        <count>2</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$http</http_port>
    <tcp_port>$tcp</tcp_port>
    <interserver_http_port>$inter</interserver_http_port>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    $tls
    <max_connections>1024</max_connections>
    <keep_alive_timeout>3</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mark_cache_size>268435456</mark_cache_size>
    <path>$dir/data/</path>
    <tmp_path>$dir/tmp/</tmp_path>
    <user_files_path>$dir/user_files/</user_files_path>
    <format_schema_path>$dir/format_schemas/</format_schema_path>
    <users_config>$dir/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <umask>022</umask>
    <mlock_executable>false</mlock_executable>
    <max_table_size_to_drop>0</max_table_size_to_drop>
    <max_partition_size_to_drop>0</max_partition_size_to_drop>
    <builtin_dictionaries_reload_interval>3600</builtin_dictionaries_reload_interval>
    <max_session_timeout>3600</max_session_timeout>
    <default_session_timeout>60</default_session_timeout>
</yandex>
EOF
  cat >"$dir/users.xml" <<'EOF'
<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>4000000000</max_memory_usage>
            <use_uncompressed_cache>0</use_uncompressed_cache>
            <load_balancing>random</load_balancing>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks replace="replace">
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
EOF
}

cmd_start() {
  local dir=$1 http=${2:-}
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)

  local old_pid
  old_pid=$(read_pid "$dir")
  if pid_alive "$old_pid"; then
    # Already running: fine when it is the server asked for (start is idempotent).
    # shellcheck disable=SC1091
    . "$dir/ports"
    if [ -z "$http" ] || [ "$http" = "$HTTP_PORT" ]; then
      if ping_ok "$HTTP_PORT"; then
        echo "USERSEG_TEST_CLICKHOUSE_URL=http://127.0.0.1:$HTTP_PORT" >"$dir/clickhouse.env"
        echo "clickhouse.sh: already running, pid $old_pid, http://127.0.0.1:$HTTP_PORT"
        return 0
      fi
    fi
    die "a server is already running from $dir (pid $old_pid, http port $HTTP_PORT); stop it first"
  fi

  # Ports of a previous run in this directory, reused when still free.
  local prev_http="" prev_tcp="" prev_inter=""
  if [ -f "$dir/ports" ]; then
    # shellcheck disable=SC1091
    . "$dir/ports"
    prev_http=${HTTP_PORT:-}
    prev_tcp=${TCP_PORT:-}
    prev_inter=${INTERSERVER_PORT:-}
  fi
  local want_http=$http
  [ -z "$want_http" ] || [[ "$want_http" =~ ^[0-9]+$ ]] || die "HTTP_PORT must be a number, got '$want_http'"

  local attempt tcp inter https
  for attempt in 1 2 3; do
    if [ "$attempt" -gt 1 ]; then
      echo "clickhouse.sh: trying again on freshly probed ports (attempt $attempt of 3)" >&2
      # A port found free may have been taken since: none of the previous ones is reused.
      prev_http="" prev_tcp="" prev_inter=""
    fi
    http=$want_http
    if [ -z "$http" ]; then
      if [ -n "$prev_http" ] && ! port_in_use "$prev_http"; then
        http=$prev_http
      else
        http=$(free_port)
      fi
    fi
    port_in_use "$http" && die "port $http is already in use"
    if [ -n "$prev_tcp" ] && [ "$prev_tcp" != "$http" ] && ! port_in_use "$prev_tcp"; then
      tcp=$prev_tcp
    else
      tcp=$(free_port "$http")
    fi
    if [ -n "$prev_inter" ] && [ "$prev_inter" != "$http" ] && [ "$prev_inter" != "$tcp" ] &&
      ! port_in_use "$prev_inter"; then
      inter=$prev_inter
    else
      inter=$(free_port "$http" "$tcp")
    fi
    https=""
    if [ -n "${CLICKHOUSE_HTTPS_CERT:-}" ] && [ -n "${CLICKHOUSE_HTTPS_KEY:-}" ]; then
      https=$(free_port "$http" "$tcp" "$inter")
    fi
    launch "$dir" "$http" "$tcp" "$inter" "$https"
    [ "$LAUNCHED" = 1 ] && break
  done
  [ "$LAUNCHED" = 1 ] || die "the server exited during start three times, on fresh ports each time (see $dir/log)"
  echo "USERSEG_TEST_CLICKHOUSE_URL=http://127.0.0.1:$http" >"$dir/clickhouse.env"
  if [ -n "$https" ]; then
    echo "USERSEG_TEST_CLICKHOUSE_HTTPS_URL=https://localhost:$https" >>"$dir/clickhouse.env"
  fi
  echo "clickhouse.sh: started pid $(read_pid "$dir"), http://127.0.0.1:$http (tcp $tcp, interserver $inter), data in $dir/data"
}

# Starts the server in DIR on the ports given and waits for /ping. Sets LAUNCHED=1 when it
# serves, LAUNCHED=0 when it exited during its start or another process answers on its HTTP
# port (a port taken since it was probed: worth another try on other ports); dies otherwise.
launch() {
  local dir=$1 http=$2 tcp=$3 inter=$4 https=$5
  LAUNCHED=0
  printf 'HTTP_PORT=%s\nTCP_PORT=%s\nINTERSERVER_PORT=%s\n' "$http" "$tcp" "$inter" >"$dir/ports"
  write_config "$dir" "$http" "$tcp" "$inter" "$https"

  local server
  server=$(find_server)
  # The server runs as whoever starts it (root included: 18.16 does not refuse). Its data is
  # owned by that user, so restarts must use the same user. setsid detaches it from the
  # caller's process group; it does not fork here (a background subshell of a script is not a
  # group leader), so $! is the server's pid, which is checked against the listening socket.
  # shellcheck disable=SC2086
  (cd "$dir" && exec setsid $server --config-file="$dir/config.xml" \
    >"$dir/log/stdout.log" 2>"$dir/log/stderr.log" </dev/null) &
  local pid=$!
  echo "$pid" >"$dir/clickhouse.pid"

  local deadline=$((SECONDS + 60))
  until ping_ok "$http"; do
    if ! pid_alive "$pid"; then
      echo "clickhouse.sh: the server exited during start; last log lines:" >&2
      tail -n 20 "$dir/log/clickhouse-server.err.log" "$dir/log/stderr.log" >&2 2>/dev/null || true
      rm -f "$dir/clickhouse.pid"
      return 0
    fi
    if [ $SECONDS -ge $deadline ]; then
      kill "$pid" 2>/dev/null || true
      die "the server did not answer /ping on port $http within 60 s (see $dir/log)"
    fi
    sleep 0.2
  done
  if lost_port "$http" "$pid" clickhouse.sh; then
    rm -f "$dir/clickhouse.pid"
    return 0
  fi
  LAUNCHED=1
}

cmd_stop() {
  local dir=$1
  [ -d "$dir" ] || die "no such directory: $dir"
  local pid
  pid=$(read_pid "$dir")
  if ! pid_alive "$pid"; then
    rm -f "$dir/clickhouse.pid"
    echo "clickhouse.sh: not running"
    return 0
  fi
  kill -TERM "$pid"
  local deadline=$((SECONDS + 60))
  while pid_alive "$pid"; do
    if [ $SECONDS -ge $deadline ]; then
      echo "clickhouse.sh: pid $pid did not exit within 60 s of SIGTERM; sending SIGKILL" >&2
      kill -KILL "$pid" 2>/dev/null || true
    fi
    sleep 0.1
  done
  rm -f "$dir/clickhouse.pid"
  echo "clickhouse.sh: stopped pid $pid"
}

cmd_status() {
  local dir=$1
  [ -f "$dir/ports" ] || die "no server was started in $dir"
  # shellcheck disable=SC1091
  . "$dir/ports"
  if ping_ok "$HTTP_PORT"; then
    echo "clickhouse.sh: running, http://127.0.0.1:$HTTP_PORT"
  else
    echo "clickhouse.sh: not answering on port $HTTP_PORT"
    return 1
  fi
}

[ $# -ge 2 ] || usage
case "$1" in
start) [ $# -le 3 ] || usage; cmd_start "$2" "${3:-}" ;;
stop) [ $# -eq 2 ] || usage; cmd_stop "$2" ;;
status) [ $# -eq 2 ] || usage; cmd_status "$2" ;;
*) usage ;;
esac
