#!/usr/bin/env bash
# Dependencies of tests/test_console_browser.py (the web console in a real headless browser).
#
#   scripts/install-browser-test-deps.sh [VENV]      # VENV defaults to .venv
#
# - Debian's `chromium` (apt). No browser is downloaded from the internet: the test points
#   Playwright at /usr/bin/chromium (never run `playwright install`).
# - Python `playwright` (pip) into VENV. Only the `playwright` wheel itself is added (its deps,
#   greenlet and pyee, are already there via gevent / other packages).
#
# Do NOT use selenium instead: it pulls in `trio`, and huggingface_hub -> httpcore2 imports trio
# when present; under Gunicorn's gevent worker that import fails ("child watchers are only
# available on the default loop") and the model never loads.
#
# Idempotent: skips whatever is already installed. Needs root (or sudo) for apt-get.
set -euo pipefail

VENV="${1:-.venv}"
PY="$VENV/bin/python"
if [[ ! -x "$PY" ]]; then
  echo "error: no Python at $PY (pass the virtualenv as the first argument)" >&2
  exit 2
fi

SUDO=""
if [[ "$(id -u)" != 0 ]]; then SUDO="sudo"; fi

if command -v chromium >/dev/null 2>&1; then
  echo "chromium: already installed ($(command -v chromium))"
else
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
fi

if "$PY" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "playwright: already installed"
else
  "$PY" -m pip install --quiet playwright
fi

# Fail loudly here, not later in the test, if the pair doesn't work together.
"$PY" - <<'EOF'
import shutil
from playwright.sync_api import sync_playwright

path = shutil.which("chromium")
with sync_playwright() as pw:
    browser = pw.chromium.launch(executable_path=path, headless=True, args=["--no-sandbox"])
    print(f"ok: playwright drives {path} (Chromium {browser.version})")
    browser.close()
EOF
