#!/usr/bin/env bash
# `--bwlimit`: the rate pushes and pulls achieve against the limit, on loopback (no root needed).
#
#   benches/bwlimit.sh
#
# Per case: a real `deltasync serve` on 127.0.0.1, a folder with one incompressible file, then a
# timed `push` into an empty account or `pull` into an empty folder with `--stats`. Achieved rate
# = the limited direction's bytes on the wire (`Total bytes sent` for a push, `Total bytes
# received` for a pull: TLS and framing included) / the whole process's wall time (start-up,
# TLS handshake, scan and commit included). Cases: client `--bwlimit 2M` (32 MiB, push and pull),
# client `--bwlimit 500K` (8 MiB), and `serve --bwlimit 2M` with unlimited clients (32 MiB).
#
# Smoothness: while each run goes, `ss -ti` is read every 100 ms for the server's end of the
# connection (bytes_received for a push, bytes_acked for a pull: what crossed the link, whatever
# the processes did with it); the table gives the lowest and highest rate over whole seconds
# between the first and the last byte, and the longest time without a new byte (a stall; the
# sampler's own longest gap between two readings beside it, as a loaded machine delays it).
#
# Environment: DELTASYNC_BIN (default target/release/deltasync, built first), BIG (MiB for the
# 2M cases, default 32), SMALL (MiB for the 500K cases, default 8), DELTASYNC_BENCH_TMP (work
# folder parent, default $TMPDIR or /tmp), KEEP=1 keeps the work folder.
set -euo pipefail

BIG=${BIG:-32}
SMALL=${SMALL:-8}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "bwlimit: $*" >&2; exit 1; }
command -v ss >/dev/null || die "needs ss (apt-get install iproute2)"
command -v python3 >/dev/null || die "needs python3 (for the 100 ms sampler)"

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
[ -x "$BIN" ] || die "$BIN is not executable"

WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-bwlimit.XXXXXX")
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    if [ "${KEEP:-0}" = 1 ]; then echo "bwlimit: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The sampler: every 100 ms, the byte counters of the server's established connections on PORT.
cat >"$WORK/sample.py" <<'EOF'
import re, subprocess, sys, time
port, field, out = sys.argv[1], sys.argv[2], sys.argv[3]
pat = re.compile(field + r':(\d+)')
t0 = time.monotonic()
with open(out, 'w') as f:
    while True:
        r = subprocess.run(['ss', '-tinH', 'state', 'established', f'( sport = :{port} )'],
                           capture_output=True, text=True)
        total = sum(int(x) for x in pat.findall(r.stdout))
        f.write(f'{time.monotonic() - t0:.4f} {total}\n')
        f.flush()
        time.sleep(max(0.0, 0.1 - (time.monotonic() - t0) % 0.1))
EOF
# Summary of a sample file: "MIN-MAX KiB/s per second, longest stall MS".
cat >"$WORK/smooth.py" <<'EOF'
import sys
pts = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
# The counters only grow: a sample below the last (an `ss` that missed the socket) is dropped.
vals, top = [], -1
for t, v in pts:
    if v >= top:
        vals.append((t, v))
        top = v
gap = max((b[0] - a[0] for a, b in zip(pts, pts[1:])), default=0)
moved = [i for i in range(1, len(vals)) if vals[i][1] != vals[i - 1][1]]
if not moved:
    print('no samples'); sys.exit()
first, last = moved[0] - 1, moved[-1]
seg = vals[first:last + 1]
stall, prev_t = 0.0, seg[0][0]
for i in range(1, len(seg)):
    if seg[i][1] != seg[i - 1][1]:
        stall = max(stall, seg[i][0] - prev_t)
        prev_t = seg[i][0]
rates, t_start, v_start = [], seg[0][0], seg[0][1]
for t, v in seg:
    if t - t_start >= 1.0:
        rates.append((v - v_start) / (t - t_start) / 1024)
        t_start, v_start = t, v
inner = rates[1:] if len(rates) > 2 else rates
lo_hi = f'{min(inner):.0f}-{max(inner):.0f}' if inner else '-'
print(f'{lo_hi}|{stall * 1000:.0f} ms (sampler gap {gap * 1000:.0f} ms)')
EOF

# field LABEL < stats text: the number after LABEL, commas removed.
field() { grep -m1 "^$1" | sed -e "s/^$1[[:space:]]*//" -e 's/[[:space:]].*//' -e 's/,//g'; }

# start_server NAME [SERVE ARGS...]: sets ADDR, PORT, SRV_DATA, SRV_PID.
start_server() {
    local name=$1; shift
    local dir=$WORK/$name
    mkdir -p "$dir"
    "$BIN" serve --listen 127.0.0.1:0 --data "$dir/srv" "$@" >"$dir/serve.out" 2>"$dir/serve.log" &
    SRV_PID=$!
    PIDS+=("$SRV_PID")
    for _ in $(seq 200); do
        ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$dir/serve.out")
        [ -n "$ADDR" ] && break
        sleep 0.05
    done
    [ -n "$ADDR" ] || die "the server did not start: $(cat "$dir/serve.log")"
    PORT=${ADDR##*:}
    SRV_DATA=$dir/srv
}

stop_server() { kill "$SRV_PID"; wait "$SRV_PID" 2>/dev/null || true; }

ROWS=()
# measure LABEL push|pull MIB LIMIT_BYTES_PER_S CLIENT_ARGS...: one timed run against the running server.
measure() {
    local label=$1 cmd=$2 mib=$3 limit=$4; shift 4
    local dir=$WORK/case-$RANDOM$RANDOM
    mkdir -p "$dir"
    # An account of its own, so a pull brings this case's file only.
    TOKEN=$("$BIN" account add "case${#ROWS[@]}" --data "$SRV_DATA" | tail -n1)
    local folder=$dir/folder
    if [ "$cmd" = push ]; then
        mkdir -p "$folder"
        head -c "$((mib << 20))" /dev/urandom >"$folder/big.bin"
        local sfield=bytes_received stat="Total bytes sent:"
    else
        # Put the file on the server first, unlimited.
        local seed=$dir/seed
        mkdir -p "$seed"
        head -c "$((mib << 20))" /dev/urandom >"$seed/big.bin"
        "$BIN" push "$seed" --server "$ADDR" --token "$TOKEN" --no-progress >/dev/null
        local sfield=bytes_acked stat="Total bytes received:"
    fi
    python3 "$WORK/sample.py" "$PORT" "$sfield" "$dir/samples" &
    local sampler=$!
    PIDS+=("$sampler")
    sleep 0.3
    echo "[$label] $cmd $mib MiB" >&2
    local t0=$EPOCHREALTIME
    local out
    out=$("$BIN" "$cmd" "$folder" --server "$ADDR" --token "$TOKEN" --no-progress --stats "$@")
    local t1=$EPOCHREALTIME
    sleep 0.2
    kill "$sampler"; wait "$sampler" 2>/dev/null || true
    local bytes
    bytes=$(field "$stat" <<<"$out")
    local smooth
    smooth=$(python3 "$WORK/smooth.py" "$dir/samples")
    ROWS+=("$(awk -v l="$label" -v b="$bytes" -v a="$t0" -v z="$t1" -v lim="$limit" -v s="$smooth" 'BEGIN {
        split(s, p, "|"); w = z - a; r = b / w;
        printf "| %s | %.0f KiB/s | %d | %.2f s | %.0f KiB/s | %.3f | %s | %s |", l, lim / 1024, b, w, r / 1024, r / lim, p[1], p[2] }')")
    echo "[$label] ${ROWS[-1]}" >&2
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}

M=$((1 << 20))
K=1024
start_server client-limits
measure "push --bwlimit 2M" push "$BIG" $((2 * M)) --bwlimit 2M
measure "pull --bwlimit 2M" pull "$BIG" $((2 * M)) --bwlimit 2M
measure "push --bwlimit 500K" push "$SMALL" $((500 * K)) --bwlimit 500K
measure "pull --bwlimit 500K" pull "$SMALL" $((500 * K)) --bwlimit 500K
stop_server
start_server serve-limit --bwlimit 2M
measure "push to serve --bwlimit 2M" push "$BIG" $((2 * M))
measure "pull from serve --bwlimit 2M" pull "$BIG" $((2 * M))
stop_server

echo
echo "On loopback, $BIN; achieved = the limited direction's wire bytes / whole-process wall time:"
echo
echo "| case | limit | wire bytes | wall time | achieved | ratio | per-second rate on the link (min-max KiB/s) | longest stall |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
