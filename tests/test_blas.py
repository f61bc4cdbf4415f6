"""Which BLAS MLX uses on the Linux CPU (engine/blas.py): the decision, what the process
really binds to, and what a real server's log and /v1/system/status say."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import requests

from engine import blas
from tests.server import ROOT

LIB = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
needs_openblas = pytest.mark.skipif(not sys.platform.startswith("linux") or blas.find_openblas() is None,
                                    reason="OpenBLAS is not installed (make setup installs it)")


@pytest.mark.parametrize("setting, platform, library, mlx_imported, loads, says", [
    ("auto", "linux", LIB, False, LIB, "preloading"),
    ("auto", "linux", None, False, None, "apt-get install libopenblas0-pthread"),
    ("auto", "linux", LIB, True, None, "imported before OpenBLAS"),
    ("bundled", "linux", LIB, False, None, "ORCHARD_BLAS=bundled"),
    ("auto", "darwin", None, False, None, "not Linux"),
])
def test_plan(setting, platform, library, mlx_imported, loads, says):
    library_to_load, why = blas.plan(setting, platform, library, mlx_imported)
    assert library_to_load == loads and says in why


def describe_in_a_fresh_process(setting: str) -> dict:
    """numpy first: its own OpenBLAS (prefixed symbols) is mapped too, and must not count."""
    code = ("import json, numpy; from engine import blas; blas.activate(%r); import mlx.core as mx; "
            "a = mx.ones((64, 64)); mx.eval(a @ a); print(json.dumps(blas.describe()))" % setting)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


@needs_openblas
def test_the_process_reports_what_mlx_binds_to():
    fast = describe_in_a_fresh_process("auto")
    assert fast["library"].startswith("OpenBLAS 0.") and fast["fast"] and fast["threads"] >= 1
    assert "openblas" in fast["path"]
    slow = describe_in_a_fresh_process("bundled")
    assert slow == {"library": "bundled reference BLAS", "path": None, "threads": 1, "fast": False}


@needs_openblas
@pytest.mark.parametrize("setting, fast", [("auto", True), ("bundled", False)])
def test_a_real_server_says_which_blas_it_uses(tiny_server_factory, setting, fast):
    server = tiny_server_factory(ORCHARD_BLAS=setting)
    backend = requests.get(server.base_url + "/v1/system/status", timeout=10).json()["backend"]
    assert backend["blas_fast"] is fast
    assert backend["blas"].startswith("OpenBLAS" if fast else "bundled reference BLAS")
    assert backend["blas_threads"] >= 1
    assert f"MLX CPU BLAS: {backend['blas']}" in server.full_log()
