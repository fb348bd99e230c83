#!/usr/bin/env bash
# `make bench`: runs the benchmark scenarios on this machine and writes docs/BENCHMARKS.md.
# scripts/bench_report.py rewrites only its own sections there (between its markers): every
# figure in them comes from this script's runs; the sections measured by hand stay as they are.
#
# Sizes can be lowered for a quick run, e.g. BENCH_SCALE_PAIRS=5000000 BENCH_INGEST_SECS=10.
set -euo pipefail
cd "$(dirname "$0")/.."

INGEST_SECS="${BENCH_INGEST_SECS:-30}"          # (1) and (5): seconds of sustained ingest
SCALE_PAIRS="${BENCH_SCALE_PAIRS:-50000000}"     # (2) and (4): live pairs in the store
SCALE_USERS="${BENCH_SCALE_USERS:-10000000}"
SEGMENTS="${BENCH_SEGMENTS:-500}"
DIST_PAIRS="${BENCH_DIST_PAIRS:-65000000}"       # (3): pairs through USS → broker → ES (≈50M live)
DIST_USERS="${BENCH_DIST_USERS:-30000000}"
DIST_RATE="${BENCH_DIST_RATE:-550000}"           # (3): pairs/s offered to USS (sustained, paced)
OUT="${BENCH_OUT:-docs/BENCHMARKS.md}"
# Which parts to run (a quick look at one of them: BENCH_PARTS=3 BENCH_OUT=/tmp/b.md).
PARTS="${BENCH_PARTS:-standalone scale analytics 3}"
part() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo "bench: building release binaries"
cargo build --release --quiet -p userseg
cargo build --release --quiet -p userseg-embedded --example scale --example analytics
BIN="$PWD/target/release/userseg"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  scripts/tansu.sh stop "$WORK/tansu" >/dev/null 2>&1 || true
  scripts/clickhouse.sh stop "$WORK/clickhouse" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_ready() {
  for _ in $(seq 1 600); do
    curl -fsS "$1/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "bench: $1 never became ready" >&2; return 1
}
# Acknowledged -> visible: N times, push one pair of a new segment and poll its count until it
# is 1; p50/p99/max in ms from the acknowledgement, as JSON.
ack_to_visible() {
  python3 - "$1" "${2:-50}" "$3" <<'PY'
import http.client, json, sys, time, urllib.parse
u = urllib.parse.urlparse(sys.argv[1]); n = int(sys.argv[2]); tag = sys.argv[3]
c = http.client.HTTPConnection(u.hostname, u.port)
lat = []
for i in range(n):
    seg = f"ryw-{tag}-{i}"
    body = json.dumps({"pairs": [{"user_id": "probe", "segment": seg}]})
    c.request("POST", "/v1/pairs", body, {"content-type": "application/json"}); r = c.getresponse(); r.read()
    acked = time.perf_counter()
    while True:
        c.request("GET", f"/v1/segments/{seg}"); r = c.getresponse(); v = json.loads(r.read())
        if v.get("users") == 1:
            break
    lat.append((time.perf_counter() - acked) * 1e3)
    time.sleep(0.02)
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat)//2], "p99_ms": lat[int(len(lat)*0.99)-1], "max_ms": lat[-1], "samples": n}))
PY
}
# p50/p99/max latency in ms of N GETs of a URL (keep-alive), as JSON.
http_latency() {
  python3 - "$1" "${2:-500}" <<'PY'
import http.client, json, sys, time, urllib.parse
u = urllib.parse.urlparse(sys.argv[1]); n = int(sys.argv[2])
c = http.client.HTTPConnection(u.hostname, u.port)
lat = []
for _ in range(n):
    path = u.path + ("?" + u.query if u.query else "")
    t = time.perf_counter(); c.request("GET", path); r = c.getresponse(); r.read()
    lat.append((time.perf_counter() - t) * 1e3)
lat.sort()
print(json.dumps({"p50_ms": lat[len(lat)//2], "p99_ms": lat[int(len(lat)*0.99)-1], "max_ms": lat[-1], "samples": n}))
PY
}

COMMANDS=()
# Commands are recorded repo-relative (the report must not name this machine's paths).
run() { COMMANDS+=("${*//$PWD\//}"); "$@"; }

# (1) and (5): standalone ingest, durable (fdatasync before every acknowledgement).
if part standalone; then
PORT=$(free_port); URL="http://127.0.0.1:$PORT"
DATA_DIR="$WORK/standalone" SERVICE_PORT=$PORT BATCH_SIZE=100000 FLUSH_INTERVAL=200ms \
  "$BIN" standalone 2>"$WORK/standalone.log" & PIDS+=($!)
wait_ready "$URL"
echo "bench: acknowledged -> visible on the idle server"
ack_to_visible "$URL" 50 idle >"$WORK/ryw_idle.json"
echo "bench: (1) standalone ingest over gRPC streaming, ${INGEST_SECS}s"
run "$BIN" load --target "$URL" --protocol grpc --users 5000000 --segments "$SEGMENTS" \
  --duration "${INGEST_SECS}s" --batch 10000 --concurrency 4 --segment-prefix grpc- --json >"$WORK/s1.json" &
LOAD=$!
sleep $(( INGEST_SECS / 3 ))
echo "bench: acknowledged -> visible under full gRPC load"
ack_to_visible "$URL" 30 load >"$WORK/ryw_load.json"
wait "$LOAD"
echo "bench: (5) the same workload over HTTP/JSON"
run "$BIN" load --target "$URL" --protocol http --users 5000000 --segments "$SEGMENTS" \
  --duration "${INGEST_SECS}s" --batch 10000 --concurrency 4 --segment-prefix http- --json >"$WORK/s5.json"
echo "bench: estimate latency over HTTP on the loaded standalone server"
sleep 1
http_latency "$URL/v1/segments" 500 >"$WORK/s2_http_all.json"
http_latency "$URL/v1/segments/grpc-0" 500 >"$WORK/s2_http_one.json"
RSS_KB=$(ps -o rss= -p "${PIDS[0]}" | tr -d ' ')
echo "{\"rss_kb\": $RSS_KB}" >"$WORK/s1_rss.json"
kill -TERM "${PIDS[0]}"; wait "${PIDS[0]}" || true; PIDS=()
fi

# (2) and (4): the store at scale, in process: memory per live pair, estimates, restart.
echo "bench: (2)+(4) embedded store with $SCALE_PAIRS live pairs"
part scale && SCALE_DIR="$WORK/scale" run target/release/examples/scale "$SCALE_PAIRS" "$SEGMENTS" "$SCALE_USERS" >"$WORK/scale.json"

# (6): analytics of the store at scale, in process: user lookup, within, expressions, overlap,
# export, deletion, memory.
echo "bench: (6) analytics with $SCALE_PAIRS live pairs"
part analytics && run target/release/examples/analytics "$SCALE_PAIRS" "$SEGMENTS" "$SCALE_USERS" >"$WORK/analytics.json"

# (3): distributed ingest through USS -> broker -> ES -> ClickHouse.
if part 3; then
echo "bench: (3) distributed, $DIST_PAIRS pairs offered at $DIST_RATE pairs/s"
scripts/install-deps.sh >/dev/null
mkdir -p "$WORK/tansu" "$WORK/clickhouse"
scripts/tansu.sh start "$WORK/tansu" >/dev/null
scripts/clickhouse.sh start "$WORK/clickhouse" >/dev/null
set -a; . "$WORK/tansu/tansu.env"; . "$WORK/clickhouse/clickhouse.env"; set +a
export KAFKA_BROKER_URL="$USERSEG_TEST_KAFKA" CLICKHOUSE_ADDR="$USERSEG_TEST_CLICKHOUSE_URL" \
  CLICKHOUSE_DATABASE=bench KAFKA_TOPIC=bench KAFKA_DLQ_TOPIC=bench-dlq KAFKA_GROUP_ID=bench
"$BIN" migrate >/dev/null
USS_PORT=$(free_port); ES_PORT=$(free_port); ES2_PORT=$(free_port)
USS="http://127.0.0.1:$USS_PORT"; ES="http://127.0.0.1:$ES_PORT"
SERVICE_PORT=$USS_PORT "$BIN" uss 2>"$WORK/uss.log" & PIDS+=($!)
es_index() {
  SERVICE_PORT=$ES_PORT BATCH_SIZE=200000 FLUSH_INTERVAL=1s ESTIMATE_CACHE_TTL=0s \
    "$BIN" es 2>>"$WORK/es.log" & ES_PID=$!; PIDS+=($ES_PID)
}
es_index
wait_ready "$USS"; wait_ready "$ES"
metric() { curl -fsS "$1/metrics" 2>/dev/null | awk -v m="$2" '$1 == m {s += $2} END {print s + 0}'; }
wait_serving() {
  for _ in $(seq 1 6000); do
    [ "$(metric "$ES" userseg_index_serving)" = "1" ] && return 0
    sleep 0.1
  done
  echo "bench: the ES index never caught up" >&2; return 1
}
wait_serving
# While the load generator pushes to USS and then verifies every count against ES (its index),
# bench_follow.py samples how far the index and the ClickHouse writer trail USS, until
# ClickHouse holds every pair.
python3 scripts/bench_follow.py "$USS" "$ES" "$DIST_PAIRS" 1800 "$WORK/s3_follow.json" & FOLLOW=$!
run "$BIN" load --target "$USS" --verify-target "$ES" \
  --protocol grpc --users "$DIST_USERS" --segments "$SEGMENTS" --pairs "$DIST_PAIRS" --batch 10000 \
  --rate "$DIST_RATE" --stream-batches 8 --concurrency 4 --verify --verify-timeout 900s --json >"$WORK/s3.json" || true
wait "$FOLLOW" || true
echo "bench: (3) estimates from the ES index"
http_latency "$ES/v1/segments" 500 >"$WORK/s3_est_index.json"
http_latency "$ES/v1/segments/seg-0" 500 >"$WORK/s3_est_index_one.json"
echo "{\"rss_kb\": $(ps -o rss= -p "$ES_PID" | tr -d ' '), \"live_pairs\": $(metric "$ES" userseg_index_live_pairs)}" >"$WORK/s3_es_rss.json"
echo "bench: (3) estimates straight from ClickHouse (a second ES with ES_INDEX=false)"
SERVICE_PORT=$ES2_PORT ES_INDEX=false ESTIMATE_CACHE_TTL=0s "$BIN" es 2>"$WORK/es2.log" & ES2_PID=$!; PIDS+=($ES2_PID)
wait_ready "http://127.0.0.1:$ES2_PORT"
http_latency "http://127.0.0.1:$ES2_PORT/v1/segments" 10 >"$WORK/s3_est_exact.json" || true
http_latency "http://127.0.0.1:$ES2_PORT/v1/segments?mode=approx" 10 >"$WORK/s3_est_approx.json" || true
kill -TERM "$ES2_PID"; wait "$ES2_PID" || true
echo "bench: (3) ES restart: scan ClickHouse + catch up the topic"
kill -KILL "$ES_PID"; wait "$ES_PID" || true
T0=$(date +%s.%N); es_index; wait_serving; T1=$(date +%s.%N)
python3 -c "import json,sys; print(json.dumps({'restart_secs': $T1 - $T0, 'scanned_pairs': float(sys.argv[1])}))" \
  "$(metric "$ES" userseg_index_scanned_pairs_total)" >"$WORK/s3_restart.json"
fi

printf '%s\n' "${COMMANDS[@]}" >"$WORK/commands.txt"
python3 scripts/bench_report.py "$WORK" "$OUT"
echo "bench: wrote $OUT"
