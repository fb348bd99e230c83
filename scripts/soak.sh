#!/usr/bin/env bash
# `make soak`: the long soaks with kills (docs/RELIABILITY.md#soak). Builds the release binary,
# then runs against it, by SOAK_MODE (standalone, distributed or both; default both):
# - crates/userseg/tests/soak.rs: standalone at ~70% of the capacity measured on this machine,
#   SIGKILLed every SOAK_KILL_EVERY seconds (default 60) for SOAK_SECS seconds (default 600);
# - crates/userseg/tests/soak_distributed.rs: USS → tansu → ES → ClickHouse at ~70% of the
#   pipeline's measured capacity, ES SIGKILLed every SOAK_KILL_EVERY seconds, USS SIGKILLed and
#   ClickHouse SIGKILLed and restarted once; it starts its own tansu and ClickHouse here.
# Exact counts and flat RSS are checked at the end. `make test` runs both in their short form
# (30 s, a kill every 10 s, the debug binary).
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_SECS="${SOAK_SECS:-600}"
export SOAK_KILL_EVERY="${SOAK_KILL_EVERY:-60}"
mode="${SOAK_MODE:-both}"
case "$mode" in
standalone | distributed | both) ;;
*)
  echo "soak.sh: SOAK_MODE must be standalone, distributed or both, not $mode" >&2
  exit 2
  ;;
esac
cargo build --release -p userseg
export SOAK_BIN="$PWD/target/release/userseg"

if [ "$mode" != distributed ]; then
  SOAK_CAPACITY_SECS="${SOAK_CAPACITY_SECS:-15}" cargo test -p userseg --test soak -- --nocapture
fi

if [ "$mode" != standalone ]; then
  scripts/install-deps.sh
  # shellcheck source=scripts/servers.sh
  . scripts/servers.sh
  servers_start "${USERSEG_TEST_SERVERS_DIR:-$PWD/.test-servers}/soak"
  # Capacity: ES's write rate during 10 s of unpaced load through USS (~20 M pairs, which ES
  # has written into ClickHouse a minute or two later).
  # Soaked at 50% of it: at 70% the backlog after each ES kill grows on 2 cores
  # (docs/RELIABILITY.md, "Soak", distributed mode).
  SOAK_CAPACITY_SECS="${SOAK_CAPACITY_SECS:-10}" SOAK_LOAD_PERCENT="${SOAK_LOAD_PERCENT:-50}" cargo test -p userseg --test soak_distributed -- --nocapture
fi
