"""Forwarding to a remote upstream: a scripted upstream on a loopback socket, Orchard's side in a
Flask test app. The body's `script` field (passed through like every other field) tells the
upstream what to do."""
import json
import logging
import threading
import time

import pytest
from flask import Flask, Response, request
from werkzeug.serving import make_server

from app import errors
from app.remote import RemoteModel, UpstreamAtCapacity
from config.models_file import ModelEntry, RemoteSpec
from tests.server import free_port

KEY = "sk-upstream-very-secret-0123"


def chat_chunk(model, text):
    return "data: " + json.dumps({"object": "chat.completion.chunk", "model": model,
                                  "choices": [{"index": 0, "delta": {"content": text}}]}) + "\n\n"


def scripted_upstream() -> Flask:
    up = Flask("upstream")
    up.received = []

    @up.post("/v1/<path:api>")
    def answer(api):
        body = request.get_json()
        up.received.append({"path": "/" + api, "headers": dict(request.headers), "body": body})
        script, model = body.get("script", "ok"), body["model"]
        if script.startswith("status:"):
            status = int(script.split(":")[1])
            headers = {"Retry-After": "7"} if status == 429 else {}
            err = {"message": f"nope {status}, key {request.headers.get('Authorization', '')[7:]}",
                   "type": "invalid_request_error", "param": "temperature", "code": "bad_temperature"}
            return Response(json.dumps({"error": err}), status=status, headers=headers, mimetype="application/json")
        if script == "slow":
            time.sleep(1.5)
        if script == "redirect":
            return Response("", status=307, headers={"Location": "http://127.0.0.1:1/elsewhere"})
        if script == "not-json":
            return Response("<html>hello</html>", mimetype="text/html")
        if body.get("stream"):
            return Response(stream(script, model, "/" + api), mimetype="text/event-stream")
        if api == "messages":
            return {"type": "message", "model": model, "content": [{"type": "text", "text": "hi"}]}
        return {"object": "chat.completion", "model": model, "choices": [{"message": {"content": "hi"}}],
                "echo": body.get("echo")}

    def stream(script, model, api):
        if api == "/messages":
            yield "event: message_start\ndata: " + json.dumps({"type": "message_start", "message": {"model": model}}) + "\n\n"
        elif api == "/responses":
            yield "event: response.created\ndata: " + json.dumps(
                {"type": "response.created", "sequence_number": 0, "response": {"model": model}}) + "\n\n"
        else:
            yield ": keep-alive\n\n"
            yield chat_chunk(model, "Hel")
        if script == "slow-stream":
            time.sleep(1.5)
        if script == "break":
            raise ConnectionAbortedError("upstream died")  # werkzeug drops the connection mid-body
        if script == "truncated":
            return
        if api == "/messages":
            yield "event: message_stop\r\ndata: {\"type\": \"message_stop\"}\r\n\r\n"
        elif api == "/responses":
            yield "event: response.completed\ndata: " + json.dumps(
                {"type": "response.completed", "sequence_number": 1, "response": {"model": model}}) + "\n\n"
        else:
            yield chat_chunk(model, "lo")
            yield "data: [DONE]\n\n"

    return up


@pytest.fixture(scope="module")
def upstream():
    app = scripted_upstream()
    server = make_server("127.0.0.1", free_port(), app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app.base_url = f"http://127.0.0.1:{server.server_port}/v1"
    yield app
    server.shutdown()


def remote_model(base_url, **spec) -> RemoteModel:
    spec = {"timeout_s": 0.5, "connect_timeout_s": 0.5, "api_key_env": "UP_KEY", **spec}
    entry = ModelEntry(id="big", remote=RemoteSpec(base_url=base_url, model="big-model", **spec))
    return RemoteModel(entry, {"UP_KEY": KEY})


def orchard_app(model: RemoteModel) -> Flask:
    """Orchard's side, as the lead's route will be: forward, and errors in the route's envelope."""
    app = Flask("orchard-test")
    errors.install(app)

    @app.post("/v1/<path:api>")
    def route(api):
        body = request.get_json()
        return model.forward("/" + api, body, stream=bool(body.get("stream")), request_id="req-42")

    return app


@pytest.fixture
def client(upstream):
    model = remote_model(upstream.base_url)
    test_client = orchard_app(model).test_client()
    test_client.model = model
    return test_client


def events(resp) -> list[str]:
    return [e for e in resp.get_data(as_text=True).split("\n\n") if e]


def test_a_plain_request_passes_through_with_orchards_model_id(client, upstream):
    resp = client.post("/v1/chat/completions", json={"model": "smart", "messages": [], "echo": {"x": [1, "é"]}})
    assert resp.status_code == 200 and resp.json["model"] == "big" and resp.json["echo"] == {"x": [1, "é"]}
    sent = upstream.received[-1]
    assert sent["body"] == {"model": "big-model", "messages": [], "echo": {"x": [1, "é"]}}
    assert sent["headers"]["Authorization"] == f"Bearer {KEY}" and sent["headers"]["X-Request-Id"] == "req-42"
    assert "X-Api-Key" not in sent["headers"]
    assert client.model.stats.requests == 1 and client.model.stats.latency_s_count == 1
    assert client.model.stats.in_flight == 0


def test_a_stream_passes_through_with_orchards_model_id(client):
    resp = client.post("/v1/chat/completions", json={"model": "big", "stream": True, "messages": []})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    got = events(resp)
    assert got[0] == ": keep-alive" and got[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in got[1:-1]]
    assert [c["model"] for c in chunks] == ["big", "big"]
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == "Hello"
    assert client.model.stats.in_flight == 0 and client.model.stats.errors == {}


def test_anthropic_messages_get_its_headers_and_model_inside_message(client, upstream):
    resp = client.post("/v1/messages", json={"model": "claude-x", "max_tokens": 5, "messages": []})
    assert resp.json["model"] == "big"
    headers = upstream.received[-1]["headers"]
    assert headers["X-Api-Key"] == KEY and headers["Anthropic-Version"] == "2023-06-01"
    got = events(client.post("/v1/messages", json={"model": "m", "stream": True, "messages": []}))
    assert json.loads(got[0].split("data: ")[1])["message"]["model"] == "big"
    assert got[-1].startswith("event: message_stop\ndata: ")


def test_responses_stream_model_is_rewritten_inside_response(client):
    got = events(client.post("/v1/responses", json={"model": "m", "stream": True, "input": "hi"}))
    assert [json.loads(e.split("data: ")[1])["response"]["model"] for e in got] == ["big", "big"]


@pytest.mark.parametrize("api, script, status, fragment", [
    ("/chat/completions", "status:400", 400, {"message": "upstream: nope 400, key ***", "type": "invalid_request_error",
                                              "param": "temperature", "code": "bad_temperature"}),
    ("/chat/completions", "status:404", 404, {"code": "bad_temperature"}),
    ("/chat/completions", "status:401", 502, {"code": "upstream_error", "type": "server_error"}),
    ("/chat/completions", "status:500", 502, {"code": "upstream_error", "type": "server_error"}),
    ("/chat/completions", "status:429", 429, {"code": "upstream_at_capacity"}),
    ("/chat/completions", "status:503", 503, {"code": "upstream_at_capacity"}),
    ("/chat/completions", "redirect", 502, {"code": "upstream_error"}),
    ("/chat/completions", "not-json", 502, {"code": "upstream_error"}),
    ("/chat/completions", "slow", 504, {"code": "upstream_timeout"}),
])
def test_upstream_failures_become_orchards_openai_envelope(client, api, script, status, fragment):
    started = time.monotonic()
    resp = client.post("/v1" + api, json={"model": "m", "script": script})
    assert time.monotonic() - started < 1.4  # the slow one is cut at the 0.5 s read timeout
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert fragment.items() <= resp.json["error"].items()
    assert KEY not in resp.get_data(as_text=True)
    assert client.model.stats.errors == {fragment.get("code", "bad_temperature"): 1}


def test_capacity_errors_carry_retry_after_and_are_recognisable(upstream):
    model = remote_model(upstream.base_url)
    with orchard_app(model).test_request_context():
        with pytest.raises(UpstreamAtCapacity) as info:
            model.forward("/chat/completions", {"model": "m", "script": "status:429"}, stream=False, request_id="r")
        assert info.value.headers == {"Retry-After": "7"} and info.value.status == 429
        with pytest.raises(UpstreamAtCapacity) as info:
            model.forward("/chat/completions", {"model": "m", "script": "status:503"}, stream=True, request_id="r")
        assert info.value.headers == {"Retry-After": "1"}


def test_errors_on_the_messages_api_use_anthropics_envelope(client):
    resp = client.post("/v1/messages", json={"model": "m", "script": "status:503"})
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert resp.json["type"] == "error" and resp.json["error"]["type"] == "overloaded_error"


def test_connection_refused_is_502_at_once():
    client = orchard_app(remote_model(f"http://127.0.0.1:{free_port()}/v1")).test_client()
    resp = client.post("/v1/chat/completions", json={"model": "m"})
    assert resp.status_code == 502 and resp.json["error"]["code"] == "upstream_unavailable"
    assert "127.0.0.1" not in resp.json["error"]["message"]  # the client never learns the upstream's address


TIMEOUT_MESSAGE = "The upstream server for model 'big' did not answer in time"


@pytest.mark.parametrize("api, script, event, payload", [
    ("/chat/completions", "slow-stream", None, {"error": {"message": TIMEOUT_MESSAGE, "type": "server_error",
                                                          "param": None, "code": "upstream_timeout"}}),
    ("/chat/completions", "break", None, {"error": {"code": "upstream_error"}}),
    ("/chat/completions", "truncated", None, {"error": {"code": "upstream_error", "message": (
        "The upstream server for model 'big' failed: it closed the stream before the end")}}),
    ("/messages", "truncated", "error", {"type": "error", "error": {"type": "api_error"}}),
    ("/messages", "slow-stream", "error", {"type": "error", "error": {"message": TIMEOUT_MESSAGE}}),
    ("/responses", "slow-stream", "error", {"type": "error", "sequence_number": 1, "code": "upstream_timeout",
                                            "message": TIMEOUT_MESSAGE, "param": None}),
])
def test_a_broken_stream_ends_with_one_error_event(client, api, script, event, payload):
    started = time.monotonic()
    got = events(client.post("/v1" + api, json={"model": "m", "stream": True, "script": script}))
    assert time.monotonic() - started < 1.4
    if event is None:  # OpenAI's chat and completions: the error chunk, then [DONE]
        assert got[-1] == "data: [DONE]"
        name, data = None, got[-2]
    else:
        name, data = got[-1].split("\n", 1)
        assert name == f"event: {event}"
    assert data.startswith("data: ") and contains(json.loads(data[6:]), payload), got
    assert sum("error" in e for e in got) == 1 and client.model.stats.in_flight == 0


def contains(doc, expected) -> bool:
    if isinstance(expected, dict):
        return isinstance(doc, dict) and all(k in doc and contains(doc[k], v) for k, v in expected.items())
    return doc == expected


def test_closing_the_response_early_closes_the_upstream_stream(upstream):
    model = remote_model(upstream.base_url, timeout_s=5)
    with orchard_app(model).test_request_context():
        resp = model.forward("/chat/completions", {"model": "m", "stream": True, "script": "slow-stream"},
                             stream=True, request_id="r")
        body = iter(resp.response)
        first = next(body)
        assert first.startswith(": keep-alive") and model.stats.in_flight == 1
        started = time.monotonic()
        resp.close()  # what the WSGI server does when the client hangs up
        assert time.monotonic() - started < 0.5
    assert model.stats.in_flight == 0 and model.stats.client_disconnects == 1 and model.stats.errors == {}


def test_the_key_never_shows_in_logs_reprs_or_stats(client, caplog):
    caplog.set_level(logging.DEBUG)
    for script in ("ok", "status:400", "status:401", "status:500", "slow", "slow-stream", "break"):
        client.post("/v1/chat/completions", json={"model": "m", "script": script})
        client.post("/v1/chat/completions", json={"model": "m", "script": script, "stream": True}).get_data()
    assert "upstream failed" in caplog.text and KEY not in caplog.text
    assert KEY not in repr(client.model) and KEY not in str(client.model.stats) and KEY not in str(client.model.stats.snapshot())
    assert repr(client.model) == "RemoteModel(id='big', base_url='{}', model='big-model')".format(
        client.model.spec.base_url)


def test_no_key_variable_means_no_auth_headers(upstream):
    entry = ModelEntry(id="open", remote=RemoteSpec(base_url=upstream.base_url, model="m"))
    resp = orchard_app(RemoteModel(entry, {})).test_client().post("/v1/messages", json={"model": "x"})
    assert resp.status_code == 200
    headers = upstream.received[-1]["headers"]
    assert "Authorization" not in headers and "X-Api-Key" not in headers


def test_only_remote_entries_and_known_paths_are_forwarded(upstream):
    with pytest.raises(ValueError):
        RemoteModel(ModelEntry(id="local", source="embedded"), {})
    with pytest.raises(ValueError):
        remote_model(upstream.base_url).forward("/../admin", {}, stream=False, request_id="r")


def test_a_remote_model_imports_the_dns_resolver_at_start_not_in_its_first_request():
    """A fresh interpreter, as a worker is: building the remote model loads gevent's resolver."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from app.remote import RemoteModel\n"
            "from config.models_file import ModelEntry, RemoteSpec\n"
            "assert 'gevent.resolver.thread' not in sys.modules\n"
            "RemoteModel(ModelEntry(id='big', remote=RemoteSpec(base_url='http://127.0.0.1:9/v1', model='m')), {})\n"
            "assert 'gevent.resolver.thread' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
