"""Helpers shared by the benchmark scripts (imported next to them, like promtext)."""
import socket
import urllib.request


def free_port():
    """A TCP port free on 127.0.0.1 right now."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def clickhouse_sql(url, query, timeout=3600):
    """Runs one statement on ClickHouse's HTTP interface; its answer as text."""
    req = urllib.request.Request(url + "/", data=query.encode(), method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read().decode()
