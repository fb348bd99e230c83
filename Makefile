# userseg — see README.md. Every target is a thin wrapper over cargo or scripts/.
.PHONY: help run test soak lint fmt migrate version bench bench-scale build clean fuzz chdb-check

help: ## This list of targets
	@grep -E '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

run: ## Standalone mode on the embedded store (DATA_DIR=./data, port 8080)
	cargo run --release -p userseg -- standalone

test: ## All tests, against real tansu and ClickHouse started by scripts/test.sh
	scripts/test.sh

soak: ## Soaks with kills, standalone then distributed, 10 min each (SOAK_SECS, SOAK_KILL_EVERY, SOAK_MODE); see docs/RELIABILITY.md
	scripts/soak.sh

lint: ## Formatting and clippy, warnings are errors
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt: ## Format every crate
	cargo fmt --all

migrate: ## Apply ClickHouse migrations (CLICKHOUSE_ADDR, CLICKHOUSE_DATABASE, ...)
	cargo run --release -p userseg -- migrate

version: ## Print the version
	@cargo run --quiet --release -p userseg -- version

fuzz: ## Fuzz every decoder under AFL++ (FUZZ_SECS per target, default 60); installs cargo-afl
	scripts/fuzz.sh

chdb-check: ## The clickhouse crate's statements on ClickHouse 18.16 and on chdb (26.x), answers compared
	scripts/chdb-check.sh

bench: ## Benchmarks; writes docs/BENCHMARKS.md
	scripts/bench.sh

bench-scale: ## Standalone at scale through the binary (SCALE_PAIRS, default 1e9); writes its section of docs/BENCHMARKS.md
	cargo build --release -p userseg
	scripts/bench_scale.py

build: ## Release build of the binary (target/release/userseg)
	cargo build --release -p userseg

clean: ## Remove build output and test servers
	cargo clean
	rm -rf .test-servers
