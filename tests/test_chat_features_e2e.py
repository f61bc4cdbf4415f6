"""Chat completions as apps and agents use them, through a real Gunicorn server on the embedded
SmolLM2 and the official openai client: tools (forced by a grammar, auto, history), structured
output, logprobs, n, sampling extensions and ignored fields. Every behaviour streamed and not.

SmolLM2's chat template has no tools section, so these also prove Orchard's own Hermes rendering.
"""
from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.chat_fold import ask

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "member": {"type": "boolean"}}, "required": ["name", "age", "member"], "additionalProperties": False}
BOTH = [False, True]


@pytest.fixture(scope="module")
def server(embedded_server_factory):
    return embedded_server_factory(MAX_N="10")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _validate_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Berlin", "Rome")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7


# -- tools --------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_required_tool_choice_gives_valid_calls_every_time_at_temperature_one(client, stream):
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, tools=[WEATHER, TIME], tool_choice="required",
                temperature=1.0, n=10, max_tokens=120, parallel_tool_calls=False)
    assert len(reply["choices"]) == 10
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        calls = choice["message"]["tool_calls"]
        assert len(calls) == 1 and calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
        if calls[0]["function"]["name"] == "get_weather":
            _validate_weather(calls[0]["function"]["arguments"])
        else:
            assert calls[0]["function"]["name"] == "get_time"
            args = json.loads(calls[0]["function"]["arguments"])
            assert list(args) == ["tz"] and isinstance(args["tz"], str) and len(args["tz"]) <= 12
        assert not (choice["message"]["content"] or "").strip()
    assert reply["usage"]["completion_tokens"] >= 10


@pytest.mark.parametrize("stream", BOTH)
def test_a_named_tool_choice_calls_that_tool(client, stream):
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, tools=[TIME, WEATHER], temperature=0,
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=120)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    _validate_weather(call["function"]["arguments"])
    if stream:  # arguments arrive while they are generated, not in one piece at the end
        assert choice["fragments"][0] > 1


def test_streamed_and_plain_tool_calls_agree(client):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required", temperature=0,
                  max_tokens=120)
    plain, streamed = ask(client, False, **kwargs), ask(client, True, **kwargs)
    strip = lambda r: [(c["function"]["name"], c["function"]["arguments"])  # noqa: E731
                       for c in r["choices"][0]["message"]["tool_calls"]]
    assert strip(plain) == strip(streamed)
    for key in ("prompt_tokens", "completion_tokens"):  # cached_tokens differ: the second hits the cache
        assert plain["usage"][key] == streamed["usage"][key]


@pytest.mark.parametrize("stream", BOTH)
def test_auto_tool_choice_lets_the_model_decide_and_renders_the_tools(client, stream):
    bare = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=1)
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], temperature=0, max_tokens=60)
    assert reply["usage"]["prompt_tokens"] > bare.usage.prompt_tokens + 50  # the tools section is in the prompt
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("stop", "length", "tool_calls")
    for call in choice["message"]["tool_calls"] or []:
        assert call["function"]["name"] and call["id"].startswith("call_")
    assert "<tool_call>" not in (choice["message"]["content"] or "")


@pytest.mark.parametrize("stream", BOTH)
def test_tool_choice_none_never_calls(client, stream):
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none",
                temperature=0, max_tokens=24)
    assert reply["choices"][0]["message"]["tool_calls"] is None
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("stream", BOTH)
def test_a_conversation_with_tool_history_continues(client, stream):
    history = ASK_WEATHER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_abc", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 3}"}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "{\"forecast\": \"sunny, 24 C\"}"}]
    reply = ask(client, stream, model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                temperature=0, max_tokens=24)
    assert reply["choices"][0]["message"]["content"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=history[:1] + history[2:], max_tokens=4)
    assert info.value.body["param"] == "messages.1.tool_call_id"


# -- structured output ------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_json_schema_answers_validate_every_time_at_temperature_one(client, stream):
    reply = ask(client, stream, model=MODEL, messages=[{"role": "user", "content": "Invent a club member."}],
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                        "strict": True}},
                temperature=1.0, n=10, max_tokens=120)
    assert len(reply["choices"]) == 10
    for choice in reply["choices"]:
        assert choice["finish_reason"] == "stop"
        person = json.loads(choice["message"]["content"])
        assert set(person) == {"name", "age", "member"} and len(person["name"]) <= 16
        assert 0 <= person["age"] <= 120 and isinstance(person["member"], bool)


@pytest.mark.parametrize("stream", BOTH)
def test_json_object_mode_gives_an_object(client, stream):
    reply = ask(client, stream, model=MODEL, max_tokens=60, temperature=0,
                messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                response_format={"type": "json_object"})
    choice = reply["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: still the start of an object
        assert choice["message"]["content"].lstrip().startswith("{")


class City(BaseModel):
    name: Literal["Paris", "Berlin", "Rome"]
    population_millions: int = Field(ge=0, le=40)
    capital: bool


def test_sdk_parse_returns_a_pydantic_object(client):
    reply = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris."}],
                                          response_format=City, temperature=0, max_tokens=60)
    city = reply.choices[0].message.parsed
    assert isinstance(city, City) and city.name in ("Paris", "Berlin", "Rome")


def test_sdk_stream_helper_returns_a_pydantic_object(client):
    with client.chat.completions.stream(model=MODEL, messages=[{"role": "user", "content": "Tell me about Rome."}],
                                        response_format=City, temperature=0, max_tokens=60) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City)


def test_schemas_the_grammar_cannot_honour_are_400s_that_name_them(client):
    huge = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "d" * 60}
                                             for i in range(1200)}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, tools=[
            {"type": "function", "function": {"name": "big", "parameters": huge}}])
    assert info.value.body["code"] == "schema_too_large" and info.value.body["param"] == "tools.0.function.parameters"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "string", "format": "frobnicate-format"}}}}})
    assert info.value.body["code"] == "invalid_schema"
    assert "frobnicate" in info.value.body["message"]


# -- logprobs, n, sampling --------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_logprobs_are_sorted_with_bytes_and_match_the_text(client, stream):
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=8, logprobs=True,
                top_logprobs=3)
    choice = reply["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == reply["usage"]["completion_tokens"] - (choice["finish_reason"] == "stop")
    assert bytes(b for e in entries for b in e["bytes"]).decode() == choice["message"]["content"]
    for e in entries:
        tops = [t["logprob"] for t in e["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and e["logprob"] <= 0
        assert e["top_logprobs"][0]["token"] == e["token"]  # greedy: the chosen one is the most likely
        assert abs(e["top_logprobs"][0]["logprob"] - e["logprob"]) < 1e-6


def test_streamed_logprobs_equal_plain_logprobs(client):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2)
    plain, streamed = ask(client, False, **kwargs), ask(client, True, **kwargs)
    plain, streamed = plain["choices"][0]["logprobs"]["content"], streamed["choices"][0]["logprobs"]["content"]
    # The same tokens, bytes and alternatives; the numbers up to float32 rounding: the two need
    # not run in passes of one shape (the second may reuse the first one's prompt KV from the
    # prefix cache and compute only its last position), and another shape is another BLAS
    # kernel with another rounding (CI saw differences of 2e-6).
    assert _without_logprobs(plain) == _without_logprobs(streamed)
    assert _logprobs(plain) == pytest.approx(_logprobs(streamed), abs=1e-4)


def _without_logprobs(entries: list) -> list:
    return [{**e, "logprob": None, "top_logprobs": [{**t, "logprob": None} for t in e["top_logprobs"]]}
            for e in entries]


def _logprobs(entries: list) -> list:
    return [v for e in entries for v in [e["logprob"], *(t["logprob"] for t in e["top_logprobs"])]]


@pytest.mark.parametrize("stream", BOTH)
def test_n_choices_share_a_prompt_and_count_in_usage(client, stream):
    one = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=10)
    three = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=10, n=3)
    texts = [c["message"]["content"] for c in three["choices"]]
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert texts == [one["choices"][0]["message"]["content"]] * 3  # greedy choices are the same answer
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]
    assert three["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", BOTH)
def test_seeded_choices_differ_from_each_other_and_repeat_exactly(client, stream):
    kwargs = dict(model=MODEL, messages=ASK_WEATHER, temperature=1.0, max_tokens=12, n=3, seed=11)
    first, again = ask(client, stream, **kwargs), ask(client, not stream, **kwargs)
    texts = [c["message"]["content"] for c in first["choices"]]
    assert texts == [c["message"]["content"] for c in again["choices"]]
    assert len(set(texts)) > 1


@pytest.mark.parametrize("stream", BOTH)
def test_top_k_one_is_greedy_and_logit_bias_bans_a_token(client, stream):
    greedy = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=6, logprobs=True)
    top1 = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=1.5, max_tokens=6,
               extra_body={"top_k": 1})
    assert top1["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
    first = greedy["choices"][0]["logprobs"]["content"][0]["bytes"]
    token_id = _token_id(bytes(first))
    banned = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0, max_tokens=6, logprobs=True,
                 logit_bias={str(token_id): -100})
    assert banned["choices"][0]["logprobs"]["content"][0]["bytes"] != first
    varied = ask(client, stream, model=MODEL, messages=ASK_WEATHER, temperature=0.8, seed=5, max_tokens=6,
                 extra_body={"min_p": 0.1, "repetition_penalty": 1.3})
    assert varied["choices"][0]["finish_reason"] in ("stop", "length")


def _token_id(piece: bytes) -> int:
    from pathlib import Path

    from tokenizers import Tokenizer

    from engine.model_source import resolve
    from tests.conftest import ORCHARD_HOME

    tok = Tokenizer.from_file(str(Path(resolve("embedded", Path(ORCHARD_HOME)).location) / "tokenizer.json"))
    ids = tok.encode(piece.decode(), add_special_tokens=False).ids
    assert len(ids) == 1
    return ids[0]


@pytest.mark.parametrize("stream", BOTH)
def test_documented_fields_that_mean_nothing_here_are_accepted(client, stream):
    reply = ask(client, stream, model=MODEL, messages=ASK_WEATHER, max_tokens=4, store=True,
                metadata={"team": "orchard"}, service_tier="auto", user="u-1", modalities=["text"],
                prediction={"type": "content", "content": "Sunny"}, reasoning_effort="low",
                prompt_cache_key="k", safety_identifier="s")
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")
