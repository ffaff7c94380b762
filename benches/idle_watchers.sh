#!/usr/bin/env bash
# Server memory per idle `watch` connection: the README's "200 `watch` clients connected and idle".
#
#   benches/idle_watchers.sh [N] [IDLE_SECS]      (defaults 200 and 10)
#
# Starts `deltasync serve` on 127.0.0.1:0 with one account, reads the server's VmRSS, then starts
# N `deltasync watch` processes on N separate folders of one small file each (all on that one
# account, so every folder ends up with all N files). Once every folder holds all N files and the
# server has N established connections, it waits IDLE_SECS more and reads VmRSS again, and prints
# (after - before) / N: the server's KiB per idle connection. Everything it started is stopped by
# PID at the end.
# Environment: DELTASYNC_BIN (default target/release/deltasync, built first),
# DELTASYNC_BENCH_TMP (work folder parent, default $TMPDIR or /tmp), KEEP=1 keeps the work folder,
# SYNC_TIMEOUT (seconds to wait for every folder to be complete, default 300), FILE_BYTES (size of
# each folder's file, default 1024; under 64 bytes a file is not put through the connection's zstd
# stream, so no stream is set up and the figure is the connection's own cost).
set -euo pipefail

N=${1:-200}
IDLE=${2:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "idle_watchers: $*" >&2; exit 1; }

if [ -z "${DELTASYNC_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release --locked --bin deltasync >&2)
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
[ -x "$BIN" ] || die "$BIN is not executable"

WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-idle.XXXXXX")
SERVER_PID=""
WATCH_PIDS=()
cleanup() {
    set +e
    for p in "${WATCH_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${WATCH_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    WATCH_PIDS=()
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; fi
    SERVER_PID=""
    if [ "${KEEP:-0}" = 1 ]; then echo "idle_watchers: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }

mkdir -p "$WORK/data" "$WORK/c"
# stdout goes to a file, so the server never writes into a closed pipe.
"$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/serve.out" 2>"$WORK/serve.err" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q 'listening on' "$WORK/serve.out" && break; sleep 0.1; done
ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$WORK/serve.out" | head -n 1)
[ -n "$ADDR" ] || die "the server did not start: $(cat "$WORK/serve.err")"
PORT=${ADDR##*:}
TOKEN=$("$BIN" account add bench --data "$WORK/data" 2>/dev/null | tail -n 1)
[ -n "$TOKEN" ] || die "account add printed no token"

for i in $(seq -w 1 "$N"); do
    mkdir -p "$WORK/c/$i"
    head -c "${FILE_BYTES:-1024}" /dev/urandom >"$WORK/c/$i/f-$i.bin"
done

sleep 2
RSS0=$(kib "$SERVER_PID" VmRSS)

START=$(date +%s)
for i in $(seq -w 1 "$N"); do
    # The token through the environment: older builds have no --token-file.
    DELTASYNC_TOKEN=$TOKEN "$BIN" watch "$WORK/c/$i" --server "$ADDR" --device "w$i" \
        --no-progress >"$WORK/c/$i.log" 2>&1 &
    WATCH_PIDS+=($!)
    sleep 0.02
done

# Every folder complete (all N files) and N connections established.
want=$((N * N))
deadline=$((START + ${SYNC_TIMEOUT:-300}))
while :; do
    files=$(find "$WORK/c" -mindepth 2 -path '*/.deltasync' -prune -o -type f -name 'f-*.bin' -print | wc -l)
    conns=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
    alive=0
    for p in "${WATCH_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
    [ "$files" -ge "$want" ] && [ "$conns" -ge "$N" ] && break
    [ "$alive" -eq "$N" ] || die "only $alive of $N watchers are running (see $WORK/c/*.log; KEEP=1 keeps them)"
    [ "$(date +%s)" -lt "$deadline" ] || die "timed out: $files of $want files, $conns of $N connections"
    sleep 1
done
SYNCED=$(($(date +%s) - START))
sleep "$IDLE"
RSS1=$(kib "$SERVER_PID" VmRSS)
HWM=$(kib "$SERVER_PID" VmHWM)
conns=$(ss -Htn state established "( sport = :$PORT )" | wc -l)
alive=0
wrss=0
for p in "${WATCH_PIDS[@]}"; do
    if kill -0 "$p" 2>/dev/null; then
        alive=$((alive + 1))
        wrss=$((wrss + $(kib "$p" VmRSS)))
    fi
done

echo "idle_watchers: $N watchers (one ${FILE_BYTES:-1024}-byte file each) ($alive alive, $conns connections) on one account, $BIN"
echo "  all folders complete after ${SYNCED} s, then ${IDLE} s idle"
echo "  server VmRSS before ${RSS0} KiB, after ${RSS1} KiB (peak ${HWM} KiB)"
echo "  server per idle connection: $(( (RSS1 - RSS0) / N )) KiB"
echo "  watcher VmRSS mean: $(( wrss / (alive > 0 ? alive : 1) )) KiB"
