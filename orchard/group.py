"""`orchard serve --ranks N`: one model across N local processes (a loopback ring), and the
follower side of any distributed group.

Rank 0 is the usual Gunicorn server on PORT; ranks 1..N-1 are followers (`orchard serve` with
DISTRIBUTED_RANK set runs `run_follower`: the engine host loop without a web side). This
supervisor writes the hostfile, starts every rank, and keeps the group whole: a follower that
exits (its peer was lost, or it was killed) is started again, and joins the group again when
rank 0's fresh worker does (Gunicorn's master keeps the port open meanwhile, and the new
worker answers 503 until the group is back). If rank 0's master exits, the group stops.
On several machines each rank runs under its own launchd/systemd unit instead, which restarts
it the same way (README_PRODUCTION.md).
"""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("orchard.group")
RESTART_DELAY_S = 1.0


def run_follower(settings) -> int:
    """A follower rank: join the group, load this rank's share of the model, follow the leader."""
    from app.catalog import ModelCatalog
    from app.request_log import configure_logging
    from engine.host import EngineHost

    configure_logging(settings.log_level)
    EngineHost.freeze_start_up = True  # this process runs one host for its life
    host = ModelCatalog.build_host(settings)
    try:
        host.run_follower()
    except RuntimeError as exc:  # the group was lost: exit, the supervisor starts us again
        log.error("rank %d leaves the group: %s", settings.distributed_rank, exc)
        return 75
    return 0


def loopback_hostfile(ranks: int, folder: Path) -> Path:
    """MLX's ring hostfile for `ranks` processes on this machine: a free port each, and rank 0's
    next port free too (the plan channel, engine/distributed.py)."""
    ports = [_free_port(pair=True)] + [_free_port() for _ in range(ranks - 1)]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"group-{os.getpid()}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    return path


def _free_port(pair: bool = False) -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if not pair:
                return port
            try:
                with socket.socket() as t:
                    t.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def supervise(ranks: int, hostfile: Path, serve_argv: list[str], backend: str = "ring") -> int:
    """Start rank 0 (`serve_argv`, i.e. Gunicorn) and the followers; restart followers that
    exit; stop everything when rank 0 exits or on SIGTERM/SIGINT."""
    base = {**os.environ, "DISTRIBUTED_HOSTFILE": str(hostfile), "DISTRIBUTED_BACKEND": backend}
    one_gpu_each = backend == "nccl"
    leader = subprocess.Popen(serve_argv, env={**base, **_rank_env(0, one_gpu_each)}, preexec_fn=_die_with_parent)
    followers = {rank: _start_follower(base, rank, one_gpu_each) for rank in range(1, ranks)}
    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        leader.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while leader.poll() is None:
            for rank, process in list(followers.items()):
                if process.poll() is not None and not stopping:
                    print(f"orchard: rank {rank} exited ({process.returncode}); starting it again",
                          file=sys.stderr, flush=True)
                    time.sleep(RESTART_DELAY_S)
                    followers[rank] = _start_follower(base, rank, one_gpu_each)
            time.sleep(0.2)
    finally:
        for process in followers.values():
            if process.poll() is None:
                process.terminate()
        for process in followers.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        hostfile.unlink(missing_ok=True)
    return leader.returncode or 0


def _start_follower(env: dict, rank: int, one_gpu_each: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchard.cli", "serve"], env={**env, **_rank_env(rank, one_gpu_each)},
                            preexec_fn=_die_with_parent)


def _rank_env(rank: int, one_gpu_each: bool) -> dict:
    """A rank's own variables: its number; with NCCL on one host, its own GPU."""
    return {"DISTRIBUTED_RANK": str(rank), **({"CUDA_VISIBLE_DEVICES": str(rank)} if one_gpu_each else {})}


def _die_with_parent() -> None:
    """Linux: a rank gets SIGTERM when its supervisor dies, so no rank outlives the group."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
