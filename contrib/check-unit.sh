#!/usr/bin/env bash
# Checks contrib/deltasync.service with systemd-analyze (CI runs this; see .ci/run):
#   - `verify`: any message fails the check (systemd only warns about unknown keys and bad
#     values, and would then run the service without that protection);
#   - `security --offline`: the exposure score stays at most 2.0 ("OK"; it is 1.4).
# verify needs ExecStart's binary to exist, so a copy of the unit runs BINARY instead of
# /usr/local/bin/deltasync. Without systemd-analyze (installed here when that is cheap: as root
# with apt-get), the check is skipped with a note.
# Usage: contrib/check-unit.sh BINARY
set -euo pipefail
bin=$(realpath "${1:?usage: contrib/check-unit.sh BINARY (a built deltasync)}")
unit="$(dirname "$0")/deltasync.service"
if ! command -v systemd-analyze >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y --no-install-recommends systemd >/dev/null 2>&1 || true
fi
if ! command -v systemd-analyze >/dev/null; then
    echo "note: systemd-analyze is not available: contrib/deltasync.service was not verified"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed "s#^ExecStart=/usr/local/bin/deltasync #ExecStart=$bin #" "$unit" >"$tmp/deltasync.service"
if ! grep -q "^ExecStart=$bin serve " "$tmp/deltasync.service"; then
    echo "contrib/check-unit.sh: no \`ExecStart=/usr/local/bin/deltasync serve …\` line in $unit"
    exit 1
fi
if ! out=$(systemd-analyze verify "$tmp/deltasync.service" 2>&1) || [ -n "$out" ]; then
    echo "systemd-analyze verify contrib/deltasync.service:"
    echo "${out:-(failed)}"
    exit 1
fi
if ! systemd-analyze security --offline=yes --threshold=20 "$tmp/deltasync.service" >"$tmp/security" 2>&1; then
    tail -n 40 "$tmp/security"
    echo "contrib/deltasync.service: exposure above 2.0 (see above)"
    exit 1
fi
echo "contrib/deltasync.service: verified; $(grep -o 'Overall exposure level.*' "$tmp/security")"
