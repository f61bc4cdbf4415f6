"""The web console (app/console.py + app/static/console/*).

1. Flask test client only: GET / serves the page with the playground form, assets are served.
2. A real browser (Debian's headless Chromium, driven by Playwright) against:
   a. a stub API in a thread that requires an API key: 401 message, key saved in localStorage and
      sent as Bearer, request body fields, token-by-token rendering, SSE error event, Stop;
   b. the REAL server (Gunicorn, tiny random Qwen2): status shows ready + model id, a streamed
      answer appears, a screenshot is saved (pytest tmp dir and $ORCHARD_SCREENSHOT_DIR).
Browser tests skip when chromium or playwright is missing
(install: scripts/install-browser-test-deps.sh).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from flask import Flask, Response, jsonify, request

from app.console import console

SHOT_ENV = "ORCHARD_SCREENSHOT_DIR"


# ---------------------------------------------------------------- no browser ------------

def _console_only_app() -> Flask:
    app = Flask("console-test")
    app.register_blueprint(console)
    return app


def test_console_page_served():
    client = _console_only_app().test_client()
    resp = client.get("/")
    assert resp.status_code == 200
    assert resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    for marker in ('id="chat-form"', 'id="message"', 'id="send-btn"', 'id="stop-btn"', 'id="api-key"',
                   'id="max-tokens"', 'id="temperature"', 'aria-live="polite"', 'id="st-engine-state"',
                   'id="models-list"', 'id="model-select"',
                   "/console/console.js", "/console/console.css"):
        assert marker in html, marker
    assert "http://" not in html and "https://" not in html  # no CDN: everything is served locally

    js = client.get("/console/console.js")
    assert js.status_code == 200 and "javascript" in js.mimetype
    assert "/v1/chat/completions" in js.get_data(as_text=True)
    css = client.get("/console/console.css")
    assert css.status_code == 200 and css.mimetype == "text/css"
    assert client.get("/console/nope.js").status_code == 404
    assert client.get("/console/../console.py").status_code == 404
    assert client.get("/console/%2e%2e/console.py").status_code == 404


# ---------------------------------------------------------------- browser plumbing ------

def _chromium() -> str | None:
    for name in (os.environ.get("CHROME_BIN", ""), "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """Headless system Chromium driven by Playwright (no Playwright browser download)."""
    chromium = _chromium()
    if not chromium:
        pytest.skip("chromium not installed (run scripts/install-browser-test-deps.sh)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright not installed (run scripts/install-browser-test-deps.sh)")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium, headless=True,
                               args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A fresh browser context (empty localStorage) + page, recording console errors."""

    def __init__(self, browser):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.errors: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))

    def js_errors(self, ignore_http_4xx: bool = False) -> list[str]:
        errors = self.errors
        if ignore_http_4xx:  # Chromium logs the 400/401s the stub answers on purpose
            errors = [e for e in errors if not re.search(r"Failed to load resource: .*status of 4\d\d", e)]
        return errors

    def text(self, element_id: str) -> str:
        return self.page.evaluate("id => document.getElementById(id).textContent", element_id)

    def last_answer(self) -> dict:
        return self.page.evaluate(
            "() => { const m = [...document.querySelectorAll('#transcript .msg.assistant')].pop();"
            " return m ? {state: m.dataset.state, text: m.querySelector('.content').textContent,"
            "             note: [...m.querySelectorAll('.note')].map(n => n.textContent).join(' ')} : {}; }")

    def send_enabled(self) -> bool:
        return self.page.is_enabled("#send-btn")

    def answered(self) -> bool:
        return self.last_answer().get("state") in ("done", "error", "stopped") and self.send_enabled()

    def send(self, text: str, max_tokens: int | None = None) -> None:
        if max_tokens is not None:
            self.page.fill("#max-tokens", str(max_tokens))
        self.page.fill("#message", text)
        self.page.click("#send-btn")

    def wait(self, predicate, timeout: float = 30.0, what: str = "condition"):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                shown = {k: self.text(k) for k in ("st-engine-state", "banner", "chat-error")}
                shown["transcript"] = self.page.inner_text("#transcript")
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; page shows {shown}")
            self.page.wait_for_timeout(50)

    def screenshot(self, tmp_path: Path, name: str) -> Path:
        path = tmp_path / name
        self.page.screenshot(path=str(path), full_page=True)
        if os.environ.get(SHOT_ENV):
            out = Path(os.environ[SHOT_ENV])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, out / name)
        return path

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def ui(browser):
    p = Page(browser)
    yield p
    p.close()


# ---------------------------------------------------------------- stub API (auth) -------

STUB_KEY = "sekrit-key"


def _stub_app(seen: list) -> Flask:
    """The console plus a fake OpenAI API that needs `Bearer STUB_KEY` (like Orchard with API_KEYS)."""
    app = _console_only_app()

    def envelope(status, message, type_="invalid_request_error"):
        return Response(json.dumps({"error": {"message": message, "type": type_, "param": None, "code": None}}),
                        status=status, mimetype="application/json")

    @app.before_request
    def auth():
        if request.path == "/" or request.path.startswith("/console/") or request.path == "/health":
            return None
        if request.headers.get("Authorization") != f"Bearer {STUB_KEY}":
            return envelope(401, "Invalid API key", "authentication_error")
        return None

    @app.get("/v1/models")
    def models():
        return jsonify(object="list", data=[{"id": "stub-model", "object": "model"}])

    @app.get("/v1/system/status")
    def status():
        return jsonify(engine={"state": "ready"}, model={"id": "stub-model"},
                       requests={"running": 0, "waiting": 0}, tokens={"per_second_10s": 12.5, "generated": 42},
                       memory={"rss_bytes": 300 * 2**20, "mlx_active_bytes": None, "kv_cache_bytes": 2**20},
                       batch={"current": 0, "max_seen": 3}, uptime_s=3725.0, version="stub", backend={"blas": "stub"})

    @app.post("/v1/chat/completions")
    def completions():
        body = request.get_json()
        seen.append(body)
        last = body["messages"][-1]["content"]
        if last == "bad request":
            return envelope(400, "Invalid value for 'temperature': too hot")

        def chunk(**delta):
            return "data: " + json.dumps({"object": "chat.completion.chunk",
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"

        def events():
            yield chunk(role="assistant", content="")
            if last == "slow":
                for i in range(200):
                    yield chunk(content=f"t{i} ")
                    time.sleep(0.05)
            yield ": keep-alive\n\n"
            for piece in ("Hel", "lo", ", wor", "ld"):
                yield chunk(content=piece)
                time.sleep(0.02)
            if last == "fail":
                yield "data: " + json.dumps({"error": {"message": "Generation failed: boom",
                                                       "type": "server_error"}}) + "\n\n"
            else:
                yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
                       + "\n\n")
            yield "data: [DONE]\n\n"

        return Response(events(), mimetype="text/event-stream")

    return app


@pytest.fixture(scope="module")
def stub_server():
    from werkzeug.serving import make_server

    seen: list = []
    server = make_server("127.0.0.1", 0, _stub_app(seen), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_console_auth_errors_and_stop_with_stub(ui, stub_server, tmp_path):
    base, seen = stub_server
    p, pg = ui, ui.page
    pg.goto(base + "/")

    # No key: the status poll gets 401 -> a clear message.
    p.wait(lambda: "API key required" in p.text("banner"), 10, "the API-key banner")
    assert p.text("st-engine-state") == "unauthorized"

    # Save the key: the next poll succeeds; the key survives a reload (localStorage).
    pg.fill("#api-key", STUB_KEY)
    pg.click("#key-form button[type=submit]")
    p.wait(lambda: p.text("st-engine-state") == "ready", 10, "status ready")
    pg.reload()
    p.wait(lambda: p.text("st-engine-state") == "ready", 10, "status ready after reload")
    assert pg.input_value("#api-key") == STUB_KEY
    assert p.text("st-model-id") == "stub-model"
    assert pg.is_hidden("#banner")
    assert (p.text("st-uptime"), p.text("st-rss"), p.text("st-mlx")) == ("1h 2m", "300 MiB", "\u2014")

    # A streamed answer, with the request the API expects.
    p.send("hi")
    p.wait(p.answered, 10, "answer done")
    assert p.last_answer()["state"] == "done" and p.last_answer()["text"] == "Hello, world"
    body = seen[-1]
    assert body["model"] == "stub-model" and body["stream"] is True
    assert body["max_tokens"] == 128 and body["temperature"] == 0.7
    assert body["messages"] == [{"role": "user", "content": "hi"}]

    # The conversation goes along with the next turn; Enter sends.
    pg.fill("#max-tokens", "16")
    pg.fill("#message", "again")
    pg.press("#message", "Enter")
    p.wait(lambda: len(seen) == 2 and p.answered(), 10, "2nd answer")
    assert seen[-1]["max_tokens"] == 16
    assert [m["role"] for m in seen[-1]["messages"]] == ["user", "assistant", "user"]
    assert seen[-1]["messages"][1]["content"] == "Hello, world"

    # An error event in the SSE stream is shown.
    p.send("fail")
    p.wait(lambda: "Generation failed: boom" in p.text("chat-error"), 10, "SSE error shown")
    assert p.last_answer()["state"] == "error" and p.send_enabled()

    # An HTTP error envelope is shown.
    p.send("bad request")
    p.wait(lambda: "too hot" in p.text("chat-error"), 10, "HTTP error shown")

    # Stop aborts a stream mid-way.
    p.send("slow")
    p.wait(lambda: len(p.last_answer().get("text", "")) > 10, 10, "slow stream started")
    pg.click("#stop-btn")
    p.wait(lambda: p.last_answer()["state"] == "stopped" and p.send_enabled(), 10, "stream stopped")
    assert "Stopped" in p.last_answer()["note"]

    # A wrong key: the chat says so too.
    pg.fill("#api-key", "wrong")
    p.send("hi")
    p.wait(lambda: "API key required" in p.text("chat-error"), 10, "401 shown in chat")
    p.screenshot(tmp_path, "console-stub.png")
    assert p.js_errors(ignore_http_4xx=True) == []


# ---------------------------------------------------------------- the real server -------

@pytest.fixture(scope="module")
def real_server(browser, tmp_path_factory, tiny_model_dir):
    from tests.server import ServerProcess

    log = tmp_path_factory.mktemp("console-server") / "server.log"
    server = ServerProcess({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny"}, log).start()
    try:
        if requests.get(server.base_url + "/", timeout=10).status_code == 404:
            pytest.skip("GET / is 404: the console blueprint is not registered in app/__init__.py yet "
                        "(app.register_blueprint(console))")
        yield server
    finally:
        server.stop()


def test_console_chat_against_real_server(ui, real_server, tmp_path):
    p, pg = ui, ui.page
    t0 = time.monotonic()
    pg.goto(real_server.base_url + "/")
    p.wait(lambda: p.text("st-engine-state") == "ready", 30, "engine ready in the status panel")
    p.wait(lambda: p.text("st-model-id") == "tiny", 10, "model id in the status panel")
    assert p.text("st-version") not in ("", "\u2014", "\u2026")

    p.send("Hello there", max_tokens=8)
    p.wait(lambda: p.last_answer().get("text"), 60, "streamed text")
    p.wait(p.answered, 60, "the stream to end")
    answer = p.last_answer()
    assert answer["state"] == "done" and answer["text"], answer
    assert p.text("chat-error") == ""
    # The status panel keeps polling: the generated-token counter moves within a poll or two.
    p.wait(lambda: p.text("st-generated") not in ("0", "\u2026", "\u2014"), 10, "tokens counted")

    shot = p.screenshot(tmp_path, "console.png")
    print(f"\nconsole screenshot: {shot} ({time.monotonic() - t0:.1f} s in the browser)")
    assert p.js_errors() == []
