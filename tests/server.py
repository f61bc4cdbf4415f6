"""A real Orchard server for tests: Gunicorn as a subprocess on a free loopback port."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]

# "Blocked Stack (for thread id 0x..):" or "Thread 0x.. (name)", then that thread's outermost frame.
_THREAD_STACK = re.compile(r'(?:Blocked Stack \(for thread id |\nThread )(0x[0-9a-f]+)[^\n]*\n(?:[ \t]*\n)*'
                           r'[ \t]*File "([^"]+)", line \d+, in (\w+)')
_REPORT_THREAD = re.compile(r"Blocked Stack \(for thread id (0x[0-9a-f]+)\)")


def loop_blocks(log: str) -> list[str]:
    """The blocked stacks of gevent monitor reports about Orchard's event loop, from a server log.

    Two kinds of report are not about our loop, and are left out, by thread: those about a
    thread whose outermost frame is gevent's monitor (`gevent/_monitor.py` `__call__`: a monitor
    thread that got a hub of its own reports itself, several times a second), and those about
    the engine thread (`engine/host.py` `_run`: it gets a hub of its own after waiting on a lock
    that gevent patched, an import's or logging's, while the main thread held it, and the
    monitor then reports each step it takes). Threads are known by id from any stack in the
    log, so a report cut short or interleaved with another monitor's output is still placed."""
    not_ours = {tid for tid, path, func in _THREAD_STACK.findall(log)
                if (path.endswith("gevent/_monitor.py") and func == "__call__")
                or (path.endswith("engine/host.py") and func == "_run")}
    real = []
    for report in log.split("appears to be blocked")[1:]:
        thread = _REPORT_THREAD.search(report)
        if thread is None or thread.group(1) in not_ours:
            continue
        real.append(report.split("Blocked Stack", 1)[-1].split("Info:", 1)[0].strip()[:2000])
    return real


def _die_with_parent() -> None:
    """Linux: SIGTERM the server if the test run itself dies, so no server outlives it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """Starts `gunicorn -c gunicorn.conf.py`, waits for /health, stops with SIGTERM."""

    def __init__(self, env: dict[str, str], log_path: Path, argv: list[str] | None = None):
        # argv: what to start instead of Gunicorn (e.g. `orchard serve --ranks 2`)
        self.argv = argv or [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # gevent's monitor thread reports any greenlet that blocks the event loop > 100 ms.
        self.env = {**os.environ, "HOST": "127.0.0.1", "PORT": str(self.port), "LOG_LEVEL": "info",
                    "GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1", **env}
        self._ready_offset = 0
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                health = requests.get(self.base_url + "/health", timeout=1)
                if health.status_code == 200:
                    self.mark_ready()
                    return self
                if "failed" in health.text:  # the model did not load: no point waiting
                    self.stop()
                    raise RuntimeError(f"server unhealthy: {health.text}\n{self.log()}")
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.log()}")

    def mark_ready(self) -> None:
        """A (re)started worker may block its loop while loading; from here on it may not."""
        self._ready_offset = self.log_path.stat().st_size

    def full_log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def access_entries(self) -> list[dict]:
        """The server's JSON access-log entries, in order. Each is read from its first brace:
        stdout and stderr share one file, so a buffered write of other output can end up in
        front of an entry on the same line."""
        entries = []
        for line in self.full_log().splitlines():
            if '"orchard.access"' in line and "{" in line:
                try:
                    entries.append(json.loads(line[line.index("{"):]))
                except ValueError:
                    continue
        return entries

    def loop_blocks(self) -> list[str]:
        """gevent monitor reports of a blocked event loop since the server became ready."""
        with open(self.log_path, "rb") as f:
            f.seek(self._ready_offset)
            return loop_blocks(f.read().decode(errors="replace"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._log.close()

    def client(self, **kwargs):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                      timeout=kwargs.pop("timeout", 120), **kwargs)
