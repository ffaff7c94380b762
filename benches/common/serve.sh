# Sourced by the bench scripts that start servers. Needs BIN, WORK and the array PIDS.
#
# serve NAME [ARGS...]: starts `deltasync serve --listen 127.0.0.1:0 ARGS...` in the background,
# its stdout in $WORK/NAME.out and its log in $WORK/NAME.log; waits until it listens (20 s at
# most, else prints the log and exits 1) and sets ADDR and LAST_PID.
serve() {
    local name=$1
    shift
    "$BIN" serve --listen 127.0.0.1:0 "$@" >"$WORK/$name.out" 2>"$WORK/$name.log" &
    PIDS+=($!)
    LAST_PID=$!
    for _ in $(seq 400); do
        ADDR=$(sed -n 's/.*listening on //p' "$WORK/$name.out")
        [ -n "$ADDR" ] && return
        sleep 0.05
    done
    echo "server $name did not start:" >&2
    cat "$WORK/$name.log" >&2
    exit 1
}
