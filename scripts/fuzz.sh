#!/usr/bin/env bash
# `make fuzz`: every fuzz target of the userseg-fuzz crate (fuzz/) under AFL++, coverage-guided,
# FUZZ_SECS seconds each (default 60). FUZZ_TARGETS="a b" picks targets (default: all).
# The first run installs cargo-afl and builds the instrumented binary (long: a release build of
# the workspace's dependencies, in target/fuzz).
# Findings go to target/fuzz/out/<target>/default/crashes; the run fails if there is any.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECS="${FUZZ_SECS:-60}"
scripts/install-fuzz.sh

# Instrumented build in its own target directory, so normal builds keep their cache.
export CARGO_TARGET_DIR="$PWD/target/fuzz"
# FUZZ_SKIP_BUILD=1 fuzzes the binary already built (a rerun).
if [ -z "${FUZZ_SKIP_BUILD:-}" ]; then
  cargo afl build --release -p userseg-fuzz --features afl --bin userseg-fuzz --quiet
fi
BIN="$CARGO_TARGET_DIR/release/userseg-fuzz"
OUT="$CARGO_TARGET_DIR/out"
TARGETS="${FUZZ_TARGETS:-$("$BIN" --list | cut -f1)}"

export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_QUIET=1
export AFL_NO_AFFINITY=1
failed=0
mkdir -p "$OUT"
printf '%-14s %10s %10s %8s %8s\n' target execs execs/s corpus crashes >"$OUT.summary"
for t in $TARGETS; do
  seeds="$OUT/seeds/$t"
  rm -rf "$seeds" "$OUT/$t"
  "$BIN" "$t" --seeds "$seeds"
  echo "fuzz: $t for ${FUZZ_SECS}s"
  # -t: per-input limit in ms (generous: the first runs on a loaded machine are slow).
  cargo afl fuzz -t 5000 -V "$FUZZ_SECS" -i "$seeds" -o "$OUT/$t" -- "$BIN" "$t" >"$OUT/$t.log" 2>&1 || {
    echo "fuzz: afl-fuzz failed on $t, see $OUT/$t.log"
    tail -20 "$OUT/$t.log"
    failed=1
    continue
  }
  stats="$OUT/$t/default/fuzzer_stats"
  execs=$(awk -F': *' '$1 ~ /^execs_done/ {print $2}' "$stats")
  speed=$(awk -F': *' '$1 ~ /^execs_per_sec/ {print $2}' "$stats")
  corpus=$(awk -F': *' '$1 ~ /^corpus_count/ {print $2}' "$stats")
  crashes=$(find "$OUT/$t/default/crashes" -type f -name 'id:*' | wc -l)
  printf '%-14s %10s %10s %8s %8s\n' "$t" "$execs" "$speed" "$corpus" "$crashes" >>"$OUT.summary"
  if [ "$crashes" -gt 0 ]; then
    echo "fuzz: $t found $crashes crashing inputs in $OUT/$t/default/crashes"
    failed=1
  fi
done
cat "$OUT.summary"
exit "$failed"
