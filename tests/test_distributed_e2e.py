"""One model across two ranks (issue 15.3): `orchard serve --ranks 2` starts a loopback ring of
two processes serving the embedded SmolLM2 split across them (its MLP tensor-parallel), rank 0
on PORT. Compared with a one-process server on the same model: the same greedy tokens for 8
concurrent requests; a client that leaves mid-stream leaves both ranks in step; a killed
follower makes rank 0 answer 503 (never hang), then the group re-forms and serves again."""
from __future__ import annotations

import concurrent.futures as cf
import signal
import sys
import time

import psutil
import pytest
import requests

from tests.server import ServerProcess

MODEL = "smollm2-135m-instruct"
PROMPTS = [f"Write one sentence about {w}." for w in
           ("apples", "rivers", "the moon", "bread", "trains", "winter", "a cat", "music")]


@pytest.fixture(scope="module")
def group(orchard_home, tmp_path_factory):
    log = tmp_path_factory.mktemp("group") / "server.log"
    server = ServerProcess({"MODEL": "embedded", "ORCHARD_HOME": orchard_home}, log,
                           argv=[sys.executable, "-m", "orchard.cli", "serve", "--ranks", "2"]).start()
    yield server
    assert server.stop() == 0, server.log()


@pytest.fixture(scope="module")
def single(embedded_server_factory):
    return embedded_server_factory()


def answers(server, prompts=PROMPTS, max_tokens=16) -> list[str]:
    client = server.client()

    def one(prompt: str) -> str:
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                              max_tokens=max_tokens, temperature=0).choices[0].message.content

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def follower(server) -> psutil.Process:
    """Rank 1: the supervisor's child that is not Gunicorn."""
    children = psutil.Process(server.proc.pid).children()
    return next(p for p in children if "gunicorn" not in " ".join(p.cmdline()))


def test_two_ranks_give_the_same_greedy_tokens_as_one_process(group, single):
    assert "split across 2 ranks" in group.full_log()
    # both ranks serve one host for their life and froze their start-up objects (engine/host.py)
    assert group.full_log().count("start-up objects frozen") >= 2
    assert answers(group) == answers(single)


def test_a_client_leaving_mid_stream_leaves_the_ranks_in_step(group, single):
    client = group.client()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Count to fifty"}],
                                            max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()  # the leader aborts it; the abort is part of the plan every rank applies
    time.sleep(0.5)
    assert answers(group, PROMPTS[:4]) == answers(single, PROMPTS[:4])


def test_a_killed_follower_gives_503s_then_the_group_recovers(group, single):
    expected = answers(single, PROMPTS[:2])
    rank1 = follower(group)
    rank1.send_signal(signal.SIGKILL)
    statuses, deadline = [], time.monotonic() + 150
    while time.monotonic() < deadline:
        try:
            r = requests.post(group.base_url + "/v1/chat/completions", timeout=30, json={
                "model": MODEL, "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 4,
                "temperature": 0})
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert r.headers.get("Retry-After"), r.headers
            if r.status_code == 200 and 503 in statuses:
                break
        except requests.ReadTimeout:  # a hang: fail now, with what the group's log says about it
            statuses.append(f"no answer in 30 s, {time.monotonic() - deadline + 150:.1f} s after the kill")
            break
        except requests.ConnectionError:
            statuses.append("refused")
        time.sleep(0.5)
    assert set(statuses) <= {200, 503, 500}, (statuses, group.log())  # never a hang (each call returned within 30 s)
    assert 503 in statuses and statuses[-1] == 200, statuses
    assert follower(group).pid != rank1.pid
    assert answers(group, PROMPTS[:2]) == expected
