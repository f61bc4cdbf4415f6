"""Shared fixtures: models (the embedded one, a tiny random Qwen2) and server processes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.server import ServerProcess

ORCHARD_HOME = os.environ.get("ORCHARD_HOME", str(Path("~/.cache/orchard").expanduser()))


@pytest.fixture(scope="session")
def orchard_home() -> str:
    return ORCHARD_HOME


@pytest.fixture(scope="session")
def embedded_model_dir(orchard_home) -> Path:
    """The embedded SmolLM2 imported to MLX (fetched and converted once per machine)."""
    from engine.model_source import resolve

    return Path(resolve("embedded", Path(orchard_home)).location)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from engine.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-qwen2"), "tiny")


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2 with Qwen2.5's 32k context and an 8k vocabulary: agents' long requests fit."""
    from engine.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-32k"), "tiny-32k")


@pytest.fixture(scope="session")
def terse_long_context_model_dir(tmp_path_factory) -> Path:
    """The same shape, made to end its turns after a few tokens (p ~0.15 per step): the agent
    CLIs treat an answer cut by max_tokens as a failure, and random weights never end by themselves."""
    from engine.random_model import make_terse, write_random_model

    return make_terse(write_random_model(tmp_path_factory.mktemp("tiny-32k-terse"), "tiny-32k"))


AGENTS_BIN = Path(os.environ.get("ORCHARD_AGENTS_DIR", Path("~/.cache/orchard/agents").expanduser())) / "node_modules/.bin"


def agent_cli(name: str) -> str:
    """The path of an agent CLI installed by scripts/install-agent-clis.sh; skips the test without it."""
    path = AGENTS_BIN / name
    if not path.exists():
        pytest.skip(f"{name} not installed (run scripts/install-agent-clis.sh)")
    return str(path)


@pytest.fixture(scope="module")
def embedded_server_factory(tmp_path_factory, orchard_home, embedded_model_dir):
    """Start real Gunicorn servers on the embedded model with extra settings; each is checked for
    event-loop blocks and stopped at module end."""
    servers = []

    def start(**env) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess({"MODEL": "embedded", "ORCHARD_HOME": orchard_home, **env}, log).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert_never_blocked(server)
        server.stop()


@pytest.fixture(scope="module")
def embedded_server(embedded_server_factory):
    """One real Gunicorn server on the embedded model, shared by a test module."""
    return embedded_server_factory()


def assert_never_blocked(server: ServerProcess) -> None:
    blocks = server.loop_blocks()
    assert not blocks, "the event loop was blocked > 100 ms while serving:\n" + "\n".join(blocks[:5])


@pytest.fixture(scope="module")
def tiny_server_factory(tiny_model_dir, tmp_path_factory):
    """Start real servers on the tiny Qwen2 with extra settings; all stopped at module end."""
    servers = []

    def start(**env) -> ServerProcess:
        log = tmp_path_factory.mktemp("tiny-server") / "server.log"
        server = ServerProcess({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny", **env}, log).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            assert_never_blocked(server)
        server.stop()
