#!/usr/bin/env python3
"""Replays the clickhouse crate's statements on a current ClickHouse and compares the answers.

`make chdb-check` first records every statement the crate sends, with ClickHouse 18.16's
answers, into target/chdb/statements.json (crates/clickhouse/tests/statements.rs), then runs
this script: it replays them in order on chdb (ClickHouse embedded in Python, PyPI `chdb`) in a
fresh directory: the same DDL, the same RowBinary rows (INSERT ... FROM INFILE), the same reads
on the same data. A read matches when its RowBinary answer is byte for byte 18.16's, or, for a
read whose rows have no defined order, when the same rows come back (compared as sorted
TabSeparated lines); for the scan of raw pairs, when each pair has the same latest ts. Any other answer, or a statement that fails, is a difference. Polls of a
server's progress (system.mutations) must run but answer by timing, not by the data: their
answers are not compared. Statements of kind `parse` (the cluster DDL of
deploy/clickhouse-cluster/, which needs a cluster and ZooKeeper) are only parsed, by formatQuery.

Usage: scripts/chdb_check.py [statements.json] [--report FILE]. Exits 1 on any difference.
"""

import json
import os
import sys
import tempfile

# Reads whose answer depends on how far the server's background work got, not on the data.
TIMING_DEPENDENT = ("FROM system.mutations",)
# The scan of raw pairs: a ReplacingMergeTree keeps duplicates of a (segment, user_id) until a
# merge on 18.16, and drops them already at insert on 26.x (optimize_on_insert); the reader
# keeps the latest ts of each pair, so that is what must be equal.
SCAN = "SELECT segment, user_id, ts FROM "


def latest_per_pair(tsv):
    latest = {}
    for line in tsv.splitlines():
        segment, user, ts = line.rsplit("\t", 2) if line.count("\t") >= 2 else (line, "", "")
        key = (segment, user)
        latest[key] = max(latest.get(key, ""), ts)
    return latest


def main() -> int:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    path = args[0] if args else "target/chdb/statements.json"
    report_path = None
    if "--report" in sys.argv:
        report_path = sys.argv[sys.argv.index("--report") + 1]
        args = [a for a in args if a != report_path]
    try:
        import chdb
        from chdb import session
    except ImportError:
        print("chdb_check: the Python package chdb is missing: scripts/install-chdb.sh", file=sys.stderr)
        return 2
    with open(path) as f:
        doc = json.load(f)

    work = tempfile.mkdtemp(prefix="userseg-chdb-")
    sess = session.Session(os.path.join(work, "db"))
    version = sess.query("SELECT version()", "TabSeparated").bytes().decode().strip()

    counts = {"parse": 0, "execute": 0, "insert": 0, "same bytes": 0, "same rows": 0, "same pairs": 0, "polls": 0}
    differences = []
    lines = []
    for i, st in enumerate(doc["statements"]):
        kind, sql, step = st["kind"], st["sql"], st["step"]
        try:
            if kind == "parse":
                literal = "'" + sql.replace("\\", "\\\\").replace("'", "\\'") + "'"
                sess.query(f"SELECT formatQuery({literal})")
                counts["parse"] += 1
                lines.append(f"parsed      [{step}] {sql[:110]}")
                continue
            if kind == "execute":
                sess.query(sql)
                counts["execute"] += 1
                continue
            if kind == "insert":
                data = bytes.fromhex(st["data_hex"])
                infile = os.path.join(work, f"insert-{i}.bin")
                with open(infile, "wb") as f:
                    f.write(data)
                prefix = sql.removesuffix(" FORMAT RowBinary")
                sess.query(f"{prefix} FROM INFILE '{infile}' FORMAT RowBinary")
                counts["insert"] += 1
                continue
            answer = sess.query(sql).bytes()
        except Exception as e:  # a statement 26.x refuses is a difference
            differences.append((i, step, sql, f"failed: {e}"))
            continue
        if any(p in sql for p in TIMING_DEPENDENT):
            counts["polls"] += 1
            lines.append(f"ran (poll)  [{step}] {sql[:110]}")
            continue
        want = bytes.fromhex(st["answer_hex"])
        if answer == want:
            counts["same bytes"] += 1
            lines.append(f"same bytes  [{step}] {sql[:110]}")
            continue
        text = st.get("answer_text")
        got_text = None
        if text is not None and sql.endswith(" FORMAT RowBinary"):
            got_text = sess.query(sql.removesuffix(" FORMAT RowBinary") + " FORMAT TabSeparated").bytes().decode()
            if sorted(got_text.splitlines()) == sorted(text.splitlines()):
                counts["same rows"] += 1
                lines.append(f"same rows   [{step}] {sql[:110]}")
                continue
            if sql.startswith(SCAN) and latest_per_pair(got_text) == latest_per_pair(text):
                counts["same pairs"] += 1
                lines.append(f"same pairs  [{step}] {sql[:110]}")
                continue
        differences.append((i, step, sql, f"18.16 answered {want.hex()[:200]} ({text!r:.200}), "
                                          f"{version} answered {answer.hex()[:200]} ({got_text!r:.200})"))

    total = len(doc["statements"])
    queries = counts["same bytes"] + counts["same rows"] + counts["same pairs"] + counts["polls"] + len(differences)
    summary = (
        f"chdb_check: {total} statements recorded on ClickHouse {doc['clickhouse_version']}, "
        f"replayed on ClickHouse {version} (chdb {chdb.__version__}): "
        f"{counts['execute']} DDL/maintenance, {counts['insert']} inserts, "
        f"{counts['parse']} cluster DDL parsed only, "
        f"{queries} reads: {counts['same bytes']} same bytes, {counts['same rows']} same rows "
        f"(order not defined), {counts['same pairs']} same latest ts per pair (scans), "
        f"{counts['polls']} progress polls run (answers by timing), "
        f"{len(differences)} differences"
    )
    out = [summary] + lines
    for i, step, sql, why in differences:
        out.append(f"DIFFERENT   [{step}] statement {i}: {sql}\n    {why}")
    text = "\n".join(out) + "\n"
    if report_path:
        with open(report_path, "w") as f:
            f.write(text)
    for i, step, sql, why in differences:
        print(f"DIFFERENT [{step}] statement {i}: {sql}\n    {why}")
    print(summary)
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())
