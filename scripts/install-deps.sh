#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine: protoc, ClickHouse (Debian package),
# and the tansu Kafka-protocol broker (built once with cargo, cached afterwards), with the fixes of
# scripts/tansu/*.patch (see scripts/tansu/README.md).
# Idempotent: every step is skipped when its result is already present.
set -euo pipefail

TOOLS_DIR="${USERSEG_TOOLS_DIR:-$HOME/.cache/userseg}"
TANSU_VERSION="${TANSU_VERSION:-0.6.0}"
TANSU_BIN="$TOOLS_DIR/tansu-$TANSU_VERSION/bin/tansu"
# postgres: the durable storage the broker-restart test runs on (sqlite crashes on restart).
TANSU_FEATURES="dynostore,libsql,postgres"
TANSU_STAMP="$TOOLS_DIR/tansu-$TANSU_VERSION/features"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# The build is redone when the features or the patches change.
TANSU_WANT="$TANSU_FEATURES $(cat "$HERE"/tansu/*.patch | sha256sum | cut -c1-16)"

need_apt=()
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
command -v clickhouse-server >/dev/null 2>&1 || [ -x /usr/bin/clickhouse ] || need_apt+=(clickhouse-server clickhouse-client)
command -v cmake >/dev/null 2>&1 || need_apt+=(cmake)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
command -v patch >/dev/null 2>&1 || need_apt+=(patch)
# OpenSSL headers: librdkafka is built with TLS and SASL/SCRAM support (rdkafka's ssl feature).
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)
pkg-config --exists openssl 2>/dev/null || need_apt+=(libssl-dev)
# Chromium: the web console's test runs in a real headless browser.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
# PostgreSQL: tansu's durable storage for the broker-restart test.
[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

if [ ! -x "$TANSU_BIN" ] || [ "$(cat "$TANSU_STAMP" 2>/dev/null)" != "$TANSU_WANT" ]; then
  echo "install-deps: building tansu $TANSU_VERSION with scripts/tansu/*.patch (first run only, about 11 minutes)"
  build="$TOOLS_DIR/tansu-build"
  rm -rf "$build"
  mkdir -p "$build/src"
  # The published sources of tansu (the binary, with its Cargo.lock) and of the crates patched.
  for crate in tansu tansu-storage; do
    curl -fsSL "https://static.crates.io/crates/$crate/$crate-$TANSU_VERSION.crate" | tar -xz -C "$build/src"
  done
  for p in "$HERE"/tansu/*.patch; do
    patch -d "$build/src" -p1 --quiet <"$p"
  done
  printf '\n[patch.crates-io]\ntansu-storage = { path = "../tansu-storage-%s" }\n' "$TANSU_VERSION" \
    >>"$build/src/tansu-$TANSU_VERSION/Cargo.toml"
  # `cargo build` keeps the package's Cargo.lock (only the patched crate's entry changes).
  CARGO_TARGET_DIR="$build/target" cargo build --release --quiet \
    --manifest-path "$build/src/tansu-$TANSU_VERSION/Cargo.toml" --features "$TANSU_FEATURES"
  install -D -m 755 "$build/target/release/tansu" "$TANSU_BIN"
  rm -rf "$build"
  echo "$TANSU_WANT" >"$TANSU_STAMP"
fi
echo "install-deps: ok (tansu at $TANSU_BIN)"
