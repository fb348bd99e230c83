#!/usr/bin/env bash
# `make soak`: the long soak with kills (docs/RELIABILITY.md#soak). Builds the release binary,
# then runs crates/userseg/tests/soak.rs against it: standalone at ~70% of the capacity measured
# on this machine, SIGKILLed every SOAK_KILL_EVERY seconds (default 60) for SOAK_SECS seconds
# (default 600), exact counts and flat RSS checked at the end. `make test` runs the same test in
# its short form (30 s, a kill every 10 s, the debug binary).
set -euo pipefail
cd "$(dirname "$0")/.."

export SOAK_SECS="${SOAK_SECS:-600}"
export SOAK_KILL_EVERY="${SOAK_KILL_EVERY:-60}"
export SOAK_CAPACITY_SECS="${SOAK_CAPACITY_SECS:-15}"
cargo build --release -p userseg
export SOAK_BIN="$PWD/target/release/userseg"
cargo test -p userseg --test soak -- --nocapture
