#!/usr/bin/env bash
# Resumed transfers: a push and a pull of one big random file (1 GiB by default), each killed
# (SIGKILL) once about half of it got across, then run again; prints what the second run moved
# (`--stats`: Total bytes sent / received) as a share of the file, and how long it took.
#
#   benches/resume.sh [SIZE_MIB] [CUT_PERCENT]        (defaults: 1024 50)
#
# The push is cut off once the server's packs hold CUT_PERCENT of the file, the pull once its
# partial download in `.deltasync/partial/` does. Environment: DELTASYNC_BIN (default
# target/release/deltasync, built first), DELTASYNC_BENCH_TMP (work folder parent, default
# $TMPDIR or /tmp), KEEP=1 keeps the work folder.
set -euo pipefail

SIZE_MIB=${1:-1024}
CUT=${2:-50}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/ds-resume.XXXXXX")
SERVER=
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER=$!
for _ in $(seq 300); do grep -q 'listening on' "$WORK/server.out" 2>/dev/null && break; sleep 0.02; done
ADDR=$(sed -n 's/.*listening on //p' "$WORK/server.out")
[ -n "$ADDR" ] || { echo "resume: the server did not start" >&2; cat "$WORK/server.log" >&2; exit 1; }
TOKEN=$("$BIN" account add bench --data "$WORK/data" | tail -n 1)
sync_args=(--server "$ADDR" --token "$TOKEN" --no-progress)

mkdir -p "$WORK/a"
head -c "${SIZE_MIB}M" /dev/urandom >"$WORK/a/big.bin"
SIZE=$(stat -c %s "$WORK/a/big.bin")

# Runs `deltasync CMD DIR` in the background and SIGKILLs it once `du -sb WATCHED` reaches CUT%.
cut_off() {
    local cmd=$1 dir=$2 watched=$3 pid used
    "$BIN" "$cmd" "$dir" "${sync_args[@]}" >/dev/null 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        used=$(du -sb "$watched" 2>/dev/null | cut -f1 || echo 0)
        if [ "${used:-0}" -ge $((SIZE * CUT / 100)) ]; then
            kill -9 "$pid"
            break
        fi
        sleep 0.01
    done
    if wait "$pid"; then echo "resume: the $cmd finished before it was cut off" >&2; exit 1; fi
}

# `deltasync CMD DIR --stats`, timed; prints the value of the `--stats` line LABEL and the seconds.
second_run() {
    local cmd=$1 dir=$2 label=$3 t0 t1 out
    t0=$(date +%s.%N)
    out=$("$BIN" "$cmd" "$dir" "${sync_args[@]}" --stats)
    t1=$(date +%s.%N)
    echo "$(echo "$out" | sed -n "s/^$label: //p") $(echo "$t1 - $t0" | bc)"
}

pct() { echo "scale=1; 100 * $1 / $SIZE" | bc; }

# Push, cut off; the server keeps the whole chunks it received.
cut_off push "$WORK/a" "$WORK/data/packs"
for _ in $(seq 600); do grep -q 'cut-off upload of `big.bin`' "$WORK/server.log" && break; sleep 0.05; done
KEPT=$(sed -n 's/.*kept \([0-9]*\) bytes of a cut-off upload of `big.bin`.*/\1/p' "$WORK/server.log" | tail -n 1)
read -r SENT SECS <<<"$(second_run push "$WORK/a" 'Total bytes sent')"
echo "push of $SIZE bytes cut off with $KEPT kept by the server ($(pct "$KEPT")%): the next push sent $SENT bytes ($(pct "$SENT")% of the file) in ${SECS} s"

# Pull into an empty folder, cut off; the partial download waits in .deltasync/partial.
cut_off pull "$WORK/b" "$WORK/b/.deltasync/partial"
KEPT=$(du -sb "$WORK/b/.deltasync/partial" | cut -f1)
read -r RECEIVED SECS <<<"$(second_run pull "$WORK/b" 'Total bytes received')"
cmp "$WORK/a/big.bin" "$WORK/b/big.bin"
echo "pull of $SIZE bytes cut off with $KEPT kept ($(pct "$KEPT")%): the next pull received $RECEIVED bytes ($(pct "$RECEIVED")% of the file) in ${SECS} s; the file is exact"
for d in partial tmp; do
    left=$(find "$WORK/b/.deltasync/$d" -type f | wc -l)
    [ "$left" = 0 ] || echo "resume: $left files left in .deltasync/$d" >&2
done
