#!/bin/bash
# Write one launchd job per port, for replicas behind nginx (deploy/nginx/orchard.conf):
# com.orchard.server.<port>.plist, rendered from com.orchard.server.plist with its own Label,
# its own log folder (<log dir>/<port>: orchard.log, orchard.pid, orchard.launchd.log) and
# ORCHARD_INSTANCE_PORT, which orchard-launch.sh applies after the settings files.
# Writes the plists only; it prints the launchctl commands that load them.
# Written for macOS's /bin/bash 3.2.
#
#   launchd/orchard-instances.sh                       # 8001 8002 8003 into ~/Library/LaunchAgents
#   launchd/orchard-instances.sh --plist-dir /tmp/p 8001 8002
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $(basename "$0") [options] [PORT...]   (default ports: 8001 8002 8003)
  --prefix DIR     Orchard checkout with .venv/ and .env.production (default: $default_prefix)
  --plist-dir DIR  where the plists go (default: ~/Library/LaunchAgents)
  --log-dir DIR    each instance logs into DIR/<port> (default: ~/Library/Logs/Orchard)
  -h, --help       this text
USAGE
}

default_prefix="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
prefix="$default_prefix"
plist_dir="$HOME/Library/LaunchAgents"
log_dir="$HOME/Library/Logs/Orchard"
ports=""
while (( $# )); do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a value}"; shift ;;
        --plist-dir) plist_dir="${2:?--plist-dir needs a value}"; shift ;;
        --log-dir) log_dir="${2:?--log-dir needs a value}"; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
        *) ports="$ports $1" ;;
    esac
    shift
done
ports="${ports:- 8001 8002 8003}"

die() { echo "orchard-instances: $*" >&2; exit 1; }
# The paths go into sed expressions and XML: keep them plain.
for path in "$prefix" "$plist_dir" "$log_dir"; do
    [[ "$path" =~ ^/[A-Za-z0-9_./+-]+$ ]] || die "not an absolute path of plain characters: $path"
done
template="$prefix/launchd/com.orchard.server.plist"
[[ -f "$template" ]] || die "$template not found: is --prefix an Orchard checkout?"
env_override="$HOME/.config/orchard/orchard.env"

mkdir -p "$plist_dir"
domain="gui/$(id -u)"
for port in $ports; do
    if [[ ! "$port" =~ ^[0-9]+$ ]] || (( port < 1024 || port > 65535 )); then
        die "not a port above 1023: $port"
    fi
    label="com.orchard.server.$port"
    sed -e "s|@ORCHARD_DIR@|$prefix|g" -e "s|@LOG_DIR@|$log_dir/$port|g" -e "s|@ENV_OVERRIDE@|$env_override|g" \
        -e "s|<string>com.orchard.server</string>|<string>$label</string>|" \
        -e "s|<key>ORCHARD_DIR</key>|<key>ORCHARD_INSTANCE_PORT</key><string>$port</string><key>ORCHARD_DIR</key>|" \
        "$template" >"$plist_dir/$label.plist"
    mkdir -p "$log_dir/$port"
    echo "orchard-instances: wrote $plist_dir/$label.plist (port $port, logs in $log_dir/$port)"
    echo "  load: launchctl bootstrap $domain $plist_dir/$label.plist"
done
