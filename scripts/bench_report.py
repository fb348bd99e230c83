#!/usr/bin/env python3
"""Turns the JSON outputs of scripts/bench.sh into docs/BENCHMARKS.md.

Usage: bench_report.py WORK_DIR OUT.md

The report is made of named sections, each written between two markers:

    <!-- bench_report.py: NAME ... -->
    ...
    <!-- /bench_report.py: NAME -->

When OUT.md exists, only what stands between each pair of markers is replaced; everything
outside them (sections measured by hand, notes) is kept as it is. A section whose markers are
missing from OUT.md is appended at its end (with its markers, and a warning). When OUT.md does
not exist, it is written with every section in order.
"""
import datetime
import json
import os
import platform
import re
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
e_index, e_index_one = load("s3_est_index.json") or {}, load("s3_est_index_one.json") or {}
follow = load("s3_follow.json") or {}
es_rss = load("s3_es_rss.json") or {}
es_restart = load("s3_restart.json") or {}
an = load("analytics.json") or {}
ryw_idle, ryw_load = load("ryw_idle.json") or {}, load("ryw_load.json") or {}
commands = open(os.path.join(work, "commands.txt")).read().strip()
# Repo-relative commands: never this machine's absolute paths.
repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
commands = commands.replace(repo + "/", "")
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()

BEGIN = "<!-- bench_report.py: {} (written by `make bench`; edit outside these markers only) -->"
END = "<!-- /bench_report.py: {} -->"
sections = {}  # name -> lines, in the order the report writes them


def section(name):
    """Starts section NAME: what w() writes from now on goes into it."""
    global w
    sections[name] = []
    w = sections[name].append


def merge(existing, sections):
    """EXISTING's lines with the text between each section's markers replaced by the section."""
    begin = re.compile(r"^<!-- bench_report\.py: (\S+)")
    out, i, seen = [], 0, set()
    while i < len(existing):
        m = begin.match(existing[i])
        if not m or m.group(1) not in sections:
            out.append(existing[i])
            i += 1
            continue
        name = m.group(1)
        try:
            j = existing.index(END.format(name), i + 1)
        except ValueError:
            sys.exit(f"bench_report.py: no {END.format(name)!r} after line {i + 1} of {out_path}")
        out += [BEGIN.format(name)] + sections[name] + [END.format(name)]
        seen.add(name)
        i = j + 1
    for name, body in sections.items():
        if name not in seen:
            print(f"bench_report.py: no markers of section {name} in {out_path}: appended at its end",
                  file=sys.stderr)
            out += ["", BEGIN.format(name)] + body + [END.format(name)]
    return out


out_path = out
section("header")
w("# Benchmarks")
w("")
w(f"Written by `make bench` (scripts/bench.sh) on {datetime.date.today().isoformat()}, commit `{rev}`. "
  "Every figure in its sections (between `bench_report.py` markers in this file's source) comes from that run; "
  "the sections measured by hand name their own command and date. "
  "The load generator runs on the same machine as the servers.")
w("")
w(f"- machine: {os.cpu_count()} cores ({cpu_model()}), {mem_gib():.0f} GiB RAM, {platform.system()} {platform.release()}")
w("- build: `cargo build --release` (thin LTO)")
w("")
section("summary")
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


def ch_rate():
    if not s3 or not follow.get("written_secs"):
        return None
    return s3["pairs_accepted"] / follow["written_secs"]


if s3:
    r, c = e2e_rate(s3), ch_rate()
    w(f"| distributed end to end ≥ 500,000 pairs/s | {f(c, 0)} pairs/s into ClickHouse (accepted by USS / time until ES wrote the last pair); "
      f"{f(r, 0)} pairs/s counted exactly by the ES index; USS alone {f(s3['pairs_per_sec'], 0)} pairs/s | {target(c is not None and c >= 5e5)} |")
if scale:
    p99 = scale["estimate_all_ms"]["p99"]
    w(f"| estimate of all {scale['segments']} segments at {scale['live_pairs']:,} live pairs, p99 ≤ 2 ms standalone | {f(p99, 3)} ms (in process) | {target(p99 <= 2)} |")
if e_index:
    live = es_rss.get("live_pairs")
    w(f"| estimate of all segments at {f(live, 0)} live pairs, p99 ≤ 200 ms distributed | {f(e_index.get('p99_ms'), 2)} ms from the ES index over HTTP "
      f"(straight from ClickHouse: exact {f(e_exact.get('p99_ms'))} ms, approx {f(e_approx.get('p99_ms'))} ms) | {target(e_index.get('p99_ms', 1e9) <= 200)} |")
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


section("scenarios")
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
    w(f"Counted exactly by the ES index (every segment equal to the generator's own count): **{e2e_rate(s3):,.0f} pairs/s** end to end; "
      f"the index trailed the last acknowledgement by {s3['verify']['waited_secs']:.1f} s.")
    w("")
if follow:
    c = ch_rate()
    trail = None
    if follow.get("written_secs") is not None and follow.get("published_secs") is not None:
        trail = follow["written_secs"] - follow["published_secs"]
    rate = s3.get("rate_limit_pairs_per_sec") if s3 else None
    w(f"Load offered at {f(rate, 0)} pairs/s (`--rate`). Written to ClickHouse (committed by the consumer group): all {follow['target_pairs']:,} pairs "
      f"{f(follow.get('written_secs'))} s after the load started, **{f(c, 0)} pairs/s** end to end; USS had published the last of them after "
      f"{f(follow.get('published_secs'))} s, so ClickHouse trailed USS by {f(trail)} s at the end. "
      f"Largest backlog between USS and ClickHouse: {follow['max_clickhouse_backlog_pairs']:,.0f} pairs; between USS and the index: {follow['max_index_backlog_pairs']:,.0f} pairs "
      f"(sampled every 0.5 s by scripts/bench_follow.py).")
    w("")
if e_index:
    w(f"Estimates from the ES index over HTTP ({f(es_rss.get('live_pairs'), 0)} live pairs): all segments p50 {e_index['p50_ms']:.2f} ms, p99 {e_index['p99_ms']:.2f} ms; "
      f"one segment p50 {e_index_one.get('p50_ms', 0):.2f} ms, p99 {e_index_one.get('p99_ms', 0):.2f} ms ({e_index['samples']} requests each, Python client).")
    w("")
if e_exact:
    w(f"The same query answered by ClickHouse 18.16 (a second ES with `ES_INDEX=false`, cache off): exact p50 {e_exact['p50_ms']:.0f} ms, p99 {e_exact['p99_ms']:.0f} ms; "
      f"approx p50 {e_approx.get('p50_ms', 0):.0f} ms, p99 {e_approx.get('p99_ms', 0):.0f} ms ({e_exact['samples']} requests each).")
    w("")
if es_rss:
    live = es_rss.get("live_pairs") or 0
    per = es_rss["rss_kb"] * 1024 / live if live else None
    w(f"ES process RSS with the index loaded: {es_rss['rss_kb'] / 1024:,.0f} MiB ({f(per)} bytes per live pair, including the Kafka client buffers).")
    w("")
if es_restart:
    w(f"ES restart (SIGKILL, start, scan {es_restart['scanned_pairs']:,.0f} pairs out of ClickHouse, catch up the topic, serve from the index): **{es_restart['restart_secs']:.1f} s**; ClickHouse answers meanwhile.")
    w("")
section("memory")
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
section("analytics")
w("### (6) Analytics at scale (embedded store; the ES index is the same structure)")
w("")
if an:
    w(f"- {an['live_pairs']:,} live pairs, {an['users']:,} users, {an['segments']} segments (Zipf; largest {', '.join(f'{x:,}' for x in an['largest_segments'])}), {an['cores']} cores")
    w("")
    w("| query | p50 | p99 | target |")
    w("|---|---|---|---|")
    for key, name, goal in [
        ("user_lookup_ms", "user lookup (`/v1/users/{id}/segments`)", 1.0),
        ("within_1d_all_segments_ms", "`within=1d` for all segments", 5.0),
        ("expr_3_terms_largest_ms", "`segment-000 AND segment-001 AND NOT segment-002` (the largest)", 20.0),
        ("overlap_top20_ms", "overlap matrix of the 20 largest", 100.0),
        ("expr_not_largest_ms", "`NOT segment-000` (needs the universe: every segment scanned)", None),
        ("expr_3_terms_within_1d_ms", "the same expression, `within=1d`", None),
        ("overlap_top20_within_1d_ms", "the same overlap, `within=1d`", None),
        ("expr_3_terms_1d1m_later_unswept_ms", "the same expression a day and a minute later, the oldest minute expired but not yet swept", None),
        ("overlap_top20_1d1m_later_unswept_ms", "the same overlap a day and a minute later, not yet swept", None),
    ]:
        if key not in an:
            continue
        m = an[key]
        status = "" if goal is None else f"≤ {goal:g} ms: {target(m['p99'] <= goal)}"
        w(f"| {name} | {m['p50']:.3f} ms | {m['p99']:.3f} ms | {status} |")
    ex = an["export"]
    w("")
    w(f"- export of `{ex['segment']}` ({ex['members']:,} members, serialized as NDJSON on a second thread): "
      f"**{ex['members_per_second']:,.0f} members/s** ({ex['seconds']:.2f} s; target ≥ 2,000,000/s: {target(ex['members_per_second'] >= 2e6)}), "
      f"RSS grew by {ex['rss_growth_bytes'] / 2**20:,.1f} MiB during it")
    d = an["delete_10k_users"]
    w(f"- deleting 10,000 users in one request: applied in **{d['seconds'] * 1e3:,.0f} ms** ({d['found']:,} of them held; target ≤ 1 s: {target(d['seconds'] <= 1.0)})")
    w(f"- memory: **{an['rss_bytes_per_live_pair']:.1f} bytes of RSS per live pair** (segment indexes included; target ≤ 16: {target(an['rss_bytes_per_live_pair'] <= 16)})")
    w("")
if ryw_idle or ryw_load:
    w("Acknowledged → counted (standalone, over HTTP, one pair, then polling its count):")
    w("")
    for name, r in [("idle server", ryw_idle), ("under the full gRPC ingest load of (1)", ryw_load)]:
        if r:
            w(f"- {name}: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms ({r['samples']} probes)")
    w("")
section("commands")
w("## Commands")
w("")
w("```")
w(commands)
w("```")
w("")
w("Criterion micro-benchmarks of the hot paths: `cargo bench -p userseg-api --bench decode` "
  "(decode + validate a 1000-pair push), `cargo bench -p userseg-embedded --bench store` (apply, count all, count one).")
existing = None
if os.path.exists(out):
    with open(out) as fh:
        existing = fh.read().split("\n")
    if existing and existing[-1] == "":
        existing.pop()
if existing is None:
    lines = []
    for name, body in sections.items():
        lines += [BEGIN.format(name)] + body + [END.format(name)]
else:
    lines = merge(existing, sections)
with open(out, "w") as fh:
    fh.write("\n".join(lines) + "\n")
