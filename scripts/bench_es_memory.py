#!/usr/bin/env python3
"""Memory of the ES index per live pair (issue 11), through the real release binary.

Usage: bench_es_memory.py PAIRS USERS [ES_INDEX ...]
  env: USERSEG_TEST_KAFKA, USERSEG_TEST_CLICKHOUSE_URL (scripts/tansu.sh, scripts/clickhouse.sh),
       USERSEG (default target/release/userseg)

For each ES_INDEX mode given (default: true partitioned), in a fresh ClickHouse database and
topic: starts `userseg es` on the empty database and reads its RSS once serving (the baseline:
code, allocator, HTTP, Kafka clients with nothing buffered); then fills ClickHouse's `pairs`
with PAIRS rows (USERS users, 500 segments, every user's rows in distinct segments, ts within
the last hour) by one INSERT … SELECT FROM numbers(), restarts ES, waits until it serves from
the index, and prints one JSON line: live pairs, users, the index's own accounting
(userseg_index_memory_bytes: members + dictionary), RSS, and bytes per live pair of each.
The partitioned mode runs one ES owning all six partitions (six shards).
"""
import json
import os
import subprocess
import sys
import time

from benchlib import clickhouse_sql, free_port
from promtext import metrics

pairs, users = int(sys.argv[1]), int(sys.argv[2])
modes = sys.argv[3:] or ["true", "partitioned"]
kafka = os.environ["USERSEG_TEST_KAFKA"]
ch = os.environ["USERSEG_TEST_CLICKHOUSE_URL"]
binary = os.environ.get("USERSEG", "target/release/userseg")



def env_for(db, topic, mode, port):
    e = dict(os.environ)
    e.update({
        "KAFKA_BROKER_URL": kafka, "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq",
        "KAFKA_GROUP_ID": topic + "-es", "KAFKA_PARTITIONS": "6",
        "CLICKHOUSE_ADDR": ch, "CLICKHOUSE_DATABASE": db, "ES_INDEX": mode,
        "ES_PEERS": f"http://127.0.0.1:{port}", "SERVICE_PORT": str(port),
        "KAFKA_STATS_INTERVAL": "5s", "HISTORY_INTERVAL": "1h", "LOG_FORMAT": "json",
    })
    return e


def serve(db, topic, mode, timeout=1800):
    """Starts ES, waits until it serves from the index; (process, base, seconds)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(f"/tmp/bench-es-memory-{db}.log", "ab")
    p = subprocess.Popen([binary, "es"], env=env_for(db, topic, mode, port), stdout=log, stderr=log)
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        m = metrics(base)
        if m.get("userseg_index_serving") == 1.0:
            return p, base, time.monotonic() - start
        if p.poll() is not None:
            sys.exit(f"es exited: see /tmp/bench-es-memory-{db}.log")
        time.sleep(0.5)
    sys.exit("es never served from the index")


def settle(base, key="process_resident_memory_bytes"):
    """The gauges once the size gauges were refreshed (every 5 s) and RSS is steady."""
    time.sleep(6)
    last = None
    for _ in range(20):
        m = metrics(base)
        if last and abs(m.get(key, 0) - last.get(key, 0)) < 1 << 20:
            return m
        last = m
        time.sleep(2)
    return last


for mode in modes:
    tag = "part" if mode == "partitioned" else "full"
    db = f"memb_{tag}_{int(time.time())}"
    topic = f"memb-{tag}-{int(time.time())}"
    subprocess.run([binary, "migrate"], env=env_for(db, topic, mode, 0), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    p, base, _ = serve(db, topic, mode)
    empty = settle(base)
    p.terminate(); p.wait()
    t0 = time.monotonic()
    clickhouse_sql(ch, f"INSERT INTO {db}.pairs (segment, user_id, ts) SELECT "
        f"concat('seg-', toString((intDiv(number, {users}) * 37 + (number % {users}) * 13) % 500)), "
        f"concat('user-', toString(number % {users})), now() - (number % 3600) "
        f"FROM numbers({pairs})")
    insert_secs = time.monotonic() - t0
    p, base, load_secs = serve(db, topic, mode)
    # The size gauges are refreshed every 5 s: wait until they show every row.
    while metrics(base).get("userseg_index_live_pairs", 0) < pairs:
        time.sleep(1)
    load_secs = time.monotonic() - t0 - insert_secs
    m = settle(base)
    p.terminate(); p.wait()
    live = m["userseg_index_live_pairs"]
    rss, rss0 = m["process_resident_memory_bytes"], empty["process_resident_memory_bytes"]
    acct = m["userseg_index_memory_bytes"]
    print(json.dumps({
        "es_index": mode, "pairs_inserted": pairs, "live_pairs": int(live),
        "users": int(m["userseg_index_users"]), "insert_secs": round(insert_secs, 1),
        "serving_after_secs": round(load_secs, 1),
        "rss_empty_mib": round(rss0 / 2**20, 1), "rss_loaded_mib": round(rss / 2**20, 1),
        "rss_growth_bytes_per_pair": round((rss - rss0) / live, 2),
        "rss_bytes_per_pair": round(rss / live, 2),
        "index_accounting_bytes_per_pair": round(acct / live, 2),
    }), flush=True)
    clickhouse_sql(ch, f"DROP DATABASE {db}")
