#!/usr/bin/env bash
# ExecStartPost of orchard.service: block until GET /health answers 200, i.e. the model is
# loaded and the engine thread runs. Until then the unit stays "activating", so dependent
# units and `systemctl start orchard` wait for a server that can actually answer.
#
# Usage: orchard-ready.sh [TIMEOUT_SECONDS]   (default 0 = no limit of its own; systemd's
# TimeoutStartSec kills it). HOST and PORT come from the unit's environment.
set -euo pipefail

# A follower rank of a distributed group (DISTRIBUTED_RANK > 0) serves no HTTP: nothing to wait for.
if [[ "${DISTRIBUTED_RANK:-0}" != "0" ]]; then
    exit 0
fi

timeout_s="${1:-${ORCHARD_READY_TIMEOUT:-0}}"
interval_s="${ORCHARD_READY_INTERVAL:-1}"
host="${HOST:-127.0.0.1}"
port="${PORT:-8001}"

# A wildcard bind is reachable on loopback; an IPv6 literal needs brackets in a URL.
case "$host" in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    "::" | "[::]") host="[::1]" ;;
    *:*) [[ "$host" == \[* ]] || host="[$host]" ;;
esac
url="http://${host}:${port}/health"

# Prints the HTTP status (000 when nothing answers). curl when present, else Python.
probe() {
    if command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$url" || true
    else
        local py="${ORCHARD_DIR:-}/.venv/bin/python"
        [[ -x "$py" ]] || py=python3
        "$py" - "$url" <<'PY' || true
import sys, urllib.error, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).status, end="")
except urllib.error.HTTPError as e:
    print(e.code, end="")
except Exception:
    print("000", end="")
PY
    fi
}

start=$SECONDS
next_report=30
while :; do
    code="$(probe)"
    if [[ "$code" == 200 ]]; then
        echo "orchard-ready: $url is healthy after $((SECONDS - start)) s"
        exit 0
    fi
    # systemd exports MAINPID to ExecStartPost: stop waiting if Gunicorn already died.
    if [[ -n "${MAINPID:-}" ]] && ! kill -0 "$MAINPID" 2>/dev/null; then
        echo "orchard-ready: gunicorn (pid $MAINPID) exited before becoming healthy" >&2
        exit 1
    fi
    elapsed=$((SECONDS - start))
    if (( timeout_s > 0 && elapsed >= timeout_s )); then
        echo "orchard-ready: $url not healthy after ${elapsed} s (last HTTP status $code)" >&2
        exit 1
    fi
    if (( elapsed >= next_report )); then
        echo "orchard-ready: waiting for the model to load: ${elapsed} s, /health answers $code"
        next_report=$((next_report + 30))
    fi
    sleep "$interval_s"
done
