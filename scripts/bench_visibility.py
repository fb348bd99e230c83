#!/usr/bin/env python3
"""Acknowledged -> visible latency of a standalone server (issue 12, read-your-writes).

Starts `userseg standalone` (the binary given, default target/release/userseg) on a fresh data
directory, then, one probe at a time, pushes one new pair of segment `vis` over HTTP and polls
`GET /v1/segments/vis` as fast as it answers until the count shows the pair; the latency is from
the push's acknowledgement to the first answer that counts it. Measured twice: on an idle server
("low load"), and while `userseg load` pushes unpaced over gRPC streaming ("full load"). Prints
one JSON object with p50 / p99 / max in milliseconds for each.

    cargo build --release -p userseg && scripts/bench_visibility.py [--probes 300] [--bin PATH]
"""

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time

import promtext
from benchlib import free_port



class Server:
    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def request(self, method, path, body=None):
        headers = {"content-type": "application/json"} if body is not None else {}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()


def wait_ready(port, proc, secs=60):
    deadline = time.time() + secs
    while time.time() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited with {proc.returncode}")
        try:
            status, _ = Server(port).request("GET", "/readyz")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    sys.exit("the server did not become ready")


def probes(port, n, first):
    """Latencies (ms) of n probes with user ids first..first+n-1 in segment `vis`."""
    srv = Server(port)
    out = []
    for i in range(first, first + n):
        body = json.dumps({"pairs": [{"user_id": f"vis-{i}", "segment": "vis"}]})
        status, text = srv.request("POST", "/v1/pairs", body)
        if status != 200:
            sys.exit(f"push answered {status}: {text!r}")
        acked = time.perf_counter()
        while True:
            status, text = srv.request("GET", "/v1/segments/vis")
            if status == 200 and json.loads(text)["users"] >= i:
                break
        out.append((time.perf_counter() - acked) * 1000.0)
    return out


def summary(lat):
    lat = sorted(lat)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))]
    return {"probes": len(lat), "p50_ms": round(pick(0.5), 3), "p99_ms": round(pick(0.99), 3),
            "max_ms": round(lat[-1], 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/userseg")
    ap.add_argument("--probes", type=int, default=300)
    ap.add_argument("--load-secs", type=int, default=0,
                    help="how long the full load runs (default: until the probes are done)")
    args = ap.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        env = dict(os.environ, DATA_DIR=data, SERVICE_PORT=str(port), RUST_LOG="warn")
        server = subprocess.Popen([args.bin, "standalone"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_ready(port, server)
            low = probes(port, args.probes, 1)
            load = subprocess.Popen(
                [args.bin, "load", "--target", f"http://127.0.0.1:{port}", "--duration", "600s",
                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            time.sleep(3)  # the load reaches its steady rate
            started = time.time()
            full = probes(port, args.probes, args.probes + 1)
            elapsed = time.time() - started
            load.terminate()
            load.wait(timeout=30)
            status, text = Server(port).request("GET", "/metrics")
            pairs = promtext.parse(text.decode()).get("userseg_ingest_pairs_total", 0)
            print(json.dumps({
                "low_load": summary(low),
                "full_load": summary(full),
                "full_load_pairs_accepted": int(pairs),
                "full_load_probe_seconds": round(elapsed, 1),
                "cores": os.cpu_count(),
                "loadavg": os.getloadavg(),
            }, indent=2))
        finally:
            server.terminate()
            server.wait(timeout=60)


if __name__ == "__main__":
    main()
