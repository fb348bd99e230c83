#!/usr/bin/env python3
"""Samples the distributed pipeline while the load generator runs (scripts/bench.sh, scenario 3).

Usage: bench_follow.py USS_URL ES_URL TARGET_PAIRS TIMEOUT_SECS OUT.json

Every 0.5 s it reads from /metrics: pairs USS published to the broker, pairs ES's index applied
from the topic, pairs ES wrote to ClickHouse. It stops once ES has written TARGET_PAIRS pairs to
ClickHouse (or at the timeout) and writes a JSON summary: when each stage reached the target
(seconds since start), and the largest backlog between USS and ClickHouse / the index.
"""
import json
import sys
import time

from promtext import metrics

uss, es, target, timeout, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]


start = time.monotonic()
samples = []
done = {"published": None, "indexed": None, "written": None}
max_ch_backlog = max_index_backlog = 0
while time.monotonic() - start < timeout:
    t = time.monotonic() - start
    u, e = metrics(uss), metrics(es)
    published = u.get("userseg_kafka_published_pairs_total", 0)
    indexed = e.get("userseg_index_followed_pairs_total", 0)
    written = e.get("userseg_processor_pairs_written_total", 0)
    samples.append([round(t, 2), published, indexed, written])
    max_ch_backlog = max(max_ch_backlog, published - written)
    max_index_backlog = max(max_index_backlog, published - indexed)
    for k, v in (("published", published), ("indexed", indexed), ("written", written)):
        if done[k] is None and v >= target:
            done[k] = t
    if done["written"] is not None:
        break
    time.sleep(0.5)

json.dump({
    "target_pairs": target,
    "published_secs": done["published"],
    "indexed_secs": done["indexed"],
    "written_secs": done["written"],
    "max_clickhouse_backlog_pairs": max_ch_backlog,
    "max_index_backlog_pairs": max_index_backlog,
    "samples": samples,
}, open(out, "w"))
