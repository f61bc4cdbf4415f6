#!/bin/bash
# One health check of com.orchard.server, run every 30 s by com.orchard.watchdog.plist.
# launchd restarts a server that exits, but not one whose engine thread is dead while
# Gunicorn still answers (/health then says 503). After ORCHARD_WATCHDOG_FAILURES failed
# checks in a row this restarts the job with `launchctl kickstart -k`.
# Does nothing while the job is not running, or while Gunicorn's master or worker is
# younger than ORCHARD_WATCHDOG_GRACE seconds (the model is still loading: launchd has no
# readiness notion, and Gunicorn respawns a dead worker on its own).
# Written for macOS's /bin/bash 3.2.
set -euo pipefail

dir="${ORCHARD_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
label="${ORCHARD_LAUNCHD_LABEL:-com.orchard.server}"
domain="${ORCHARD_LAUNCHD_DOMAIN:-gui/$(id -u)}"
max_failures="${ORCHARD_WATCHDOG_FAILURES:-3}"
grace_s="${ORCHARD_WATCHDOG_GRACE:-600}"
counter="${ORCHARD_WATCHDOG_STATE:-${TMPDIR:-/tmp}/orchard-watchdog-failures}"

stamp() { date '+%Y-%m-%d %H:%M:%S'; }
reset() { rm -f "$counter"; }

# The same HOST/PORT as the server.
set -a
# shellcheck disable=SC1091
[[ -f "$dir/.env.production" ]] && . "$dir/.env.production"
# shellcheck disable=SC1090
[[ -n "${ORCHARD_ENV_OVERRIDE:-}" && -f "$ORCHARD_ENV_OVERRIDE" ]] && . "$ORCHARD_ENV_OVERRIDE"
set +a
host="${HOST:-127.0.0.1}"
port="${PORT:-8001}"
case "$host" in
    "" | 0.0.0.0) host=127.0.0.1 ;;
    "::" | "[::]") host="[::1]" ;;
    *:*) [[ "$host" == \[* ]] || host="[$host]" ;;
esac
url="http://${host}:${port}/health"

# ps etime is [[dd-]hh:]mm:ss on macOS and Linux alike (macOS ps has no etimes).
age_of() {
    local t d=0 h=0 m=0 s=0 a b c
    t="$(ps -o etime= -p "$1" 2>/dev/null | tr -d ' ')" || true
    [[ -n "$t" ]] || { echo 0; return; }
    if [[ "$t" == *-* ]]; then d="${t%%-*}"; t="${t#*-}"; fi
    IFS=: read -r a b c <<<"$t"
    if [[ -n "${c:-}" ]]; then h="$a"; m="$b"; s="$c"; else m="$a"; s="$b"; fi
    echo $(( 10#$d * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

info="$(launchctl print "$domain/$label" 2>/dev/null)" || { reset; exit 0; }  # not loaded
state="$(awk '$1 == "state" && $2 == "=" { print $3; exit }' <<<"$info")"
pid="$(awk '$1 == "pid" && $2 == "=" { print $3; exit }' <<<"$info")"
if [[ "$state" != running || ! "$pid" =~ ^[0-9]+$ ]]; then
    reset   # launchd is between restarts (ThrottleInterval) or the job was stopped
    exit 0
fi

if curl -fs -o /dev/null --max-time 10 "$url"; then
    reset
    exit 0
fi

youngest="$(age_of "$pid")"
for child in $(pgrep -P "$pid" 2>/dev/null || true); do
    a="$(age_of "$child")"
    if (( a < youngest )); then youngest="$a"; fi
done
if (( youngest < grace_s )); then
    echo "$(stamp) orchard-watchdog: $url failing, process started ${youngest} s ago (grace ${grace_s} s): waiting"
    reset
    exit 0
fi

failures=$(( $(cat "$counter" 2>/dev/null || echo 0) + 1 ))
echo "$failures" >"$counter"
if (( failures < max_failures )); then
    echo "$(stamp) orchard-watchdog: $url failed ($failures/$max_failures)"
    exit 0
fi
echo "$(stamp) orchard-watchdog: $url failed $failures times in a row: kickstart -k $domain/$label"
reset
# -k: kill the running instance (SIGTERM, SIGKILL after ExitTimeOut) and start it again.
launchctl kickstart -k "$domain/$label"
