"""The real Claude Code CLI (2.1.332, scripts/install-agent-clis.sh) completes a one-shot task
against Orchard: `claude -p`, offline, with its full agent request (~15.8k tokens here: 12 tools,
one deferred; a system prompt in blocks with cache_control after the billing header; adaptive
thinking, effort, context_management; a `system` message after the user's; eight betas;
max_tokens 128000, far beyond the context) on a tiny random Qwen2 with a 32k context.

Random weights write gibberish, which is fine: the point is the protocol. They must also end
their turn, though. A turn cut by max_tokens is no way out: Claude Code takes stop_reason
max_tokens as a failure, sends "Output token limit hit. Resume directly" three times, then exits
1 with "Claude's response exceeded the N output token maximum". Nor is `--json-schema` (the
Codex test's way out): Claude Code asks for it with a StructuredOutput tool under tool_choice
auto, which random weights never call. So the test serves a copy of the model made terse
(`engine.random_model.make_terse`): it ends each turn after a few tokens, with stop_reason end_turn.
"""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import agent_cli, assert_never_blocked
from tests.server import ServerProcess

API_KEY = "sk-orchard-claude-code"
MODEL = "claude-opus-5-5"  # the CLI's own default model: its full request, system messages included


@pytest.fixture(scope="module")
def server(terse_long_context_model_dir, tmp_path_factory):
    agent_cli("claude")  # skip before starting a server for nothing
    model = terse_long_context_model_dir
    log = tmp_path_factory.mktemp("claude-server") / "server.log"
    server = ServerProcess({"MODEL": str(model), "MODEL_ID": "tiny-32k", "MODEL_ALIASES": "claude-*",
                            "API_KEYS": API_KEY, "MAX_TOKENS_LIMIT": "64", "DEFAULT_MAX_TOKENS": "64"}, log).start()
    yield server
    assert_never_blocked(server)
    server.stop()


def messages_statuses(server: ServerProcess) -> list[int]:
    """HTTP statuses of the server's /v1/messages answers, from its access log."""
    return [e["status"] for e in server.access_entries() if e.get("route") == "/v1/messages"]


def test_claude_code_completes_a_one_shot_task(server, tmp_path):
    claude = agent_cli("claude")
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    # A clean environment: no inherited ANTHROPIC_* credentials or proxies, no user settings.
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "ANTHROPIC_BASE_URL": server.base_url,
           "ANTHROPIC_API_KEY": API_KEY, "DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1",
           "DISABLE_ERROR_REPORTING": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    run = subprocess.run([claude, "-p", "Say hello", "--model", MODEL, "--output-format", "json"],
                         cwd=work, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, f"stdout: {run.stdout[-2000:]}\nstderr: {run.stderr[-2000:]}\n{server.log()}"
    result = json.loads(run.stdout)
    assert result["type"] == "result" and result["is_error"] is False, result
    statuses = messages_statuses(server)
    assert statuses and all(s == 200 for s in statuses), statuses
    assert result["usage"]["input_tokens"] + result["usage"]["cache_read_input_tokens"] > 8000  # the agent's prompt
