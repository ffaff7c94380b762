#!/usr/bin/env bash
# Bytes on the wire for a deep tree of many small files with unicode names (the metadata-heavy
# case): `deltasync push/pull --stats` (bytes on the TCP socket, TLS included) against
# `rsync -az --stats` to an rsync daemon on 127.0.0.1 (its own socket bytes, unencrypted).
# Prints a table; nothing is kept.
#
#   benches/metadata_bytes.sh [FILES]        (default 20000)
#
# Fixture (generated here, deterministic): FILES files of 100-2,000 bytes of text-like content,
# 6-8 folders deep under long common prefixes, names in accented Latin, Cyrillic, CJK and emoji.
# Cases: first push; push after modifying 1% of the files (a line appended); no-op push; pull of
# the whole tree into an empty folder (rsync: from the daemon's module).
# Environment: DELTASYNC_BIN (default target/release/deltasync, built first), DELTASYNC_BENCH_TMP.
set -euo pipefail

FILES=${1:-20000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "metadata_bytes: $*" >&2; exit 1; }
command -v rsync >/dev/null || die "needs rsync (apt-get install rsync)"
command -v python3 >/dev/null || die "needs python3"

cd "$ROOT"
if [ -z "${DELTASYNC_BIN:-}" ]; then
    cargo build --release --locked --bin deltasync >&2
    DELTASYNC_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/deltasync
fi
BIN=$DELTASYNC_BIN

WORK=$(mktemp -d "${DELTASYNC_BENCH_TMP:-${TMPDIR:-/tmp}}/deltasync-meta.XXXXXX")
PIDS=()
cleanup() {
    set +e
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the fixture ---
python3 - "$WORK/tree" "$FILES" <<'EOF'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(12)
words = {
    "latin": ["été", "données", "réunion", "Ångström", "façade", "naïve", "Übersicht", "mañana", "projet", "crème"],
    "cyrillic": ["Документы", "отчёт", "фотографии", "проект", "работа", "письмо", "архив", "таблица"],
    "cjk": ["照片", "文件", "资料", "会议记录", "プロジェクト", "写真", "보고서", "사진"],
    "emoji": ["📷", "🎵", "📁", "✅", "🌍", "🚀"],
}
scripts = list(words)
vocab = [w for ws in words.values() for w in ws] + ["the", "and", "report", "value", "line", "status", "2026"]
def name():
    s = rng.choice(scripts)
    parts = [rng.choice(words[s]) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.3:
        parts.append(rng.choice(words["emoji"]))
    return " ".join(parts)
# Long common prefixes, as real trees have: a few top folders, each level a handful of children.
tops = ["Users/marie/Documents/Projets partagés/Équipe produit", "Users/marie/Pictures/Фотографии 2026",
        "Users/marie/Work/研究資料/アーカイブ"]
dirs = []
for t in tops:
    stack = [(t, len(t.split("/")))]
    while stack and len(dirs) < n // 25 + 10:
        d, depth = stack.pop(0)
        dirs.append(d)
        if depth < 8:
            for i in range(rng.randint(2, 4)):
                stack.append((f"{d}/{name()} {i}", depth + 1))
leaves = [d for d in dirs if d.count("/") >= 5]
for i in range(n):
    d = rng.choice(leaves)
    ext = rng.choice([".txt", ".md", ".csv", ".json", ".log"])
    p = os.path.join(root, d, f"{name()} {i:05d}{ext}")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    size = rng.randint(100, 2000)
    out, total = [], 0
    while total < size:
        line = " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 12))) + f" {rng.randint(0, 99999)}\n"
        out.append(line)
        total += len(line.encode())
    with open(p, "wb") as f:
        f.write("".join(out).encode()[:size])
EOF
NFILES=$(find "$WORK/tree" -type f | wc -l)
RAW=$(find "$WORK/tree" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
PATHS=$(cd "$WORK/tree" && find . -mindepth 1 -printf '%P\n' | LC_ALL=C awk '{s+=length($0)} END {print s}')

# --- servers ---
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
TOKEN=$("$BIN" account add bench --data "$WORK/data" | tail -n 1)

# Sent + received from a --stats output (deltasync's and rsync's lines have the same names).
total() { sed -n 's/^Total bytes \(sent\|received\): *//p' | tr -d ',' | awk '{s+=$1} END {print s}'; }
ms() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }
ds() { "$BIN" "$@" --server "$ADDR" --token "$TOKEN" --stats --no-progress; }
rs() { rsync -az --stats --exclude .deltasync "$@"; }
ROWS=()
row() { # case, deltasync bytes, ms, rsync bytes, ms
    ROWS+=("$(printf '| %s | %s | %s ms | %s | %s ms | %s |' "$1" "$2" "$3" "$4" "$5" \
        "$(awk -v a="$2" -v b="$4" 'BEGIN {printf "%.3f", a / b}')")")
}
case_() { # name, deltasync args, rsync args
    local name=$1 t d r td tr
    shift
    local -a dargs=() rargs=()
    while [ "$1" != -- ]; do dargs+=("$1"); shift; done
    shift
    rargs=("$@")
    t=$(date +%s%N); d=$(ds "${dargs[@]}" | total); td=$(ms "$t")
    t=$(date +%s%N); r=$(rs "${rargs[@]}" | total); tr=$(ms "$t")
    row "$name" "$d" "$td" "$r" "$tr"
}

C=$WORK/tree
case_ "first push" push "$C" -- "$C/" "$MOD/"
# 1%: a line appended to every 100th file.
i=0
while IFS= read -r -d '' f; do
    if [ $((i % 100)) = 0 ]; then printf 'one more line of text, number %d\n' "$i" >>"$f"; fi
    i=$((i + 1))
done < <(find "$C" -path "$C/.deltasync" -prune -o -type f -print0 | sort -z)
case_ "push after 1% modified" push "$C" -- "$C/" "$MOD/"
case_ "no-op push" push "$C" -- "$C/" "$MOD/"
case_ "pull into an empty folder" pull "$WORK/pulled" -- "$MOD/" "$WORK/rpulled/"
diff -r --exclude .deltasync "$C" "$WORK/pulled" >/dev/null || die "the pulled tree differs from the pushed one"
diff -r "$C" "$WORK/rpulled" --exclude .deltasync >/dev/null || die "rsync's pulled tree differs"

echo "metadata_bytes: $NFILES files, $RAW bytes of content, $PATHS bytes of paths (UTF-8), $(date -u +%F)"
echo
echo "| case | deltasync bytes (sent + received) | deltasync time | rsync -az bytes | rsync time | ratio |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${ROWS[@]}"
