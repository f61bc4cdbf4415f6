"""Anthropic Messages requests without HTTP: validation, translation into chat messages and an
OutputSpec, the stop-reason mapping, and the one fold that makes content blocks and stream events."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from app.api.messages.conversation import without_billing_header
from app.api.messages.protocol import CountTokensRequest, MessagesRequest
from app.api.messages.serving import ContentBlocks, matched_stop, stop_reason, usage
from app.errors import APIError, anthropic_body, from_validation
from app.generation.events import ChoiceDone, FinishReason, TextDelta, ToolCallEvent
from app.text.tool_parsers import ToolCallDelta

BASE = {"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
TOOL = {"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}


def parse(**changes) -> MessagesRequest:
    return MessagesRequest.model_validate_json(json.dumps({**BASE, **changes}))


def billing(nonce: str) -> str:
    return f"x-anthropic-billing-header: cc_version=2.1.332.1c9; cc_entrypoint=cli; cch={nonce};"


EPHEMERAL = {"type": "ephemeral"}
# What Claude Code 2.1.332 (`claude -p`, its default model) posts to /v1/messages?beta=true, texts
# cut short: each field and block shape as captured, with 2 of its 12 tools.
CLAUDE_CODE = {
    "model": "claude-opus-5-5",
    "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>\nAttribution for git commits ...\n</system-reminder>\n"},
            {"type": "text", "text": "Say hello"}]},
        {"role": "system", "content": [{"type": "text", "text": "# Environment\n - Platform: linux",
                                        "cache_control": EPHEMERAL}], "output_config": {"effort": "medium"}}],
    "system": [
        {"type": "text", "text": billing("8f3a1")},
        {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
         "cache_control": EPHEMERAL},
        {"type": "text", "text": "\nYou are an agent working with the user toward their goals.",
         "cache_control": EPHEMERAL}],
    "tools": [
        {"name": "Bash", "description": "Executes a given bash command", "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
            "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
            "required": ["command"], "additionalProperties": False}},
        {"name": "DeferredToolPlaceholder", "description": "Reserved placeholder; never call this tool.",
         "input_schema": {"type": "object", "properties": {}}, "defer_loading": True}],
    "metadata": {"user_id": json.dumps({"device_id": "e3" * 32, "account_uuid": "",
                                        "session_id": "dc3cf367-c062-4fc8-b49c-1ee459a3c4bf"})},
    "max_tokens": 128000,
    "thinking": {"type": "adaptive", "display": "omitted"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "output_config": {"effort": "medium"},
    "stream": True,
}


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "clear_at": "next_user_message"}]}, "messages.0"),
    ({"output_config": {"effort": "high", "verbosity": "low"}}, "output_config.verbosity"),
    ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]}]}, "messages.0.content"),
    ({"tool_choice": {"type": "any"}}, ""),
    ({"tools": [TOOL], "tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"tools": [{"name": "bad name!", "input_schema": {}}]}, "tools.0.name"),
    ({"stop_sequences": [""]}, "stop_sequences.0"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
])
def test_invalid_requests_are_400s_naming_the_parameter(changes, param):
    body = {**BASE, **changes}
    body = {k: v for k, v in body.items() if v is not None}
    with pytest.raises(ValidationError) as info:
        MessagesRequest.model_validate_json(json.dumps(body))
    error = from_validation(info.value)
    assert error.status == 400 and (error.param or "").startswith(param)
    assert anthropic_body(error)["error"]["type"] == "invalid_request_error"


def test_a_server_tool_is_refused_with_a_reason():
    with pytest.raises(ValidationError) as info:
        parse(tools=[{"type": "web_search_20250305", "name": "web_search", "max_uses": 3}])
    assert "server tools" in from_validation(info.value).message


def test_documented_extras_are_accepted_and_ignored():
    body = parse(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                 cache_control={"type": "ephemeral"},
                 metadata={"user_id": "u"}, thinking={"type": "enabled", "budget_tokens": 1024},
                 service_tier="standard_only", stream=True, top_k=5, top_p=0.9, temperature=0)
    sampling = body.sampling_params()
    assert (sampling.temperature, sampling.top_p, sampling.top_k) == (0.0, 0.9, 5)
    assert parse().sampling_params().temperature == 1.0  # Anthropic's default
    assert CountTokensRequest.model_validate_json(json.dumps({"model": "m", "messages": BASE["messages"]}))


def test_claude_codes_request_is_accepted_as_sent():
    older = dict(CLAUDE_CODE, model="claude-sonnet-4-5", max_tokens=32000, output_config=None,
                 thinking={"budget_tokens": 31999, "type": "enabled", "display": "omitted"})
    for body in (CLAUDE_CODE, older):
        request = MessagesRequest.model_validate_json(json.dumps(body))
        assert request.chat_messages() == [
            {"role": "system", "content": "You are a Claude agent, built on Anthropic's Claude Agent SDK.\n\n"
                                          "\nYou are an agent working with the user toward their goals."},
            {"role": "user", "content": "<system-reminder>\nAttribution for git commits ...\n</system-reminder>\n"
                                        "\n\nSay hello"},
            {"role": "system", "content": "# Environment\n - Platform: linux"}]
        # The deferred placeholder stays out of the tools section, but may still be called.
        assert [t["function"]["name"] for t in request.tool_definitions()] == ["Bash"]
        assert [t["name"] for t in request.output_spec().tools] == ["Bash", "DeferredToolPlaceholder"]
        assert request.output_spec().json_mode is None


# -- translation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("system, expected", [
    ([{"type": "text", "text": billing("a1")}, {"type": "text", "text": "Be brief."}], "Be brief."),
    ([{"type": "text", "text": billing("a1") + "\nBe brief."}, {"type": "text", "text": "Really."}],
     "Be brief.\n\nReally."),
    (billing("a1") + "\nBe brief.", "Be brief."),
    (billing("a1"), ""),
    ([{"type": "text", "text": "Be brief. " + billing("a1")}], "Be brief. " + billing("a1")),  # not a header there
    ([{"type": "text", "text": "A"}, {"type": "text", "text": ""}], "A\n\n"),  # other blocks as they came
])
def test_claude_codes_billing_header_is_left_out_of_the_system_prompt(system, expected):
    first = parse(system=system).chat_messages()[0]
    assert (first["content"] if first["role"] == "system" else "") == expected
    assert without_billing_header("x-anthropic-billing-header: x;\nrest\nmore") == "rest\nmore"


def test_a_new_billing_nonce_renders_the_same_messages():
    """The header's nonce changes every request: with it gone, the prompt's prefix repeats."""
    def rendered(nonce):
        body = dict(CLAUDE_CODE, system=[{"type": "text", "text": billing(nonce)}, *CLAUDE_CODE["system"][1:]])
        return CountTokensRequest.model_validate_json(json.dumps(
            {k: v for k, v in body.items() if k not in ("max_tokens", "stream", "metadata")})).chat_messages()

    assert rendered("00001") == rendered("ffff9")
    assert "billing" not in json.dumps(rendered("00001"))


def test_system_messages_render_in_place_until_cleared():
    body = parse(system="S", messages=[
        {"role": "user", "content": "one"},
        {"role": "system", "content": "reminder", "clear_at": "next_user_message"},
        {"role": "system", "content": [], "output_config": {"effort": "low"}},  # an effort statement
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "two"},
        {"role": "system", "content": [{"type": "text", "text": "fresh"}], "clear_at": "next_user_message"},
        {"role": "system", "content": "kept"}])
    assert body.chat_messages() == [
        {"role": "system", "content": "S"}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "two"},
        {"role": "system", "content": "fresh"}, {"role": "system", "content": "kept"}]


def test_a_tool_reference_result_lists_the_deferred_tool():
    web = {"name": "WebFetch", "description": "Fetch a URL", "input_schema": {"type": "object"}, "defer_loading": True}
    search = {"name": "ToolSearch", "input_schema": {"type": "object"}}
    body = parse(tools=[search, web], messages=[
        {"role": "user", "content": "fetch it"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_s", "name": "ToolSearch",
                                           "input": {"query": "select:WebFetch"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_s", "content": [
            {"type": "tool_reference", "tool_name": "WebFetch"}]}]}])
    assert [t["function"]["name"] for t in body.tool_definitions()] == ["ToolSearch"]
    assert json.loads(body.chat_messages()[-1]["content"]) == {"type": "function", "function": {
        "name": "WebFetch", "parameters": {"type": "object"}, "description": "Fetch a URL"}}


def test_output_config_format_constrains_the_answer_to_its_schema():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    spec = parse(output_config={"effort": "low", "format": {"type": "json_schema", "schema": schema}}).output_spec()
    assert (spec.json_mode, spec.schema, spec.strict) == ("schema", schema, True)
    assert spec.schema_param == "output_config.format.schema"


def test_a_tool_conversation_becomes_chat_messages_in_template_order():
    body = parse(system=[{"type": "text", "text": "A"}, {"type": "text", "text": "B"}], messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "Checking."}, CALL]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "text", "text": "And tomorrow?"}]},
        {"role": "assistant", "content": [dict(CALL, id="toolu_2")]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                                      "content": [{"type": "text", "text": "timeout"}]}]}])
    assert body.chat_messages() == [
        {"role": "system", "content": "A\n\nB"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "toolu_2", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"}]


@pytest.mark.parametrize("messages, words", [
    ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}],
     "did not call"),
    ([{"role": "user", "content": [CALL]}], "belongs in an assistant"),
    ([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "x"}]}],
     "belongs in a user"),
    ([{"role": "user", "content": [{"type": "image", "source": {"type": "url", "url": "http://x/y.png"}}]}],
     "text only"),
    ([{"role": "assistant", "content": [CALL]}, {"role": "user", "content": [{
        "type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "document", "source": {}}]}]}],
     "text only"),
])
def test_misplaced_blocks_and_media_are_400s(messages, words):
    with pytest.raises(APIError) as info:
        parse(messages=messages).chat_messages()
    assert info.value.status == 400 and words in info.value.message


@pytest.mark.parametrize("choice, expected", [
    (None, ("auto", None, True)),
    ({"type": "auto", "disable_parallel_tool_use": True}, ("auto", None, False)),
    ({"type": "any"}, ("required", None, True)),
    ({"type": "tool", "name": "get_weather"}, ("named", "get_weather", True)),
    ({"type": "none"}, ("none", None, True)),
])
def test_tool_choice_becomes_an_output_spec(choice, expected):
    body = parse(tools=[TOOL], **({"tool_choice": choice} if choice else {}))
    spec = body.output_spec()
    assert (spec.tool_choice, spec.tool_name, spec.parallel) == expected
    assert spec.tools == [{"name": "get_weather", "parameters": TOOL["input_schema"]}]
    rendered = body.tool_definitions()
    if expected[0] == "none":
        assert rendered is None  # tool_choice none: the model is not shown the tools
    else:
        assert rendered == [{"type": "function", "function": {"name": "get_weather",
                                                              "parameters": TOOL["input_schema"]}}]


# -- stop reasons, usage ---------------------------------------------------------------------------
@pytest.mark.parametrize("reason, stopped, expected", [
    (FinishReason.STOP, False, "end_turn"),
    (FinishReason.STOP, True, "stop_sequence"),
    (FinishReason.LENGTH, False, "max_tokens"),
    (FinishReason.TOOL_CALLS, False, "tool_use"),
    (FinishReason.TOOL_CALLS, True, "tool_use"),
    (FinishReason.ABORT, False, "pause_turn"),
])
def test_finish_reasons_map_to_anthropic_stop_reasons(reason, stopped, expected):
    assert stop_reason(reason, stopped) == expected


def test_the_matched_stop_sequence_is_named():
    choice = lambda stopped, **kw: SimpleNamespace(assembler=SimpleNamespace(stopped=stopped, **kw))  # noqa: E731
    assert matched_stop(choice(False), ("3",)) is None
    assert matched_stop(choice(True), ("3",)) == "3"
    assert matched_stop(choice(True, matched="b"), ("a", "b")) == "b"


def test_usage_counts_cache_reads_apart_from_input():
    assert usage(100, 7, 60) == {"input_tokens": 40, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 60, "output_tokens": 7}


# -- content blocks -------------------------------------------------------------------------------
def test_one_fold_gives_the_stream_events_and_the_content():
    blocks = ContentBlocks()
    events = [TextDelta(0, "Let me "), TextDelta(0, "check."), None,
              ToolCallEvent(0, ToolCallDelta(0, "call_A", "get_weather", "")),
              ToolCallEvent(0, ToolCallDelta(0, arguments="{\"city\": ")),
              ToolCallEvent(0, ToolCallDelta(0, arguments="\"Paris\"}")),
              ToolCallEvent(0, ToolCallDelta(1, "call_B", "get_time", "{}")),
              ChoiceDone(0, FinishReason.TOOL_CALLS, 12)]
    out = [e for event in events for e in blocks.add(event)] + blocks.stop()
    assert [(e["type"], e.get("index")) for e in out] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_delta", 0), ("ping", None),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_delta", 1), ("content_block_stop", 1), ("content_block_start", 2),
        ("content_block_delta", 2), ("content_block_stop", 2)]
    assert out[0]["content_block"] == {"type": "text", "text": ""}
    assert out[5]["content_block"] == {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {}}
    assert out[6]["delta"] == {"type": "input_json_delta", "partial_json": "{\"city\": "}
    assert blocks.content() == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_A", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_B", "name": "get_time", "input": {}}]


def test_a_cut_tool_call_has_an_object_input_and_a_failed_generation_raises():
    blocks = ContentBlocks()
    blocks.add(ToolCallEvent(0, ToolCallDelta(0, "call_A", "f", "{\"a\": [1, ")))
    assert blocks.content()[0]["input"] == {}
    with pytest.raises(APIError) as info:
        blocks.add(ChoiceDone(0, FinishReason.ERROR, 0, error="boom"))
    assert info.value.status == 500 and anthropic_body(info.value)["error"]["type"] == "api_error"
