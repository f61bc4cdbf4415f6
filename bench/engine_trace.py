"""A per-step trace of the engine thread inside a real server worker: when each request was
submitted and admitted, and each engine step's start, end and batch state. It found both of
goal 3's cold costs (issue 14: stop 20's cache trim in the first request's first step, stop
21's second prefill step), where the engine alone showed none.

Run a server with it (the real gunicorn.conf.py, plus this module in the worker):

    ENGINE_TRACE=/tmp/trace.jsonl python -m gunicorn -c bench/traced.gunicorn.conf.py

The worker writes one JSON array per line when it exits: ["submit", t, n], ["admit", t, n],
["step", t0, t1, [queued, prefilling, decoding, joining], tokens out]. Times are
time.perf_counter() (CLOCK_MONOTONIC on Linux), so a client on the same machine can put its
own marks beside them; `steps_between` does that for one request.
"""
from __future__ import annotations

import json
import os
import time

_events: list = []


def install() -> None:
    """Wrap the engine's submit, admit and step (once per process; measured only, no decision)."""
    from engine.engine import Engine
    from engine.generator import Generator

    if getattr(Generator.step, "_traced", False):
        return
    step, submit, admit = Generator.step, Engine.submit_group, Engine._admit

    def traced_step(self):
        batch = self._batch
        started = time.perf_counter()
        state = [len(batch._unprocessed_sequences), len(batch._prompt_batch)]
        if self.slots:
            state += [sum(len(g) for g in batch._groups.values()),
                      sum(1 for _, last in batch._joining for t in last if t is not None)]
        out = step(self)
        _events.append(("step", started, time.perf_counter(), state, len(out)))
        return out

    def traced_submit(self, requests, ready=None):
        _events.append(("submit", time.perf_counter(), len(requests)))
        return submit(self, requests, ready)

    def traced_admit(self):
        waiting = len(self._scheduler.waiting)
        admit(self)
        if waiting:
            _events.append(("admit", time.perf_counter(), waiting - len(self._scheduler.waiting)))

    traced_step._traced = True
    Generator.step, Engine.submit_group, Engine._admit = traced_step, traced_submit, traced_admit


def dump(path: str) -> None:
    with open(path, "w") as f:
        for event in _events:
            f.write(json.dumps(event) + "\n")


def read(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def steps_between(events: list, start: float, end: float) -> list[float]:
    """Milliseconds of each engine step that began between two client marks (perf_counter)."""
    return [round(1000 * (e[2] - e[1]), 2) for e in events if e[0] == "step" and start <= e[1] <= end]


def wanted() -> bool:
    return bool(os.environ.get("ENGINE_TRACE"))
