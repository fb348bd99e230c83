#!/usr/bin/env bash
# Installs cargo-afl (AFL++ for Rust, works on the stable toolchain) for `make fuzz`. Not part
# of `make test`'s install. Idempotent: skipped when cargo-afl and its AFL++ build are there.
set -euo pipefail

AFL_VERSION="${CARGO_AFL_VERSION:-0.18.2}"
if ! cargo afl --version >/dev/null 2>&1; then
  echo "install-fuzz: cargo install cargo-afl $AFL_VERSION (first run only, a few minutes)"
  cargo install cargo-afl --version "$AFL_VERSION" --locked --quiet
fi
# AFL++ itself (afl-fuzz and its runtime) is built once per rustc version.
help="$(cargo afl fuzz -h 2>&1 || true)"
case "$help" in
  *afl-fuzz*) ;;
  *)
    echo "install-fuzz: building AFL++"
    cargo afl config --build
    ;;
esac
echo "install-fuzz: ok ($(cargo afl --version 2>/dev/null | head -1))"
