"""Anthropic's Messages API as its clients use it: a real Gunicorn server on the embedded SmolLM2,
driven by the official `anthropic` SDK. Every behaviour streamed (assembled by the SDK's own
stream helper) and not; the raw event order is read once without the SDK.

The SDK (2.x) no longer takes `temperature` as an argument: it travels in extra_body.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import pytest
import requests


ALIAS = "claude-orchard-test"  # matches the server's MODEL_ALIASES=claude-*
WEATHER = {"name": "get_weather", "description": "Current weather in a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False}}
TIME = {"name": "get_time", "description": "Current time in a timezone", "input_schema": {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 12}},
    "required": ["tz"], "additionalProperties": False}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris for the next 3 days?"}]
COUNT = [{"role": "user", "content": "Count from 1 to 10."}]
GREEDY = {"temperature": 0}
BOTH = [False, True]


@pytest.fixture(scope="module")
def server(embedded_server_factory):
    return embedded_server_factory(MODEL_ALIASES="claude-*")


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


def ask(client, stream: bool, **kwargs) -> anthropic.types.Message:
    """The final Message, from a plain call or from the SDK's stream helper folding the events."""
    kwargs.setdefault("model", ALIAS)
    if not stream:
        return client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as events:
        return events.get_final_message()


def _validate_weather(block) -> None:
    assert block.type == "tool_use" and block.name == "get_weather" and block.id.startswith("toolu_")
    assert set(block.input) == {"city", "days"} and block.input["city"] in ("Paris", "Berlin", "Rome")
    assert isinstance(block.input["days"], int) and 1 <= block.input["days"] <= 7


# -- text -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_plain_text_under_an_alias_with_ignored_fields(client, stream):
    reply = ask(client, stream, max_tokens=12, messages=COUNT, extra_body=GREEDY,
                system=[{"type": "text", "text": "You are brief.", "cache_control": {"type": "ephemeral"}}],
                metadata={"user_id": "u-1"}, service_tier="auto", thinking={"type": "disabled"},
                extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"})
    assert reply.id.startswith("msg_") and reply.type == "message" and reply.role == "assistant"
    assert reply.model == ALIAS  # the name asked for, as Anthropic answers
    (block,) = reply.content
    assert block.type == "text" and block.text.strip()
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert 0 < reply.usage.output_tokens <= 12 and reply.usage.cache_creation_input_tokens == 0


@pytest.mark.parametrize("stream", BOTH)
def test_a_stop_sequence_ends_the_text_and_is_named(client, stream):
    reply = ask(client, stream, max_tokens=30, messages=COUNT, extra_body=GREEDY, stop_sequences=["3"])
    assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == "3"
    assert reply.content[0].text.startswith("1") and "3" not in reply.content[0].text


@pytest.mark.parametrize("stream", BOTH)
def test_max_tokens_cuts_the_reply(client, stream):
    reply = ask(client, stream, max_tokens=4, messages=COUNT, extra_body=GREEDY)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 4


# -- tools ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_any_tool_choice_gives_valid_tool_use_every_time_at_temperature_one(client, stream):
    def one(_):
        return ask(client, stream, max_tokens=60, messages=ASK_WEATHER, tools=[WEATHER, TIME],
                   tool_choice={"type": "any", "disable_parallel_tool_use": True}, extra_body={"temperature": 1.0})

    with ThreadPoolExecutor(4) as pool:  # batched together: four answers for the price of one
        replies = list(pool.map(one, range(4)))
    for reply in replies:
        assert reply.stop_reason == "tool_use", reply
        (block,) = reply.content
        if block.name == "get_weather":
            _validate_weather(block)
        else:
            assert block.name == "get_time" and list(block.input) == ["tz"] and len(block.input["tz"]) <= 12


@pytest.mark.parametrize("stream", BOTH)
def test_a_named_tool_choice_calls_that_tool(client, stream):
    reply = ask(client, stream, max_tokens=60, messages=ASK_WEATHER, tools=[TIME, WEATHER],
                tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert reply.stop_reason == "tool_use"
    (block,) = reply.content
    _validate_weather(block)


@pytest.mark.parametrize("stream", BOTH)
def test_a_conversation_with_tool_use_and_tool_result_continues(client, stream):
    history = ASK_WEATHER + [
        {"role": "assistant", "content": [{"type": "text", "text": "Let me check."}, {
            "type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Paris", "days": 3}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_abc",
                                      "content": [{"type": "text", "text": "{\"forecast\": \"sunny, 24 C\"}"}]}]}]
    reply = ask(client, stream, max_tokens=16, messages=history, tools=[WEATHER], tool_choice={"type": "none"},
                extra_body=GREEDY)
    assert reply.content and reply.content[0].type == "text" and reply.content[0].text.strip()
    assert reply.stop_reason in ("end_turn", "max_tokens")
    orphan = [ASK_WEATHER[0], {"role": "assistant", "content": "Sure."}, history[2]]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=ALIAS, max_tokens=4, messages=orphan)
    assert "toolu_abc" in info.value.body["error"]["message"]


# -- count_tokens ---------------------------------------------------------------------------------
def test_count_tokens_equals_the_input_of_the_same_request(client):
    kwargs = dict(model=ALIAS, messages=ASK_WEATHER, tools=[WEATHER], system="You are brief.")
    counted = client.messages.count_tokens(**kwargs).input_tokens
    reply = client.messages.create(max_tokens=1, **kwargs)
    # Anthropic's input_tokens leave out the tokens read from the cache: the prompt is the sum.
    assert counted == reply.usage.input_tokens + reply.usage.cache_read_input_tokens
    bare = client.messages.count_tokens(model=ALIAS, messages=ASK_WEATHER, system="You are brief.").input_tokens
    assert counted > bare + 50  # the tools section is in the prompt ...
    unrendered = client.messages.count_tokens(tool_choice={"type": "none"}, **kwargs).input_tokens
    assert unrendered == bare  # ... except with tool_choice none


# -- errors ---------------------------------------------------------------------------------------
def test_a_missing_max_tokens_is_a_400_in_anthropics_envelope(client):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.post("/v1/messages", body={"model": ALIAS, "messages": COUNT}, cast_to=object)
    assert info.value.status_code == 400
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in info.value.body["error"]["message"]


def test_an_unknown_model_is_a_404_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="gpt-nothing", max_tokens=4, messages=COUNT)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="gpt-nothing", messages=COUNT)


def test_images_and_server_tools_are_400s_that_say_why(client):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=ALIAS, max_tokens=4, messages=[
            {"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}])
    assert "text only" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=ALIAS, max_tokens=4, messages=COUNT,
                               tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert "server tools" in info.value.body["error"]["message"]


# -- the raw stream -------------------------------------------------------------------------------
def test_the_raw_event_stream_of_a_tool_call_is_in_anthropics_order(server):
    body = dict(model=ALIAS, max_tokens=60, messages=ASK_WEATHER, tools=[WEATHER], stream=True, temperature=0,
                tool_choice={"type": "tool", "name": "get_weather"})
    with requests.post(server.base_url + "/v1/messages", json=body, stream=True, timeout=120,
                       headers={"anthropic-version": "2023-06-01"}) as response:
        assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    names = [line.removeprefix("event: ") for line in lines[0::2]]
    payloads = [json.loads(line.removeprefix("data: ")) for line in lines[1::2]]
    assert [p["type"] for p in payloads] == names  # every event names its own type
    core = [n for n in names if n != "ping"]
    assert core[:2] == ["message_start", "content_block_start"] and core[-3:] == [
        "content_block_stop", "message_delta", "message_stop"]
    assert set(core[2:-3]) == {"content_block_delta"} and len(core) > 6  # arguments arrive in pieces
    start = payloads[names.index("content_block_start")]["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather" and start["input"] == {}
    pieces = [p["delta"]["partial_json"] for p in payloads if p["type"] == "content_block_delta"]
    assert json.loads("".join(pieces))["city"] in ("Paris", "Berlin", "Rome")
    assert payloads[names.index("message_delta")]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
