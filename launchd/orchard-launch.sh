#!/bin/bash
# launchd entry point for the Orchard server (com.orchard.server.plist).
# launchd has no EnvironmentFile=, so this sources .env.production (and an optional
# per-host override file) and then execs Gunicorn from the project's venv, so launchd
# keeps tracking the Gunicorn master's PID and its SIGTERM reaches Gunicorn directly.
# Written for macOS's /bin/bash 3.2.
set -euo pipefail

dir="${ORCHARD_DIR:-$(cd "$(dirname "$0")/.." && pwd)}"
cd "$dir"

# KEY=value lines, as systemd's EnvironmentFile= reads them; `set -a` exports them.
# Quote values with spaces; no `export`, no spaces around '='.
load_env() {
    set -a
    # shellcheck disable=SC1090
    . "$1"
    set +a
}
if [[ ! -f .env.production ]]; then
    echo "orchard-launch: $dir/.env.production is missing" >&2
    exit 78  # EX_CONFIG; launchd retries after ThrottleInterval
fi
load_env .env.production
if [[ -n "${ORCHARD_ENV_OVERRIDE:-}" && -f "$ORCHARD_ENV_OVERRIDE" ]]; then
    load_env "$ORCHARD_ENV_OVERRIDE"
fi
# One of several instances (launchd/orchard-instances.sh): its port wins over the files' PORT.
if [[ -n "${ORCHARD_INSTANCE_PORT:-}" ]]; then
    export PORT="$ORCHARD_INSTANCE_PORT"
fi

venv="$dir/.venv/bin"
if [[ ! -x "$venv/python" ]]; then
    echo "orchard-launch: no virtualenv at $dir/.venv (run 'make setup' in $dir)" >&2
    exit 78
fi

# ExitTimeOut in the plist is 45 s; launchd SIGKILLs Gunicorn mid-drain if this is not lower.
if (( ${GRACEFUL_TIMEOUT:-30} >= 45 )); then
    echo "orchard-launch: warning: GRACEFUL_TIMEOUT=${GRACEFUL_TIMEOUT} is not below the plist's ExitTimeOut (45 s)" >&2
fi

# Fail with a readable message (into orchard.launchd.log) before Gunicorn starts. The
# listing of every setting is discarded: it would copy secrets into the log.
"$venv/orchard" config check >/dev/null

log_dir="${ORCHARD_LOG_DIR:-$HOME/Library/Logs/Orchard}"
mkdir -p "$log_dir"
# Gunicorn writes its own log file and, with --capture-output, sends the worker's
# stdout/stderr there too. On SIGUSR1 it reopens the file: newsyslog (newsyslog/orchard.conf)
# renames the log and signals the PID in orchard.pid. A file opened by launchd
# (StandardErrorPath) could not be reopened and would keep growing after rotation.
# Command-line options override gunicorn.conf.py's errorlog = "-".
exec "$venv/python" -m gunicorn -c "$dir/gunicorn.conf.py" \
    --error-logfile "$log_dir/orchard.log" --capture-output --pid "$log_dir/orchard.pid"
