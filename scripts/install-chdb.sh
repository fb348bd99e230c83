#!/usr/bin/env bash
# Installs chdb (ClickHouse embedded in Python, from PyPI) for the ClickHouse version check
# (scripts/chdb-check.sh). Idempotent: skipped when the pinned version is importable.
set -euo pipefail

CHDB_VERSION="${CHDB_VERSION:-4.4.0}"
PYTHON="${PYTHON:-python3}"
have="$("$PYTHON" -c 'import chdb; print(chdb.__version__)' 2>/dev/null || true)"
if [ "$have" != "$CHDB_VERSION" ]; then
  echo "install-chdb: pip install chdb==$CHDB_VERSION (first run only)"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check "chdb==$CHDB_VERSION"
fi
echo "install-chdb: ok (chdb $CHDB_VERSION)"
