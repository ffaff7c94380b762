#!/usr/bin/env bash
# A longer soak of the watch convergence test: many seeds of random file-system operations on
# one of three watchers. Usage: benches/soak.sh [COUNT] (default 50 seeds, starting at 100).
set -euo pipefail
cd "$(dirname "$0")/.."
count=${1:-50}
seeds=$(seq -s, 100 $((100 + count - 1)))
DELTASYNC_WATCH_SEEDS=$seeds cargo test --release --locked --test tests \
    watch::three_watchers_converge_under_random_operations -- --nocapture
