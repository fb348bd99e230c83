"""Reads a userseg server's /metrics (Prometheus text format) for the benchmark scripts.

Imported by scripts/bench_follow.py, scripts/bench_es_memory.py and scripts/bench_visibility.py
(run as scripts, so this directory is on their import path).
"""
import urllib.request


def parse(text):
    """{metric name: value summed over its label sets}; comments and bad lines are skipped."""
    vals = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, _, value = line.rpartition(" ")
        name = name.split("{", 1)[0]
        try:
            vals[name] = vals.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return vals


def metrics(base):
    """parse() of BASE/metrics; {} when the server does not answer (not up yet, or killed)."""
    try:
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            text = r.read().decode()
    except OSError:
        return {}
    return parse(text)
