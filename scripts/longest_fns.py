#!/usr/bin/env python3
"""Lists the longest Rust functions in crates/*/src (the library and binary code, not tests).

Usage: scripts/longest_fns.py [N] [--all]
  N      how many to list (default 10)
  --all  also count #[cfg(test)] modules and *_tests.rs / *_suite.rs files

A function's length is the number of lines from its `fn` line to its closing brace, found by
counting braces outside strings, chars and comments (good enough for rustfmt-formatted code).
"""

import glob
import re
import sys

FN = re.compile(r"^\s*(?:pub(?:\([^)]*\))?\s+)?(?:const\s+)?(?:async\s+)?(?:unsafe\s+)?fn\s+(\w+)")


def strip(line, state):
    """Returns the line without strings, chars and comments; `state` carries block comments."""
    out, i, n = [], 0, len(line)
    while i < n:
        if state["block"]:
            j = line.find("*/", i)
            if j < 0:
                return "".join(out)
            state["block"], i = False, j + 2
            continue
        c = line[i]
        if line.startswith("//", i):
            break
        if line.startswith("/*", i):
            state["block"], i = True, i + 2
            continue
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return "".join(out)


def functions(path, include_tests):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    state = {"block": False}
    code = [strip(l, state) for l in lines]
    skip_until = -1
    found = []
    for i, line in enumerate(code):
        if i <= skip_until:
            continue
        if not include_tests and line.strip().startswith("#[cfg(test)]"):
            # Skip the item that follows (a test module): up to its matching brace.
            depth, opened = 0, False
            for j in range(i + 1, len(code)):
                depth += code[j].count("{") - code[j].count("}")
                opened = opened or "{" in code[j]
                if opened and depth <= 0:
                    skip_until = j
                    break
                if not opened and code[j].rstrip().endswith(";"):
                    skip_until = j
                    break
            continue
        m = FN.match(line)
        if not m:
            continue
        depth, opened = 0, False
        for j in range(i, len(code)):
            depth += code[j].count("{") - code[j].count("}")
            opened = opened or "{" in code[j]
            if not opened and code[j].rstrip().endswith(";"):
                break  # a declaration without a body (trait method)
            if opened and depth <= 0:
                found.append((j - i + 1, f"{path}:{i + 1}", m.group(1)))
                break
    return found


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    include_tests = "--all" in sys.argv
    most = int(args[0]) if args else 10
    found = []
    for path in sorted(glob.glob("crates/*/src/**/*.rs", recursive=True)):
        if not include_tests and re.search(r"(_tests|_suite|/tests)\.rs$", path):
            continue
        found.extend(functions(path, include_tests))
    found.sort(key=lambda f: -f[0])
    for length, where, name in found[:most]:
        print(f"{length:5}  {name:32}  {where}")


if __name__ == "__main__":
    main()
