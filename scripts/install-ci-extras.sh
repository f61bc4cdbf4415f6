#!/usr/bin/env bash
# System tools some tests use when present (each test skips without its tool):
#   chromium    - the web console in a real headless browser (tests/test_console_browser.py)
#   prometheus  - promtool checks of monitoring/ (tests/test_ops_files.py)
#   shellcheck  - lint of the service scripts
#   nginx       - replicas behind deploy/nginx/orchard.conf (tests/test_nginx_e2e.py); its
#                 package enables nginx.service on port 80, which the test does not use
# Never downloads a browser build: Playwright drives Debian's /usr/bin/chromium.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core shellcheck prometheus nginx >/dev/null
