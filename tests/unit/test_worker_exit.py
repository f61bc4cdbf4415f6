"""gunicorn.conf.py's worker_exit: the worker leaves with the status Gunicorn meant to give it,
without the interpreter's teardown (MLX's CUDA teardown aborted workers on the GPU); the
master, which calls the same hook for a worker already gone, is left alone. The real process
is proven in tests/test_hardening_e2e.py (SIGTERM under load: no signal, status 0)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def conf():
    spec = importlib.util.spec_from_file_location("orchard_gunicorn_conf", ROOT / "gunicorn.conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("exiting, status", [
    (SystemExit(0), 0), (SystemExit(None), 0), (SystemExit(3), 3), (SystemExit(-1), 255),
    (SystemExit("message"), 1), (RuntimeError("boom"), 1), (None, 1)])
def test_the_status_is_the_one_gunicorn_was_exiting_with(conf, exiting, status):
    assert conf._exit_status(exiting) == status


class Worker:
    def __init__(self, pid):
        self.pid = pid


def test_the_master_calling_the_hook_for_a_gone_worker_is_left_running(conf, monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    conf.worker_exit(None, Worker(os.getpid() + 1))
    assert exits == []


def test_the_worker_leaves_with_its_status(conf, monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    try:
        raise SystemExit(4)
    except SystemExit:
        conf.worker_exit(None, Worker(os.getpid()))  # as in Gunicorn's `finally`
    assert exits == [4]

