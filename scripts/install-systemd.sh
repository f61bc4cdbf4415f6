#!/usr/bin/env bash
# Install Orchard as a systemd service (Linux): the service user, orchard.service with its
# watchdog timer, the per-host settings file and the logrotate rules; then start it.
# Idempotent: run it again after an upgrade (it rewrites the units, keeps your settings).
#
#   sudo scripts/install-systemd.sh [--prefix /opt/orchard] [--user orchard] [--file-logs]
#   scripts/install-systemd.sh --dry-run      # print what would be done, change nothing
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]
  --prefix DIR         Orchard checkout with .venv/ and .env.production
                       (default: the checkout this script is in: $default_prefix)
  --user NAME          service user and group, created if missing (default: orchard)
  --unit-dir DIR       where units go (default: /etc/systemd/system)
  --logrotate-dir DIR  where the logrotate rule goes (default: /etc/logrotate.d)
  --env-dir DIR        per-host settings, orchard.env (default: /etc/orchard)
  --file-logs          log to /var/log/orchard/orchard.log instead of the journal
  --prepare-model      fetch/import MODEL as the service user before starting, so the
                       first start does not spend TimeoutStartSec on a download
  --no-watchdog        do not enable orchard-watchdog.timer
  --no-start           enable the units but do not start them now
  --dry-run            print the actions, change nothing
  -h, --help           this text
USAGE
}

default_prefix="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
prefix="$default_prefix"
user=orchard
unit_dir=/etc/systemd/system
logrotate_dir=/etc/logrotate.d
env_dir=/etc/orchard
log_dir=/var/log/orchard
file_logs=0
prepare=0
watchdog=1
start=1
dry_run=0

while (( $# )); do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a value}"; shift ;;
        --user) user="${2:?--user needs a value}"; shift ;;
        --unit-dir) unit_dir="${2:?--unit-dir needs a value}"; shift ;;
        --logrotate-dir) logrotate_dir="${2:?--logrotate-dir needs a value}"; shift ;;
        --env-dir) env_dir="${2:?--env-dir needs a value}"; shift ;;
        --file-logs) file_logs=1 ;;
        --prepare-model) prepare=1 ;;
        --no-watchdog) watchdog=0 ;;
        --no-start) start=0 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "install-systemd: $*" >&2; exit 1; }
note() { echo "install-systemd: $*"; }
# Every change goes through run: printed under --dry-run, executed otherwise.
run() {
    if (( dry_run )); then
        printf '[dry-run] %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}
# Fill the @PLACEHOLDERS@ of a template and install it (only if it changed).
render() {
    local src="$1" dest="$2" mode="$3" tmp
    if (( dry_run )); then
        printf '[dry-run] render %s -> %s (mode %s, @ORCHARD_DIR@=%s, @ORCHARD_USER@=%s)\n' \
            "$src" "$dest" "$mode" "$prefix" "$user"
        return
    fi
    tmp="$(mktemp)"
    sed -e "s|@ORCHARD_DIR@|$prefix|g" -e "s|@ORCHARD_USER@|$user|g" "$src" >"$tmp"
    if [[ -f "$dest" ]] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
        return
    fi
    install -m "$mode" "$tmp" "$dest"
    rm -f "$tmp"
    changed=1
    note "wrote $dest"
}

# Paths go into unit files and sed expressions: keep them plain.
[[ "$prefix" == /* ]] || die "--prefix must be an absolute path: $prefix"
[[ "$prefix" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--prefix may only contain letters, digits and _ . / + -: $prefix"
prefix="${prefix%/}"
[[ "$user" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "invalid user name: $user"
for f in gunicorn.conf.py .env.production systemd/orchard.service systemd/orchard-ready.sh \
         systemd/orchard-watchdog.service systemd/orchard-watchdog.timer systemd/orchard-watchdog.sh; do
    [[ -f "$prefix/$f" ]] || die "$prefix/$f not found: is --prefix an Orchard checkout?"
done
src="$prefix"  # templates come from the checkout that will be served
if [[ ! -x "$prefix/.venv/bin/python" || ! -x "$prefix/.venv/bin/orchard" ]]; then
    msg="no virtualenv with orchard installed at $prefix/.venv: run 'make setup' in $prefix first"
    if (( dry_run )); then note "warning: $msg"; else die "$msg"; fi
fi
if (( ! dry_run )); then
    (( EUID == 0 )) || die "run as root (sudo), or pass --dry-run"
    command -v systemctl >/dev/null || die "systemctl not found: is this a systemd system?"
fi
changed=0

# 1. Service user: a system account with no login; its home is the state directory that
#    systemd creates (StateDirectory=orchard), so nothing is created here.
if getent passwd "$user" >/dev/null 2>&1; then
    note "user $user exists"
else
    nologin="$(command -v nologin || echo /usr/sbin/nologin)"
    run useradd --system --user-group --home-dir /var/lib/orchard --no-create-home \
        --shell "$nologin" --comment "Orchard LLM server" "$user"
fi

# The service runs as $user and reads the checkout: catch a 0700 home or a root-only venv now
# rather than in the journal later.
if (( ! dry_run )) && command -v runuser >/dev/null 2>&1 &&
    ! runuser -u "$user" -- test -x "$prefix/.venv/bin/python" -a -r "$prefix/gunicorn.conf.py"; then
    note "warning: user $user cannot read $prefix; make it readable (e.g. chmod -R o+rX $prefix)"
fi

# 2. Units.
run mkdir -p "$unit_dir"
render "$src/systemd/orchard.service" "$unit_dir/orchard.service" 0644
render "$src/systemd/orchard-watchdog.service" "$unit_dir/orchard-watchdog.service" 0644
render "$src/systemd/orchard-watchdog.timer" "$unit_dir/orchard-watchdog.timer" 0644

# 3. Per-host settings (API keys, MODEL...): created once, never overwritten; readable by
#    the service group only.
if [[ -f "$env_dir/orchard.env" ]]; then
    note "$env_dir/orchard.env exists: kept"
else
    run install -d -m 0755 "$env_dir"
    if (( dry_run )); then
        printf '[dry-run] create %s (mode 0640, group %s): overrides for %s/.env.production\n' \
            "$env_dir/orchard.env" "$user" "$prefix"
    else
        printf '%s\n' "# Per-host overrides of $prefix/.env.production (KEY=value, read by systemd)." \
            "# Restart to apply: systemctl restart orchard" "#MODEL=" "#PORT=8001" >"$env_dir/orchard.env"
        chmod 0640 "$env_dir/orchard.env"
        chgrp "$user" "$env_dir/orchard.env"
    fi
fi

# 4. Logs: the journal by default; --file-logs adds a drop-in and logrotate rotates the file.
run install -d -m 0755 "$logrotate_dir"
render "$src/logrotate/orchard" "$logrotate_dir/orchard" 0644
if (( file_logs )); then
    run install -d -m 0755 "$log_dir"
    run install -d -m 0755 "$unit_dir/orchard.service.d"
    render "$src/systemd/file-logging.conf" "$unit_dir/orchard.service.d/file-logging.conf" 0644
fi

# 5. State directory (home, model cache). systemd creates it too (StateDirectory=), but
#    --prepare-model needs it before the first start.
run install -d -m 0750 -o "$user" -g "$user" /var/lib/orchard
if (( prepare )); then
    note "preparing the model as $user (downloads into /var/lib/orchard; may take a while)"
    # Same environment as the unit: its defaults, then .env.production, then the overrides.
    # shellcheck disable=SC2016  # expanded by the inner bash
    run runuser -u "$user" -- env HOME=/var/lib/orchard ORCHARD_HOME=/var/lib/orchard/cache \
        HF_HOME=/var/lib/orchard/huggingface bash -c \
        'cd "$1" && set -a && . ./.env.production && if [ -r "$2" ]; then . "$2"; fi && set +a && exec .venv/bin/orchard model prepare' \
        _ "$prefix" "$env_dir/orchard.env"
fi

# 6. Enable and start. `start` blocks until /health is 200 (the model is loaded), up to
#    TimeoutStartSec=600; follow it with: journalctl -u orchard -f
run systemctl daemon-reload
if (( start )); then
    note "starting orchard.service: waits until the model is loaded (journalctl -u orchard -f)"
    run systemctl enable --now orchard.service
else
    run systemctl enable orchard.service
fi
if (( watchdog )); then
    if (( start )); then run systemctl enable --now orchard-watchdog.timer
    else run systemctl enable orchard-watchdog.timer; fi
fi
if (( changed && start && ! dry_run )) && systemctl is-active --quiet orchard.service; then
    note "units changed while orchard was running: apply with 'systemctl restart orchard'"
fi
note "done. Health: curl -fsS http://127.0.0.1:\${PORT:-8001}/health   Logs: journalctl -u orchard"
