"""A remote model end to end: the official clients -> a Flask app forwarding with RemoteModel ->
a real Orchard (Gunicorn, embedded model, API keys on) as the upstream."""
import threading

import anthropic
import openai
import pytest
from flask import Flask, request
from werkzeug.serving import make_server

from app import errors
from app.remote import RemoteModel
from config.models_file import ModelEntry, RemoteSpec
from tests.server import free_port

UPSTREAM_KEY = "upstream-key-e2e-7f3a"
SERVED = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def upstream(embedded_server_factory):
    return embedded_server_factory(API_KEYS=UPSTREAM_KEY, MAX_TOKENS_LIMIT="64", DEFAULT_MAX_TOKENS="16")


def serve_forwarder(model: RemoteModel) -> tuple[str, callable]:
    """Orchard's side, as the lead's routes will call it, on a loopback port."""
    app = Flask("forwarder")
    errors.install(app)

    @app.post("/v1/<path:api>")
    def route(api):
        body = request.get_json()
        return model.forward("/" + api, body, stream=bool(body.get("stream")), request_id="e2e-1")

    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_port}", server.shutdown


@pytest.fixture(scope="module")
def forwarder(upstream):
    entry = ModelEntry(id="remote-small", remote=RemoteSpec(base_url=upstream.base_url + "/v1", model=SERVED,
                                                            api_key_env="SMALL_KEY", timeout_s=60))
    model = RemoteModel(entry, {"SMALL_KEY": UPSTREAM_KEY})
    base_url, stop = serve_forwarder(model)
    yield base_url, model
    stop()


@pytest.fixture
def client(forwarder):
    return openai.OpenAI(base_url=forwarder[0] + "/v1", api_key="orchard-client-key", max_retries=0, timeout=120)


COUNT = [{"role": "user", "content": "Count from 1 to 5."}]


def test_chat_non_stream_carries_orchards_id(client, forwarder):
    reply = client.chat.completions.create(model="anything", messages=COUNT, max_tokens=8, temperature=0)
    assert reply.model == "remote-small" and reply.choices[0].message.content and reply.usage.completion_tokens > 0
    assert forwarder[1].stats.errors == {}


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model="anything", messages=COUNT, max_tokens=8, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert {c.model for c in chunks} == {"remote-small"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_completions_and_responses_pass_through(client):
    text = client.completions.create(model="x", prompt="1, 2, 3,", max_tokens=4, temperature=0)
    assert text.model == "remote-small" and text.choices[0].text
    events = list(client.responses.create(model="x", input="Say hi", max_output_tokens=8, stream=True))
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert {e.response.model for e in events if hasattr(e, "response")} == {"remote-small"}


def test_anthropic_messages_stream_through(forwarder):
    claude = anthropic.Anthropic(base_url=forwarder[0], api_key="orchard-client-key", max_retries=0, timeout=120)
    reply = claude.messages.create(model="claude-x", max_tokens=8, messages=COUNT)
    assert reply.model == "remote-small" and reply.content[0].text
    with claude.messages.stream(model="claude-x", max_tokens=8, messages=COUNT) as stream:
        final = stream.get_final_message()
    assert final.model == "remote-small" and final.stop_reason in ("end_turn", "max_tokens")


def test_the_upstreams_refusal_comes_back_in_orchards_envelope(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="x", messages=COUNT, max_tokens=100000)
    assert info.value.body["message"].startswith("upstream: ") and info.value.body["param"] == "max_tokens"


def test_a_wrong_upstream_key_is_the_operators_502_and_never_shown(upstream):
    entry = ModelEntry(id="bad-key", remote=RemoteSpec(base_url=upstream.base_url + "/v1", model=SERVED,
                                                       api_key_env="K"))
    base_url, stop = serve_forwarder(RemoteModel(entry, {"K": "wrong-key-123"}))
    try:
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="c", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model="x", messages=COUNT, max_tokens=4)
        assert info.value.status_code == 502 and info.value.body["code"] == "upstream_error"
        assert "wrong-key-123" not in str(info.value.body)
    finally:
        stop()
