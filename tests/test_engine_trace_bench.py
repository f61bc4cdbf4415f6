"""bench/engine_trace.py through a real Gunicorn worker (bench/traced.gunicorn.conf.py): the
trace the goal-3 diagnosis used is written when the worker exits, and a client's own marks
find the steps of its request."""
from __future__ import annotations

import sys
import time

import requests

from bench import engine_trace
from tests.server import ROOT, ServerProcess


def test_a_traced_server_records_each_request_and_its_steps(tiny_model_dir, tmp_path):
    trace = tmp_path / "trace.jsonl"
    server = ServerProcess({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny", "ENGINE_TRACE": str(trace)},
                           tmp_path / "server.log",
                           argv=[sys.executable, "-m", "gunicorn", "-c", str(ROOT / "bench/traced.gunicorn.conf.py")])
    server.start()
    try:
        marks = []
        for text in ("one", "two"):
            start = time.perf_counter()
            r = requests.post(server.base_url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": text}]})
            assert r.status_code == 200
            marks.append((start, time.perf_counter(), r.json()["usage"]["completion_tokens"]))
    finally:
        assert server.stop() == 0
    events = engine_trace.read(str(trace))
    assert [e[2] for e in events if e[0] == "submit"] == [1, 1]
    assert [e[2] for e in events if e[0] == "admit"] == [1, 1]
    for start, end, completion in marks:
        steps = engine_trace.steps_between(events, start, end)
        assert len(steps) >= completion and all(ms >= 0 for ms in steps)
        assert sum(e[4] for e in events if e[0] == "step" and start <= e[1] <= end) == completion
