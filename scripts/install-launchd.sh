#!/bin/bash
# Install Orchard as a launchd job on macOS: com.orchard.server (the server) and
# com.orchard.watchdog (restarts it when /health keeps failing), plus newsyslog rules.
# Default: a LaunchAgent of the current user (runs while that user is logged in; the GPU
# is available). --system: a LaunchDaemon that runs at boot, as --user.
# Idempotent: run it again after an upgrade; it reloads the jobs (restarting the server).
# Written for macOS's /bin/bash 3.2.
#
#   scripts/install-launchd.sh                  # LaunchAgent for you
#   sudo scripts/install-launchd.sh --system    # LaunchDaemon, runs as the checkout's owner
#   scripts/install-launchd.sh --dry-run        # print what would be done, change nothing
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options]
  --prefix DIR         Orchard checkout with .venv/ and .env.production
                       (default: the checkout this script is in: $default_prefix)
  --system             install a LaunchDaemon in /Library/LaunchDaemons (needs sudo)
  --user NAME          with --system: the account the server runs as
                       (default: the owner of --prefix)
  --plist-dir DIR      where the plists go (default: ~/Library/LaunchAgents, or
                       /Library/LaunchDaemons with --system)
  --log-dir DIR        (default: ~/Library/Logs/Orchard, or /usr/local/var/log/orchard)
  --newsyslog-dir DIR  (default: /etc/newsyslog.d; written with sudo when not root)
  --no-watchdog        do not install com.orchard.watchdog
  --no-start           install the plists but do not load them now (they load at next
                       login or boot)
  --dry-run            print the actions, change nothing
  -h, --help           this text
USAGE
}

default_prefix="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
prefix="$default_prefix"
system=0
user=""
plist_dir=""
log_dir=""
newsyslog_dir=/etc/newsyslog.d
watchdog=1
start=1
dry_run=0

while (( $# )); do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a value}"; shift ;;
        --system) system=1 ;;
        --user) user="${2:?--user needs a value}"; shift ;;
        --plist-dir) plist_dir="${2:?--plist-dir needs a value}"; shift ;;
        --log-dir) log_dir="${2:?--log-dir needs a value}"; shift ;;
        --newsyslog-dir) newsyslog_dir="${2:?--newsyslog-dir needs a value}"; shift ;;
        --no-watchdog) watchdog=0 ;;
        --no-start) start=0 ;;
        --dry-run) dry_run=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

die() { echo "install-launchd: $*" >&2; exit 1; }
note() { echo "install-launchd: $*"; }
run() {
    if (( dry_run )); then
        printf '[dry-run] %s\n' "$(printf '%q ' "$@")"
    else
        "$@"
    fi
}
# Root-owned destinations get sudo when we are not root.
as_root() {
    if (( EUID == 0 )); then run "$@"; else run sudo "$@"; fi
}

[[ "$prefix" == /* ]] || die "--prefix must be an absolute path: $prefix"
[[ "$prefix" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--prefix may only contain letters, digits and _ . / + -: $prefix"
prefix="${prefix%/}"
for f in gunicorn.conf.py .env.production launchd/com.orchard.server.plist launchd/com.orchard.watchdog.plist \
         launchd/orchard-launch.sh launchd/orchard-watchdog.sh newsyslog/orchard.conf; do
    [[ -f "$prefix/$f" ]] || die "$prefix/$f not found: is --prefix an Orchard checkout?"
done
if [[ ! -x "$prefix/.venv/bin/python" || ! -x "$prefix/.venv/bin/orchard" ]]; then
    msg="no virtualenv with orchard installed at $prefix/.venv: run 'make setup' in $prefix first"
    if (( dry_run )); then note "warning: $msg"; else die "$msg"; fi
fi
if (( ! dry_run )); then
    [[ "$(uname -s)" == Darwin ]] || die "this installs launchd jobs (macOS); on Linux use scripts/install-systemd.sh"
fi

# GNU stat first: on Linux `stat -f` means file-system status and would "succeed".
owner_of() { stat -c %U "$1" 2>/dev/null || stat -f %Su "$1"; }
if (( system )); then
    (( dry_run || EUID == 0 )) || die "--system needs root: run it with sudo"
    user="${user:-$(owner_of "$prefix")}"
    [[ "$user" != root ]] || die "refusing to run the server as root: pass --user NAME"
    domain=system
    plist_dir="${plist_dir:-/Library/LaunchDaemons}"
    log_dir="${log_dir:-/usr/local/var/log/orchard}"
    env_override=/usr/local/etc/orchard/orchard.env
else
    # A LaunchAgent belongs to the user who runs this; as root it would land in gui/0.
    (( dry_run || EUID != 0 )) || die "run as your own user (no sudo) for a LaunchAgent, or pass --system"
    [[ -z "$user" ]] || die "--user only applies with --system"
    user="$(id -un)"
    domain="gui/$(id -u)"
    plist_dir="${plist_dir:-$HOME/Library/LaunchAgents}"
    log_dir="${log_dir:-$HOME/Library/Logs/Orchard}"
    env_override="$HOME/.config/orchard/orchard.env"
fi
# newsyslog.conf fields are separated by spaces and the paths go into sed and XML.
[[ "$log_dir" =~ ^/[A-Za-z0-9_./+-]+$ ]] || die "--log-dir must be an absolute path without spaces or special characters: $log_dir"
[[ "$env_override" =~ ^/[A-Za-z0-9_./+-]+$ ]] || die "unsupported characters in $env_override (HOME=$HOME)"

render() {  # src dest: fill the @PLACEHOLDERS@
    local src="$1" dest="$2"
    if (( dry_run )); then
        printf '[dry-run] render %s -> %s (@ORCHARD_DIR@=%s, @LOG_DIR@=%s, @LAUNCHD_DOMAIN@=%s, @ENV_OVERRIDE@=%s, @OWNER@=%s:staff)\n' \
            "$src" "$dest" "$prefix" "$log_dir" "$domain" "$env_override" "$user"
        return
    fi
    sed -e "s|@ORCHARD_DIR@|$prefix|g" -e "s|@LOG_DIR@|$log_dir|g" -e "s|@LAUNCHD_DOMAIN@|$domain|g" \
        -e "s|@ENV_OVERRIDE@|$env_override|g" -e "s|@OWNER@|$user:staff|g" "$src" >"$dest"
}

loaded() { command -v launchctl >/dev/null 2>&1 && launchctl print "$domain/$1" >/dev/null 2>&1; }
unload() {  # bootout and wait until launchd has let go of the job (up to ExitTimeOut + 5 s)
    local label="$1" i
    if (( dry_run )) || loaded "$label"; then
        run launchctl bootout "$domain/$label" || true
        if (( ! dry_run )); then
            for ((i = 0; i < 50; i++)); do loaded "$label" || break; sleep 1; done
        fi
    fi
}

labels="com.orchard.server"
(( watchdog )) && labels="$labels com.orchard.watchdog"

# 1. Logs (and the state file of the watchdog) live here; owned by the server's user.
run mkdir -p "$log_dir"
if (( system )); then run chown "$user:staff" "$log_dir"; fi

# 2. Plists. launchd ignores a LaunchDaemon unless it is root:wheel 0644.
run mkdir -p "$plist_dir"
if (( dry_run )); then
    tmp_dir=/tmp/orchard-install-staging  # only named in the output, never created
else
    tmp_dir="$(mktemp -d)"
    trap 'rm -rf "$tmp_dir"' EXIT
fi
for label in $labels; do
    render "$prefix/launchd/$label.plist" "$tmp_dir/$label.plist"
done
if (( system )); then
    # The server runs as --user; the watchdog stays root so it may kickstart a system job.
    run plutil -replace UserName -string "$user" "$tmp_dir/com.orchard.server.plist"
    run plutil -replace GroupName -string staff "$tmp_dir/com.orchard.server.plist"
fi
for label in $labels; do
    (( dry_run )) || plutil -lint "$tmp_dir/$label.plist" >/dev/null || die "$label.plist does not lint"
    # Unload first so launchd rereads the plist (reinstall = upgrade = restart).
    if (( start )); then unload "$label"; fi
    if (( system )); then
        run install -m 0644 -o root -g wheel "$tmp_dir/$label.plist" "$plist_dir/$label.plist"
    else
        run install -m 0644 "$tmp_dir/$label.plist" "$plist_dir/$label.plist"
    fi
done

# 3. Log rotation (newsyslog runs as root, so this needs sudo even for an agent).
render "$prefix/newsyslog/orchard.conf" "$tmp_dir/orchard.conf"
as_root mkdir -p "$newsyslog_dir"
as_root install -m 0644 "$tmp_dir/orchard.conf" "$newsyslog_dir/orchard.conf"

# 4. Load. RunAtLoad starts the server at once; it answers /health after the model loads.
if (( start )); then
    for label in $labels; do
        run launchctl enable "$domain/$label"   # undo an earlier `launchctl disable`
        run launchctl bootstrap "$domain" "$plist_dir/$label.plist"
    done
    note "started $domain/com.orchard.server; the model is loading: tail -f $log_dir/orchard.log"
else
    note "installed; loads at next login/boot, or now with: launchctl bootstrap $domain $plist_dir/com.orchard.server.plist"
fi
note "settings: $prefix/.env.production, per-host overrides in $env_override (optional)"
note "done. Health: curl -fsS http://127.0.0.1:8001/health"
