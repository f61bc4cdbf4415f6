"""Replicas behind nginx: deploy/nginx/orchard.conf in front of three real instances on loopback.

Debian's nginx runs a copy of the committed file in which only ports, paths and two timeouts
differ (checked below). The instances then get killed (SIGKILL), stopped (SIGSTOP), drained
(SIGTERM), full, and a client cuts its stream: every client sees a complete 200, a 503 with
Retry-After in the OpenAI envelope, or a stream that Orchard itself ended ([DONE] after an
error event or finish_reason "abort"). Every request carries its own X-Request-Id, and the
instances' logs and metrics show that none ran on two instances.
"""
from __future__ import annotations

import concurrent.futures as cf
import difflib
import http.server
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.server import ROOT, ServerProcess, _die_with_parent, free_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx not installed (scripts/install-ci-extras.sh)")

CONF = ROOT / "deploy" / "nginx" / "orchard.conf"
MODEL = "smollm2-135m-instruct"
# The test's proxy_read_timeout: how long a stopped instance holds a request. Above the
# longest answer here (max_tokens 16 on a loaded 2-core CPU takes up to ~5 s).
READ_TIMEOUT_S = 8
FAIL_TIMEOUT_S = 8  # the test's fail_timeout: how long a failed instance is left out
TEMP_DIRS = ("client_body_temp_path", "proxy_temp_path", "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path")


# ---- the configuration ----------------------------------------------------------------
def render(text: str, tmp: Path, listen: int | None = None, upstreams: list[int] | None = None,
           timeouts: bool = False) -> str:
    """The committed file with this run's paths (and ports and timeouts if given); each
    substitution must match, so the file keeps the shape the test relies on."""
    subs = [(r"^pid .*;$", f"pid {tmp}/nginx.pid;"),
            (r"^error_log \S+", f"error_log {tmp}/error.log"),
            (r"^(\s*access_log) \S+", rf"\1 {tmp}/access.log")]
    subs += [(rf"^(\s*{d}) \S+;$", rf"\1 {tmp}/{d};") for d in TEMP_DIRS]
    if listen is not None:
        subs.append((r"^(\s*listen) 127\.0\.0\.1:8000;$", rf"\g<1> 127.0.0.1:{listen};"))
    for seed, port in zip((8001, 8002, 8003), upstreams or []):  # servers, retry groups, their map
        subs.append((rf"(?<=\D){seed}(?=\D)", str(port)))
    if timeouts:
        subs += [(r"^(\s*proxy_read_timeout) \S+;$", rf"\1 {READ_TIMEOUT_S}s;"),
                 (r"fail_timeout=\S+;", f"fail_timeout={FAIL_TIMEOUT_S}s;")]
    for pattern, replacement in subs:
        text, count = re.subn(pattern, replacement, text, flags=re.M)
        assert count >= 1, f"{CONF.name}: no line matches {pattern!r}"
    return text


def changed_directives(before: str, after: str) -> set[str]:
    lines = difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
    return {line[1:].split()[0] for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))}


def nginx_check(conf: Path, prefix: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, "-t", "-p", str(prefix), "-e", str(prefix / "startup.log"), "-c", str(conf)],
                          capture_output=True, text=True, timeout=30)


def test_the_committed_file_is_a_complete_configuration(tmp_path):
    text = CONF.read_text()
    rendered = render(text, tmp_path)
    # Only paths differ: everything else runs exactly as committed.
    assert changed_directives(text, rendered) == {"pid", "error_log", "access_log", *TEMP_DIRS}
    (tmp_path / "orchard.conf").write_text(rendered)
    r = nginx_check(tmp_path / "orchard.conf", tmp_path)
    assert r.returncode == 0, r.stderr
    if os.geteuid() == 0 and os.path.isdir("/var/log/nginx"):  # as it is, where its paths are ours to use
        r = subprocess.run([NGINX, "-t", "-c", str(CONF)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
    for rule in ("least_conn;", "keepalive 32;", "proxy_buffering off;", "proxy_next_upstream error timeout;",
                 "proxy_intercept_errors on;", "error_page 503 = @another_instance;",
                 "error_page 503 = @last_instance;", "max_fails=1"):
        assert rule in text, rule
    assert "non_idempotent" not in re.sub(r"#.*", "", text), "would resend requests that reached a model"


# ---- the retry chain, against stand-in upstreams -----------------------------------------
class StandIn(http.server.BaseHTTPRequestHandler):
    """An upstream that answers every POST with its server's `status` (503: Orchard's refusal,
    with Retry-After and the envelope) and records the X-Request-Id of each request it got."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self._answer(200, {"status": "ok"})

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.seen.append(self.headers.get("X-Request-Id"))
        if self.server.status == 503:
            self._answer(503, {"error": {"message": "busy", "type": "server_error", "param": None,
                                         "code": "server_is_overloaded"}}, {"Retry-After": "1"})
        else:
            self._answer(200, {"port": self.server.server_port})

    def _answer(self, status: int, body: dict, headers: dict | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(data)),
                            **(headers or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stand_ins(tmp_path):
    """nginx with the committed file in front of three stand-in upstreams."""
    cluster = Cluster(tmp_path, "")
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", port), StandIn) for port in cluster.ports]
    for server in servers:
        server.status, server.seen, server.daemon_threads = 200, [], True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cluster.start_nginx()
        yield cluster, servers
    finally:
        cluster.stop()
        for server in servers:
            server.shutdown()
            server.server_close()


def test_a_refused_request_tries_every_instance_before_a_503(stand_ins):
    """Refused by two instances, a request still reaches the third, whichever it is; refused by
    all three, the client gets the last 503 as it is. No instance gets the same request twice
    before every other one has had it."""
    cluster, servers = stand_ins
    for accepting in range(3):
        for index, server in enumerate(servers):
            server.status, server.seen = (200 if index == accepting else 503), []
        for n in range(6):
            rid = f"chain-{accepting}-{n}"
            r = requests.post(cluster.url + "/v1/chat/completions", json={}, headers={"X-Request-Id": rid}, timeout=10)
            assert r.status_code == 200, (accepting, r.text, cluster.access_log())
            assert r.json()["port"] == cluster.ports[accepting]
        assert servers[accepting].seen == [f"chain-{accepting}-{n}" for n in range(6)]
        for server in servers:
            assert len(server.seen) == len(set(server.seen)), server.seen
    for server in servers:
        server.status, server.seen = 503, []
    r = requests.post(cluster.url + "/v1/chat/completions", json={}, headers={"X-Request-Id": "chain-none"}, timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert r.json()["error"]["code"] == "server_is_overloaded"
    assert all("chain-none" in server.seen for server in servers), cluster.access_log()


# ---- the cluster ----------------------------------------------------------------------
@dataclass
class Outcome:
    request_id: str
    status: int
    kind: str  # complete | aborted | sse_error | refused (503 + Retry-After) | anything else: a failure
    code: str | None = None
    chunk_times: list[float] = field(default_factory=list)


ALLOWED = {"complete", "aborted", "sse_error", "refused"}


class Cluster:
    def __init__(self, tmp: Path, orchard_home: str):
        self.tmp, self.home = tmp, orchard_home
        self.listen = free_port()
        self.ports = [free_port() for _ in range(3)]
        self.url = f"http://127.0.0.1:{self.listen}"
        self.instances: list[ServerProcess] = []  # every process ever started (the logs outlive them)
        self.ledger: list[Outcome] = []
        self._ids = itertools.count(1)  # next() on it is atomic: requests are made from several threads
        self.nginx: subprocess.Popen | None = None

    def instance(self, index: int, **env) -> ServerProcess:
        port = self.ports[index]
        log = self.tmp / f"instance-{index}-{len(self.instances)}.log"
        server = ServerProcess({"MODEL": "embedded", "ORCHARD_HOME": self.home, "PORT": str(port), **env}, log)
        server.port, server.base_url = port, f"http://127.0.0.1:{port}"
        self.instances.append(server)
        return server

    def start_nginx(self) -> None:
        conf = self.tmp / "orchard.conf"
        conf.write_text(render(CONF.read_text(), self.tmp, self.listen, self.ports, timeouts=True))
        self.nginx = subprocess.Popen([NGINX, "-p", str(self.tmp), "-e", str(self.tmp / "startup.log"), "-c",
                                       str(conf), "-g", "daemon off;"], preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                requests.get(self.url + "/health", timeout=2)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not start:\n{self.nginx_log()}")

    def access_log(self, lines: int = 40) -> str:
        path = self.tmp / "access.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def nginx_log(self) -> str:
        logs = (self.tmp / "startup.log", self.tmp / "error.log")
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())

    def ask(self, stream: bool = False, max_tokens: int = 4, cut_after: int | None = None,
            base_url: str | None = None) -> Outcome:
        """One chat completion with its own X-Request-Id and prompt; classified and recorded."""
        rid = f"nginx-e2e-{next(self._ids)}-{os.getpid()}"
        body = {"model": MODEL, "max_tokens": max_tokens, "stream": stream, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count from one to fifty. ({rid})"}]}
        response = requests.post((base_url or self.url) + "/v1/chat/completions", json=body, stream=stream,
                                 headers={"X-Request-Id": rid}, timeout=60)
        outcome = classify(rid, response, cut_after)
        if base_url is None:
            self.ledger.append(outcome)
        return outcome

    def ask_many(self, count: int, **kwargs) -> list[Outcome]:
        with cf.ThreadPoolExecutor(count) as pool:
            return list(pool.map(lambda _: self.ask(**kwargs), range(count)))

    def stop(self) -> None:
        for server in self.instances:
            for process in processes(server):
                try:
                    process.send_signal(signal.SIGCONT)
                except psutil.Error:
                    pass
            server.stop(timeout=15)
        if self.nginx is not None and self.nginx.poll() is None:
            self.nginx.send_signal(signal.SIGQUIT)
            try:
                self.nginx.wait(10)
            except subprocess.TimeoutExpired:
                self.nginx.kill()
                self.nginx.wait()


def classify(rid: str, response: requests.Response, cut_after: int | None) -> Outcome:
    if response.status_code == 503:
        envelope = response.json()["error"]
        ok = (response.headers.get("Retry-After", "").isdigit()
              and set(envelope) == {"message", "type", "param", "code"})
        return Outcome(rid, 503, "refused" if ok else "503 without Retry-After or envelope", envelope.get("code"))
    if response.status_code != 200:
        return Outcome(rid, response.status_code, f"unexpected {response.status_code}: {response.text[:300]}")
    if "text/event-stream" not in response.headers.get("Content-Type", ""):
        choice = response.json()["choices"][0]
        return Outcome(rid, 200, "aborted" if choice["finish_reason"] == "abort" else "complete")
    return read_stream(rid, response, cut_after)


def read_stream(rid: str, response: requests.Response, cut_after: int | None) -> Outcome:
    outcome = Outcome(rid, 200, "truncated (no [DONE])")
    reasons, error, contents = set(), None, 0
    try:
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            outcome.chunk_times.append(time.monotonic())
            if line == b"data: [DONE]":
                outcome.kind = "sse_error" if error else "aborted" if "abort" in reasons else "complete"
                break
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
                continue
            for choice in event.get("choices", []):
                contents += bool(choice["delta"].get("content"))
                if choice.get("finish_reason"):
                    reasons.add(choice["finish_reason"])
            if cut_after is not None and contents >= cut_after:
                outcome.kind = "cut"
                break
    except requests.RequestException as exc:
        outcome.kind = f"broken stream: {exc}"
    finally:
        response.close()
    return outcome


def processes(server: ServerProcess) -> list[psutil.Process]:
    """Gunicorn's master and its worker (the worker holds the model and the connections)."""
    try:
        master = psutil.Process(server.proc.pid)
        return [master, *master.children()]
    except psutil.Error:
        return []


def scrape(server: ServerProcess) -> dict[str, float]:
    """Unlabelled samples, plus `finished`: requests whose engine run ended, all reasons together."""
    text = requests.get(server.base_url + "/metrics", timeout=5).text
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    values = {s.name: s.value for s in samples if not s.labels}
    values["finished"] = sum(s.value for s in samples if s.name == "orchard:request_success_total")
    return values


def wait_running(server: ServerProcess, at_least: int = 1, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while scrape(server)["orchard:num_requests_running"] < at_least:
        assert time.monotonic() < deadline, f"nothing ran on {server.base_url}"
        time.sleep(0.05)


def completions(server: ServerProcess) -> list[str]:
    return [e["request_id"] for e in server.access_entries() if e.get("message") == "completion"]


def refused(server: ServerProcess) -> set[str]:
    return {e["request_id"] for e in server.access_entries() if e.get("message") == "request" and e["status"] == 503}


def ran_on(cluster: Cluster, rid: str) -> list[int]:
    """Indexes of the instances (by port) whose engine finished this request."""
    return [cluster.ports.index(s.port) for s in cluster.instances if rid in completions(s)]


def assert_metrics_match_logs(servers: list[ServerProcess]) -> None:
    """Each instance's own count of engine runs (request_success_total) is its completion log."""
    for server in servers:
        assert scrape(server)["finished"] == len(completions(server)), server.base_url


def assert_allowed(outcomes: list[Outcome]) -> None:
    bad = [o for o in outcomes if o.kind not in ALLOWED]
    assert not bad, bad


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, orchard_home, embedded_model_dir):
    cluster = Cluster(tmp_path_factory.mktemp("nginx"), orchard_home)
    # 0: full after one request (503 server_is_overloaded); 1: drains for at most 1 s; 2: defaults.
    servers = [cluster.instance(0, MAX_CONCURRENT_REQUESTS="1", REQUEST_QUEUE_SIZE="0"),
               cluster.instance(1, DRAIN_TIMEOUT="1", GRACEFUL_TIMEOUT="5"),
               cluster.instance(2)]
    # Started in parallel from threads that live as long as the instances: a server gets
    # SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG follows the thread).
    starters = cf.ThreadPoolExecutor(3)
    try:
        list(starters.map(ServerProcess.start, servers))
        cluster.start_nginx()
        yield cluster
    finally:
        cluster.stop()
        starters.shutdown()


# ---- the scenarios, in order: each leaves the cluster as the next expects ---------------
def test_requests_spread_over_instances_and_streams_are_not_buffered(cluster):
    with cf.ThreadPoolExecutor(3) as pool:
        plain = [pool.submit(cluster.ask, max_tokens=8) for _ in range(2)]
        stream = cluster.ask(stream=True, max_tokens=12)
        outcomes = [f.result() for f in plain] + [stream]
    assert [o.kind for o in outcomes] == ["complete"] * 3, (outcomes, cluster.nginx_log())
    # Chunks arrive as they are generated, not all at once when the answer is done.
    assert stream.chunk_times[-1] - stream.chunk_times[1] > 0.2, stream.chunk_times
    assert len({i for o in outcomes for i in ran_on(cluster, o.request_id)}) >= 2, "least_conn spreads"


def test_a_503_before_any_work_is_retried_on_another_instance(cluster):
    full = cluster.instances[0]
    with cf.ThreadPoolExecutor(1) as pool:  # instance 0 busy with its one slot, asked directly
        busy = pool.submit(cluster.ask, stream=True, max_tokens=16, base_url=full.base_url)
        wait_running(full)
        outcomes = cluster.ask_many(3, max_tokens=4)
        assert busy.result().kind == "complete"
    assert [o.kind for o in outcomes] == ["complete"] * 3, (outcomes, cluster.nginx_log())
    retried = {o.request_id for o in outcomes} & refused(full)
    assert retried, "no request reached the full instance: nothing was retried"
    for rid in retried:  # refused there before any work, then run exactly once elsewhere
        assert ran_on(cluster, rid) in ([1], [2]), rid
    assert_metrics_match_logs(cluster.instances)


def test_a_stopped_instance_costs_one_timeout_then_is_avoided(cluster):
    stopped = cluster.instances[2]
    for process in processes(stopped):
        process.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        outcomes = cluster.ask_many(3, max_tokens=4)
        failed_at = time.monotonic()
        assert failed_at - start < READ_TIMEOUT_S + 15
        assert_allowed(outcomes)
        held = [o for o in outcomes if o.kind == "refused" and o.code == "upstream_unavailable"]
        assert len(held) == 1, outcomes  # the one request the stopped instance accepted
        # Marked failed (max_fails=1): the next requests go elsewhere at once.
        for _ in range(3):
            start = time.monotonic()
            assert cluster.ask(max_tokens=2).kind == "complete"
            assert time.monotonic() - start < READ_TIMEOUT_S
    finally:
        for process in processes(stopped):
            process.send_signal(signal.SIGCONT)
    assert requests.get(stopped.base_url + "/health", timeout=10).status_code == 200
    time.sleep(max(0.0, failed_at + FAIL_TIMEOUT_S + 0.5 - time.monotonic()))  # back in nginx's rotation


def test_sigterm_drains_one_instance_while_the_others_serve(cluster):
    draining = cluster.instances[1]
    with cf.ThreadPoolExecutor(3) as pool:
        streams = [pool.submit(cluster.ask, stream=True, max_tokens=16) for _ in range(3)]
        wait_running(draining)
        draining.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        during = cluster.ask_many(3, max_tokens=4)
        outcomes = [f.result() for f in streams] + during
    assert_allowed(outcomes)
    assert sum(o.kind == "complete" for o in during) >= 1, (during, cluster.access_log())
    assert draining.proc.wait(15) == 0 and "drained" in draining.full_log()


def test_sigkill_mid_request_gives_a_503_and_no_second_run(cluster):
    victim = cluster.instances[2]
    with cf.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(cluster.ask, max_tokens=8) for _ in range(2)]
        wait_running(victim)
        for process in processes(victim):  # master first: it would start a new worker
            process.send_signal(signal.SIGKILL)
        outcomes = [f.result() for f in calls]
    assert_allowed(outcomes)
    lost = [o for o in outcomes if o.kind == "refused" and o.code == "upstream_unavailable"]
    assert len(lost) == 1, outcomes
    assert ran_on(cluster, lost[0].request_id) == [], "a request that reached a model ran again"
    # The dead instance refuses connections: retried at once, before anything was sent.
    assert [cluster.ask(max_tokens=2).kind for _ in range(2)] == ["complete"] * 2


def test_a_stream_the_client_cuts_stops_generating(cluster):
    survivor = cluster.instances[0]
    before = scrape(survivor)["orchard:generation_tokens_total"]
    cut = cluster.ask(stream=True, max_tokens=16, cut_after=1)
    assert cut.kind == "cut"
    deadline = time.monotonic() + 10
    while scrape(survivor)["orchard:num_requests_running"]:
        assert time.monotonic() < deadline, "the cut stream kept generating"
        time.sleep(0.05)
    assert scrape(survivor)["orchard:generation_tokens_total"] - before < 16


def test_no_request_ran_twice(cluster):
    assert_allowed([o for o in cluster.ledger if o.kind != "cut"])
    for outcome in cluster.ledger:
        where = ran_on(cluster, outcome.request_id)
        assert len(where) <= 1, f"{outcome.request_id} ran on instances {where}"
        if outcome.kind == "complete":
            assert len(where) == 1, outcome
    assert_metrics_match_logs([cluster.instances[0]])  # the one instance still alive
    print(f"{len(cluster.ledger)} requests: " + ", ".join(
        f"{kind} {sum(o.kind == kind for o in cluster.ledger)}" for kind in sorted(ALLOWED | {"cut"})))
