#!/bin/bash
# Remove what scripts/install-launchd.sh installed: unload both jobs, delete the plists and
# the newsyslog rules. Keeps logs and the model cache unless --purge (logs only; the model
# cache is ORCHARD_HOME / the Hugging Face cache, shared with `orchard` on the command line).
# Idempotent. Written for macOS's /bin/bash 3.2.
#
#   scripts/uninstall-launchd.sh [--system] [--purge] [--dry-run]
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]
  --system             remove the LaunchDaemon (needs sudo) instead of the LaunchAgent
  --plist-dir DIR      (default: ~/Library/LaunchAgents, or /Library/LaunchDaemons)
  --log-dir DIR        (default: ~/Library/Logs/Orchard, or /usr/local/var/log/orchard)
  --newsyslog-dir DIR  (default: /etc/newsyslog.d)
  --purge              also delete the log folder
  --dry-run            print the actions, change nothing
  -h, --help           this text
USAGE
}

system=0
plist_dir=""
log_dir=""
newsyslog_dir=/etc/newsyslog.d
purge=0
dry_run=0
while (( $# )); do
    case "$1" in
        --system) system=1 ;;
        --plist-dir) plist_dir="${2:?--plist-dir needs a value}"; shift ;;
        --log-dir) log_dir="${2:?--log-dir needs a value}"; shift ;;
        --newsyslog-dir) newsyslog_dir="${2:?--newsyslog-dir needs a value}"; shift ;;
        --purge) purge=1 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "uninstall-launchd: $*" >&2; exit 1; }
note() { echo "uninstall-launchd: $*"; }
run() {
    if (( dry_run )); then
        printf '[dry-run] %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}
as_root() {
    if (( EUID == 0 )); then run "$@"; else run sudo "$@"; fi
}

if (( system )); then
    (( dry_run || EUID == 0 )) || die "--system needs root: run it with sudo"
    domain=system
    plist_dir="${plist_dir:-/Library/LaunchDaemons}"
    log_dir="${log_dir:-/usr/local/var/log/orchard}"
else
    domain="gui/$(id -u)"
    plist_dir="${plist_dir:-$HOME/Library/LaunchAgents}"
    log_dir="${log_dir:-$HOME/Library/Logs/Orchard}"
fi

loaded() { command -v launchctl >/dev/null 2>&1 && launchctl print "$domain/$1" >/dev/null 2>&1; }

# Watchdog first, so it cannot kickstart the server while it is being removed.
for label in com.orchard.watchdog com.orchard.server; do
    if (( dry_run )) || loaded "$label"; then
        # bootout sends SIGTERM and waits up to ExitTimeOut for Gunicorn to drain.
        run launchctl bootout "$domain/$label" || true
    fi
    run rm -f "$plist_dir/$label.plist"
done
as_root rm -f "$newsyslog_dir/orchard.conf"
if (( purge )); then
    run rm -rf "$log_dir"
else
    note "kept logs in $log_dir (use --purge to delete)"
fi
note "done"
