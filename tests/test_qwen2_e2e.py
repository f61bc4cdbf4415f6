"""The flagship Qwen2 path, offline: a tiny random-weight Qwen2 folder served by real Gunicorn."""
from __future__ import annotations

import pytest
import requests



@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory(MODEL_ID="qwen2-tiny")


def test_chatml_prompt_is_rendered_and_served(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["qwen2-tiny"]
    reply = client.chat.completions.create(model="qwen2-tiny", max_tokens=5, temperature=0,
                                           messages=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": "Hello"}],
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
    # ChatML: the rendered prompt carries the system turn, the user turn and the assistant header.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.env["MODEL"])
    rendered = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                       tokenize=False)
    assert rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert reply.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))


def test_status_reports_the_served_model(server):
    status = requests.get(server.base_url + "/v1/system/status").json()
    assert status["model"]["id"] == "qwen2-tiny" and status["model"]["context_length"] == 1024
    assert status["engine"]["state"] == "ready"
