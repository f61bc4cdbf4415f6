#!/usr/bin/env bash
# System tools some tests use when present (each test skips without its tool):
#   chromium    - the web console in a real headless browser (tests/test_console_browser.py)
#   prometheus  - promtool checks of monitoring/ (tests/test_ops_files.py)
#   shellcheck  - lint of the service scripts
# Never downloads a browser build: Playwright drives Debian's /usr/bin/chromium.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core shellcheck prometheus >/dev/null
