"""The console with several models (issue 13): the models panel and the playground's picker.

Real browser (headless Chromium via Playwright, plumbing shared with test_console_browser.py) against:
1. a stub API with hostile model ids: every model is listed as text (no markup runs), badges,
   sizes, per-model running/waiting, the picker offers chat models only and defaults to the first
   loaded one, and the picked id is what the chat request sends;
2. a REAL server from a models file: the embedded SmolLM2 pinned, a tiny random Qwen2 loaded on
   demand, and an embedding model: all three listed with their states, the picker offers the two
   chat models, an answer from the tiny model, and the panel then shows it loaded.
"""
from __future__ import annotations

import threading

import pytest
from flask import Response, jsonify, request

from tests.test_console_browser import Page, _console_only_app, browser, ui  # noqa: F401 (fixtures)

HOSTILE = '<img src=x onerror="window.__pwned=1">'


def models_panel(p: Page) -> dict[str, dict]:
    """What the panel shows, per model id (read back as text)."""
    rows = p.page.evaluate("""() => [...document.querySelectorAll('#models-list .model')].map(li => {
        const t = sel => { const n = li.querySelector(sel); return n ? n.textContent : null; };
        return {id: t('.model-id'), state: t('.pill'), badge: li.querySelector('.pill').dataset.state,
                kind: t('.model-kind'), size: t('.model-size'), pinned: t('.model-pinned'),
                aliases: t('.model-alias-list'), running: t('.model-running'), waiting: t('.model-waiting'),
                generated: t('.model-generated')};
    })""")
    return {row["id"]: row for row in rows}


def picker(p: Page) -> tuple[list[str], str]:
    values = p.page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)")
    return values, p.page.input_value("#model-select")


# ---------------------------------------------------------------- stub API ------------

STUB_MODELS = [
    {"id": "cold", "object": "model", "owned_by": "orchard", "kind": "chat", "state": "unloaded",
     "aliases": [], "size_bytes": 5 * 2**30, "pinned": False},
    {"id": "warm", "object": "model", "owned_by": "orchard", "kind": "chat", "state": "loaded",
     "aliases": ["default", "<i>gpt-*</i>"], "size_bytes": 300 * 2**20, "pinned": True, "context_length": 8192},
    {"id": HOSTILE, "object": "model", "owned_by": "orchard", "kind": "embedding", "state": "failed",
     "aliases": [], "size_bytes": 2048, "pinned": False},
    {"id": "far", "object": "model", "owned_by": "remote", "kind": "chat", "state": "remote", "aliases": []},
]
STUB_STATUS_MODELS = [
    {"id": "cold", "kind": "chat", "state": "unloaded", "running": 0, "waiting": 0},
    {"id": "warm", "kind": "chat", "state": "loaded", "running": 2, "waiting": 1, "generated_tokens": 12345},
    {"id": HOSTILE, "kind": "embedding", "state": "failed", "running": 0, "waiting": 0, "error": "no weights"},
    {"id": "far", "kind": "chat", "state": "remote", "remote": {"base_url": "http://x/v1", "model": "m"}},
]


@pytest.fixture(scope="module")
def stub_server():
    from werkzeug.serving import make_server

    seen: list = []
    app = _console_only_app()
    app.add_url_rule("/v1/models", "models", lambda: jsonify(object="list", data=STUB_MODELS))
    app.add_url_rule("/v1/system/status", "status", lambda: jsonify(engine={"state": "ready"},
                                                                    model={"id": "warm"}, models=STUB_STATUS_MODELS))

    @app.post("/v1/chat/completions")
    def completions():
        seen.append(request.get_json())
        return Response('data: {"choices": [{"index": 0, "delta": {"content": "ok"}, "finish_reason": "stop"}]}\n\n'
                        "data: [DONE]\n\n", mimetype="text/event-stream")

    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", seen
    server.shutdown()


def test_models_panel_and_picker_with_stub(ui, stub_server, tmp_path):
    base, seen = stub_server
    p, pg = ui, ui.page
    pg.goto(base + "/")
    p.wait(lambda: len(models_panel(p)) == 4, 10, "four models in the panel")
    shown = models_panel(p)
    assert list(shown) == ["cold", "warm", HOSTILE, "far"]  # the hostile id is plain text
    assert pg.evaluate("() => window.__pwned") is None
    assert pg.locator("#models-list img, #models-list i, #model-select img").count() == 0
    assert {k: (v["state"], v["badge"]) for k, v in shown.items()} == {
        "cold": ("unloaded", "unloaded"), "warm": ("loaded", "loaded"), HOSTILE: ("failed", "failed"),
        "far": ("remote", "remote")}
    warm = shown["warm"]
    assert (warm["kind"], warm["size"], warm["pinned"], warm["aliases"]) == ("chat", "300 MiB", "pinned",
                                                                             "default, <i>gpt-*</i>")
    assert (warm["running"], warm["waiting"], warm["generated"]) == ("2", "1", "12,345")
    assert shown["cold"]["size"] == "5.0 GiB" and shown["cold"]["pinned"] is None
    assert shown[HOSTILE]["kind"] == "embedding" and shown["far"]["size"] == "remote"
    assert pg.eval_on_selector_all("#models-list .pill", "ps => ps.map(p => p.title)")[2] == "no weights"

    # Chat models only; the first loaded one is the default and is what the request names.
    assert picker(p) == (["cold", "warm", "far"], "warm")
    p.send("hi")
    p.wait(p.answered, 10, "answer")
    assert seen[-1]["model"] == "warm"

    # Picking another one: its state shows as a hint, the next request names it, the pick sticks.
    pg.select_option("#model-select", "cold")
    p.wait(lambda: p.text("model-hint") == "loads on first use", 10, "the unloaded hint")
    p.send("again")
    p.wait(lambda: len(seen) == 2 and p.answered(), 10, "2nd answer")
    assert seen[-1]["model"] == "cold"
    pg.wait_for_timeout(2500)  # a status refresh later
    assert picker(p)[1] == "cold"
    p.screenshot(tmp_path, "console-models-stub.png")
    assert p.js_errors() == []


# ---------------------------------------------------------------- the real server -------

@pytest.fixture(scope="module")
def models_server(browser, orchard_home, tiny_model_dir, tmp_path_factory):  # noqa: F811
    from tests.server import ServerProcess

    folder = tmp_path_factory.mktemp("console-models")
    (folder / "models.yaml").write_text("models:\n" + "".join(f"  - {e}\n" for e in (
        "{id: smol, source: embedded, pinned: true, aliases: [default]}",
        f'{{id: tiny, source: "{tiny_model_dir}"}}',
        f'{{id: embed, source: "{tiny_model_dir}", kind: embedding, pooling: mean}}')))
    server = ServerProcess({"MODELS_FILE": str(folder / "models.yaml"), "ORCHARD_HOME": orchard_home},
                           folder / "server.log").start()
    yield server
    server.stop()


def test_console_lists_models_and_chats_with_the_picked_one(ui, models_server, tmp_path):
    p, pg = ui, ui.page
    sent: list[dict] = []
    pg.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/chat/completions")
          and sent.append(r.post_data_json))
    pg.goto(models_server.base_url + "/")
    p.wait(lambda: len(models_panel(p)) == 3, 30, "three models in the panel")
    shown = models_panel(p)
    assert {k: (v["state"], v["kind"]) for k, v in shown.items()} == {
        "smol": ("loaded", "chat"), "tiny": ("unloaded", "chat"), "embed": ("unloaded", "embedding")}
    assert shown["smol"]["pinned"] == "pinned" and shown["smol"]["aliases"] == "default"
    assert shown["smol"]["size"].endswith("MiB") and shown["tiny"]["pinned"] is None
    assert picker(p) == (["smol", "tiny"], "smol")  # no embedding model in the chat playground

    pg.select_option("#model-select", "tiny")
    p.send("Hello there", max_tokens=4)
    p.wait(p.answered, 120, "the tiny model's answer")
    answer = p.last_answer()
    assert answer["state"] == "done", (answer, p.text("chat-error"))
    assert [body["model"] for body in sent] == ["tiny"]
    posts = [e for e in models_server.access_entries() if e.get("path") == "/v1/chat/completions"]
    assert [e["status"] for e in posts] == [200]
    p.wait(lambda: models_panel(p)["tiny"]["state"] == "loaded", 10, "tiny shown as loaded")
    tiny = models_panel(p)["tiny"]
    assert tiny["size"].endswith("KiB") and tiny["generated"] != "0"  # its weights; its own tokens
    assert models_panel(p)["smol"]["state"] == "loaded" and picker(p)[1] == "tiny"
    p.screenshot(tmp_path, "console-models.png")
    assert p.js_errors() == []
