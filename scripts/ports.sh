#!/usr/bin/env bash
# Sourced (not run) by scripts/clickhouse.sh and scripts/tansu.sh: free loopback ports for the
# test servers, and telling when a server lost the one it was given.
#
# A port is probed free before the server binds it, so another process can take it in between;
# the scripts then start the server again on freshly probed ports. Ports are probed below the
# kernel's ephemeral range (ip_local_port_range, from which outgoing connections and binds to
# port 0 take theirs) when it leaves room, which leaves mostly other probing starts to race with.

# Is any TCP socket on this host (a listener or a connection's local end) bound to port $1?
port_bound() {
  ss -Htan 2>/dev/null | awk '{print $4}' | grep -Eq "[:.]$1\$"
}

# Prints "FIRST COUNT": the ports probed.
port_range() {
  local lo=32768 _hi
  if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
    read -r lo _hi </proc/sys/net/ipv4/ip_local_port_range
  fi
  if [ "$lo" -ge 25000 ]; then
    echo "20000 $((lo - 20000))"
  else
    echo "20000 40000"
  fi
}

# True when a process other than PID listens on 127.0.0.1:PORT: the port was taken since it was
# probed, and the server started as PID will not get it. Says so on stderr (prefixed with WHO)
# and SIGKILLs PID, a child of the calling script, reaping it.
lost_port() {
  local port=$1 pid=$2 who=$3 listener
  listener=$(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'pid=[0-9]*' | head -n 1 | cut -d= -f2 || true)
  if [ -z "$listener" ] || [ "$listener" = "$pid" ]; then
    return 1
  fi
  echo "$who: port $port is served by pid $listener, not by the server started as pid $pid" >&2
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  return 0
}

# Prints a free TCP port that is not among the ports given as arguments.
free_port() {
  local port taken first count other
  read -r first count < <(port_range)
  for _ in $(seq 1 200); do
    port=$((first + RANDOM % count))
    taken=0
    for other in "$@"; do
      [ "$other" = "$port" ] && taken=1
    done
    [ "$taken" = 0 ] || continue
    port_bound "$port" && continue
    echo "$port"
    return 0
  done
  echo "no free port found" >&2
  return 1
}
