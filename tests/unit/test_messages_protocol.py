"""Anthropic Messages requests without HTTP: validation, translation into chat messages and an
OutputSpec, the stop-reason mapping, and the one fold that makes content blocks and stream events."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

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


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, param", [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
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


# -- translation ----------------------------------------------------------------------------------
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
