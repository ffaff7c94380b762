#!/usr/bin/env bash
# deltasync vs rsync over a slow link: two network namespaces joined by a veth pair, both
# directions shaped with `tc tbf` (10 Mbit/s by default), the servers in one namespace and the
# clients in the other.
#
#   sudo benches/slow_link.sh [SCENARIO...]      (default: big-mid-edit small-1pct log-append)
#
# Per scenario: generate base/new (`cargo bench --bench delta_sizes -- --generate-only`), start
# `deltasync serve` and `rsync --daemon` in the server namespace, push/seed `base` over the link
# still unshaped, shape it, turn the client folder into `new` in place, then time
# `deltasync push --stats` and `rsync -az --delete --stats` across the shaped link.
#
# Needs root with cargo on PATH (`sudo env PATH="$PATH" benches/slow_link.sh`), iproute2 (`ip`, `tc`), and rsync for the rsync rows (skipped without it).
# Environment: RATE (tbf rate, default 10mbit), DELTASYNC_BENCH_SCALE (default 1.0),
# DELTASYNC_BENCH_TMP (work folder parent, default $TMPDIR or /tmp), DELTASYNC_BIN (default
# target/release/deltasync, built first), KEEP=1 keeps the work folder.
#
# Addresses are TEST-NET-1 (192.0.2.1 server, 192.0.2.2 client), only on the veth pair inside the
# two namespaces this script makes; neither namespace has a route anywhere else. Everything is
# removed on exit (trap).
set -euo pipefail

RATE=${RATE:-10mbit}
SCALE=${DELTASYNC_BENCH_SCALE:-1.0}
SRV_IP=192.0.2.1
CLI_IP=192.0.2.2
DS_PORT=7700
RS_PORT=8730
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if [ $# -gt 0 ]; then SCENARIOS=("$@"); else SCENARIOS=(big-mid-edit small-1pct log-append); fi

die() { echo "slow_link: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces and tc)"
command -v ip >/dev/null || die "needs ip (apt-get install iproute2)"
command -v tc >/dev/null || die "needs tc (apt-get install iproute2)"
HAVE_RSYNC=0
if command -v rsync >/dev/null; then HAVE_RSYNC=1; else echo "slow_link: rsync not found: rsync rows skipped" >&2; fi

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
[ -x "$BIN" ] || die "$BIN is not executable"
# Build the generator now so its build time is not mixed into anything.
cargo bench --bench delta_sizes --no-run >&2

TAG=$$
NS_S=ds-slow-srv-$TAG
NS_C=ds-slow-cli-$TAG
IF_S=dss$TAG
IF_C=dsc$TAG
WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-slow.XXXXXX")
PIDS=()

cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    # Anything still running inside our namespaces (only ours: they are this script's).
    for ns in "$NS_S" "$NS_C"; do
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill "$p" 2>/dev/null; done
    done
    ip netns del "$NS_S" 2>/dev/null
    ip netns del "$NS_C" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "slow_link: kept $WORK" >&2; else rm -rf "$WORK"; fi
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

in_cli() { ip netns exec "$NS_C" "$@"; }

shape() {
    ip netns exec "$NS_S" tc qdisc replace dev "$IF_S" root tbf rate "$RATE" burst 32kbit latency 400ms
    ip netns exec "$NS_C" tc qdisc replace dev "$IF_C" root tbf rate "$RATE" burst 32kbit latency 400ms
}
unshape() {
    ip netns exec "$NS_S" tc qdisc del dev "$IF_S" root 2>/dev/null || true
    ip netns exec "$NS_C" tc qdisc del dev "$IF_C" root 2>/dev/null || true
}

# field LABEL < stats text: the number after LABEL, commas removed.
field() { grep -m1 "^$1" | sed -e "s/^$1[[:space:]]*//" -e 's/[[:space:]].*//' -e 's/,//g'; }

# secs T0 T1: seconds between two $EPOCHREALTIME readings, two decimals.
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# wait_for HOST PORT: until something listens there (seen from the client namespace).
wait_for() {
    for _ in $(seq 100); do
        if in_cli bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    die "nothing listens on $1:$2"
}

ROWS=()
for sc in "${SCENARIOS[@]}"; do
    dir=$WORK/$sc
    mkdir -p "$dir"
    echo "[$sc] generating (scale $SCALE)" >&2
    cargo bench -q --bench delta_sizes -- --generate-only "$dir" "$sc" "$SCALE" >/dev/null
    cp -a "$dir/base" "$dir/client"

    # deltasync server in the server namespace.
    token=$("$BIN" account add bench --data "$dir/srv" | tail -n1)
    ip netns exec "$NS_S" "$BIN" serve --listen "$SRV_IP:$DS_PORT" --data "$dir/srv" >"$dir/serve.log" 2>&1 &
    ds_pid=$!
    PIDS+=("$ds_pid")
    wait_for "$SRV_IP" "$DS_PORT"

    # rsync daemon in the server namespace.
    if [ "$HAVE_RSYNC" = 1 ]; then
        mkdir -p "$dir/rsync-dest"
        cat >"$dir/rsyncd.conf" <<EOF
use chroot = no
log file = $dir/rsyncd.log
pid file = $dir/rsyncd.pid
[bench]
path = $dir/rsync-dest
read only = no
uid = 0
gid = 0
EOF
        ip netns exec "$NS_S" rsync --daemon --no-detach --config="$dir/rsyncd.conf" --port=$RS_PORT --address=$SRV_IP &
        rs_pid=$!
        PIDS+=("$rs_pid")
        wait_for "$SRV_IP" $RS_PORT
    fi

    # Seed both servers with `base` over the unshaped link.
    unshape
    in_cli "$BIN" push "$dir/client" --server "$SRV_IP:$DS_PORT" --token "$token" \
        --no-progress --device bench >/dev/null
    if [ "$HAVE_RSYNC" = 1 ]; then
        in_cli rsync -az --delete --exclude=/.deltasync/ "$dir/client/" "rsync://$SRV_IP:$RS_PORT/bench/"
    fi

    # The change, in place: unchanged files untouched, changed ones rewritten.
    if [ "$HAVE_RSYNC" = 1 ]; then
        rsync -a --delete --exclude=/.deltasync/ "$dir/new/" "$dir/client/"
    else
        cp -a "$dir/new/." "$dir/client/"
    fi

    shape
    echo "[$sc] deltasync push over $RATE" >&2
    t0=$EPOCHREALTIME
    out=$(in_cli "$BIN" push "$dir/client" --server "$SRV_IP:$DS_PORT" --token "$token" \
        --no-progress --stats --device bench)
    t1=$EPOCHREALTIME
    ds_time=$(secs "$t0" "$t1")
    ds_wire=$(($(field "Total bytes sent:" <<<"$out") + $(field "Total bytes received:" <<<"$out")))

    rs_time=- rs_wire=-
    if [ "$HAVE_RSYNC" = 1 ]; then
        echo "[$sc] rsync -az over $RATE" >&2
        t0=$EPOCHREALTIME
        out=$(in_cli rsync -az --delete --stats --exclude=/.deltasync/ "$dir/client/" \
            "rsync://$SRV_IP:$RS_PORT/bench/")
        t1=$EPOCHREALTIME
        rs_time="$(secs "$t0" "$t1") s"
        rs_wire=$(($(field "Total bytes sent:" <<<"$out") + $(field "Total bytes received:" <<<"$out")))
        kill "$rs_pid"; wait "$rs_pid" 2>/dev/null || true
    fi
    unshape
    kill "$ds_pid"; wait "$ds_pid" 2>/dev/null || true
    ROWS+=("| $sc | $ds_wire | $ds_time s | $rs_wire | $rs_time |")
    echo "[$sc] ${ROWS[-1]}" >&2
    [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
done

echo
echo "Over a veth pair shaped to $RATE each way (tbf burst 32kbit latency 400ms), scale $SCALE:"
echo
echo "| scenario | deltasync wire bytes | deltasync time | rsync -z wire bytes | rsync time |"
echo "|---|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
