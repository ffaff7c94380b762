#!/usr/bin/env bash
# A soak of the model test (tests/tests/model.rs): COUNT seeds (default 2000) from START (default
# 1000) of random operations on three devices with push/pull rounds, in release mode.
# Usage: benches/model_soak.sh [COUNT] [START]
# Other knobs pass through the environment: DELTASYNC_MODEL_OPS=basic|full (default full),
# DELTASYNC_MODEL_THREADS, DELTASYNC_MODEL_SHRINK_SECS, DELTASYNC_MODEL_ACCEPT_EXIT.
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-2000}
start=${2:-1000}
ops=${DELTASYNC_MODEL_OPS:-full}
test=model::three_devices_random_operations_$ops
DELTASYNC_MODEL_SEEDS=$count DELTASYNC_MODEL_SEED_START=$start DELTASYNC_MODEL_OPS=$ops \
    cargo test --release --locked --test tests "$test" -- --include-ignored --exact --nocapture
