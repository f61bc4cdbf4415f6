#!/usr/bin/env bash
# Remove what scripts/install-systemd.sh installed. Keeps the service user, the model cache
# (/var/lib/orchard), logs and /etc/orchard/orchard.env unless --purge. Idempotent.
#
#   sudo scripts/uninstall-systemd.sh [--purge]
#   scripts/uninstall-systemd.sh --dry-run
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]
  --user NAME          service user (default: orchard)
  --unit-dir DIR       (default: /etc/systemd/system)
  --logrotate-dir DIR  (default: /etc/logrotate.d)
  --env-dir DIR        (default: /etc/orchard)
  --purge              also delete the user, /var/lib/orchard (models!), /var/log/orchard
                       and the settings in --env-dir
  --dry-run            print the actions, change nothing
  -h, --help           this text
USAGE
}

user=orchard
unit_dir=/etc/systemd/system
logrotate_dir=/etc/logrotate.d
env_dir=/etc/orchard
purge=0
dry_run=0
while (( $# )); do
    case "$1" in
        --user) user="${2:?--user needs a value}"; shift ;;
        --unit-dir) unit_dir="${2:?--unit-dir needs a value}"; shift ;;
        --logrotate-dir) logrotate_dir="${2:?--logrotate-dir needs a value}"; shift ;;
        --env-dir) env_dir="${2:?--env-dir needs a value}"; shift ;;
        --purge) purge=1 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "uninstall-systemd: $*" >&2; exit 1; }
note() { echo "uninstall-systemd: $*"; }
run() {
    if (( dry_run )); then
        printf '[dry-run] %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}
if (( ! dry_run )); then
    (( EUID == 0 )) || die "run as root (sudo), or pass --dry-run"
fi
have_systemctl=0
command -v systemctl >/dev/null 2>&1 && have_systemctl=1

# Stop the watchdog first so it cannot restart the server while it is being stopped.
# `|| true`: units that are already gone are fine (idempotent).
if (( have_systemctl || dry_run )); then
    run systemctl disable --now orchard-watchdog.timer || true
    run systemctl stop orchard-watchdog.service || true
    run systemctl disable --now orchard.service || true
fi
run rm -f "$unit_dir/orchard.service" "$unit_dir/orchard-watchdog.service" "$unit_dir/orchard-watchdog.timer"
run rm -rf "$unit_dir/orchard.service.d"
run rm -f "$logrotate_dir/orchard"
if (( have_systemctl || dry_run )); then
    run systemctl daemon-reload
    run systemctl reset-failed orchard.service orchard-watchdog.service || true
fi

if (( purge )); then
    run rm -rf /var/lib/orchard /var/log/orchard /run/orchard-watchdog "$env_dir"
    if getent passwd "$user" >/dev/null 2>&1; then
        run userdel "$user"
    fi
    if getent group "$user" >/dev/null 2>&1; then
        run groupdel "$user" || true  # userdel usually removed it already
    fi
else
    note "kept: user $user, /var/lib/orchard (model cache), /var/log/orchard, $env_dir (use --purge to delete)"
fi
note "done"
