#!/usr/bin/env bash
# Many clients on many server processes, on Garage (a real distributed S3 store) + PostgreSQL,
# against the embedded default (one `serve`: SQLite + packs on its disk), in the same run:
#   - CLIENTS clients (an account each) push at once a folder of FILES files of 4 KiB and one
#     of 2 MiB, spread over the processes (client i through process i mod P); then each pulls its
#     account into an empty folder through the next process: aggregate MiB/s and files/s
#   - propagation: CLIENTS `watch`es of one account spread over the processes; a 1 KiB file pushed
#     through the first process, until the first, the median and the last watch have it (10 times)
#   - objects written per GiB (the database's `packs` rows) and S3 requests (the processes'
#     closing log lines) per 1,000 files
#
#   benches/garage.sh [CLIENTS] [FILES] [PROCESSES]     (default 200 clients, 50 files, 3 processes)
#
# Garage: GARAGE_BIN (default `garage` on PATH; `cargo install garage --locked`, about 16
# minutes to build on 2 cores). Three Garage nodes on loopback, replication factor 3. PostgreSQL:
# .ci/services.sh's throwaway cluster (fsync off). DELTASYNC_BIN (default target/release/deltasync).
# CLIENTS watches need as many inotify instances: the bench raises fs.inotify.max_user_instances
# when it may.
set -euo pipefail

CLIENTS=${1:-200}
FILES=${2:-50}
PROCS=${3:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
GARAGE=${GARAGE_BIN:-garage}
command -v "$GARAGE" >/dev/null || { echo "no garage binary: set GARAGE_BIN (cargo install garage --locked)" >&2; exit 2; }
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN
WORK=$(mktemp -d /tmp/deltasync-garage-bench.XXXXXX)
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    .ci/services.sh stop "$WORK/services" >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

limit=$(cat /proc/sys/fs/inotify/max_user_instances)
if [ "$limit" -lt $((CLIENTS + 64)) ]; then
    echo $((CLIENTS + 64)) >/proc/sys/fs/inotify/max_user_instances 2>/dev/null ||
        echo "warning: fs.inotify.max_user_instances is $limit: some of $CLIENTS watches may fail" >&2
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# --- Garage: three nodes, replication factor 3 ---
SECRET=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
S3PORTS=()
for n in 1 2 3; do
    mkdir -p "$WORK/garage$n"
    rpc=$(free_port); s3=$(free_port); admin=$(free_port)
    S3PORTS+=("$s3")
    cat >"$WORK/garage$n/garage.toml" <<EOF
metadata_dir = "$WORK/garage$n/meta"
data_dir = "$WORK/garage$n/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$SECRET"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$s3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$admin"
EOF
    "$GARAGE" -c "$WORK/garage$n/garage.toml" server >"$WORK/garage$n/log" 2>&1 &
    PIDS+=($!)
done
g() { "$GARAGE" -c "$WORK/garage1/garage.toml" "$@"; }
node_id() { # N: the node's ID@ADDR, once it answers
    for _ in $(seq 100); do
        "$GARAGE" -c "$WORK/garage$1/garage.toml" node id -q 2>/dev/null && return
        sleep 0.1
    done
    echo "garage node $1 did not start:" >&2
    cat "$WORK/garage$1/log" >&2
    exit 1
}
IDS=()
for n in 1 2 3; do IDS+=("$(node_id $n)"); done
for n in 1 2; do g node connect "${IDS[$n]}" >/dev/null; done
for id in "${IDS[@]}"; do g layout assign -z dc1 -c 10G "${id%%@*}" >/dev/null; done
g layout apply --version 1 >/dev/null
for _ in $(seq 100); do
    g bucket create deltasync >/dev/null 2>&1 && break
    sleep 0.2
done
keys=$(g key create bench)
AWS_ACCESS_KEY_ID=$(sed -n 's/^Key ID: *//p' <<<"$keys" | head -n 1)
AWS_SECRET_ACCESS_KEY=$(sed -n 's/^Secret key: *//p' <<<"$keys" | head -n 1)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY
g bucket allow --read --write --owner deltasync --key bench >/dev/null
echo "garage: 3 nodes, S3 on 127.0.0.1:${S3PORTS[*]}" >&2

# --- PostgreSQL (and an s3s-fs this bench does not use) ---
.ci/services.sh start "$WORK/services" >&2
PG=$(sed -n 's/^export DELTASYNC_TEST_PG=//p' "$WORK/services/env")
psql "$PG" -q -c "CREATE DATABASE bench"
PG=${PG%/*}/bench

# --- the clients' folders ---
python3 - "$WORK/src" "$CLIENTS" "$FILES" <<'EOF'
import os, sys
root, clients, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = open('/dev/urandom', 'rb')
for c in range(clients):
    d = f'{root}/c{c:03}'
    os.makedirs(d)
    for i in range(files):
        open(f'{d}/f{i:03}', 'wb').write(r.read(4096))
    open(f'{d}/big.bin', 'wb').write(r.read(2 << 20))
EOF
TOTAL_FILES=$((CLIENTS * (FILES + 1)))
TOTAL_MIB=$(python3 -c "print(round($CLIENTS * ($FILES * 4096 + (2 << 20)) / 1048576, 1))")

# serve NAME [ARGS...]: starts a server, sets ADDR and LAST_PID.
. "$ROOT/benches/common/serve.sh"

# endpoint P: process P's Garage node (round robin), when on Garage.
endpoint() {
    [ -n "${DELTASYNC_S3_ENDPOINT:-}" ] && echo "--s3-endpoint http://127.0.0.1:${S3PORTS[$((($1 - 1) % 3))]}"
    return 0
}

# run LABEL STORAGE...: the whole scenario on servers started with `serve --data D STORAGE...`.
run() {
    local label=$1
    shift
    local storage=("$@") data=$WORK/data-$label procs=$PROCS addrs=() pids=()
    [ ${#storage[@]} -eq 0 ] && procs=1
    for p in $(seq "$procs"); do
        serve "$label-$p" --data "$data" "${storage[@]}" $(endpoint "$p")
        addrs+=("$ADDR"); pids+=("$LAST_PID")
    done
    for c in $(seq 0 $((CLIENTS - 1))); do
        "$BIN" account add "u$c" --data "$data" "${storage[@]}" | tail -n 1 >"$WORK/$label-token-$c"
    done
    rm -rf "$WORK/$label-push" "$WORK/$label-pull"
    cp -a "$WORK/src" "$WORK/$label-push"
    sync
    python3 - "$BIN" "$WORK" "$label" "$CLIENTS" "$TOTAL_FILES" "$TOTAL_MIB" "${addrs[@]}" <<'EOF'
import os, subprocess, sys, time
bin, work, label, clients, files, mib = sys.argv[1:7]
clients, files, mib = int(clients), int(files), float(mib)
addrs = sys.argv[7:]
def token(c):
    return open(f'{work}/{label}-token-{c}').read().strip()
def all_at_once(verb, folder, shift):
    t0 = time.monotonic()
    ps = [subprocess.Popen([bin, verb, f'{work}/{label}-{folder}/c{c:03}', '--server', addrs[(c + shift) % len(addrs)],
                            '--token', token(c), '--no-progress', '-q'])
          for c in range(clients)]
    bad = sum(p.wait() != 0 for p in ps)
    t = time.monotonic() - t0
    print(f'{label}: {verb} by {clients} clients at once over {len(addrs)} process(es): {t:.2f} s, '
          f'{mib / t:.1f} MiB/s, {files / t:.0f} files/s' + (f'; {bad} FAILED' if bad else ''), flush=True)
all_at_once('push', 'push', 0)
all_at_once('pull', 'pull', 1)
for c in range(0, clients, max(1, clients // 10)):
    a, b = f'{work}/src/c{c:03}', f'{work}/{label}-pull/c{c:03}'
    for name in os.listdir(a):
        if open(f'{a}/{name}', 'rb').read() != open(f'{b}/{name}', 'rb').read():
            sys.exit(f'{label}: {b}/{name} differs from what was pushed')
EOF
    if [ ${#storage[@]} -gt 0 ]; then
        psql "$PG" -At -F' ' -c "SELECT count(*), sum(size) FROM packs" | while read -r n bytes; do
            echo "$label: $n objects written for $TOTAL_MIB MiB: $(python3 -c "print(round($n * 1073741824 / $bytes))") per GiB, $(python3 -c "print(round($bytes / $n / 1048576, 2))") MiB each on average"
        done
    fi
    kill -TERM "${pids[@]}"
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ ${#storage[@]} -gt 0 ]; then
        cat "$WORK/$label"-*.log | sed -n 's/.*: \([0-9]*\) write requests (PUT, multipart parts), \([0-9]*\) reads (GET, HEAD), \([0-9]*\) others.*/\1 \2 \3/p' |
            awk -v f="$TOTAL_FILES" -v l="$label" '{w += $1; r += $2; o += $3} END {printf "%s: S3 requests of the pushes and pulls: %d PUT, %d GET, %d other: %.1f PUT and %.1f GET per 1,000 files\n", l, w, r, o, w * 1000 / f, r * 1000 / f}'
    fi

    # Propagation: CLIENTS watches of one account over the processes.
    addrs=(); pids=()
    for p in $(seq "$procs"); do
        serve "$label-w$p" --data "$data" "${storage[@]}" $(endpoint "$p")
        addrs+=("$ADDR"); pids+=("$LAST_PID")
    done
    "$BIN" account add team --data "$data" "${storage[@]}" | tail -n 1 >"$WORK/$label-team"
    for c in $(seq 0 $((CLIENTS - 1))); do
        "$BIN" account token team --device "w$c" --data "$data" "${storage[@]}" | tail -n 1 >"$WORK/$label-wtoken-$c"
    done
    python3 - "$BIN" "$WORK" "$label" "$CLIENTS" "${addrs[@]}" <<'EOF'
import os, statistics, subprocess, sys, time
bin, work, label, clients = sys.argv[1:5]
clients = int(clients)
addrs = sys.argv[5:]
team = open(f'{work}/{label}-team').read().strip()
writer = f'{work}/{label}-writer'
os.makedirs(writer)
watches = []
for c in range(clients):
    d = f'{work}/{label}-watch/w{c:03}'
    os.makedirs(d)
    tok = open(f'{work}/{label}-wtoken-{c}').read().strip()
    watches.append((d, subprocess.Popen([bin, 'watch', d, '--server', addrs[c % len(addrs)], '--token', tok, '-q'],
                                        stdout=subprocess.DEVNULL, stderr=open(f'{work}/{label}-watch-{c}.log', 'w'))))
def arrivals(name, t0, limit=60):
    left = {d for d, _ in watches}
    got = []
    while left and time.monotonic() - t0 < limit:
        for d in list(left):
            if os.path.exists(f'{d}/{name}'):
                left.discard(d)
                got.append(time.monotonic() - t0)
        time.sleep(0.002)
    return got, len(left)
# Every watch connected and idle: a first file reaches all of them.
open(f'{writer}/warm', 'wb').write(os.urandom(1024))
subprocess.run([bin, 'push', writer, '--server', addrs[0], '--token', team, '--no-progress', '-q'], check=True)
got, missing = arrivals('warm', time.monotonic(), 120)
if missing:
    sys.exit(f'{label}: {missing} of {clients} watches never got the first file (see {work}/{label}-watch-*.log)')
time.sleep(2)
first, mid, last = [], [], []
for i in range(10):
    open(f'{writer}/one-{i}', 'wb').write(os.urandom(1024))
    t0 = time.monotonic()
    subprocess.run([bin, 'push', writer, '--server', addrs[0], '--token', team, '--no-progress', '-q'], check=True)
    got, missing = arrivals(f'one-{i}', t0)
    if missing:
        sys.exit(f'{label}: {missing} watches did not get one-{i} within 60 s')
    first.append(got[0] * 1000); mid.append(statistics.median(got) * 1000); last.append(got[-1] * 1000)
    time.sleep(1)
for _, p in watches:
    p.terminate()
for _, p in watches:
    p.wait()
ms = lambda xs: f'{statistics.median(xs):.0f}'
print(f'{label}: propagation to {clients} watches over {len(addrs)} process(es), push to arrival, medians of 10 (ms): '
      f'first {ms(first)}, median watch {ms(mid)}, last {ms(last)} (last: {min(last):.0f}-{max(last):.0f})', flush=True)
EOF
    kill -TERM "${pids[@]}"
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}

echo "$CLIENTS clients, each $FILES files of 4 KiB + 1 of 2 MiB ($TOTAL_FILES files, $TOTAL_MIB MiB in all)"
run embedded
export DELTASYNC_S3_ENDPOINT=http://127.0.0.1:${S3PORTS[0]}
run shared --metadata "$PG" --store s3://deltasync/bench --s3-region garage
