"""Which BLAS MLX's CPU backend uses on Linux, and how Orchard picks a fast one.

The Linux `mlx-cpu` wheel links a bundled reference BLAS (about 2.8 GFLOP/s for
a 1024² fp32 matmul here). Loading Debian's OpenBLAS with RTLD_GLOBAL *before*
`mlx.core` is first imported puts its `cblas_*` symbols first in the global
lookup scope, so MLX's calls bind to it (measured 42-49 GFLOP/s on 2 cores).
ORCHARD_BLAS=auto does this when the library is installed; `bundled` leaves MLX
alone. `in_use()` reports what is really mapped into the process.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("orchard.engine")

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
)
_loaded: list[str] = []


def find_openblas() -> str | None:
    return next((c for c in OPENBLAS_CANDIDATES if Path(c).is_file()), None)


def activate(setting: str) -> str:
    """Load OpenBLAS ahead of MLX when allowed and possible; returns what is in use."""
    if setting == "auto" and sys.platform.startswith("linux") and not _loaded:
        lib = find_openblas()
        if lib is None:
            log.warning("OpenBLAS not found: MLX uses its slow bundled BLAS "
                        "(apt-get install libopenblas0-pthread)")
        elif "mlx.core" in sys.modules:
            log.warning("mlx was imported before OpenBLAS could be loaded; keeping the bundled BLAS")
        else:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            _loaded.append(lib)
    state = in_use()
    log.info("MLX CPU BLAS: %s", state)
    return state


def in_use() -> str:
    """'Metal ...', 'OpenBLAS (<path>)' or 'bundled reference BLAS', from the live process."""
    if sys.platform == "darwin":
        return "Metal (Apple GPU)"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for line in maps.splitlines():
        if "openblas" in line.lower():
            threads = os.environ.get("OPENBLAS_NUM_THREADS", "default")
            return f"OpenBLAS ({line.split()[-1]}, {threads} threads)"
    return "bundled reference BLAS (slow: apt-get install libopenblas0-pthread)"
