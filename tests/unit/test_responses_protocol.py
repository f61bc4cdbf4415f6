"""Responses API requests: validation, input items -> chat messages, options -> OutputSpec. No server."""
import json

import pytest

from app.api.responses.protocol import input_messages, output_messages, parse, tool_definitions
from app.errors import APIError

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def request(**fields):
    return parse(json.dumps({"model": "m", "input": "hi", **fields}).encode())


def messages(items, history=()):
    return input_messages(request(input=items), list(history))


def test_a_string_input_is_one_user_message():
    assert messages("Hello") == [{"role": "user", "content": "Hello"}]


def test_message_items_with_and_without_type_and_with_parts():
    items = [{"role": "developer", "content": "Be brief."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi "},
                                                             {"type": "input_text", "text": "there"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [
                 {"type": "output_text", "text": "Hello!", "annotations": [], "logprobs": []}]},
             {"role": "system", "content": "Mind the time."}]
    assert messages(items) == [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                               {"role": "assistant", "content": "Hello!"},
                               {"role": "system", "content": "Mind the time."}]


def test_function_calls_join_the_assistant_turn_and_outputs_become_tool_messages():
    items = [{"role": "user", "content": "Weather in Paris and Rome?"},
             {"type": "message", "role": "assistant", "content": "Checking."},
             {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}",
              "id": "fc_1", "status": "completed"},
             {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{\"city\": \"Rome\"}"},
             {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
             {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
             {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": "{}"}]
    out = messages(items)
    assert out[1] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Rome\"}"}}]}
    assert out[2:4] == [{"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                        {"role": "tool", "tool_call_id": "call_2", "content": "rain"}]
    assert out[4] == {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]}


def test_an_output_may_answer_a_call_of_the_previous_response_but_not_an_unknown_one():
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    items = [{"type": "function_call_output", "call_id": "call_9", "output": "done"}]
    assert messages(items, history) == [{"role": "tool", "tool_call_id": "call_9", "content": "done"}]
    assert history[1]["tool_calls"][0]["id"] == "call_9" and len(history) == 2  # history is never changed
    with pytest.raises(APIError) as info:
        messages(items)
    assert info.value.status == 400 and info.value.param == "input.0.call_id"


@pytest.mark.parametrize("part", [{"type": "input_image", "image_url": "data:..."},
                                  {"type": "input_file", "file_id": "file-1"}])
def test_media_parts_are_refused_by_name(part):
    with pytest.raises(APIError) as info:
        messages([{"role": "user", "content": [{"type": "input_text", "text": "look"}, part]}])
    assert info.value.param == "input.0.content" and part["type"] in info.value.message


def test_output_items_become_the_assistant_turn_that_follows():
    output = [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "Let me check.", "annotations": []}]},
              {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}",
               "status": "completed"}]
    assert output_messages(output) == [{"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    assert output_messages(output[:1]) == [{"role": "assistant", "content": "Let me check."}]


def test_only_function_tools_are_rendered_and_constrained():
    body = request(tools=[{"type": "web_search"}, WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}],
                   tool_choice="required", parallel_tool_calls=False)
    assert tool_definitions(body) == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city", "parameters": WEATHER["parameters"]}}]
    spec = body.output_spec()
    assert spec.tools == [{"name": "get_weather", "parameters": WEATHER["parameters"], "strict": True}]
    assert spec.tool_choice == "required" and spec.parallel is False and spec.json_mode is None


def test_named_tool_choice_and_non_strict_tools():
    body = request(tools=[dict(WEATHER, strict=False)], tool_choice={"type": "function", "name": "get_weather"})
    spec = body.output_spec()
    assert spec.tool_choice == "named" and spec.tool_name == "get_weather" and spec.tools[0]["strict"] is False
    assert request().output_spec().tool_choice == "auto" and request().output_spec().tools == []


def test_text_formats_become_json_modes():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "name": "x", "schema": schema, "strict": True}
    spec = request(text={"format": fmt}).output_spec()
    assert (spec.json_mode, spec.schema, spec.strict) == ("schema", schema, True)
    assert request(text={"format": {"type": "json_object"}}).output_spec().json_mode == "object"
    assert request(text={"format": {"type": "text"}}).output_spec().json_mode is None


def test_sampling_defaults_and_values():
    assert (request().sampling_params().temperature, request().sampling_params().top_p) == (1.0, 1.0)
    params = request(temperature=0.2, top_p=0.5).sampling_params()
    assert (params.temperature, params.top_p) == (0.2, 0.5)


def test_ignored_fields_are_accepted():
    request(reasoning={"effort": "low"}, include=["message.output_text.logprobs"], service_tier="auto", user="u",
            truncation="disabled", metadata={"k": "v"}, store=False, text={"format": {"type": "text"},
                                                                            "verbosity": "low"})


@pytest.mark.parametrize("fields, param", [
    ({"unknown_field": 1}, "unknown_field"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"role": "user", "content": "x", "extra": 1}]}, "input.0.extra"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 1}]}]}, "input.0.content.0.text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input.0.arguments"),
    ({"tools": [dict(WEATHER, color="red")]}, "tools.0.color"),
    ({"input": [{"role": "user", "content": 5}]}, "input.0.content"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": {"a": 1}}]}, "input.0.output"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "web_search"}}, "tool_choice.type"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"truncation": "auto"}, "truncation"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": "warm"}, "temperature"),
])
def test_invalid_requests_name_the_parameter(fields, param):
    with pytest.raises(APIError) as info:
        request(**fields)
    assert info.value.status == 400 and info.value.param == param, info.value.body()
    assert "list" not in info.value.message.split("'")[1:2]  # no union labels in the message's path


def test_a_value_of_the_wrong_shape_is_told_what_fits():
    with pytest.raises(APIError) as info:
        request(input=5)
    assert info.value.message == "Invalid value for 'input': Input should be a string or a list of items"


def test_a_body_that_is_not_json_is_a_400():
    with pytest.raises(APIError) as info:
        parse(b"{nope")
    assert info.value.code == "invalid_json"
