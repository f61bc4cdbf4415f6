"""Responses API requests: validation, input items -> chat messages, options -> OutputSpec; and the
response object and its events, from scripted Generation events. No server, no model."""
import json
from types import SimpleNamespace

import pytest

from pydantic import ValidationError

from app.api.responses.protocol import ResponsesRequest, input_messages, output_messages, tool_definitions
from app.errors import APIError, from_validation
from app.generation.events import ChoiceDone, FinishReason, TextDelta, ToolCallEvent
from app.generation.request import GenerationRequest
from app.text.tool_parsers import ToolCallDelta
from engine.sampling import SamplingParams

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def parse(raw: bytes) -> ResponsesRequest:
    """As the route does; a refused body raises the API error a client would get."""
    try:
        return ResponsesRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise from_validation(exc) from None


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


# What Codex CLI 0.171 (`codex exec`) posts, trimmed (its descriptions, instructions and ids shortened).
CODEX_EXEC = {"type": "function", "name": "exec_command", "description": "Runs a command in a PTY.", "strict": False,
              "parameters": {"type": "object", "properties": {
                  "cmd": {"type": "string", "description": "Shell command to execute."},
                  "max_output_tokens": {"type": "number"},
                  "prefix_rule": {"type": "array", "items": {"type": "string"}}},
                  "required": ["cmd"], "additionalProperties": False}}
CODEX_CLOSE = {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
               "parameters": {"type": "object", "properties": {"target": {"type": "string"}}, "required": ["target"],
                              "additionalProperties": False}}
CODEX_WAIT = {"type": "function", "name": "wait_agent", "description": "Wait for agents.", "strict": False,
              "parameters": {"type": "object", "properties": {"targets": {"type": "array", "items": {"type": "string"}},
                                                              "timeout_ms": {"type": "number"}},
                             "required": ["targets"], "additionalProperties": False}}
CODEX_BODY = {
    "model": "tiny-32k", "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "01a21a86-e682-7b21-860e-afd8343b0c76",
    "client_metadata": {"x-codex-installation-id": "bb619993", "session_id": "01a21a86", "turn_id": "01a21a86",
                        "x-codex-turn-metadata": "{\"sandbox\":\"seccomp\",\"model\":\"tiny-32k\"}"},
    "input": [
        {"type": "message", "id": "msg_ab30", "role": "developer",
         "content": [{"type": "input_text", "text": "You are a coding agent running in the Codex CLI."}]},
        {"type": "message", "id": "msg_01a2", "role": "developer",
         "content": [{"type": "input_text", "text": "<skills_instructions>...</skills_instructions>"},
                     {"type": "input_text", "text": "<permissions instructions>...</permissions instructions>"}]},
        {"type": "message", "id": "msg_01a3", "role": "user",
         "content": [{"type": "input_text", "text": "<environment_context>...</environment_context>"}]},
        {"type": "message", "id": "msg_01a4", "role": "user",
         "content": [{"type": "input_text", "text": "Say hello"}]}],
    "tools": [CODEX_EXEC,
              {"type": "namespace", "name": "multi_agent_v1",
               "description": "Tools for spawning and managing sub-agents.", "tools": [CODEX_CLOSE, CODEX_WAIT]},
              {"type": "web_search", "external_web_access": False}],
}
# With `codex exec --output-schema FILE`:
CODEX_FORMAT = {"format": {"type": "json_schema", "strict": True, "name": "codex_output_schema", "schema": {
    "type": "object", "properties": {"greeting": {"type": "string"}}, "required": ["greeting"],
    "additionalProperties": False}}}


def test_codex_requests_are_accepted_and_their_namespace_functions_offered():
    for body in (CODEX_BODY, dict(CODEX_BODY, text=CODEX_FORMAT)):
        parse(json.dumps(body).encode())
    body = parse(json.dumps(CODEX_BODY).encode())
    assert [o.name for o in body.offered()] == ["exec_command", "multi_agent_v1.close_agent",
                                                "multi_agent_v1.wait_agent"]
    assert [t["function"]["name"] for t in tool_definitions(body)] == [o.name for o in body.offered()]
    assert tool_definitions(body)[1]["function"] == {"name": "multi_agent_v1.close_agent",
                                                     "description": "Close an agent.",
                                                     "parameters": CODEX_CLOSE["parameters"]}
    spec = body.output_spec()
    assert [t["name"] for t in spec.tools] == [o.name for o in body.offered()] and spec.tool_choice == "auto"
    assert spec.tool_params == ("tools.0.parameters", "tools.1.tools.0.parameters", "tools.1.tools.1.parameters")
    assert body.namespaced() == {"multi_agent_v1.close_agent": ("multi_agent_v1", "close_agent"),
                                 "multi_agent_v1.wait_agent": ("multi_agent_v1", "wait_agent")}
    assert [t["type"] for t in body.echoed_tools()] == ["function", "namespace"]  # web_search is OpenAI's
    assert body.echoed_tools()[1]["tools"][0]["name"] == "close_agent"
    assert input_messages(body, [])[1] == {"role": "developer", "content": "<skills_instructions>...</skills_"
                                           "instructions><permissions instructions>...</permissions instructions>"}


def test_a_namespace_call_replayed_as_input_keeps_the_name_the_model_saw():
    items = [{"role": "user", "content": "Close agent 7."},
             {"type": "function_call", "status": "completed", "id": "fc_1", "name": "close_agent",
              "namespace": "multi_agent_v1", "arguments": "{\"target\": \"7\"}", "call_id": "call_1"},
             {"type": "function_call_output", "id": "fco_1", "call_id": "call_1", "output": "closed"}]
    out = messages(items)
    assert out[1]["tool_calls"][0]["function"]["name"] == "multi_agent_v1.close_agent"
    output = [{"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "close_agent",
               "namespace": "multi_agent_v1", "arguments": "{}", "status": "completed"}]
    assert output_messages(output)[0]["tool_calls"][0]["function"]["name"] == "multi_agent_v1.close_agent"


def test_a_namespaces_other_tools_are_dropped_and_its_functions_satisfy_tool_choice():
    body = request(tools=[{"type": "namespace", "name": "crm", "description": "CRM",
                           "tools": [{"type": "custom", "name": "raw"}, WEATHER]}], tool_choice="required")
    assert [o.name for o in body.offered()] == ["crm.get_weather"] and body.output_spec().tool_choice == "required"
    assert body.echoed_tools()[0]["tools"] == [{"type": "function", "name": "get_weather",
                                                "description": "Weather in a city",
                                                "parameters": WEATHER["parameters"], "strict": True}]
    assert body.output_spec().tool_params == ("tools.0.tools.1.parameters",)


def test_media_in_a_function_call_output_becomes_a_line_that_says_so():
    """Codex's view_image answers with an input_image: a 400 there would end the session for good."""
    items = [{"type": "function_call", "call_id": "c", "name": "view_image", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c", "output": [
                 {"type": "input_text", "text": "Here it is: "},
                 {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "high"}]}]
    assert messages(items)[1]["content"] == "Here it is: [input_image omitted: this model reads text only]"


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
    ({"tools": [{"type": "namespace", "name": "ns", "tools": [dict(WEATHER, color="red")]}]}, "tools.0.tools.0.color"),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": []}]}, "tools.0.tools"),
    ({"tools": [{"type": "namespace", "name": "a.b", "tools": [WEATHER]}]}, "tools.0.name"),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": [WEATHER], "extra": 1}]}, "tools.0.extra"),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "raw"}]}],
      "tool_choice": "required"}, "tool_choice"),
    ({"client_metadata": []}, "client_metadata"),
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


# -- the response object and its event stream, from scripted Generation events ---------------------
class ScriptedGeneration:
    """Stands in for Generation: yields the given events, then ends the way the last one says."""

    def __init__(self, events):
        self._events = events
        done = events[-1]
        self.choices = [SimpleNamespace(done=done)]
        self.completion_tokens, self.cached_tokens = done.completion_tokens, 2
        self.closed = False

    def events(self):
        yield from self._events

    def close(self):
        self.closed = True


def serve(monkeypatch, events, stream: bool, **fields):
    """(the response or the SSE text, the serving) for one request whose generation yields `events`."""
    from app.api.responses import serving as module

    generation = ScriptedGeneration(events)
    monkeypatch.setattr(module, "Generation", lambda ctx, request, environ: generation)
    settings = SimpleNamespace(keys=lambda: (), responses_store_count=100, responses_store_bytes=1 << 20,
                               responses_store_ttl=60)
    serving = module.ResponsesServing(None, settings, None, None)
    body = request(input="Weather?", **fields)
    gen_request = GenerationRequest("resp_test", [1, 2, 3, 4], 10, SamplingParams())
    store = body.store is not False
    prepared = module.Prepared(gen_request, module._head("resp_test", "m", body, store),
                               [{"role": "user", "content": "Weather?"}], "client-a", store, body.namespaced())
    if not stream:
        return serving.complete(prepared, {}), serving
    out = "".join(serving.stream(prepared, {}))
    assert generation.closed
    return out, serving


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("event: "):
            name, data = block.split("\n")
            payload = json.loads(data[len("data: "):])
            assert payload["type"] == name[len("event: "):] and payload["sequence_number"] == len(events)
            events.append(payload)
    return events


CALL_EVENTS = [None, TextDelta(0, "Let me check."),
               ToolCallEvent(0, ToolCallDelta(0, "call_1", "get_weather", "")),
               ToolCallEvent(0, ToolCallDelta(0, None, None, "{\"city\": ")),
               ToolCallEvent(0, ToolCallDelta(0, None, None, "\"Paris\"}")),
               ChoiceDone(0, FinishReason.TOOL_CALLS, 9)]


def test_text_then_a_call_stream_as_two_items_in_order(monkeypatch):
    text, _ = serve(monkeypatch, CALL_EVENTS, stream=True, tools=[WEATHER])
    assert ": keep-alive\n\n" in text
    events = sse_events(text)
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.function_call_arguments.done",
        "response.output_item.done", "response.completed"]
    assert events[8]["item"] == {"type": "function_call", "id": events[8]["item"]["id"], "call_id": "call_1",
                                 "name": "get_weather", "arguments": "", "status": "in_progress"}
    assert events[11]["arguments"] == "{\"city\": \"Paris\"}" and events[11]["output_index"] == 1
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["message", "function_call"]
    assert final["output_text"] == "Let me check." and final["usage"] == {
        "input_tokens": 4, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 9,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 13}


def test_a_plain_response_has_the_items_a_stream_ends_with(monkeypatch):
    text, _ = serve(monkeypatch, CALL_EVENTS, stream=True, tools=[WEATHER])
    plain, serving = serve(monkeypatch, CALL_EVENTS, stream=False, tools=[WEATHER])
    streamed = sse_events(text)[-1]["response"]
    strip = lambda r: [{k: v for k, v in i.items() if k != "id"} for i in r["output"]]  # noqa: E731
    assert strip(plain) == strip(streamed) and plain["status"] == "completed"
    stored = serving.store.get("client-a", "resp_test")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}
    assert stored.response is plain and stored.conversation == [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]}]


def test_a_response_cut_by_length_is_incomplete_and_never_empty(monkeypatch):
    plain, _ = serve(monkeypatch, [ChoiceDone(0, FinishReason.LENGTH, 10)], stream=False)
    assert plain["status"] == "incomplete" and plain["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = plain["output"]
    assert message["status"] == "incomplete" and message["content"][0]["text"] == ""
    text, _ = serve(monkeypatch, [TextDelta(0, "Once"), ChoiceDone(0, FinishReason.LENGTH, 10)], stream=True)
    assert sse_events(text)[-1]["type"] == "response.incomplete"


def test_an_engine_error_is_a_500_or_an_error_event_and_nothing_is_stored(monkeypatch):
    events = [TextDelta(0, "Hi"), ChoiceDone(0, FinishReason.ERROR, 1, error="boom")]
    with pytest.raises(APIError) as info:
        serve(monkeypatch, events, stream=False)
    assert info.value.status == 500
    text, serving = serve(monkeypatch, events, stream=True)
    last = sse_events(text)[-1]
    assert last["type"] == "error" and last["code"] == "engine_error" and "boom" in last["message"]
    assert len(serving.store) == 0


def test_store_false_keeps_nothing(monkeypatch):
    plain, serving = serve(monkeypatch, [TextDelta(0, "Hi"), ChoiceDone(0, FinishReason.STOP, 1)], stream=False,
                           store=False)
    assert plain["store"] is False and len(serving.store) == 0


def test_a_call_of_a_namespace_function_goes_out_with_its_namespace(monkeypatch):
    """Codex routes a call by (namespace, name): "multi_agent_v1.close_agent" alone is an "unsupported call"."""
    events = [ToolCallEvent(0, ToolCallDelta(0, "call_1", "multi_agent_v1.close_agent", "{\"target\": \"7\"}")),
              ChoiceDone(0, FinishReason.TOOL_CALLS, 9)]
    body = {k: v for k, v in CODEX_BODY.items() if k not in ("input", "stream", "model", "store")}
    text, _ = serve(monkeypatch, events, stream=True, **body)
    plain, serving = serve(monkeypatch, events, stream=False, **body)
    added = next(e for e in sse_events(text) if e["type"] == "response.output_item.added")["item"]
    for item in (added, sse_events(text)[-1]["response"]["output"][0], plain["output"][0]):
        assert (item["type"], item["name"], item["namespace"]) == ("function_call", "close_agent", "multi_agent_v1")
    assert serving.store.get("client-a", "resp_test").conversation[-1]["tool_calls"][0]["function"]["name"] == \
        "multi_agent_v1.close_agent"  # the next turn shows the model the name it wrote
    assert "namespace" not in serve(monkeypatch, CALL_EVENTS, stream=False, tools=[WEATHER])[0]["output"][1]
