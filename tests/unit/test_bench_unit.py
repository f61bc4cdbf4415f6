"""Unit tests for bench/: stats math and an end-to-end run against a fake SSE server."""
from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from bench import cli
from bench.report import comparisons, markdown_table
from bench.stats import mean, percentile, ratio, summarize


# ---------------------------------------------------------------- stats math

@pytest.mark.parametrize("values,q,expected", [
    ([1, 2, 3, 4], 50, 2.5),
    ([1, 2, 3, 4], 0, 1.0),
    ([1, 2, 3, 4], 100, 4.0),
    ([1, 2, 3, 4], 95, 3.85),
    ([4, 1, 3, 2], 25, 1.75),          # unsorted input
    ([10], 99, 10.0),
    ([0, 10], 90, 9.0),
    (list(range(101)), 99, 99.0),
    ([1.5, 1.5, 1.5], 50, 1.5),
    ([], 50, None),
])
def test_percentile(values, q, expected):
    got = percentile(values, q)
    assert got == expected if expected is None else got == pytest.approx(expected)


@pytest.mark.parametrize("q", [-1, 100.5])
def test_percentile_rejects_bad_q(q):
    with pytest.raises(ValueError):
        percentile([1, 2], q)


@pytest.mark.parametrize("func,args,expected", [
    (mean, ([1, 2, 3, 6],), 3.0),
    (mean, ([],), None),
    (ratio, (3.0, 2.0), 1.5),
    (ratio, (3.0, 0.0), None),
    (ratio, (None, 2.0), None),
])
def test_mean_ratio(func, args, expected):
    assert func(*args) == expected


def _r(ok=True, e2e=1.0, ttft=0.1, tokens=10, gaps=(), error=None):
    return SimpleNamespace(ok=ok, e2e=e2e, ttft=ttft, tokens=tokens, gaps=list(gaps),
                           error=error, token_source="usage")


def test_summarize():
    rs = [_r(e2e=1.0, ttft=0.1, tokens=10, gaps=[0.1] * 9),
          _r(e2e=2.0, ttft=0.2, tokens=20, gaps=[0.2] * 19),
          _r(ok=False, e2e=None, ttft=None, tokens=0, error="http_500"),
          _r(ok=False, e2e=None, ttft=None, tokens=0, error="timeout")]
    s = summarize(rs, wall=4.0, concurrency=2)
    assert (s["requests"], s["ok"], s["failed"]) == (4, 2, 2)
    assert s["success_rate"] == 0.5
    assert s["errors"] == {"http_500": 1, "timeout": 1}
    assert s["latency_mean"] == pytest.approx(1.5)
    assert s["latency_p50"] == pytest.approx(1.5)
    assert s["ttft_p95"] == pytest.approx(0.195)
    assert s["req_per_s"] == pytest.approx(0.5)
    assert s["output_tokens"] == 30 and s["tok_per_s"] == pytest.approx(7.5)
    assert s["stream_tok_per_s"] == pytest.approx(10.0)
    assert s["itl_mean"] == pytest.approx((0.9 + 3.8) / 28)
    assert s["itl_source"] == "chunk_gaps"
    assert s["tpot_mean"] == pytest.approx((0.9 / 9 + 1.8 / 19) / 2)


def test_summarize_tpot_fallback_and_empty():
    s = summarize([_r(e2e=1.1, ttft=0.1, tokens=11)], wall=1.0, concurrency=1)
    assert s["itl_source"] == "tpot" and s["itl_mean"] == pytest.approx(0.1)
    empty = summarize([], wall=0.0, concurrency=1)
    assert empty["success_rate"] == 0.0 and empty["latency_p95"] is None


def test_markdown_table_and_comparisons():
    table = markdown_table(["a", "bb"], [["1", "22222"]])
    assert table.splitlines()[0] == "| a |    bb |"
    recs = [{"target": t, "summary": {"concurrency": 1, "tok_per_s": v, "ttft_p95": f}}
            for t, v, f in (("A", 100.0, 0.2), ("B", 150.0, 0.1))]
    (c,) = comparisons(recs, ["A", "B"])
    assert c["tok_per_s_ratio"] == pytest.approx(1.5)
    assert c["ttft_p95_ratio"] == pytest.approx(0.5)


# ---------------------------------------------------------------- fake server

class FakeOpenAI(BaseHTTPRequestHandler):
    """Streams max_tokens one-word chunks; behaviour set on the server object."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _json(self, code, obj):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._json(200, {"object": "list", "data": [{"id": "fake-model"}]})

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.count += 1
            n = srv.count
        if srv.reject_ignore_eos and "ignore_eos" in body:
            return self._json(400, {"error": {"message": "unknown field ignore_eos"}})
        if srv.slow_every and n % srv.slow_every == 0:
            time.sleep(0.6)
        if srv.fail_every and n % srv.fail_every == 0:
            return self._json(500, {"error": {"message": "boom"}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if srv.drop_every and n % srv.drop_every == 0:
            self._chunk(b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n')
            self.close_connection = True
            return  # connection closed mid-stream
        k = body["max_tokens"]
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
        events += [{"choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
                   for i in range(k)]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({"choices": [], "usage": {"prompt_tokens": 5,
                                                    "completion_tokens": k,
                                                    "total_tokens": k + 5}})
        raw = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
        raw += b"data: [DONE]\n\n"
        # awkward framing: HTTP chunks that split and merge SSE events
        for i in range(0, len(raw), 37):
            self._chunk(raw[i:i + 37])
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


@contextmanager
def fake_server(**behaviour):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    srv.daemon_threads = True
    srv.block_on_close = False
    srv.lock, srv.count = threading.Lock(), 0
    for key in ("fail_every", "drop_every", "slow_every", "reject_ignore_eos"):
        setattr(srv, key, behaviour.get(key, 0))
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                          daemon=True)
    th.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()


def _run(tmp_path, *extra, timeout="5"):
    out = tmp_path / "out.json"
    rc = cli.main([*extra, "--json", str(out), "--quiet", "--timeout", timeout])
    assert rc == 0
    return json.loads(out.read_text())


def test_end_to_end_success(tmp_path, capsys):
    with fake_server() as url:
        t0 = time.perf_counter()
        doc = _run(tmp_path, "--url", url, "--concurrency", "1,3",
                   "--requests-per-level", "6", "--max-tokens", "8")
        assert time.perf_counter() - t0 < 5
    assert doc["targets"][0]["model"] == "fake-model"
    assert doc["meta"]["host"]["cpu_count"] and doc["meta"]["timestamp"]
    assert [lv["summary"]["concurrency"] for lv in doc["levels"]] == [1, 3]
    for lv in doc["levels"]:
        s = lv["summary"]
        assert s["requests"] == 6 and s["success_rate"] == 1.0 and s["errors"] == {}
        assert s["output_tokens"] == 48 and s["token_source"] == ["usage"]
        assert s["req_per_s"] > 0 and s["tok_per_s"] > 0 and s["stream_tok_per_s"] > 0
        assert s["ttft_p95"] is not None and s["itl_p95"] is not None
        assert all(r["tokens"] == 8 and r["chunks"] == 8 for r in lv["requests"])
    assert "| c |" in capsys.readouterr().out.replace("|  c |", "| c |")


def test_end_to_end_chunk_counting_and_eos_fallback(tmp_path):
    with fake_server(reject_ignore_eos=True) as url:
        doc = _run(tmp_path, "--url", url, "--concurrency", "2", "--no-usage",
                   "--requests-per-level", "4", "--max-tokens", "5")
    t = doc["targets"][0]
    assert t["ignore_eos"] is False and any("ignore_eos" in n for n in t["notes"])
    s = doc["levels"][0]["summary"]
    assert s["success_rate"] == 1.0 and s["output_tokens"] == 20
    assert s["token_source"] == ["chunks"]


def test_end_to_end_errors_counted(tmp_path):
    with fake_server(fail_every=3, drop_every=5) as url:
        doc = _run(tmp_path, "--url", url, "--concurrency", "2",
                   "--requests-per-level", "15", "--max-tokens", "4", "--warmup", "0")
    s = doc["levels"][0]["summary"]
    assert s["requests"] == 15
    assert s["errors"].get("http_500", 0) >= 4
    assert s["errors"].get("connection_closed", 0) >= 1
    assert 0 < s["success_rate"] < 1
    assert s["output_tokens"] == 4 * s["ok"]


def test_end_to_end_timeouts_counted(tmp_path):
    with fake_server(slow_every=2) as url:
        doc = _run(tmp_path, "--url", url, "--concurrency", "2", "--requests-per-level",
                   "4", "--max-tokens", "2", "--warmup", "0", timeout="0.25")
    s = doc["levels"][0]["summary"]
    assert s["errors"] == {"timeout": 2} and s["ok"] == 2


def test_ab_mode_and_unreachable(tmp_path, capsys):
    with fake_server() as a, fake_server() as b:
        doc = _run(tmp_path, "--url", a, "--url-b", b, "--label-a", "old",
                   "--label-b", "new", "--concurrency", "1,2",
                   "--requests-per-level", "3", "--max-tokens", "3")
    assert [lv["target"] for lv in doc["levels"]] == ["old", "new", "old", "new"]
    assert len(doc["comparisons"]) == 2
    assert all(c["tok_per_s_ratio"] > 0 for c in doc["comparisons"])
    assert "B/A" in capsys.readouterr().out
    # nothing listening: a clean error code, not a traceback
    assert cli.main(["--url", "http://127.0.0.1:9/v1", "--model", "m", "--quiet",
                     "--concurrency", "1"]) == 1


def test_a_level_spread_over_client_processes_runs_every_request_once(tmp_path):
    """--processes: streams and requests split over spawned client processes, one summary."""
    with fake_server() as url:
        doc = _run(tmp_path, "--url", url, "--concurrency", "5", "--requests-per-level", "11",
                   "--max-tokens", "4", "--processes", "2", timeout="20")
    (level,) = doc["levels"]
    s = level["summary"]
    assert s["concurrency"] == 5 and s["requests"] == 11 and s["success_rate"] == 1.0
    assert s["output_tokens"] == 44 and s["tok_per_s"] > 0 and s["ttft_p95"] is not None
    starts = [r["start"] for r in level["requests"]]
    assert starts == sorted(starts) and min(starts) >= 0  # one clock across the processes


@pytest.mark.parametrize("concurrency, n, processes, want", [
    (5, 11, 2, [(3, 7), (2, 4)]), (128, 384, 4, [(32, 96)] * 4), (2, 6, 8, [(1, 3), (1, 3)]), (8, 8, 1, [(8, 8)])])
def test_split_spreads_streams_evenly_and_requests_in_proportion(concurrency, n, processes, want):
    from bench.runner import _split

    parts = _split(concurrency, n, processes)
    assert [(c, len(r)) for c, r in parts] == want
    assert [i for _, r in parts for i in r] == list(range(n))
