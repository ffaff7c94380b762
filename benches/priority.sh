#!/usr/bin/env bash
# Priorities over a slow link: how long a 1 KiB file saved on computer A takes to be complete on
# computer B while A uploads a 1 GiB file, against the same on an idle link.
#
#   sudo benches/priority.sh
#
# Two network namespaces joined by a veth pair, both directions shaped with `tc tbf` (20 Mbit/s by
# default, burst 32kbit latency 400ms, as benches/slow_link.sh), `deltasync serve` in one, and in
# the other two `deltasync watch DIR -v --no-progress` on one account (devices A and B, both
# folders empty at the start). Then:
#
#   1. idle link: N_IDLE times, a 1 KiB file `idle-I.txt` of random bytes is saved in A and the
#      time until B holds it whole (size and content) is measured;
#   2. busy link: a 1 GiB incompressible file (made in the work folder, on A's file system) is
#      moved into A (`mv`, so it appears at once); after WAIT s, with the client's veth seen
#      sending, N times a 1 KiB file `small-I.txt` is saved in A and timed the same way (at most
#      TIMEOUT s each: a save still missing on B then counts as "not within TIMEOUT s"), GAP s
#      apart. At the end the script checks that the big upload is still under way (B has no
#      `big.bin`, the veth still sends) and reports the rate the link carried meanwhile.
#
# A save is one open/write/close of the file in A itself (SAVE=write, the default: an editor
# writing in place), or a write to a temp file in the work folder then a rename into A
# (SAVE=mv: an editor saving by rename). The clock starts before the open (or the rename); B
# is polled every 1 ms from the same python3 process (the namespaces share the file system). The
# times are whole-process figures: A's watch noticing the change, its round, the commit on the
# server, the server's notice to B, B's round and its download into place. The watch logs are
# time-stamped as their lines arrive, so each save's time is also split at A's `uploaded NAME`
# line (the server has committed it); during the upload, tbf's backlog on the client's end (the
# queue a small file's packets wait in) is sampled every 200 ms.
#
# Needs root (network namespaces and tc), iproute2 (`ip`, `tc`) and python3.
# Environment: RATE (tbf rate, default 20mbit), N (saves during the upload, default 15), N_IDLE
# (saves on the idle link, default 15), GAP (s between saves, default 2), TIMEOUT (s per save,
# default 20), WAIT (s between the big file's move and the first save, default 5), BIG (size of
# the big file for `head -c`, default 1G), SAVE (write or mv), WATCH_ARGS (more options for both
# watch processes, e.g. `--bwlimit 1M`), DELTASYNC_BENCH_TMP (work folder
# parent, default $TMPDIR or /tmp), DELTASYNC_BIN (default target/release/deltasync, built
# first; point it at an older build for a "before" figure), KEEP=1 keeps the work folder (the
# watch and serve logs are in it).
#
# Addresses are TEST-NET-1 (192.0.2.1 server, 192.0.2.2 client), only on the veth pair inside the
# two namespaces this script makes; neither namespace has a route anywhere else. Everything is
# stopped (by PID) and removed on exit (trap).
set -euo pipefail

RATE=${RATE:-20mbit}
N=${N:-15}
N_IDLE=${N_IDLE:-15}
GAP=${GAP:-2}
TIMEOUT=${TIMEOUT:-20}
WAIT=${WAIT:-5}
BIG=${BIG:-1G}
SAVE=${SAVE:-write}
SRV_IP=192.0.2.1
CLI_IP=192.0.2.2
DS_PORT=7700
ROOT=$(cd "$(dirname "$0")/.." && pwd)

die() { echo "priority: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc)"
command -v ip >/dev/null || die "needs ip (apt-get install iproute2)"
command -v tc >/dev/null || die "needs tc (apt-get install iproute2)"
command -v python3 >/dev/null || die "needs python3 (the save-and-poll loop)"
case "$SAVE" in write | mv) ;; *) die "SAVE must be write or mv, not $SAVE" ;; esac

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
[ -x "$BIN" ] || die "$BIN is not executable"

TAG=$$
NS_S=ds-prio-srv-$TAG
NS_C=ds-prio-cli-$TAG
IF_S=dps$TAG
IF_C=dpc$TAG
WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-prio.XXXXXX")
PIDS=()

cleanup() {
    set +e
    # The watchers first, then the server (the reverse of their start).
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        kill "${PIDS[i]}" 2>/dev/null
        wait "${PIDS[i]}" 2>/dev/null
    done
    # Anything still running inside our namespaces (only ours: they are this script's).
    for ns in "$NS_S" "$NS_C"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
    done
    ip netns del "$NS_S" 2>/dev/null
    ip netns del "$NS_C" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "priority: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$NS_S"
ip netns add "$NS_C"
ip link add "$IF_S" type veth peer name "$IF_C"
ip link set "$IF_S" netns "$NS_S"
ip link set "$IF_C" netns "$NS_C"
ip -n "$NS_S" addr add "$SRV_IP/24" dev "$IF_S"
ip -n "$NS_C" addr add "$CLI_IP/24" dev "$IF_C"
for ns in "$NS_S" "$NS_C"; do ip -n "$ns" link set lo up; done
ip -n "$NS_S" link set "$IF_S" up
ip -n "$NS_C" link set "$IF_C" up
ip netns exec "$NS_S" tc qdisc replace dev "$IF_S" root tbf rate "$RATE" burst 32kbit latency 400ms
ip netns exec "$NS_C" tc qdisc replace dev "$IF_C" root tbf rate "$RATE" burst 32kbit latency 400ms

in_cli() { ip netns exec "$NS_C" "$@"; }

# Bytes the client's end of the veth has sent (uploads, and B's requests).
tx_bytes() { in_cli cat "/sys/class/net/$IF_C/statistics/tx_bytes"; }

# wait_for HOST PORT: until something listens there (seen from the client namespace).
wait_for() {
    for _ in $(seq 100); do
        if in_cli bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on $1:$2"
}

# The save-and-poll loop: python3 WORK/save.py A B STAGE PREFIX COUNT GAP TIMEOUT SAVE TIMES. One
# line per save on stderr, then `ms1 ms2 ...` on stdout (`inf` for a save not on B within TIMEOUT);
# `NAME SAVED-AT` (Unix time) per save appended to TIMES.
cat >"$WORK/save.py" <<'EOF'
import os, sys, time
a, b, stage, prefix = sys.argv[1:5]
count, gap, timeout = int(sys.argv[5]), float(sys.argv[6]), float(sys.argv[7])
mode, times = sys.argv[8], open(sys.argv[9], "a")
out = []
for i in range(1, count + 1):
    name = f"{prefix}-{i}.txt"
    data = os.urandom(1024)
    target = os.path.join(b, name)
    if mode == "mv":
        tmp = os.path.join(stage, name)
        with open(tmp, "wb") as f:
            f.write(data)
        w0, t0 = time.time(), time.monotonic()
        os.rename(tmp, os.path.join(a, name))
    else:
        w0, t0 = time.time(), time.monotonic()
        with open(os.path.join(a, name), "wb") as f:
            f.write(data)
    took = None
    while time.monotonic() - t0 < timeout:
        try:
            if os.stat(target).st_size == 1024:
                with open(target, "rb") as f:
                    if f.read() == data:
                        took = time.monotonic() - t0
                        break
        except FileNotFoundError:
            pass
        time.sleep(0.001)
    if took is None:
        print(f"  {name}: not on B within {timeout:g} s", file=sys.stderr, flush=True)
        out.append("inf")
    else:
        print(f"  {name}: {took * 1000:.0f} ms", file=sys.stderr, flush=True)
        out.append(f"{took * 1000:.1f}")
    print(name, f"{w0:.6f}", file=times, flush=True)
    if i < count:
        time.sleep(max(0.0, gap - (time.monotonic() - t0)) if took is not None else gap)
print(" ".join(out))
EOF

# summary LABEL ms...: median, p90 (nearest rank) and max, `> TIMEOUT s` for missing saves.
summary() {
    local label=$1
    shift
    python3 - "$TIMEOUT" "$label" "$@" <<'EOF'
import math, sys
timeout, label, xs = float(sys.argv[1]), sys.argv[2], sorted(float(x) for x in sys.argv[3:])
def show(v):
    return f"not within {timeout:g} s" if math.isinf(v) else f"{v:.0f} ms"
def rank(p):
    return xs[max(0, math.ceil(p * len(xs)) - 1)]
missing = sum(math.isinf(x) for x in xs)
print(f"{label}: {len(xs)} saves, median {show(rank(0.5))}, p90 {show(rank(0.9))}, "
      f"max {show(xs[-1])}, min {show(xs[0])}; {missing} not on B within {timeout:g} s")
EOF
}

# split PREFIX: per save of PREFIX-I.txt, A's part (the save until A's watch prints `uploaded`,
# i.e. the server has committed it) and the rest (until B's watch prints `downloaded`).
split() {
    python3 - "$1" "$WORK/times" "$WORK/watch-A.log" "$WORK/watch-B.log" <<'EOF'
import sys
prefix, times, la, lb = sys.argv[1:5]
def seen(path, word):
    out = {}
    for line in open(path, errors="replace"):
        parts = line.split()
        if len(parts) >= 3 and parts[1] == word:
            out.setdefault(parts[2], float(parts[0]))
    return out
up, down = seen(la, "uploaded"), seen(lb, "downloaded")
a, b = [], []
for line in open(times):
    name, w0 = line.split()
    if not name.startswith(prefix + "-"):
        continue
    if name in up:
        a.append((up[name] - float(w0)) * 1000)
        if name in down:
            b.append((down[name] - up[name]) * 1000)
def show(xs):
    if not xs:
        return "none"
    xs = sorted(xs)
    return f"median {xs[(len(xs) + 1) // 2 - 1]:.0f} ms, max {xs[-1]:.0f} ms ({len(xs)})"
print(f"A's part (save -> A prints uploaded): {show(a)}; B's part (-> B prints downloaded): {show(b)}")
EOF
}

# Server and account.
"$BIN" --version >&2 || true
ip netns exec "$NS_S" "$BIN" serve --listen "$SRV_IP:$DS_PORT" --data "$WORK/srv" >"$WORK/serve.log" 2>&1 &
PIDS+=("$!")
wait_for "$SRV_IP" "$DS_PORT"
# `serve` listens before it makes its TLS identity on a new data folder, and an `account add`
# meanwhile makes one too (the two can mix key and certificate): wait for the line `serve` prints
# once its identity is made and recorded.
for _ in $(seq 100); do
    grep -q 'listening on' "$WORK/serve.log" && break
    sleep 0.1
done
grep -q 'listening on' "$WORK/serve.log" || die "serve did not start (log: $WORK/serve.log)"
added=$("$BIN" account add bench --data "$WORK/srv")
token=$(tail -n1 <<<"$added")
fp=$(sed -n 's/^fingerprint: //p' <<<"$added" | head -n1)
trust=()
if [ -n "$fp" ]; then trust=(--fingerprint "$fp"); fi

# stamp: each line of stdin with the Unix time it was read before it (the watch logs' "uploaded
# NAME" / "downloaded NAME" lines then split a save's time into A's part and B's).
stamp() { while IFS= read -r line; do printf '%s %s\n' "$EPOCHREALTIME" "$line"; done; }

# Two computers in the client namespace, both folders empty.
read -r -a watch_args <<<"${WATCH_ARGS:-}"
mkdir -p "$WORK/A" "$WORK/B" "$WORK/stage"
for d in A B; do
    # Not through in_cli: a function run in the background is a subshell, and $! would be its PID.
    ip netns exec "$NS_C" "$BIN" watch "$WORK/$d" --server "$SRV_IP:$DS_PORT" --token "$token" "${trust[@]}" \
        --device "$d" --no-progress -v "${watch_args[@]}" > >(stamp >"$WORK/watch-$d.log") 2>&1 &
    PIDS+=("$!")
done
# Both are up once a first file goes through (not timed).
python3 "$WORK/save.py" "$WORK/A" "$WORK/B" "$WORK/stage" warm 1 0 60 write /dev/null >/dev/null 2>&1 ||
    die "a first file did not reach B within 60 s (logs: $WORK/watch-A.log, watch-B.log)"

echo "[idle] $N_IDLE saves of 1 KiB on A over an idle $RATE link ($SAVE)" >&2
idle=$(python3 "$WORK/save.py" "$WORK/A" "$WORK/B" "$WORK/stage" idle "$N_IDLE" "$GAP" "$TIMEOUT" "$SAVE" "$WORK/times")
# shellcheck disable=SC2086
idle_line=$(summary "idle link" $idle)

echo "[busy] making the $BIG file" >&2
head -c "$BIG" /dev/urandom >"$WORK/stage/big.bin"
big_bytes=$(stat -c %s "$WORK/stage/big.bin")
tx0=$(tx_bytes)
mv "$WORK/stage/big.bin" "$WORK/A/big.bin"
sleep "$WAIT"
tx1=$(tx_bytes)
t1=$EPOCHREALTIME
sent=$((tx1 - tx0))
echo "[busy] $sent bytes sent by the client in the $WAIT s after the move" >&2
[ "$sent" -gt $((1024 * 1024)) ] || die "the big upload is not under way ($sent bytes in $WAIT s; logs in $WORK)"

# The queue in front of the client's end of the link (tbf's backlog) every 200 ms: what a small
# file's packets wait behind there.
(
    while :; do
        in_cli tc -s qdisc show dev "$IF_C" | sed -n 's/^ *backlog \([0-9]*\)b.*/\1/p'
        sleep 0.2
    done
) >"$WORK/backlog" &
sampler=$!
PIDS+=("$sampler")
echo "[busy] $N saves of 1 KiB on A during the upload ($SAVE)" >&2
busy=$(python3 "$WORK/save.py" "$WORK/A" "$WORK/B" "$WORK/stage" small "$N" "$GAP" "$TIMEOUT" "$SAVE" "$WORK/times")
kill "$sampler"
wait "$sampler" 2>/dev/null || true
tx2=$(tx_bytes)
t2=$EPOCHREALTIME
sleep 1
tx3=$(tx_bytes)
# shellcheck disable=SC2086
busy_line=$(summary "during the upload" $busy)
rate=$(awk -v b=$((tx2 - tx1)) -v a="$t1" -v c="$t2" 'BEGIN { printf "%.1f", b * 8 / (c - a) / 1e6 }')
if [ -e "$WORK/B/big.bin" ]; then on_b="B HAS big.bin (the upload ended during the saves)"; else on_b="B has no big.bin yet"; fi
still=$((tx3 - tx2))

echo
echo "$("$BIN" --version 2>/dev/null || echo "$BIN"), veth pair shaped to $RATE each way (tbf burst 32kbit latency 400ms), saves by $SAVE${WATCH_ARGS:+, watch $WATCH_ARGS}:"
echo "  $idle_line"
echo "    $(split idle)"
echo "  $busy_line"
echo "    $(split small)"
echo "  the client sent $((tx2 - tx0)) bytes from the move to the last save ($rate Mbit/s during the saves) of a $big_bytes-byte file;"
echo "  at the end: $on_b, the client sent $still bytes in the next second"
sort -n "$WORK/backlog" | awk -v rate="$RATE" '
    function bits(r) { if (r ~ /[gG]bit$/) return r * 1e9; if (r ~ /[mM]bit$/) return r * 1e6; if (r ~ /[kK]bit$/) return r * 1e3; return r }
    { v[NR] = $1 }
    END { if (NR == 0) exit; b = bits(rate); m = v[int((NR + 1) / 2)]; x = v[NR]
          printf "  queue in front of the client'"'"'s link (tbf backlog, %d samples): median %d B (%.0f ms at %s), max %d B (%.0f ms)\n", NR, m, m * 8000 / b, rate, x, x * 8000 / b }'
for d in A B; do
    n=$(grep -c -i -E 'error|warn' "$WORK/watch-$d.log" || true)
    echo "  watch $d: $n lines with error or warn"
    grep -i -E 'error|warn' "$WORK/watch-$d.log" | head -n 5 | sed 's/^/    /' || true
done
