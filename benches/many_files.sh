#!/usr/bin/env bash
# Many small files, deltasync against an rsync daemon on loopback: the "Many files" targets of the
# README. Whole-process wall times, in alternating runs.
#
#   benches/many_files.sh [RUNS] [FILES]      (default 3 runs of 100,000 files of 4 KiB)
#
# Per run, into a fresh account / module: a first push (deltasync push; plain `rsync -a`, no
# --fsync), a no-op round of each, a first pull into an empty folder (`deltasync pull`; rsync from
# the module), and a `watch`'s first round (until it has printed one `uploaded` line per file).
# Files are random (incompressible), new for each push and watch (the server deduplicates across
# accounts), in folders of 1,000. `sync` runs before each timed command.
# As root, everything runs on a freshly made ext4 image (attached with direct I/O, like a disk:
# see below) and nothing is deleted until the end: ext4 skips inodes deleted in the last seconds
# when it allocates, which makes creates after a big delete seconds slower (see side_by_side.sh).
# Environment: DELTASYNC_BENCH_TMP (work folder parent, default $TMPDIR or /tmp; ~2.5 GB per run
# of 100,000 files), DELTASYNC_BIN (default target/release/deltasync, built first), KEEP=1 keeps it,
# DELTASYNC_BENCH_IMAGE=0 runs on the work folder's own file system even as root.
set -euo pipefail

RUNS=${1:-3}
FILES=${2:-100000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "many_files: $*" >&2; exit 1; }
command -v rsync >/dev/null || die "needs rsync (apt-get install rsync)"

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-many.XXXXXX")
BASE=$WORK
PIDS=()
MNT=""
LOOP=""
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    [ -n "$MNT" ] && umount "$MNT" 2>/dev/null
    [ -n "$LOOP" ] && losetup -d "$LOOP" 2>/dev/null
    if [ "${KEEP:-0}" = 1 ]; then echo "many_files: kept $BASE" >&2; else rm -rf "$BASE"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ "${DELTASYNC_BENCH_IMAGE:-1}" = 1 ] && [ "$(id -u)" = 0 ] && command -v mkfs.ext4 >/dev/null \
    && command -v losetup >/dev/null; then
    # The image is attached with direct I/O, so that it behaves like a disk: a buffered loop
    # device copies every block written back into a second page cache and a second file system
    # (the one holding the image), and that doubled writeback lands inside the timed window of
    # whoever makes data durable (deltasync) and after the window of whoever does not (rsync
    # without --fsync). Preallocated, so writes to it allocate nothing in the outer file system.
    SIZE=$(( FILES * 4096 * (2 + 6 * RUNS) * 13 / 10 + (1 << 30) ))
    fallocate -l "$SIZE" "$WORK/fs.img" 2>/dev/null || truncate -s "$SIZE" "$WORK/fs.img"
    LOOP=$(losetup --direct-io=on -f --show "$WORK/fs.img" 2>/dev/null || losetup -f --show "$WORK/fs.img")
    mkfs.ext4 -q -F -i 4096 "$LOOP"
    mkdir "$WORK/fs"
    mount "$LOOP" "$WORK/fs" && MNT=$WORK/fs
    echo "many_files: on a fresh ext4 image, $LOOP, direct I/O $(cat "/sys/block/${LOOP#/dev/}/loop/dio" 2>/dev/null || echo '?')" >&2
    WORK=$WORK/fs
else
    echo "many_files: runs on the work folder's file system (no image: not root, or DELTASYNC_BENCH_IMAGE=0)" >&2
fi

# New random files in DIR: every push and watch starts from content the server has never seen
# (its store deduplicates across accounts, so copies of one tree would measure a push of nothing).
gen() {
    python3 - "$1" "$FILES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
r = open('/dev/urandom', 'rb')
for i in range(n):
    d = f'{root}/d{i // 1000:03}'
    if i % 1000 == 0:
        os.makedirs(d)
    with open(f'{d}/f{i % 1000:04}.bin', 'wb') as f:
        f.write(r.read(4096))
EOF
}

mkdir -p "$WORK/mod"
"$BIN" serve --listen 127.0.0.1:0 --data "$WORK/data" >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q 'listening on' "$WORK/serve.log" && break; sleep 0.05; done
ADDR=$(grep -o 'listening on [0-9.:]*' "$WORK/serve.log" | awk '{print $3}')
[ -n "$ADDR" ] || die "deltasync serve did not start: $(cat "$WORK/serve.log")"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
printf 'port = %s\nuse chroot = false\n[mod]\npath = %s\nread only = false\n' "$PORT" "$WORK/mod" >"$WORK/rsyncd.conf"
if [ "$(id -u)" = 0 ]; then printf 'uid = root\ngid = root\n' >>"$WORK/rsyncd.conf"; fi
rsync --daemon --no-detach --config="$WORK/rsyncd.conf" --address=127.0.0.1 &
PIDS+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.05; done
MOD=rsync://127.0.0.1:$PORT/mod
export DELTASYNC_SERVER=$ADDR

ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
median() { sort -n | awk '{a[NR]=$1} END {if (NR) print a[int((NR+1)/2)], "(min", a[1] ", max", a[NR] ")"}'; }
timed() { # FILE CMD...: runs CMD after a sync, appends its wall ms to FILE
    local out=$1; shift
    sync
    local t; t=$(date +%s%N)
    "$@" >/dev/null 2>&1 || die "failed: $*"
    ms "$t" >>"$WORK/$out"
}
watch_first_round() { # DIR TOKEN: ms until the watch has uploaded every file
    local d=$1 tok=$2 log=$WORK/watch.log t
    : >"$log"
    sync
    t=$(date +%s%N)
    "$BIN" watch "$d" --token "$tok" --no-progress 2>"$log" &
    local wp=$!
    # Reads only what the log gained since the last look, every 10 ms (a `grep -c` of the whole
    # log every 20 ms cost the two cores a few percent by the end of the round).
    python3 - "$log" "$FILES" "$wp" <<'EOF' || die "watch stopped: $(tail -n 3 "$log")"
import os, sys, time
log, want, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen, rest = 0, b''
with open(log, 'rb') as f:
    while seen < want:
        got = f.read()
        if not got:
            try:
                os.kill(pid, 0)
            except OSError:
                sys.exit(1)
            time.sleep(0.01)
            continue
        lines = (rest + got).split(b'\n')
        rest = lines.pop()
        seen += sum(1 for l in lines if l.startswith(b'uploaded '))
EOF
    ms "$t" >>"$WORK/watch"
    kill "$wp"; wait "$wp" 2>/dev/null || true
}

for i in $(seq "$RUNS"); do
    tok=$("$BIN" account add "run$i" --data "$WORK/data" 2>/dev/null | tail -n 1)
    c=$WORK/c$i
    gen "$c"
    ds_push() { timed push "$BIN" push "$c" --token "$tok" --no-progress; timed noop "$BIN" push "$c" --no-progress; }
    rs_push() { timed rpush rsync -a --exclude .deltasync "$c/" "$MOD/r$i/"; timed rnoop rsync -a --exclude .deltasync "$c/" "$MOD/r$i/"; }
    ds_pull() { timed pull "$BIN" pull "$WORK/p$i" --token "$tok" --no-progress; }
    rs_pull() { timed rpull rsync -a "$MOD/r$i/" "$WORK/q$i/"; }
    if [ $((i % 2)) = 1 ]; then ds_push; rs_push; ds_pull; rs_pull; else rs_push; ds_push; rs_pull; ds_pull; fi
    wtok=$("$BIN" account add "watch$i" --data "$WORK/data" 2>/dev/null | tail -n 1)
    gen "$WORK/w$i"
    watch_first_round "$WORK/w$i" "$wtok"
    echo "run $i: push $(tail -n 1 "$WORK/push") ms (rsync $(tail -n 1 "$WORK/rpush")), no-op $(tail -n 1 "$WORK/noop") ms (rsync $(tail -n 1 "$WORK/rnoop")), pull $(tail -n 1 "$WORK/pull") ms (rsync $(tail -n 1 "$WORK/rpull")), watch first round $(tail -n 1 "$WORK/watch") ms" >&2
done

echo "$FILES files of 4 KiB, $RUNS alternating runs, medians in ms ($(nproc) cores, $(date -u +%F)):"
echo "first push:          deltasync $(median <"$WORK/push")  rsync -a $(median <"$WORK/rpush")"
echo "no-op push:          deltasync $(median <"$WORK/noop")  rsync -a $(median <"$WORK/rnoop")"
echo "first pull:          deltasync $(median <"$WORK/pull")  rsync -a $(median <"$WORK/rpull")"
echo "watch's first round: deltasync $(median <"$WORK/watch")"
