# userseg — see README.md. Every target is a thin wrapper over cargo or scripts/.
.PHONY: run test lint fmt migrate version bench build clean

run: ## Standalone mode on the embedded store (DATA_DIR=./data, port 8080)
	cargo run --release -p userseg -- standalone

test: ## All tests, against real tansu and ClickHouse started by scripts/test.sh
	scripts/test.sh

lint: ## Formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

migrate: ## Apply ClickHouse migrations (CLICKHOUSE_ADDR, CLICKHOUSE_DATABASE, ...)
	cargo run --release -p userseg -- migrate

version:
	@cargo run --quiet --release -p userseg -- version

bench: ## Benchmarks; writes docs/BENCHMARKS.md
	scripts/bench.sh

build:
	cargo build --release -p userseg

clean:
	cargo clean
	rm -rf .test-servers
