#!/usr/bin/env bash
# Reproduces the tansu 0.6.0 sqlite-storage panic that made userseg's Kafka producer
# non-idempotent (docs/RELIABILITY.md, "Broker restart"):
#
#   1. tansu with sqlite storage; an idempotent librdkafka producer produces (ok);
#   2. tansu stops; the producer's next message times out (message.timeout.ms), so librdkafka
#      bumps the producer's epoch locally, as an idempotent producer may (KIP-360);
#   3. tansu starts again with the same directory and port; the producer sends with the bumped
#      epoch; tansu's storage looks the epoch up (producer_select_for_update.sql, no row),
#      panics with "more or less than one row" (tansu-storage-0.6.0/src/lite.rs, query_one)
#      and refuses every later produce, from any client, until it is restarted.
#
# The restart is not needed: any message timeout of an idempotent producer (a network cut or a
# slow broker beyond the ack timeout) leads to the same bumped epoch.
#
# Usage: scripts/repro/tansu-sqlite-epoch-bump.sh   (needs tansu, see scripts/install-deps.sh;
# the test's own broker is started and stopped by it; USERSEG_TEST_* need not be set)
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo test -p userseg --test broker_restart -- --ignored --exact \
  tansu_sqlite_panics_on_a_locally_bumped_epoch --nocapture
