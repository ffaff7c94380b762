#!/usr/bin/env bash
# The embedded default (one `serve` on its data folder: SQLite + packs) against two `serve`
# processes sharing PostgreSQL and an S3 bucket (s3s-fs), in the same run, on loopback:
#   - push and pull of FILES small files (4 KiB, random) and of one BIG MiB file: whole-process times
#   - propagation: a 1 KiB file pushed through one process until a `watch` connected to the
#     other has it (embedded: both on the one server), median of 10
#   - objects written per GiB and S3 requests per 1,000 small files (the server's closing log line)
#
#   benches/shared_store.sh [FILES] [BIG_MIB]      (default 1000 files, 256 MiB)
#
# Starts its own services with .ci/services.sh (s3s-fs built once, a throwaway PostgreSQL with
# fsync off: the figures are the protocol's and the stores' costs, not a durable database's).
# DELTASYNC_BIN (default target/release/deltasync, built first).
set -euo pipefail

FILES=${1:-1000}
BIG=${2:-256}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
WORK=$(mktemp -d /tmp/deltasync-shared-bench.XXXXXX)
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    .ci/services.sh stop "$WORK/services"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

.ci/services.sh start "$WORK/services" >&2
# shellcheck disable=SC1091
. "$WORK/services/env"
psql "$DELTASYNC_TEST_PG" -q -c "CREATE DATABASE bench"
PG=${DELTASYNC_TEST_PG%/*}/bench
S3DIR=$WORK/services/s3/$DELTASYNC_TEST_S3_BUCKET

python3 - "$WORK/small" "$FILES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
r = open('/dev/urandom', 'rb')
for i in range(n):
    d = f'{root}/d{i // 1000:03}'
    if i % 1000 == 0:
        os.makedirs(d)
    open(f'{d}/f{i:06}', 'wb').write(r.read(4096))
EOF
mkdir -p "$WORK/big"
head -c $((BIG << 20)) /dev/urandom >"$WORK/big/big.bin"

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2 - $1:.2f}')"; }

. "$ROOT/benches/common/serve.sh"
# serve_here NAME [ARGS...]: `serve` on the local data folder, or the shared one when
# DELTASYNC_METADATA is set.
serve_here() {
    local name=$1 data=$WORK/data-local
    shift
    [ -n "${DELTASYNC_METADATA:-}" ] && data=$WORK/data-shared
    serve "$name" --data "$data" "$@"
}

token() { "$@" | tail -n 1; }

C=()
run_small() { # LABEL ADDR1 ADDR2
    local label=$1 a1=$2 a2=$3 t0 t1
    cp -a "$WORK/small" "$WORK/small-$label"
    sync
    t0=$(now); "$BIN" push "$WORK/small-$label" --server "$a1" "${C[@]}"; t1=$(now)
    echo "$label: push $FILES small files: $(secs "$t0" "$t1") s"
    t0=$(now); "$BIN" pull "$WORK/pull-$label-small" --server "$a2" "${C[@]}"; t1=$(now)
    echo "$label: pull $FILES small files: $(secs "$t0" "$t1") s"
}

run_big() { # LABEL ADDR1 ADDR2
    local label=$1 a1=$2 a2=$3 t0 t1
    cp -a "$WORK/big" "$WORK/big-$label"
    sync
    t0=$(now); "$BIN" push "$WORK/big-$label" --server "$a1" "${C[@]}"; t1=$(now)
    echo "$label: push $BIG MiB: $(secs "$t0" "$t1") s ($(python3 -c "print(f'{$BIG / ($t1 - $t0):.0f}')") MiB/s)"
    t0=$(now); "$BIN" pull "$WORK/pull-$label-big" --server "$a2" "${C[@]}"; t1=$(now)
    echo "$label: pull $BIG MiB: $(secs "$t0" "$t1") s ($(python3 -c "print(f'{$BIG / ($t1 - $t0):.0f}')") MiB/s)"
    cmp "$WORK/big/big.bin" "$WORK/pull-$label-big/big.bin"
}

run_prop() { # LABEL ADDR1 ADDR2: a watch on 1, pushes of 1 KiB through 2
    local label=$1 a1=$2 a2=$3 t0 t1 w
    mkdir -p "$WORK/w-$label" "$WORK/p-$label"
    "$BIN" watch "$WORK/w-$label" --server "$a1" "${C[@]}" &
    w=$!
    PIDS+=($w)
    sleep 3
    local ms=()
    for i in $(seq 10); do
        head -c 1024 /dev/urandom >"$WORK/p-$label/one-$i"
        t0=$(now)
        "$BIN" push "$WORK/p-$label" --server "$a2" "${C[@]}"
        while [ ! -f "$WORK/w-$label/one-$i" ]; do sleep 0.002; done
        t1=$(now)
        ms+=("$(python3 -c "print(round(($t1 - $t0) * 1000))")")
    done
    kill "$w"
    echo "$label: propagation (push through one process until the watch on the other has it), ms: ${ms[*]}; median $(printf '%s\n' "${ms[@]}" | sort -n | sed -n 5,6p | paste -sd' ' | awk '{print ($1 + $2) / 2}')"
}

packs() { find "$S3DIR" -type f -name '*.pack' "$@"; }

# The embedded default.
serve_here local
LOCAL=$ADDR
# An account per part, so each pull fetches only that part's files.
acct() { # DATA NAME: sets C to use a new account's token
    C=(--token "$(token "$BIN" account add "$2" --data "$1")" --no-progress -q)
}
acct "$WORK/data-local" small
run_small embedded "$LOCAL" "$LOCAL"
acct "$WORK/data-local" big
run_big embedded "$LOCAL" "$LOCAL"
acct "$WORK/data-local" prop
run_prop embedded "$LOCAL" "$LOCAL"

# Two processes on PostgreSQL + S3 (one data folder for both: the same TLS identity).
export DELTASYNC_METADATA=$PG DELTASYNC_STORE=s3://$DELTASYNC_TEST_S3_BUCKET/bench DELTASYNC_S3_ENDPOINT=$DELTASYNC_TEST_S3_ENDPOINT
pair() { # N: starts processes N-a and N-b, sets A, B and their PIDs
    serve_here "$1-a"; A=$ADDR; A_PID=$LAST_PID
    serve_here "$1-b"; B=$ADDR; B_PID=$LAST_PID
}
stop_pair() { # N: stops them; prints their S3 request lines
    kill -TERM "$A_PID" "$B_PID"
    wait "$A_PID" "$B_PID" 2>/dev/null || true
    grep -h "write requests" "$WORK/$1-a.log" "$WORK/$1-b.log" | sed 's/^.*INFO //; s/^/  /'
}
pair 1
acct "$WORK/data-shared" small
run_small shared "$A" "$B"
echo "shared: S3 requests of that push and pull ($FILES files), per process:"
stop_pair 1
echo "shared: objects for $FILES small files: $(packs | wc -l)"
pair 2
n0=$(packs | wc -l)
acct "$WORK/data-shared" big
run_big shared "$A" "$B"
n1=$(packs | wc -l)
echo "shared: objects for $BIG MiB: $((n1 - n0)) ($(python3 -c "print(round(($n1 - $n0) * 1024 / $BIG))") per GiB)"
echo "shared: S3 requests of that push and pull, per process:"
stop_pair 2
pair 3
acct "$WORK/data-shared" prop
run_prop shared "$A" "$B"
stop_pair 3 >/dev/null
all=$(packs -printf '%s\n' | awk '{s += $1; n += 1} END {printf "%d objects, %.2f MiB each on average", n, s / n / 1048576}')
echo "shared: the bucket: $all"
