#!/usr/bin/env python3
"""`make bench-scale`: the standalone mode at scale, end to end through the real release binary
(issue 11: a billion live pairs, 10 M users, 500 segments on one box).

Starts `userseg standalone` on a fresh DATA_DIR, fills it over gRPC with `userseg load --fill`
(every membership of a Zipf workload solved for SCALE_PAIRS live pairs sent once, user by
user, so a user's segments share a request), and measures:

- sustained durable ingest: pairs acknowledged per second (every acknowledgement follows the
  log's fdatasync), over the whole fill and over its last quarter (at size);
- ingest latency p99 (per PushStream unit) of the units that overlapped a snapshot against those
  that did not (snapshots are the server's own: CHECKPOINT_LOG_BYTES of new log, default
  256 MiB; each logs "wrote a snapshot" with its duration, which gives its interval);
- RSS (/proc/PID/status VmRSS) per live pair, live pairs counted by the binary (the sum of
  `GET /v1/segments`, and the `userseg_embedded_live_pairs` gauge);
- the estimate of all segments (`GET /v1/segments`) p50/p99 over SCALE_ESTIMATES requests;
- restart: SIGKILL (snapshot + log tail) and SIGTERM (final snapshot), each followed by a start
  on the same DATA_DIR, timed until `/readyz` answers 200 and until the counts are back.

Prints one JSON object and writes the figures into SCALE_OUT (docs/BENCHMARKS.md) between the
markers `<!-- bench-scale:begin -->` and `<!-- bench-scale:end -->`, one block per size (a
later run of the same size replaces its block; the rest of the file is left as it is).
DATA_DIR is removed at the end, also on failure.

Environment: SCALE_PAIRS (1000000000), SCALE_USERS (10000000), SCALE_SEGMENTS (500),
SCALE_CONCURRENCY (4), SCALE_BATCH (10000), SCALE_STREAM_BATCHES (4), SCALE_ESTIMATES (1000),
SCALE_TAG (a label for a run with other server settings: its own block), SCALE_MIN_FREE_GIB
(3: the run stops when the disk of DATA_DIR has less free, or memory half of it),
SCALE_DATA_DIR (a fresh directory under /tmp), SCALE_OUT (docs/BENCHMARKS.md; empty: print
only), USERSEG (target/release/userseg). Server settings (CHECKPOINT_LOG_BYTES, ...) pass
through the environment.
"""
import datetime
import http.client
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from benchlib import free_port

PAIRS = int(os.environ.get("SCALE_PAIRS", "1000000000"))
USERS = int(os.environ.get("SCALE_USERS", "10000000"))
SEGMENTS = int(os.environ.get("SCALE_SEGMENTS", "500"))
CONCURRENCY = os.environ.get("SCALE_CONCURRENCY", "4")
BATCH = os.environ.get("SCALE_BATCH", "10000")
STREAM_BATCHES = os.environ.get("SCALE_STREAM_BATCHES", "4")
ESTIMATES = int(os.environ.get("SCALE_ESTIMATES", "1000"))
# A label for runs with other server settings (e.g. "change feed off"): its own block.
TAG = os.environ.get("SCALE_TAG", "")
# The fill stops (server and load generator killed) when the disk of DATA_DIR or the memory
# would run this low: the machine is shared.
MIN_FREE_DISK = int(float(os.environ.get("SCALE_MIN_FREE_GIB", "3")) * 2**30)
MIN_FREE_MEM = int(float(os.environ.get("SCALE_MIN_FREE_GIB", "3")) * 2**30 / 2)
OUT = os.environ.get("SCALE_OUT", "docs/BENCHMARKS.md")
BINARY = os.environ.get("USERSEG", "target/release/userseg")
BEGIN, END = "<!-- bench-scale:begin -->", "<!-- bench-scale:end -->"


def log(msg):
    print(f"bench-scale: {msg}", file=sys.stderr, flush=True)



def rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_secs(pid):
    """User + system CPU seconds of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def dir_bytes(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(root, name))
            except OSError:
                pass
    return total


class Server:
    """One `userseg standalone` process on DATA_DIR, its JSON log appended to a file."""

    def __init__(self, data_dir, port, log_path):
        self.data_dir, self.port, self.log_path = data_dir, port, log_path
        self.proc = None

    def start(self):
        env = dict(os.environ)
        env.update({"DATA_DIR": self.data_dir, "SERVICE_PORT": str(self.port),
                    "SERVICE_HOST": "127.0.0.1", "LOG_FORMAT": "json"})
        out = open(self.log_path, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([BINARY, "standalone"], env=env, stdout=out, stderr=out)
        out.close()

    def get(self, path, timeout=10.0):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def wait_ready(self, limit=3600):
        """Seconds from start until /readyz answers 200."""
        while time.monotonic() - self.started < limit:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited ({self.proc.returncode}); see {self.log_path}")
            try:
                status, _ = self.get("/readyz", timeout=1.0)
                if status == 200:
                    return time.monotonic() - self.started
            except OSError:
                pass
            time.sleep(0.05)
        sys.exit(f"the server was not ready after {limit} s; see {self.log_path}")

    def live_pairs(self):
        """Live pairs as the binary counts them: the sum of every segment's users."""
        status, body = self.get("/v1/segments", timeout=60.0)
        if status != 200:
            raise OSError(f"GET /v1/segments: {status} {body[:200]!r}")
        return sum(s["users"] for s in json.loads(body)["segments"])

    def wait_live(self, expected, limit=3600):
        """Seconds from start until the counts add up to `expected` (or the last count)."""
        got = -1
        while time.monotonic() - self.started < limit:
            try:
                got = self.live_pairs()
                if got == expected:
                    return time.monotonic() - self.started, got
            except OSError:
                pass
            time.sleep(0.2)
        return None, got

    def metric(self, name):
        _, body = self.get("/metrics")
        total = None
        for line in body.decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
        return total

    def route_buckets(self, route):
        """Cumulative counts of userseg_http_request_duration_seconds for `route`, by `le`."""
        _, body = self.get("/metrics")
        out = {}
        for line in body.decode().splitlines():
            if (line.startswith("userseg_http_request_duration_seconds_bucket{")
                    and f'route="{route}"' in line):
                le = re.search(r'le="([^"]+)"', line).group(1)
                out[le] = out.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def stop(self, sig):
        """Sends `sig` and waits for the exit; seconds it took."""
        t = time.monotonic()
        self.proc.send_signal(sig)
        self.proc.wait()
        return time.monotonic() - t


def snapshots(log_path, since_ms=0):
    """(start_ms, end_ms) of each "wrote a snapshot" in the server's JSON log."""
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            if "wrote a snapshot" not in line:
                continue
            try:
                e = json.loads(line)
                ts = e["timestamp"].replace("Z", "+00:00")
                # Python 3.11 parses at most 6 fractional digits.
                ts = re.sub(r"(\.\d{6})\d+", r"\1", ts)
                end = datetime.datetime.fromisoformat(ts).timestamp() * 1000
                start = end - float(e.get("elapsed_ms", 0))
            except (ValueError, KeyError):
                continue
            if end >= since_ms:
                out.append((start, end))
    return out


def quantile(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, int(q * len(v)))]


def ingest_figures(latency_log, snaps):
    """Throughput over time and latency in / out of snapshots, from `userseg load --latency-log`."""
    units = []
    with open(latency_log) as f:
        for line in f:
            start, lat_us, pairs = (int(x) for x in line.split())
            units.append((start, start + lat_us / 1000.0, lat_us / 1000.0, pairs))
    if not units:
        return {}
    t0 = min(u[0] for u in units)
    t1 = max(u[1] for u in units)
    span = max(t1 - t0, 1.0)
    last_q = t0 + 0.75 * span
    pairs_last_q = sum(u[3] for u in units if u[1] >= last_q)
    during, outside = [], []
    for start, end, lat, _ in units:
        if any(start < s_end and end > s_start for s_start, s_end in snaps):
            during.append(lat)
        else:
            outside.append(lat)
    return {
        "units": len(units),
        "rate_last_quarter": pairs_last_q / (0.25 * span / 1000.0),
        "p99_outside_ms": quantile(outside, 0.99), "p50_outside_ms": quantile(outside, 0.5),
        "units_outside": len(outside),
        "p99_during_ms": quantile(during, 0.99), "p50_during_ms": quantile(during, 0.5),
        "units_during": len(during),
    }


def estimate_latency(server, n):
    """p50/p99 (ms) of GET /v1/segments over one keep-alive connection."""
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        c.request("GET", "/v1/segments")
        r = c.getresponse()
        r.read()
        times.append((time.perf_counter() - t) * 1000)
        if r.status != 200:
            sys.exit(f"GET /v1/segments: {r.status}")
    c.close()
    return quantile(times, 0.5), quantile(times, 0.99)


def main():
    if not os.path.exists(BINARY):
        sys.exit(f"{BINARY} is missing: cargo build --release -p userseg")
    base_dir = os.environ.get("SCALE_DATA_DIR") or tempfile.mkdtemp(prefix="userseg-scale-")
    data_dir = os.path.join(base_dir, "data")
    if os.path.exists(data_dir):
        sys.exit(f"{data_dir} exists: the benchmark needs a fresh DATA_DIR")
    os.makedirs(data_dir)
    work = tempfile.mkdtemp(prefix="userseg-scale-work-")
    server_log = os.path.join(work, "server.log")
    latency_log = os.path.join(work, "latency.log")
    port = free_port()
    server = Server(data_dir, port, server_log)
    r = {"live_pairs_target": PAIRS, "tag": TAG,
         "server_env": {k: v for k, v in os.environ.items()
                        if k in ("CHECKPOINT_LOG_BYTES", "CHECKPOINT_INTERVAL", "CHANGES_RETENTION",
                                 "BATCH_SIZE", "FLUSH_INTERVAL", "MAX_INFLIGHT_PAIRS")}, "users": USERS, "segments": SEGMENTS,
         "cores": os.cpu_count(), "load_before": loadavg(),
         "date": datetime.date.today().isoformat()}
    try:
        r["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()
    except OSError:
        r["commit"] = "?"
    try:
        run(server, r, data_dir, latency_log, server_log)
    finally:
        if server.proc and server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
        shutil.rmtree(base_dir if not os.environ.get("SCALE_DATA_DIR") else data_dir,
                      ignore_errors=True)
        log(f"removed {data_dir}; server log and latencies in {work}")
    print(json.dumps(r), flush=True)
    if OUT:
        write_doc(r)
        log(f"wrote {OUT}")


def run(server, r, data_dir, latency_log, server_log):
    server.start()
    server.wait_ready()
    r["rss_empty_bytes"] = rss_bytes(server.proc.pid)
    cmd = [BINARY, "load", "--target", f"http://127.0.0.1:{server.port}", "--json",
           "--fill", str(PAIRS), "--users", str(USERS), "--segments", str(SEGMENTS),
           "--batch", BATCH, "--stream-batches", STREAM_BATCHES, "--concurrency", CONCURRENCY,
           "--latency-log", latency_log]
    r["load_command"] = " ".join(["userseg"] + cmd[1:3] + ["http://127.0.0.1:PORT"] + cmd[4:-2])
    log(f"filling {PAIRS:,} live pairs ({USERS:,} users, {SEGMENTS} segments)")
    peak = [0]
    done = threading.Event()
    stopped = []

    def sample():
        last = time.monotonic()
        while not done.wait(1.0):
            peak[0] = max(peak[0], rss_bytes(server.proc.pid))
            disk, mem = shutil.disk_usage(data_dir).free, mem_available()
            if disk < MIN_FREE_DISK or mem < MIN_FREE_MEM:
                stopped.append(f"stopped the fill after {time.time() - t_fill / 1000:.0f} s (RSS "
                               f"{peak[0] / 2**30:.1f} GiB): "
                               f"{disk / 2**30:.1f} GiB free on disk, {mem / 2**30:.1f} GiB of "
                               f"memory available (SCALE_MIN_FREE_GIB)")
                server.proc.kill()
                loader.kill()
                return
            if time.monotonic() - last >= 30:
                last = time.monotonic()
                log(f"  RSS {peak[0] / 2**30:.2f} GiB, DATA_DIR {dir_bytes(data_dir) / 2**30:.2f} "
                    f"GiB, load {loadavg()}")

    sampler = threading.Thread(target=sample, daemon=True)
    t_fill = time.time() * 1000
    cpu0, child0 = cpu_secs(server.proc.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy_metrics = ["userseg_wal_commit_seconds", "userseg_processor_write_seconds",
                    "userseg_ingest_publish_seconds"]
    busy0 = {m: (server.metric(m + "_sum") or 0, server.metric(m + "_count") or 0)
             for m in busy_metrics}
    loader = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler.start()
    stdout, stderr = loader.communicate()
    load = subprocess.CompletedProcess(cmd, loader.returncode, stdout, stderr)
    child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r["server_cpu_secs"] = cpu_secs(server.proc.pid) - cpu0
    if not stopped:
        for m in busy_metrics:
            total, count = server.metric(m + "_sum") or 0, server.metric(m + "_count") or 0
            r[m] = {"secs": total - busy0[m][0], "count": count - busy0[m][1]}
    r["loadgen_cpu_secs"] = (child1.ru_utime + child1.ru_stime) - (child0.ru_utime + child0.ru_stime)
    done.set()
    sampler.join()
    if stopped:
        sys.exit(f"bench-scale: {stopped[0]}")
    if load.returncode != 0:
        sys.exit(f"userseg load failed ({load.returncode}): {load.stdout} {load.stderr}")
    summary = json.loads(load.stdout.strip().splitlines()[-1])
    memberships = summary["fill"]["memberships"]
    r.update({
        "memberships": memberships, "skew": summary["fill"]["skew"],
        "pairs_accepted": summary["pairs_accepted"], "fill_secs": summary["elapsed_secs"],
        "ingest_pairs_per_sec": summary["pairs_per_sec"], "retries": summary["retries"],
        "errors": summary["errors"], "load_during": loadavg(),
    })
    t = time.monotonic()
    applied, live = server.wait_live(memberships)
    r["applied_after_secs"] = time.monotonic() - t
    r["live_pairs"] = live
    if live != memberships:
        sys.exit(f"the server counts {live} live pairs, the fill sent {memberships}")
    snaps = snapshots(server_log, t_fill)
    r["snapshots_during_fill"] = len(snaps)
    r["snapshot_secs_max"] = max(((e - s) / 1000 for s, e in snaps), default=None)
    r.update(ingest_figures(latency_log, snaps))
    r["data_dir_bytes"] = dir_bytes(data_dir)
    # RSS once settled; the gauge of live pairs is refreshed with the expiry sweep (every 60 s).
    deadline = time.monotonic() + 75
    gauge = None
    while time.monotonic() < deadline:
        gauge = server.metric("userseg_embedded_live_pairs")
        if gauge == memberships:
            break
        time.sleep(1)
    r["live_pairs_gauge"] = gauge
    r["store_bytes"] = server.metric("userseg_embedded_memory_bytes")
    r["rss_bytes"] = rss_bytes(server.proc.pid)
    r["rss_peak_bytes"] = max(peak[0], r["rss_bytes"])
    before = server.route_buckets("/v1/segments")
    r["estimate_p50_ms"], r["estimate_p99_ms"] = estimate_latency(server, ESTIMATES)
    after = server.route_buckets("/v1/segments")
    n = after.get("+Inf", 0) - before.get("+Inf", 0)
    if n:
        r["estimate_server_within_1ms"] = (after.get("0.001", 0) - before.get("0.001", 0)) / n
        r["estimate_server_within_2_5ms"] = (after.get("0.0025", 0) - before.get("0.0025", 0)) / n
    log(f"filled: {json.dumps(r)}")

    # SIGKILL: the next start loads the last snapshot and replays the log behind it.
    server.stop(signal.SIGKILL)
    server.start()
    r["restart_kill_ready_secs"] = server.wait_ready()
    r["restart_kill_counts_secs"], got = server.wait_live(memberships)
    if got != memberships:
        sys.exit(f"after SIGKILL the server counts {got} live pairs, not {memberships}")
    r["rss_after_restart_bytes"] = rss_bytes(server.proc.pid)
    # SIGTERM: a final snapshot, then the next start loads only it.
    r["shutdown_secs"] = server.stop(signal.SIGTERM)
    server.start()
    r["restart_term_ready_secs"] = server.wait_ready()
    r["restart_term_counts_secs"], got = server.wait_live(memberships)
    if got != memberships:
        sys.exit(f"after SIGTERM the server counts {got} live pairs, not {memberships}")
    r["recovery_ms"] = [json.loads(line).get("recovery_ms") for line in open(server_log)
                        if "recovered standalone state" in line][-2:]
    r["load_after"] = loadavg()
    server.stop(signal.SIGTERM)


def fmt(n, digits=0):
    if n is None:
        return "n/a"
    return f"{n:,.{digits}f}"


def verdict(ok, how):
    return "met" if ok else f"**not met** ({how})"


def order(key):
    size, _, tag = key.partition("-")
    return (int(size), tag)


def write_doc(r):
    live = r["live_pairs"]
    rss_pp = r["rss_bytes"] / live
    rss_restart_pp = r["rss_after_restart_bytes"] / live
    rate = r["ingest_pairs_per_sec"]
    rate_q = r.get("rate_last_quarter") or 0
    p99_out, p99_in = r.get("p99_outside_ms"), r.get("p99_during_ms")
    restart = max(r["restart_kill_ready_secs"], r["restart_term_ready_secs"])
    size = r["live_pairs_target"]
    key = f"{size}{'-' + re.sub('[^a-z0-9]+', '-', TAG.lower()) if TAG else ''}"
    cpu = (f" CPU during the fill: server {r['server_cpu_secs']:.0f} s, load generator "
           f"{r['loadgen_cpu_secs']:.0f} s ({r['server_cpu_secs'] / r['fill_secs']:.2f} + "
           f"{r['loadgen_cpu_secs'] / r['fill_secs']:.2f} cores of {r['cores']}; "
           f"{r['server_cpu_secs'] * 1e6 / live:.2f} + {r['loadgen_cpu_secs'] * 1e6 / live:.2f} "
           f"CPU-seconds per million pairs).")
    wal, apply = r.get("userseg_wal_commit_seconds"), r.get("userseg_processor_write_seconds")
    if wal and apply and wal["count"] and apply["count"]:
        cpu += (f" The log's writer spent {wal['secs']:.1f} s in {fmt(wal['count'])} group commits "
                f"(write + fdatasync, {1000 * wal['secs'] / wal['count']:.2f} ms each, "
                f"{fmt(live / wal['count'])} pairs each: busy {wal['secs'] / r['fill_secs']:.0%} of "
                f"the fill); the processor {apply['secs']:.1f} s applying {fmt(apply['count'])} "
                f"batches to the store (busy {apply['secs'] / r['fill_secs']:.0%}).")
    settings = ", ".join(f"{k}={v}" for k, v in sorted(r["server_env"].items())) or "defaults"
    rows = [
        f"| sustained durable ingest ≥ 2,000,000 pairs/s at size | {fmt(rate)} pairs/s over the "
        f"fill, {fmt(rate_q)} in its last quarter | "
        f"{verdict(min(rate, rate_q) >= 2e6, f'{2e6 / max(min(rate, rate_q), 1):.1f}× short')} |",
        f"| ingest p99 during a snapshot ≤ 2× outside | {fmt(p99_in, 1)} ms during "
        f"({r.get('units_during', 0)} units, {r['snapshots_during_fill']} snapshots, longest "
        f"{fmt(r['snapshot_secs_max'], 1)} s) vs {fmt(p99_out, 1)} ms outside "
        f"({r.get('units_outside', 0)} units) | "
        + (verdict(p99_in <= 2 * p99_out, f"{p99_in / p99_out:.1f}×")
           if p99_in is not None and p99_out else "no unit overlapped a snapshot") + " |",
        f"| ≤ 8 bytes RSS per live pair | {rss_pp:.1f} bytes after the fill ({fmt(r['rss_bytes'] / 2**20)} "
        f"MiB; peak {fmt(r['rss_peak_bytes'] / 2**20)} MiB), {rss_restart_pp:.1f} after a restart; "
        f"the store's own accounting {fmt((r['store_bytes'] or 0) / live, 1)} | "
        f"{verdict(rss_pp <= 8, f'{rss_pp / 8:.2f}× the target')} |",
        f"| restart ≤ 20 s | SIGKILL → ready {r['restart_kill_ready_secs']:.1f} s (snapshot + log), "
        f"SIGTERM ({r['shutdown_secs']:.1f} s, final snapshot) → ready "
        f"{r['restart_term_ready_secs']:.1f} s; recovery as logged {r['recovery_ms']} ms | "
        f"{verdict(restart <= 20, f'{restart / 20:.1f}× the target')} |",
        f"| estimate of all segments p99 ≤ 2 ms | p50 {r['estimate_p50_ms']:.2f} ms, p99 "
        f"{r['estimate_p99_ms']:.2f} ms (`GET /v1/segments`, {ESTIMATES} requests, Python "
        f"client, idle server)"
        + (f"; measured by the server (its histogram): {r['estimate_server_within_1ms']:.1%} "
           f"within 1 ms, {r['estimate_server_within_2_5ms']:.1%} within 2.5 ms"
           if "estimate_server_within_1ms" in r else "")
        + " | " + verdict(r['estimate_p99_ms'] <= 2, f"{r['estimate_p99_ms'] / 2:.1f}× the target")
        + " |",
    ]
    block = "\n".join([
        f"<!-- bench-scale:run {key} -->",
        f"### {fmt(live)} live pairs ({fmt(r['users'])} users, {r['segments']} segments)"
        + (f", {TAG}" if TAG else ""),
        "",
        f"{r['date']}, commit `{r['commit']}`, {r['cores']} cores, load average {r['load_before']} "
        f"before, {r['load_during']} at the end of the fill, {r['load_after']} at the end. "
        f"`{' '.join(f'{k}={v}' for k, v in sorted(r['server_env'].items()))}"
        f"{' ' if r['server_env'] else ''}SCALE_PAIRS={size} SCALE_USERS={r['users']} "
        f"SCALE_SEGMENTS={r['segments']} make bench-scale` (server settings: {settings}); the fill: `{r['load_command']}` (segment sizes Zipf with exponent "
        f"{r['skew']:.3f}), {fmt(r['pairs_accepted'])} pairs in {r['fill_secs']:.1f} s, "
        f"retries {r['retries']}, errors {r['errors'] or 'none'}; counted by the binary "
        f"{r['applied_after_secs']:.1f} s after the last acknowledgement. DATA_DIR after the "
        f"fill: {fmt(r['data_dir_bytes'] / 2**20)} MiB." + cpu,
        "",
        "| target (issue 11) | measured | status |",
        "|---|---|---|",
        *rows,
        f"<!-- bench-scale:end-run {key} -->",
    ])
    try:
        text = open(OUT).read()
    except FileNotFoundError:
        text = ""
    head = (
        "## Standalone at scale, through the binary (`make bench-scale`)\n\n"
        "Written by `make bench-scale` (scripts/bench_scale.py): `userseg standalone` (release "
        "build) on a fresh DATA_DIR, filled over gRPC by `userseg load --fill` (every "
        "membership of a Zipf workload sent once, user by user: a user's segments share a "
        "request), the load generator on the same machine. Ingest latency is per PushStream "
        "unit (`SCALE_STREAM_BATCHES` messages of `SCALE_BATCH` pairs), split by whether the "
        "unit overlapped a snapshot the server logged. RSS is VmRSS over the live pairs the "
        "binary counts. One block per size; the store-level measurement is "
        "`crates/embedded/examples/scale` (issue 11's figures).\n"
    )
    blocks = {}
    if BEGIN in text and END in text:
        before, rest = text.split(BEGIN, 1)
        inner, after = rest.split(END, 1)
        for m in re.finditer(r"<!-- bench-scale:run ([a-z0-9-]+) -->.*?"
                             r"<!-- bench-scale:end-run \1 -->", inner, re.S):
            blocks[m.group(1)] = m.group(0)
    else:
        before, after = text.rstrip("\n") + "\n\n", "\n"
    blocks[key] = block
    notes = ""
    if BEGIN in text:
        m = re.search(r"<!-- bench-scale:notes -->.*?<!-- bench-scale:end-notes -->", inner, re.S)
        if m:
            notes = "\n" + m.group(0) + "\n"
    inner = "\n" + head + "\n" + "\n\n".join(blocks[k] for k in sorted(blocks, key=order)) + "\n" + notes
    with open(OUT, "w") as f:
        f.write(before + BEGIN + inner + END + after)


if __name__ == "__main__":
    main()
