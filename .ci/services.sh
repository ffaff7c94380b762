#!/usr/bin/env bash
# The real services the S3 + PostgreSQL tests need, started on 127.0.0.1 in a folder of their own:
#   .ci/services.sh start DIR   starts an S3 server (s3s-fs 0.14.1) and a throwaway PostgreSQL 15
#                               cluster, and writes the variables the tests read to DIR/env
#   .ci/services.sh stop DIR    stops both (by the PIDs recorded in DIR) and removes DIR
# Use: `.ci/services.sh start /tmp/ds-services && . /tmp/ds-services/env && cargo test ...`
#
# s3s-fs is built once (`cargo install s3s-fs@0.14.1 --features binary --locked`, about 2 min;
# later versions need a newer rustc) and reused from ~/.cargo/bin. PostgreSQL runs as the
# `postgres` user (initdb refuses root) with fsync off: the cluster lives as long as the test run.
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [[ -z "$cmd" || -z "$dir" ]]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pg_bin() {
    local b
    for b in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
        if [[ -x "$b/initdb" ]]; then
            echo "$b"
            return
        fi
    done
    command -v initdb >/dev/null && dirname "$(command -v initdb)" && return
    echo "PostgreSQL's initdb was not found: install postgresql-15" >&2
    exit 1
}

as_postgres() {
    if [[ $(id -u) -eq 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)

    # S3: s3s-fs with fixed test keys, one bucket.
    if ! command -v s3s-fs >/dev/null; then
        cargo install s3s-fs@0.14.1 --features binary --locked --quiet
    fi
    local s3port access=deltasync-test secret=deltasync-test-secret
    s3port=$(free_port)
    mkdir -p "$dir/s3/deltasync-test"
    s3s-fs --host 127.0.0.1 --port "$s3port" --access-key "$access" --secret-key "$secret" \
        "$dir/s3" >"$dir/s3.log" 2>&1 &
    echo $! >"$dir/s3.pid"

    # PostgreSQL: a throwaway cluster owned by `postgres`.
    local bin pgport
    bin=$(pg_bin)
    pgport=$(free_port)
    # A folder of its own that `postgres` owns (DIR's parents may be closed to it).
    local pg
    pg=$(mktemp -d /tmp/deltasync-pg.XXXXXX)
    echo "$pg" >"$dir/pg"
    if [[ $(id -u) -eq 0 ]]; then chown postgres "$pg"; fi
    if ! as_postgres "$bin/initdb" -D "$pg/data" -A trust -U postgres -E UTF8 >"$pg/initdb.log" 2>&1; then
        echo "services: initdb failed:" >&2
        cat "$pg/initdb.log" >&2
        exit 1
    fi
    if ! as_postgres "$bin/pg_ctl" -D "$pg/data" -l "$pg/log" -w -t 60 start \
        -o "-p $pgport -k $pg -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300" \
        >/dev/null; then
        echo "services: PostgreSQL did not start:" >&2
        cat "$pg/log" >&2
        exit 1
    fi

    local i
    for i in $(seq 100); do
        if (echo >"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null; then break; fi
        sleep 0.1
    done

    cat >"$dir/env" <<EOF
export DELTASYNC_TEST_S3_ENDPOINT=http://127.0.0.1:$s3port
export DELTASYNC_TEST_S3_BUCKET=deltasync-test
export AWS_ACCESS_KEY_ID=$access
export AWS_SECRET_ACCESS_KEY=$secret
export AWS_REGION=us-east-1
export DELTASYNC_TEST_PG=postgres://postgres@127.0.0.1:$pgport/postgres
EOF
    echo "services: S3 on 127.0.0.1:$s3port, PostgreSQL on 127.0.0.1:$pgport (variables in $dir/env)"
}

stop() {
    [[ -d "$dir" ]] || return 0
    if [[ -f "$dir/s3.pid" ]]; then
        kill "$(cat "$dir/s3.pid")" 2>/dev/null || true
    fi
    if [[ -f "$dir/pg" ]]; then
        local pg
        pg=$(cat "$dir/pg")
        as_postgres "$(pg_bin)/pg_ctl" -D "$pg/data" -m immediate -w stop >/dev/null 2>&1 || true
        [[ "$pg" == /tmp/deltasync-pg.* ]] && rm -rf "$pg"
    fi
    rm -rf "$dir"
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    *)
        echo "usage: $0 start|stop DIR" >&2
        exit 2
        ;;
esac
