"""Anthropic's Messages API as its clients use it: a real Gunicorn server on the embedded SmolLM2,
driven by the official `anthropic` SDK. Every behaviour streamed (assembled by the SDK's own
stream helper) and not; the raw event order is read once without the SDK.

The SDK (2.x) no longer takes `temperature` as an argument: it travels in extra_body.

The server caps max_tokens at 64 (MAX_TOKENS_LIMIT): Claude Code asks 32000-128000 whatever the
model, and a cap, unlike a limit, is no 400.
"""
from __future__ import annotations

import json
import uuid
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


CLAUDE_CODE_BETAS = ["claude-code-20250219", "interleaved-thinking-2025-05-14", "context-management-2025-06-27",
                     "per-turn-control-2026-07-01", "mid-conversation-tool-changes-2026-07-01",
                     "thinking-token-count-2026-05-13", "advanced-tool-use-2025-11-20", "effort-2025-11-24"]
SYSTEM_TEXT = ("You are a careful assistant for a small software project. Answer briefly, in plain words, and "
               "say so when you are not sure. ") * 5


@pytest.fixture(scope="module")
def server(embedded_server_factory):
    return embedded_server_factory(MODEL_ALIASES="claude-*", MAX_TOKENS_LIMIT="64", DEFAULT_MAX_TOKENS="64")


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


def billing_header() -> dict:
    """Claude Code's first system block: its nonce changes on every request."""
    nonce = uuid.uuid4().hex[:5]
    text = f"x-anthropic-billing-header: cc_version=2.1.332.1c9; cc_entrypoint=cli; cch={nonce};"
    return {"type": "text", "text": text}


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


# -- Claude Code ----------------------------------------------------------------------------------
def test_claude_codes_request_shape_streams_an_answer(client):
    """Every field Claude Code 2.1.332 sends, through the SDK's beta path (?beta=true, anthropic-beta)."""
    bash = {"name": "Bash", "description": "Executes a bash command", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"command": {"type": "string"}}, "required": ["command"], "additionalProperties": False}}
    placeholder = {"name": "DeferredToolPlaceholder", "description": "Never call this tool.",
                   "input_schema": {"type": "object", "properties": {}}, "defer_loading": True}
    kwargs = dict(
        model="claude-opus-5-5", max_tokens=128000, betas=CLAUDE_CODE_BETAS,
        system=[billing_header(),
                {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer briefly.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
                  {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Platform: linux",
                                                  "cache_control": {"type": "ephemeral"}}],
                   "output_config": {"effort": "medium"}}],
        tools=[bash, placeholder], thinking={"type": "adaptive", "display": "omitted"},
        output_config={"effort": "medium"}, metadata={"user_id": json.dumps({"device_id": "d" * 64,
                                                                             "session_id": str(uuid.uuid4())})},
        context_management={"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]})
    with client.beta.messages.stream(**kwargs) as events:
        reply = events.get_final_message()
    assert reply.stop_reason in ("end_turn", "max_tokens", "tool_use") and reply.content
    assert 0 < reply.usage.output_tokens <= 64  # 128000 asked, capped by MAX_TOKENS_LIMIT
    counted = client.beta.messages.count_tokens(**{k: v for k, v in kwargs.items()
                                                   if k not in ("max_tokens", "metadata")})
    assert counted.input_tokens == reply.usage.input_tokens + reply.usage.cache_read_input_tokens


def test_a_billing_header_with_a_new_nonce_each_turn_still_hits_the_prefix_cache(client):
    """Claude Code's header is left out of the prompt: each turn reads the one before from the cache."""
    history, prompts = [], []
    for turn, question in enumerate(["What is a unit test?", "And an integration test?", "Which is faster?",
                                     "Give one example of each."]):
        history.append({"role": "user", "content": question})
        reply = ask(client, True, max_tokens=12, extra_body=GREEDY, messages=history,
                    system=[billing_header(), {"type": "text", "text": SYSTEM_TEXT,
                                               "cache_control": {"type": "ephemeral"}}])
        usage = reply.usage
        prompts.append(usage.input_tokens + usage.cache_read_input_tokens)
        if turn:
            # Far more than the ~30 tokens before the nonce a header left in would share.
            assert usage.cache_read_input_tokens >= 0.9 * prompts[-2], (turn, usage, prompts)
        history.append({"role": "assistant", "content": reply.content})
    with_header = client.messages.count_tokens(model=ALIAS, messages=history, system=[
        billing_header(), {"type": "text", "text": SYSTEM_TEXT}]).input_tokens
    assert with_header == client.messages.count_tokens(model=ALIAS, messages=history, system=SYSTEM_TEXT).input_tokens


# -- max_tokens is a cap --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_client(tiny_server_factory):
    """The tiny Qwen2: a 1024-token context a test can fill."""
    server = tiny_server_factory(MODEL_ALIASES="claude-*", MAX_TOKENS_LIMIT="16", DEFAULT_MAX_TOKENS="16")
    return anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("stream", BOTH)
def test_max_tokens_beyond_the_limit_or_the_context_stops_there(tiny_client, stream):
    reply = ask(tiny_client, stream, max_tokens=32000, messages=COUNT, extra_body=GREEDY)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 16  # MAX_TOKENS_LIMIT
    def prompt(words: int) -> list[dict]:
        return [{"role": "user", "content": "hello " * words}]

    def count(words: int) -> int:
        return tiny_client.messages.count_tokens(model=ALIAS, messages=prompt(words)).input_tokens

    one, per_word = count(1), count(2) - count(1)
    long = prompt(1 + (1024 - 8 - one) // per_word)  # a few tokens short of the context
    prompt = count(len(long[0]["content"].split()))
    assert 1024 - 16 < prompt < 1024, prompt  # leaves less room than the limit
    reply = ask(tiny_client, stream, max_tokens=32000, messages=long, extra_body=GREEDY)
    assert reply.stop_reason == "max_tokens" and reply.usage.output_tokens == 1024 - prompt


def test_a_prompt_beyond_the_context_is_still_a_400(tiny_client):
    with pytest.raises(anthropic.BadRequestError) as info:
        tiny_client.messages.create(model=ALIAS, max_tokens=1, messages=[{"role": "user", "content": "hello " * 300}])
    assert "context length" in info.value.body["error"]["message"]


# -- tools ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_any_tool_choice_gives_valid_tool_use_every_time_at_temperature_one(client, stream):
    def one(_):
        return ask(client, stream, max_tokens=150, messages=ASK_WEATHER, tools=[WEATHER, TIME],
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
