#!/bin/sh
# OpenBLAS for MLX's Linux CPU backend (its wheel's bundled reference BLAS is ~15x slower;
# engine/blas.py preloads OpenBLAS when it is installed). Run by `make setup`/`make run`:
# installs Debian's libopenblas0-pthread as root or with passwordless sudo, otherwise says
# how in one line. Never fails: Orchard runs without it, only slower.
# Usage: scripts/install-openblas.sh [python]   (the venv's python, to ask engine/blas.py)
PYTHON=${1:-python3}
case $0 in */*) cd "${0%/*}/.." || true ;; esac  # the repository root, for engine.blas
[ "$(uname -s)" = Linux ] || exit 0
[ "${ORCHARD_BLAS:-auto}" = auto ] || exit 0
"$PYTHON" -m engine.blas 2>/dev/null && exit 0   # already installed

PACKAGE=libopenblas0-pthread
if ! command -v apt-get >/dev/null 2>&1; then
  echo "orchard: OpenBLAS not found; install your distribution's OpenBLAS (pthread) package for fast CPU inference"
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "orchard: OpenBLAS not found; for ~15x faster CPU inference run: sudo apt-get install $PACKAGE"
  exit 0
fi
echo "orchard: installing $PACKAGE (fast BLAS for MLX on the CPU)"
export DEBIAN_FRONTEND=noninteractive
# A fresh container has no package lists yet: update only when the first try fails.
$SUDO apt-get install -y -qq --no-install-recommends $PACKAGE >/dev/null 2>&1 \
  || { $SUDO apt-get update -qq >/dev/null 2>&1 \
       && $SUDO apt-get install -y -qq --no-install-recommends $PACKAGE >/dev/null 2>&1; } \
  || echo "orchard: could not install $PACKAGE (MLX keeps its slow bundled BLAS); try: sudo apt-get install $PACKAGE"
exit 0
