#!/usr/bin/env python3
"""Turns the JSON outputs of scripts/bench.sh into docs/BENCHMARKS.md."""
import datetime
import json
import os
import platform
import subprocess
import sys

work, out = sys.argv[1], sys.argv[2]


def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_gib():
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
            return kb / 1024 / 1024
    except (OSError, ValueError, IndexError):
        return 0


def f(x, nd=1):
    return "n/a" if x is None else f"{x:,.{nd}f}"


def target(ok):
    return "met" if ok else "**not met**"


s1, s5, s3 = load("s1.json"), load("s5.json"), load("s3.json")
scale = load("scale.json") or {}
rss = load("s1_rss.json") or {}
h_all, h_one = load("s2_http_all.json") or {}, load("s2_http_one.json") or {}
e_exact, e_approx = load("s3_est_exact.json") or {}, load("s3_est_approx.json") or {}
commands = open(os.path.join(work, "commands.txt")).read().strip()
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

lines = []
w = lines.append
w("# Benchmarks")
w("")
w(f"Written by `make bench` (scripts/bench.sh) on {datetime.date.today().isoformat()}, commit `{rev}`. "
  "Every figure below comes from that run; the load generator runs on the same machine as the servers.")
w("")
w(f"- machine: {os.cpu_count()} cores ({cpu_model()}), {mem_gib():.0f} GiB RAM, {platform.system()} {platform.release()}")
w("- build: `cargo build --release` (thin LTO)")
w("")
w("## Summary against the targets")
w("")
w("| target | figure | status |")
w("|---|---|---|")
if s1:
    w(f"| standalone durable ingest ≥ 2,000,000 pairs/s (gRPC streaming) | {f(s1['pairs_per_sec'], 0)} pairs/s | {target(s1['pairs_per_sec'] >= 2e6)} |")
def e2e_rate(s):
    v = s.get("verify") or {}
    if not v.get("ok"):
        return None
    return s["pairs_accepted"] / (s["elapsed_secs"] + v["waited_secs"])


if s3:
    r = e2e_rate(s3)
    w(f"| distributed end to end ≥ 500,000 pairs/s | {f(r, 0)} pairs/s counted by ES (accepted by USS / (send time + lag until ES counts match)); USS alone {f(s3['pairs_per_sec'], 0)} pairs/s | {target(r is not None and r >= 5e5)} |")
if scale:
    p99 = scale["estimate_all_ms"]["p99"]
    w(f"| estimate of all {scale['segments']} segments at {scale['live_pairs']:,} live pairs, p99 ≤ 2 ms standalone | {f(p99, 3)} ms (in process) | {target(p99 <= 2)} |")
if e_exact:
    w(f"| estimate of all segments, p99 ≤ 200 ms distributed | exact {f(e_exact.get('p99_ms'))} ms, approx {f(e_approx.get('p99_ms'))} ms (HTTP) | {target(e_exact.get('p99_ms', 1e9) <= 200)} |")
if scale:
    b = scale["rss_bytes_per_live_pair"]
    w(f"| memory ≤ 16 bytes per live pair | {f(b)} bytes (RSS growth / live pairs) | {target(b <= 16)} |")
    r = scale["restart_from_snapshot_seconds"]
    w(f"| restart with {scale['live_pairs']:,} live pairs ≤ 10 s | {f(r, 2)} s | {target(r <= 10)} |")
w("")


def ingest_section(title, s):
    w(f"### {title}")
    w("")
    if not s:
        w("(no result)")
        w("")
        return
    lat = s["latency"]
    w(f"- {s['pairs_accepted']:,} pairs accepted in {s['elapsed_secs']:.1f} s: **{s['pairs_per_sec']:,.0f} pairs/s**")
    w(f"- {s['users']:,} users, {s['segments']} segments, batch {s['batch']}, concurrency {s['concurrency']}, re-sends {s['resends']:,}")
    w(f"- latency per {lat['unit']}: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms, max {lat['max_ms']:.1f} ms")
    w(f"- errors: {s['errors'] or 'none'}; retries: {s['retries']}")
    v = s.get("verify")
    if v:
        w(f"- verify: ok={v['ok']}, exact={v['exact']}, waited {v['waited_secs']:.1f} s after the last acknowledgement ({v['polls']} polls)")
    w("")


w("## Scenarios")
w("")
ingest_section("(1) Standalone ingest, gRPC streaming, durable", s1)
if rss:
    w(f"Server RSS after (1) and (5): {rss['rss_kb'] / 1024:,.0f} MiB.")
    w("")
ingest_section("(5) Standalone ingest, HTTP/JSON, same workload", s5)
w("### (2) Standalone estimate latency")
w("")
if scale:
    a, o = scale["estimate_all_ms"], scale["estimate_one_ms"]
    w(f"In process, {scale['segments']} segments, {scale['live_pairs']:,} live pairs: all segments p50 {a['p50']:.3f} ms, p99 {a['p99']:.3f} ms, max {a['max']:.3f} ms; "
      f"one segment p50 {o['p50'] * 1000:.1f} µs, p99 {o['p99'] * 1000:.1f} µs.")
if h_all:
    w(f"Over HTTP on the server loaded by (1) and (5): `GET /v1/segments` p50 {h_all['p50_ms']:.2f} ms, p99 {h_all['p99_ms']:.2f} ms; "
      f"`GET /v1/segments/grpc-0` p50 {h_one.get('p50_ms', 0):.2f} ms, p99 {h_one.get('p99_ms', 0):.2f} ms ({h_all['samples']} requests each, Python client).")
w("")
w("### (3) Distributed: USS → broker (tansu) → ES → ClickHouse 18.16")
w("")
ingest_section("ingest through USS", s3)
if s3 and e2e_rate(s3):
    w(f"End to end (until ES reports every count exactly): **{e2e_rate(s3):,.0f} pairs/s**; the lag after the last acknowledgement was {s3['verify']['waited_secs']:.1f} s.")
    w("")
if e_exact:
    w(f"Estimates from ES (cache off), all segments: exact p50 {e_exact['p50_ms']:.1f} ms, p99 {e_exact['p99_ms']:.1f} ms; "
      f"approx p50 {e_approx.get('p50_ms', 0):.1f} ms, p99 {e_approx.get('p99_ms', 0):.1f} ms ({e_exact['samples']} requests each).")
    w("")
w("### (4) Memory per live pair and restart")
w("")
if scale:
    w(f"- {scale['live_pairs']:,} live pairs, {scale['users']:,} users, {scale['segments']} segments (Zipf sizes)")
    w(f"- RSS growth per live pair: **{scale['rss_bytes_per_live_pair']:.1f} bytes** "
      f"(memberships {scale['member_bytes_per_live_pair']:.1f} bytes/pair, user dictionary {scale['dict_bytes_per_user']:.1f} bytes/user)")
    w(f"- in-process apply rate while filling: {scale['ingest_pairs_per_second']:,.0f} pairs/s")
    w(f"- snapshot: {scale['snapshot_bytes'] / 2**20:,.0f} MiB written in {scale['snapshot_write_seconds']:.2f} s; "
      f"restart (load + rebuild) **{scale['restart_from_snapshot_seconds']:.2f} s**")
    w("")
w("## Commands")
w("")
w("```")
w(commands)
w("```")
w("")
w("Criterion micro-benchmarks of the hot paths: `cargo bench -p userseg-api --bench decode` "
  "(decode + validate a 1000-pair push), `cargo bench -p userseg-embedded --bench store` (apply, count all, count one).")
with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
