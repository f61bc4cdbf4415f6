"""Which BLAS MLX's CPU backend uses on Linux, and how Orchard picks a fast one.

The Linux `mlx-cpu` wheel links a bundled reference BLAS (about 2.8 GFLOP/s for
a 1024² fp32 matmul here). Loading Debian's OpenBLAS with RTLD_GLOBAL *before*
`mlx.core` is first imported puts its `cblas_*` symbols first in the global
lookup scope, so MLX's calls bind to it (measured 42-49 GFLOP/s on 2 cores).
ORCHARD_BLAS=auto does this when the library is installed (`make setup` and
`make run` install it where they can: scripts/install-openblas.sh); `bundled`
leaves MLX alone. `describe()` asks the dynamic linker what MLX's calls bind to.

OpenBLAS wheels on PyPI were no way around the system package: scipy-openblas32/64
export only `scipy_`-prefixed symbols (MLX's `cblas_sgemm` never binds to them), and
the unprefixed ones (cmeel-openblas, ngsolve-openblas) need the system's libgfortran5.
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("orchard.engine")

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",  # Debian/Ubuntu libopenblas0-pthread
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libblas.so.3",
    "/usr/lib64/libopenblasp.so.0",  # Fedora/RHEL openblas-threads
)
HOW_TO_INSTALL = "make setup as root, or: sudo apt-get install libopenblas0-pthread"
BUNDLED = "bundled reference BLAS"
_loaded: list[str] = []


def find_openblas() -> Optional[str]:
    return next((c for c in OPENBLAS_CANDIDATES if Path(c).is_file()), None)


def plan(setting: str, platform: str, library: Optional[str], mlx_imported: bool) -> tuple[Optional[str], str]:
    """(the library to preload or None, why): the whole decision, for activate() and tests."""
    if setting != "auto":
        return None, f"ORCHARD_BLAS={setting}: MLX keeps its {BUNDLED}"
    if not platform.startswith("linux"):
        return None, "not Linux: MLX brings its own BLAS"
    if library is None:
        return None, f"OpenBLAS not found: MLX uses its slow {BUNDLED} ({HOW_TO_INSTALL})"
    if mlx_imported:
        return None, f"mlx was imported before OpenBLAS could be loaded: MLX keeps its {BUNDLED}"
    return library, f"preloading {library}"


def activate(setting: str) -> str:
    """Load OpenBLAS ahead of MLX when allowed and possible; returns what is in use."""
    if not _loaded:
        library, why = plan(setting, sys.platform, find_openblas(), "mlx.core" in sys.modules)
        if library is not None:
            ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
            _loaded.append(library)
        elif setting == "auto" and sys.platform.startswith("linux"):
            log.warning("%s", why)
    state = in_use()
    log.info("MLX CPU BLAS: %s", state)
    return state


def describe() -> dict:
    """What MLX's `cblas_sgemm` binds to in this process (or will, once imported): library
    (name and version), path, threads, and whether it is a fast BLAS. Asked of the dynamic
    linker, not read from file names (numpy's own prefixed OpenBLAS is mapped too, but MLX
    never calls it)."""
    if sys.platform == "darwin":
        return {"library": "Metal (Apple GPU)", "path": None, "threads": None, "fast": True}
    path = _global_provider("cblas_sgemm")
    if path is None:  # MLX resolves it in its own dependencies: the wheel's reference BLAS
        return {"library": BUNDLED, "path": None, "threads": 1, "fast": False}
    lib = ctypes.CDLL(path)  # already loaded: the same handle
    return {"library": _config(lib) or Path(path).name, "path": path, "threads": _threads(lib), "fast": True}


def in_use() -> str:
    """One line for logs and /v1/system/status: 'OpenBLAS 0.3.21 (<path>, 2 threads)', ..."""
    d = describe()
    if d["path"] is not None:
        return f"{d['library']} ({d['path']}, {d['threads'] or 'unknown'} threads)"
    return d["library"] if d["fast"] else f"{BUNDLED} (slow: {HOW_TO_INSTALL})"


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def _global_provider(symbol: str) -> Optional[str]:
    """The file that defines `symbol` in the global lookup scope (what an extension module's
    undefined symbol binds to first), or None."""
    try:
        process = ctypes.CDLL(None)
        address = ctypes.cast(getattr(process, symbol), ctypes.c_void_p)
        info = _DlInfo()
        if not process.dladdr(address, ctypes.byref(info)) or not info.dli_fname:
            return None
    except (AttributeError, OSError):
        return None
    return os.path.realpath(info.dli_fname.decode())


def _config(lib) -> Optional[str]:
    """'OpenBLAS 0.3.21' from openblas_get_config() ('OpenBLAS 0.3.21 DYNAMIC_ARCH ...')."""
    try:
        get = lib.openblas_get_config
    except AttributeError:
        return None
    get.restype = ctypes.c_char_p
    return " ".join(get().decode(errors="replace").split()[:2])


def _threads(lib) -> Optional[int]:
    try:
        return int(lib.openblas_get_num_threads())
    except AttributeError:
        return None


if __name__ == "__main__":  # `python -m engine.blas`: exit 0 when OpenBLAS is there (or not needed)
    sys.exit(0 if not sys.platform.startswith("linux") or find_openblas() else 1)
