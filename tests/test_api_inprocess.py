"""The HTTP API in-process (Flask test client) on a tiny random Qwen2: shapes and errors."""
from __future__ import annotations

import json

import pytest

from config import load_settings
from tests.engine_harness import running_app

BODY = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    settings = load_settings({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny"}, dotenv=False)
    with running_app(settings) as app:
        yield app.test_client()


def sse_events(response) -> list:
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_envelope(response, status: int, code=None, param=None):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


def test_models_lists_the_served_model(client):
    data = client.get("/v1/models").get_json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny"]


def test_non_streamed_completion_shape_and_usage(client):
    data = client.post("/v1/chat/completions", json=BODY).get_json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = data["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 6


def test_stream_keeps_one_id_and_matches_the_non_streamed_text(client):
    body = dict(BODY, max_tokens=8, ignore_eos=True)
    whole = client.post("/v1/chat/completions", json=body).get_json()
    events = sse_events(client.post("/v1/chat/completions",
                                    json=dict(body, stream=True, stream_options={"include_usage": True})))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("body, status, code, param", [
    (b"{not json", 400, "invalid_json", None),
    (b"", 400, None, None),
    (b"[]", 400, None, None),
    (dict(BODY, max_tokens=-1), 400, "invalid_value", "max_tokens"),
    (dict(BODY, max_tokens=10**9), 400, None, "max_tokens"),
    (dict(BODY, temperature="hot"), 400, "invalid_value", "temperature"),
    (dict(BODY, messages=[]), 400, "invalid_value", "messages"),
    (dict(BODY, n=9), 400, "invalid_value", "n"),
    (dict(BODY, model="gpt-4"), 404, "model_not_found", "model"),
    (dict(BODY, model="/etc/passwd"), 404, "model_not_found", "model"),
    (dict(BODY, max_tokens=1020), 400, "context_length_exceeded", "messages"),
    (dict(BODY, messages=[{"role": "user", "content": "word " * 2000}]), 400, "context_length_exceeded", "messages"),
])
def test_bad_requests_get_the_openai_envelope(client, body, status, code, param):
    kwargs = {"data": body, "content_type": "application/json"} if isinstance(body, bytes) else {"json": body}
    assert_envelope(client.post("/v1/chat/completions", **kwargs), status, code, param)


def test_unknown_route_and_wrong_method(client):
    assert_envelope(client.get("/v2/nothing"), 404)
    error = assert_envelope(client.get("/v1/chat/completions"), 405, "method_not_allowed")
    assert "method" in error["message"].lower()


def test_stop_string_ends_the_answer(client):
    base = dict(BODY, max_tokens=12, ignore_eos=True)
    full = client.post("/v1/chat/completions", json=base).get_json()["choices"][0]["message"]["content"]
    if len(full) < 3:
        pytest.skip("the random model produced too little text to cut")
    stop = full[2:4]
    data = client.post("/v1/chat/completions", json=dict(base, stop=[stop])).get_json()
    assert data["choices"][0]["message"]["content"] == full[:full.find(stop)]
    assert data["choices"][0]["finish_reason"] == "stop"


def test_status_reports_engine_model_and_memory(client):
    status = client.get("/v1/system/status").get_json()
    assert status["engine"]["state"] == "ready" and status["model"]["id"] == "tiny"
    assert status["tokens"]["generated"] > 0 and status["memory"]["rss_bytes"] > 0
    assert status["memory"]["mlx_active_bytes"] > 0
    assert status["backend"]["blas"].startswith(("OpenBLAS", "bundled", "Metal"))


def test_the_models_serving_objects_are_built_at_start_not_by_the_first_request(tiny_model_dir):
    """Orchard.prepare_services: once the engine is ready, the chat template has rendered and
    the tokenizer has run (a probe conversation) before any request arrives."""
    import gevent

    settings = load_settings({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny-prepared"}, dotenv=False)
    with running_app(settings) as app:
        orchard = app.extensions["orchard"]
        with gevent.Timeout(30):
            while "tiny-prepared" not in orchard._services:
                gevent.sleep(0.02)
        text = orchard._services["tiny-prepared"].text
        assert "template_renders_tools" in vars(text)  # the tool probe is cached already
        assert orchard.prepare_services(poll_s=0.01) == 1  # idempotent: the same objects again
        assert orchard._services["tiny-prepared"].text is text
        response = app.test_client().post("/v1/chat/completions", json={**BODY, "model": "tiny-prepared"})
        assert response.status_code == 200 and response.get_json()["choices"][0]["message"]["content"] is not None
