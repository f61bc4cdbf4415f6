#!/usr/bin/env bash
# One watchdog check for orchard.service (run by orchard-watchdog.service every 30 s).
# Restarts orchard.service after ORCHARD_WATCHDOG_FAILURES consecutive failed /health
# checks; see orchard-watchdog.service for when it deliberately does nothing.
set -euo pipefail

unit="${ORCHARD_UNIT:-orchard.service}"
max_failures="${ORCHARD_WATCHDOG_FAILURES:-3}"
grace_s="${ORCHARD_WATCHDOG_GRACE:-600}"
state_dir="${RUNTIME_DIRECTORY:-${ORCHARD_WATCHDOG_STATE:-/run/orchard-watchdog}}"
counter="$state_dir/failures"
host="${HOST:-127.0.0.1}"
port="${PORT:-8001}"
case "$host" in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    "::" | "[::]") host="[::1]" ;;
    *:*) [[ "$host" == \[* ]] || host="[$host]" ;;
esac
url="http://${host}:${port}/health"

probe() {  # exit 0 only on HTTP 200 within 10 s
    if command -v curl >/dev/null 2>&1; then
        curl -fs -o /dev/null --max-time 10 "$url"
    else
        local py="${ORCHARD_DIR:-}/.venv/bin/python"
        [[ -x "$py" ]] || py=python3
        "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)' "$url" 2>/dev/null
    fi
}

# Seconds since a process started (0 if it is gone). ps etime is [[dd-]hh:]mm:ss; etimes
# would be simpler but is procps-only.
age_of() {
    local t d=0 h=0 m=0 s=0 a b c
    t="$(ps -o etime= -p "$1" 2>/dev/null | tr -d ' ')" || true
    [[ -n "$t" ]] || { echo 0; return; }
    if [[ "$t" == *-* ]]; then d="${t%%-*}"; t="${t#*-}"; fi
    IFS=: read -r a b c <<<"$t"
    if [[ -n "${c:-}" ]]; then h="$a"; m="$b"; s="$c"; else m="$a"; s="$b"; fi
    echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

mkdir -p "$state_dir"
reset() { rm -f "$counter"; }

state="$(systemctl is-active "$unit" 2>/dev/null || true)"
if [[ "$state" != active ]]; then
    reset   # starting, stopping, stopped or failed: not ours to act on
    exit 0
fi

if probe; then
    reset
    exit 0
fi

# A young worker is still loading the model (first start or respawned by Gunicorn).
main_pid="$(systemctl show -p MainPID --value "$unit" 2>/dev/null || echo 0)"
if [[ "$main_pid" =~ ^[1-9][0-9]*$ ]]; then
    youngest="$(age_of "$main_pid")"
    for child in $(pgrep -P "$main_pid" 2>/dev/null || true); do
        a="$(age_of "$child")"
        if (( a < youngest )); then youngest="$a"; fi
    done
    if (( youngest < grace_s )); then
        echo "orchard-watchdog: $url failing, but the worker started ${youngest} s ago (grace ${grace_s} s): waiting"
        reset
        exit 0
    fi
fi

failures=$(( $(cat "$counter" 2>/dev/null || echo 0) + 1 ))
echo "$failures" >"$counter"
if (( failures < max_failures )); then
    echo "orchard-watchdog: $url failed ($failures/$max_failures)"
    exit 0
fi
echo "orchard-watchdog: $url failed $failures times in a row: restarting $unit" >&2
reset
# --no-block: the restart waits for the model to load (up to TimeoutStartSec); this check
# must not. While orchard is restarting it is not "active", so later checks do nothing.
systemctl restart --no-block "$unit"
