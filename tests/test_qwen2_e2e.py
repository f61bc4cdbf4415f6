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


# -- the Qwen2.5 tools path: the model's own template renders tools; <tool_call> is one token ---------
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_on_the_qwen_template_are_valid_from_random_weights(server, stream):
    import json

    from tests.chat_fold import ask

    reply = ask(server.client(), stream, model="qwen2-tiny", messages=ASK, tools=[WEATHER], tool_choice="required",
                temperature=1.0, n=4, max_tokens=240, parallel_tool_calls=False)
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        for call in choice["message"]["tool_calls"]:
            args = json.loads(call["function"]["arguments"])
            assert call["function"]["name"] == "get_weather" and args["city"] in ("Paris", "Rome")
            assert 1 <= args["days"] <= 7


def test_the_qwen_template_renders_tools_and_tool_history_itself(server):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(server.env["MODEL"])
    assert tok.convert_tokens_to_ids("<tool_call>") < 512 and len(tok.encode("<tool_call>", add_special_tokens=False)) == 1
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 2}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = server.client().chat.completions.create(model="qwen2-tiny", messages=history, tools=[WEATHER],
                                                    max_tokens=1)
    rendered = tok.apply_chat_template(
        [ASK[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
         {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
        tools=[WEATHER], add_generation_prompt=True, tokenize=False)
    assert "<tools>" in rendered and "<tool_response>\nsunny\n</tool_response>" in rendered
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}' in rendered
    assert reply.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
