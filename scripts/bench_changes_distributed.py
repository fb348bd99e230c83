#!/usr/bin/env python3
"""The distributed change feed under full ingest (issue 13), through the real release binaries.

Usage: bench_changes_distributed.py [SECS] [USERS]
  env: USERSEG_TEST_KAFKA, USERSEG_TEST_CLICKHOUSE_URL (scripts/tansu.sh, scripts/clickhouse.sh),
       USERSEG (default target/release/userseg), BENCH_FEED (default off,on: the runs),
       BENCH_PARTITIONS (default 6: KAFKA_PARTITIONS of both topics)

Twice, feed off then on (KAFKA_CHANGES_TOPIC), each in a fresh ClickHouse database and topics:
starts USS and one ES (full index), waits until ES serves, pushes `userseg load` unpaced through
USS for SECS seconds (default 20) with USERS users (default 5,000,000: nearly every pair is a new
membership, so nearly every pair is an `entered` event, the feed's worst case), then waits until
ES has written every accepted pair into ClickHouse. Prints one JSON line per run: pairs accepted,
ES's sustained write rate into ClickHouse (pairs written / time from the load's start until the
last was written), events published per second over the same time, the time ES's writes waited
for the feed's gate; then the feed's cost on ES's ingest rate.
"""
import json
import os
import subprocess
import sys
import time

from benchlib import clickhouse_sql, free_port
from promtext import metrics

secs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
users = int(sys.argv[2]) if len(sys.argv) > 2 else 5_000_000
kafka = os.environ["USERSEG_TEST_KAFKA"]
ch = os.environ["USERSEG_TEST_CLICKHOUSE_URL"]
binary = os.environ.get("USERSEG", "target/release/userseg")



def env_for(db, topic, port, feed):
    e = dict(os.environ)
    e.update({
        "KAFKA_BROKER_URL": kafka, "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq",
        "KAFKA_GROUP_ID": topic + "-es",
        "KAFKA_PARTITIONS": os.environ.get("BENCH_PARTITIONS", "6"),
        "CLICKHOUSE_ADDR": ch, "CLICKHOUSE_DATABASE": db, "SERVICE_PORT": str(port),
        "HISTORY_INTERVAL": "1h", "LOG_FORMAT": "json",
    })
    if feed:
        e["KAFKA_CHANGES_TOPIC"] = topic + "-changes"
    return e


def start(role, db, topic, feed, log):
    port = free_port()
    p = subprocess.Popen([binary, role], env=env_for(db, topic, port, feed), stdout=log,
                         stderr=log)
    return p, f"http://127.0.0.1:{port}"


def wait_for(what, cond, timeout=600):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.2)


def hist_sum(m, name):
    return m.get(name + "_sum", 0.0)


results = {}
modes = os.environ.get("BENCH_FEED", "off,on").split(",")
for feed in [m == "on" for m in modes]:
    tag = "on" if feed else "off"
    stamp = int(time.time())
    db, topic = f"chbench_{tag}_{stamp}", f"chbench-{tag}-{stamp}"
    log = open(f"/tmp/bench-changes-{db}.log", "ab")
    subprocess.run([binary, "migrate"], env=env_for(db, topic, 0, feed), check=True,
                   stdout=log, stderr=log)
    es, es_base = start("es", db, topic, feed, log)
    uss, uss_base = start("uss", db, topic, feed, log)
    wait_for("ES serves", lambda: metrics(es_base).get("userseg_index_serving") == 1.0)
    before = metrics(es_base)
    t0 = time.monotonic()
    out = subprocess.run(
        [binary, "load", "--target", uss_base, "--duration", f"{secs}s", "--users", str(users),
         "--segments", "100", "--json"],
        check=True, capture_output=True, text=True).stdout
    load = json.loads(out.strip().splitlines()[-1])
    accepted = int(load["pairs_accepted"])
    written0 = before.get("userseg_processor_pairs_written_total", 0)
    wait_for("ES wrote every accepted pair", lambda: metrics(es_base).get(
        "userseg_processor_pairs_written_total", 0) - written0 >= accepted, timeout=1800)
    elapsed = time.monotonic() - t0
    after = metrics(es_base)
    emitted = after.get("userseg_changes_emitted_total", 0) - before.get(
        "userseg_changes_emitted_total", 0)
    gate = hist_sum(after, "userseg_processor_gate_wait_seconds") - hist_sum(
        before, "userseg_processor_gate_wait_seconds")
    results[tag] = {
        "feed": tag, "load_secs": secs, "users": users, "pairs_accepted": accepted,
        "uss_pairs_per_sec": round(load["pairs_per_sec"]),
        "es_written_pairs_per_sec": round(accepted / elapsed),
        "written_after_secs": round(elapsed, 1),
        "events_published": int(emitted), "events_per_sec": round(emitted / elapsed),
        "gate_wait_secs": round(gate, 1),
    }
    print(json.dumps(results[tag]), flush=True)
    for p in (uss, es):
        p.terminate()
        p.wait()
    clickhouse_sql(ch, f"DROP DATABASE {db}")

if "off" in results and "on" in results:
    off, on = results["off"]["es_written_pairs_per_sec"], results["on"]["es_written_pairs_per_sec"]
    print(json.dumps({"feed_cost_on_es_ingest_percent": round(100 * (off - on) / off, 1)}),
          flush=True)
