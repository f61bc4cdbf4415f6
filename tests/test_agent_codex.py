"""The real Codex CLI (0.171, scripts/install-agent-clis.sh) completes a one-shot task against
Orchard: `codex exec`, offline, through a custom provider with `wire_api = "responses"`, with
its full agent request (~11.7k tokens: developer messages, 8 function tools, a `namespace` of 5
sub-agent functions, web_search, reasoning, include, prompt_cache_key, client_metadata,
store false, stream) on a tiny random Qwen2 with a 32k context.

Random weights write gibberish, which is fine: the point is the protocol. They must also end
their turn, though, and they never write end-of-turn by themselves: a response cut by
max_output_tokens is `response.incomplete`, which Codex takes as a failure ("Incomplete
response returned, reason: max_output_tokens", exit 1). So the model is made terse
(`engine.random_model.make_terse`: each step ends the turn with probability ~0.15), and one
test also asks for a structured answer (`--output-schema`, sent as text.format json_schema),
which the grammar ends after a short JSON object.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from tests.conftest import agent_cli, assert_never_blocked
from tests.server import ServerProcess

API_KEY = "sk-orchard-codex"
MODEL = "tiny-32k"
SCHEMA = {"type": "object", "properties": {"greeting": {"type": "string", "maxLength": 16}},
          "required": ["greeting"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(terse_long_context_model_dir, tmp_path_factory):
    agent_cli("codex")  # skip before starting a server for nothing
    log = tmp_path_factory.mktemp("codex-server") / "server.log"
    server = ServerProcess({"MODEL": str(terse_long_context_model_dir), "MODEL_ID": MODEL, "API_KEYS": API_KEY,
                            "MAX_TOKENS_LIMIT": "64", "DEFAULT_MAX_TOKENS": "64"}, log).start()
    yield server
    assert_never_blocked(server)
    server.stop()


def access_log(server: ServerProcess, message: str) -> list[dict]:
    """The server's /v1/responses access-log entries of one kind ("request" or "completion")."""
    entries = server.access_entries()
    ids = {e["request_id"] for e in entries if e.get("route") == "/v1/responses"}
    return [e for e in entries if e["message"] == message and e["request_id"] in ids]


def settled_access_log(server: ServerProcess, message: str, timeout: float = 10.0) -> list[dict]:
    """access_log once every logged request has its completion logged too (a completion is logged
    as the stream ends, which may be just after the client has read its last event and exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        requests, completions = access_log(server, "request"), access_log(server, "completion")
        if requests and len(completions) >= len(requests):
            break
        time.sleep(0.1)
    return access_log(server, message)


@pytest.fixture
def codex(server, tmp_path):
    """Runs `codex exec ARGS...` with its own CODEX_HOME pointing at the server (and an output
    schema when `structured`); asserts it exits 0 and returns its last message (parsed if structured)."""
    binary = agent_cli("codex")
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    (home / "config.toml").write_text(f'''model = "{MODEL}"
model_provider = "orchard"
check_for_update_on_startup = false

[model_providers.orchard]
name = "Orchard"
base_url = "{server.base_url}/v1"
wire_api = "responses"
env_key = "ORCHARD_API_KEY"
''')
    schema, last = tmp_path / "schema.json", tmp_path / "last-message.txt"
    schema.write_text(json.dumps(SCHEMA))
    # A clean environment: no inherited OPENAI_* credentials or proxies, no user config.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "CODEX_HOME": str(home), "ORCHARD_API_KEY": API_KEY}

    def run(*args: str, structured: bool = True):
        last.unlink(missing_ok=True)
        extra = ["--output-schema", str(schema)] if structured else []
        # --sandbox and --color are exec's own, so they go before a `resume`; `resume` takes the rest.
        done = subprocess.run([binary, "exec", "--sandbox", "read-only", "--color", "never", *args,
                               "--skip-git-repo-check", *extra, "-o", str(last)],
                              cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
        report = f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}\n{server.log()}"
        assert done.returncode == 0, report
        run.report = report  # for a later assertion's message
        return json.loads(last.read_text()) if structured else last.read_text()

    return run


def test_codex_exec_completes_a_plain_one_shot_task(server, codex):
    codex("--ephemeral", "Say hello", structured=False)
    statuses = [e["status"] for e in settled_access_log(server, "request")]
    assert statuses and all(s == 200 for s in statuses), f"{statuses}\n{codex.report}"
    done = settled_access_log(server, "completion")
    assert done and done[-1]["finish_reason"] == "stop" and done[-1]["prompt_tokens"] > 8000, done


def test_codex_exec_completes_a_structured_one_shot_task(server, codex):
    answer = codex("--ephemeral", "Say hello")
    assert set(answer) == {"greeting"}  # the answer, in the schema's shape
    statuses = [e["status"] for e in settled_access_log(server, "request")]
    assert statuses and all(s == 200 for s in statuses), f"{statuses}\n{codex.report}"
    done = settled_access_log(server, "completion")
    assert done and all(e["finish_reason"] == "stop" for e in done), done
    assert done[-1]["prompt_tokens"] > 8000  # the agent's whole request, tools and all


def test_codex_exec_resume_replays_the_first_turn(server, codex):
    """store is false: the second turn sends the first turn's items back as input (Codex's stateless
    loop). They render as the first turn's prompt and answer did, so the prefix cache serves them."""
    codex("Say hello")
    before = len(settled_access_log(server, "completion"))
    codex("resume", "--last", "Say it again")
    statuses = [e["status"] for e in settled_access_log(server, "request")]
    assert all(s == 200 for s in statuses), f"{statuses}\n{codex.report}"
    first, second = settled_access_log(server, "completion")[before - 1:]
    assert second["prompt_tokens"] > first["prompt_tokens"] and second["cached_tokens"] >= first["prompt_tokens"] - 64
