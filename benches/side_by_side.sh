#!/usr/bin/env bash
# Wall time of whole pushes, deltasync against an rsync daemon, in alternating runs: the speed
# targets of the README ("Speed and memory"). Prints every run and the medians.
#
#   benches/side_by_side.sh [RUNS]        (default 12)
#
# Scenarios (fixtures from `cargo bench --bench delta_sizes -- --generate-only`):
# - big-mid-edit end to end: a 256 MiB file already on both servers gets 64 KiB overwritten in
#   the middle; `deltasync push` against `rsync -az`.
# - initial-big: the 256 MiB file into an empty account / module; against `rsync -a --fsync`.
# - initial-small: 10,000 x 4 KiB files into an empty account; against `rsync -a --fsync` and
#   plain `rsync -a`. Run on a freshly made ext4 image when run as root: ext4 skips inodes deleted
#   in the last seconds when it allocates, so a tree deleted just before makes the next 10,000
#   creates seconds slower, for both tools alike. Nothing is deleted between these runs.
#
# The order alternates (deltasync first in odd runs, rsync first in even ones), the files both
# tools read are read once just before each timed run, and `sync` runs before each. Needs rsync.
# Environment: DELTASYNC_BENCH_TMP (work folder parent, default $TMPDIR or /tmp; ~3 GB),
# DELTASYNC_BIN (default target/release/deltasync, built first), KEEP=1 keeps the work folder.
set -euo pipefail

RUNS=${1:-12}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "side_by_side: $*" >&2; exit 1; }
command -v rsync >/dev/null || die "needs rsync (apt-get install rsync)"

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
cargo bench --locked --bench delta_sizes --no-run >&2
GEN=$(cargo bench --locked --bench delta_sizes --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*delta_sizes[^"]*\)".*/\1/p' | tail -n 1)
[ -x "$GEN" ] || die "could not find the delta_sizes bench binary"

WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-sbs.XXXXXX")
PIDS=()
MNT=""
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    PIDS=()
    [ -n "$MNT" ] && umount "$MNT" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "side_by_side: kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for s in big-mid-edit initial-big initial-small; do
    "$GEN" --generate-only "$WORK/fx-$s" "$s" >&2
done

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)], "(min", a[1] ", max", a[NR] ")"}'; }

# Starts a deltasync server and an rsync daemon with their data under $1; sets ADDR, PORT, MOD.
start_servers() {
    local d=$1
    mkdir -p "$d/mod"
    "$BIN" serve --listen 127.0.0.1:0 --data "$d/data" >"$d/serve.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 100); do grep -q 'listening on' "$d/serve.log" && break; sleep 0.05; done
    ADDR=$(grep -o 'listening on [0-9.:]*' "$d/serve.log" | awk '{print $3}')
    [ -n "$ADDR" ] || die "deltasync serve did not start: $(cat "$d/serve.log")"
    PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    printf 'port = %s\nuse chroot = false\n[mod]\npath = %s\nread only = false\n' "$PORT" "$d/mod" >"$d/rsyncd.conf"
    if [ "$(id -u)" = 0 ]; then printf 'uid = root\ngid = root\n' >>"$d/rsyncd.conf"; fi
    rsync --daemon --no-detach --config="$d/rsyncd.conf" --address=127.0.0.1 &
    PIDS+=($!)
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
    MOD=rsync://127.0.0.1:$PORT/mod
}
stop_servers() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    PIDS=()
}
token() { "$BIN" account add "$1" --data "$2/data" | tail -n 1; }

# --- the 256 MiB scenarios, on the work folder's file system ---
D=$WORK/big
start_servers "$D"
for s in big-mid-edit initial-big; do
    : >"$D/$s.ds"; : >"$D/$s.rs"
    for i in $(seq "$RUNS"); do
        tok=$(token "$s-$i" "$D")
        c=$D/c-$s-$i
        if [ "$s" = initial-big ]; then
            cp -a "$WORK/fx-$s/new" "$c"; dst=$MOD/$s-$i/; flags=(--fsync)
        else
            cp -a "$WORK/fx-$s/base" "$c"
            "$BIN" push "$c" --server "$ADDR" --token "$tok" --no-progress >/dev/null
            rsync -a --exclude .deltasync "$c/" "$MOD/$s-$i/"
            cat "$WORK/fx-$s/new/big.bin" >"$c/big.bin"; touch -r "$WORK/fx-$s/new/big.bin" "$c/big.bin"
            dst=$MOD/$s-$i/; flags=(-z)
        fi
        # Only this run's copies exist: the others are deleted at the end of each run.
        warm() { sync; cat "$c/big.bin" $(find "$D/data" "$D/mod" -name big.bin) >/dev/null; }
        run_ds() { warm; local t; t=$(date +%s%N); "$BIN" push "$c" --server "$ADDR" --token "$tok" --no-progress >/dev/null; ms "$t" >>"$D/$s.ds"; }
        run_rs() { warm; local t; t=$(date +%s%N); rsync -a "${flags[@]}" --exclude .deltasync "$c/" "$dst"; ms "$t" >>"$D/$s.rs"; }
        if [ $((i % 2)) = 1 ]; then run_ds; run_rs; else run_rs; run_ds; fi
        echo "$s $i: deltasync $(tail -n 1 "$D/$s.ds") ms, rsync ${flags[*]} $(tail -n 1 "$D/$s.rs") ms" >&2
        rm -rf "$c"; find "$D/data" "$D/mod" -name big.bin -delete
    done
done
stop_servers

# --- initial-small, on a fresh file system when we can make one ---
S=$WORK/small
mkdir -p "$S"
if [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null; then
    truncate -s 4G "$WORK/small.img"
    mkfs.ext4 -q -F "$WORK/small.img"
    mount -o loop "$WORK/small.img" "$S" && MNT=$S
else
    echo "side_by_side: not root: initial-small runs on the work folder's file system" >&2
fi
start_servers "$S"
: >"$S/ds"; : >"$S/rf"; : >"$S/rp"
for i in $(seq "$RUNS"); do
    tok=$(token "small-$i" "$S")
    c=$S/c$i
    cp -a "$WORK/fx-initial-small/new" "$c"
    run_ds() { sync; local t; t=$(date +%s%N); "$BIN" push "$c" --server "$ADDR" --token "$tok" --no-progress >/dev/null; ms "$t" >>"$S/ds"; }
    run_rf() { sync; local t; t=$(date +%s%N); rsync -a --fsync --exclude .deltasync "$c/" "$MOD/f$i/"; ms "$t" >>"$S/rf"; }
    run_rp() { sync; local t; t=$(date +%s%N); rsync -a --exclude .deltasync "$c/" "$MOD/p$i/"; ms "$t" >>"$S/rp"; }
    case $((i % 3)) in 0) run_ds; run_rf; run_rp ;; 1) run_rf; run_rp; run_ds ;; 2) run_rp; run_ds; run_rf ;; esac
    echo "initial-small $i: deltasync $(tail -n 1 "$S/ds") ms, rsync --fsync $(tail -n 1 "$S/rf") ms, rsync $(tail -n 1 "$S/rp") ms" >&2
done
stop_servers

echo "side by side, $RUNS alternating runs each, medians in ms ($(nproc) cores, $(date -u +%F)):"
echo "big-mid-edit:  deltasync $(median <"$D/big-mid-edit.ds")  rsync -z $(median <"$D/big-mid-edit.rs")"
echo "initial-big:   deltasync $(median <"$D/initial-big.ds")  rsync --fsync $(median <"$D/initial-big.rs")"
echo "initial-small: deltasync $(median <"$S/ds")  rsync --fsync $(median <"$S/rf")  rsync $(median <"$S/rp")"
