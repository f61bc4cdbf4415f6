"""The Responses API through a real Gunicorn server on the embedded SmolLM2 and the official openai
client: text, input items, max_output_tokens, forced and replayed function calls, structured
output, stored conversations (previous_response_id, retrieve, delete, store=false, scopes) and the
raw event stream; Codex CLI's request shape (namespace tools, its ignored fields). Every behaviour
streamed and not; a stream is folded back into the response it ends with, after checking that
its events add up to that response. max_output_tokens as a cap runs on the tiny random Qwen2,
whose 1k context is quick to fill.

Two API keys, so that one client's stored responses are checked to be invisible to another.
"""
from __future__ import annotations

import json

import openai
import pytest
import requests


MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {
               "city": {"type": "string", "enum": ["Paris", "Berlin", "Rome"]},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}}
ASK_WEATHER = "What is the weather in Paris for the next 3 days?"
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
    "required": ["name", "age"], "additionalProperties": False}
BOTH = [False, True]


@pytest.fixture(scope="module")
def server(embedded_server_factory):
    return embedded_server_factory(API_KEYS="key-a,key-b")


@pytest.fixture(scope="module")
def capped_server(tiny_server_factory):
    return tiny_server_factory(MAX_TOKENS_LIMIT="64", DEFAULT_MAX_TOKENS="16")


@pytest.fixture(scope="module")
def client(server):
    return server.client(api_key="key-a")


@pytest.fixture(scope="module")
def other_client(server):
    return server.client(api_key="key-b")


def ask(client, stream: bool, **kwargs) -> dict:
    """The response object as a dict, from a plain call or from a folded stream."""
    if not stream:
        response = client.responses.create(**kwargs)
        assert response.output_text == response.model_extra["output_text"]  # the SDK's own, and ours
        return response.model_dump()
    return fold(list(client.responses.create(stream=True, **kwargs)))


def fold(events: list) -> dict:
    """The final response of a stream, once its events are checked to build exactly that."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    built: dict[int, dict] = {}
    fragments: dict[int, int] = {}
    for e in events[2:-1]:
        if e.type == "response.output_item.added":
            assert e.output_index == len(built) and e.item.status == "in_progress"
            built[e.output_index] = {"item": e.item.model_dump(), "text": "", "arguments": ""}
        elif e.type == "response.output_text.delta":
            built[e.output_index]["text"] += e.delta
        elif e.type == "response.function_call_arguments.delta":
            built[e.output_index]["arguments"] += e.delta
            fragments[e.output_index] = fragments.get(e.output_index, 0) + 1
        elif e.type == "response.output_item.done":
            built[e.output_index]["done"] = e.item.model_dump()
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    response = final.response.model_dump()
    assert final.type == f"response.{response['status']}"
    assert [b["done"] for b in built.values()] == response["output"]
    for b, item in zip(built.values(), response["output"]):
        assert b["item"]["id"] == item["id"]
        if item["type"] == "message":
            assert b["text"] == item["content"][0]["text"]
        else:
            assert b["arguments"] == item["arguments"] and b["item"]["call_id"] == item["call_id"]
    return dict(response, fragments=fragments, streamed=True)


def text_of(response: dict) -> str:
    return "".join(p["text"] for item in response["output"] if item["type"] == "message" for p in item["content"])


def calls_of(response: dict) -> list[dict]:
    return [item for item in response["output"] if item["type"] == "function_call"]


def _validate_weather(arguments: str) -> None:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Berlin", "Rome")
    assert isinstance(args["days"], int) and 1 <= args["days"] <= 7


# -- text -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_a_string_input_with_instructions(client, stream):
    short = ask(client, stream, model=MODEL, input="Name a colour.", instructions="Be brief.", max_output_tokens=1)
    reply = ask(client, stream, model=MODEL, input="Name a colour.", instructions="Answer in one word, in lower case.",
                max_output_tokens=8, temperature=0, metadata={"team": "orchard"})
    assert reply["id"].startswith("resp_") and reply["object"] == "response" and reply["model"] == MODEL
    assert reply["status"] in ("completed", "incomplete") and reply["error"] is None
    (message,) = reply["output"]
    assert message["type"] == "message" and message["role"] == "assistant" and message["id"].startswith("msg_")
    assert message["content"][0]["type"] == "output_text" and text_of(reply).strip()
    usage = reply["usage"]
    assert usage["input_tokens"] > short["usage"]["input_tokens"]  # the instructions are the system message
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] and usage["output_tokens"] <= 8
    assert reply["instructions"] == "Answer in one word, in lower case." and reply["metadata"] == {"team": "orchard"}
    assert (reply["temperature"], reply["top_p"], reply["tool_choice"], reply["tools"]) == (0.0, 1.0, "auto", [])


@pytest.mark.parametrize("stream", BOTH)
def test_input_items_make_a_conversation(client, stream):
    items = [{"role": "developer", "content": "You are terse."},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi."}]},
             {"role": "user", "content": "Say bye."}]
    reply = ask(client, stream, model=MODEL, input=items, max_output_tokens=6, temperature=0)
    chat = client.chat.completions.create(model=MODEL, max_tokens=1, messages=[
        {"role": "developer", "content": "You are terse."}, {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Say bye."}])
    assert reply["usage"]["input_tokens"] == chat.usage.prompt_tokens  # the same prompt as chat's
    assert text_of(reply)


@pytest.mark.parametrize("stream", BOTH)
def test_max_output_tokens_makes_the_response_incomplete(client, stream):
    reply = ask(client, stream, model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=3,
                temperature=0)
    assert reply["status"] == "incomplete" and reply["incomplete_details"] == {"reason": "max_output_tokens"}
    assert reply["usage"]["output_tokens"] == 3 and reply["max_output_tokens"] == 3
    assert reply["output"][-1]["status"] == "incomplete" and text_of(reply)


@pytest.mark.parametrize("stream", BOTH)
def test_max_output_tokens_is_a_cap_not_a_400(capped_server, stream):
    """Above what MAX_TOKENS_LIMIT (64 here) or the context leaves, generation stops there: incomplete."""
    client = capped_server.client()
    context = client.models.list().data[0].model_extra["context_length"]
    reply = ask(client, stream, model="tiny", input="Hello.", max_output_tokens=10**6, temperature=0)
    assert reply["status"] == "incomplete" and reply["incomplete_details"] == {"reason": "max_output_tokens"}
    assert reply["usage"]["output_tokens"] == 64 and reply["max_output_tokens"] == 10**6  # echoed as asked
    long = ask(client, stream, model="tiny", input="The capital of France is Paris. " * 105, max_output_tokens=500,
               temperature=0)
    room = context - long["usage"]["input_tokens"]
    assert 1 <= room < 64, "the prompt should leave the context less room than the limit"
    assert long["status"] == "incomplete" and long["usage"]["output_tokens"] == room
    default = ask(client, stream, model="tiny", input="Hello.", temperature=0)  # none given: DEFAULT_MAX_TOKENS
    assert default["status"] == "incomplete" and default["usage"]["output_tokens"] == 16
    with pytest.raises(openai.BadRequestError) as info:  # a prompt that alone exceeds the context
        ask(client, stream, model="tiny", input="The capital of France is Paris. " * 200, max_output_tokens=10)
    assert info.value.body["code"] == "context_length_exceeded" and info.value.body["param"] == "input"


def test_unknown_fields_and_media_are_400s_that_name_them(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", extra_body={"frobnicate": 1})
    assert info.value.body["param"] == "frobnicate"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}])
    assert info.value.body["param"] == "input.0.content" and info.value.body["code"] == "unsupported_content"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-nope", input="hi")


def test_schemas_the_grammar_cannot_honour_are_400s_at_this_apis_paths(client):
    odd = {"type": "object", "properties": {"a": {"type": "string", "format": "frobnicate-format"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}, dict(WEATHER, parameters=odd)])
    assert info.value.body["param"] == "tools.1.parameters" and "frobnicate" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input="hi", text={"format": {"type": "json_schema", "name": "x",
                                                                          "schema": odd}})
    assert info.value.body["param"] == "text.format.schema" and info.value.body["code"] == "invalid_schema"


# -- function calls ---------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_required_tool_choice_gives_valid_calls_at_temperature_one(client, stream):
    for _ in range(3):
        reply = ask(client, stream, model=MODEL, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                    temperature=1.0, max_output_tokens=60, parallel_tool_calls=False)
        assert reply["status"] == "completed"
        (call,) = calls_of(reply)
        assert call["id"].startswith("fc_") and call["call_id"].startswith("call_") and call["status"] == "completed"
        assert call["name"] == "get_weather"
        _validate_weather(call["arguments"])
        assert not text_of(reply).strip()
        if stream:  # arguments arrive while they are generated, not in one piece at the end
            assert reply["fragments"][reply["output"].index(call)] > 1
    assert reply["tool_choice"] == "required" and reply["tools"][0]["name"] == "get_weather"
    assert reply["parallel_tool_calls"] is False


@pytest.mark.parametrize("stream", BOTH)
def test_a_function_call_and_its_output_continue_the_conversation(client, stream):
    items = [{"role": "user", "content": ASK_WEATHER},
             {"type": "function_call", "call_id": "call_abc", "name": "get_weather",
              "arguments": "{\"city\": \"Paris\", \"days\": 3}"},
             {"type": "function_call_output", "call_id": "call_abc", "output": "{\"forecast\": \"sunny, 24 C\"}"}]
    reply = ask(client, stream, model=MODEL, input=items, tools=[WEATHER], tool_choice="none", temperature=0,
                max_output_tokens=12)
    assert text_of(reply) and not calls_of(reply)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=MODEL, input=items[:1] + items[2:], max_output_tokens=4)
    assert info.value.body["param"] == "input.1.call_id"


@pytest.mark.parametrize("stream", BOTH)
def test_a_namespace_offers_its_functions_and_their_calls_name_it(client, stream):
    """Codex CLI groups tools so ({"type": "namespace", ...}); a call comes back with its namespace,
    and goes back as input (Codex's stateless loop) with it."""
    tools = [{"type": "namespace", "name": "forecasts", "description": "Weather services", "tools": [WEATHER]},
             {"type": "web_search"}]
    reply = ask(client, stream, model=MODEL, input=ASK_WEATHER, tools=tools, tool_choice="required", temperature=0,
                parallel_tool_calls=False, max_output_tokens=60, store=False)
    (call,) = calls_of(reply)
    assert (call["name"], call["namespace"]) == ("get_weather", "forecasts")
    _validate_weather(call["arguments"])
    assert [t["type"] for t in reply["tools"]] == ["namespace"]  # web_search is OpenAI's
    assert reply["tools"][0]["tools"][0]["name"] == "get_weather"
    replayed = {k: call[k] for k in ("type", "status", "id", "name", "namespace", "arguments", "call_id")}  # as Codex
    items = [{"role": "user", "content": ASK_WEATHER}, replayed,
             {"type": "function_call_output", "call_id": call["call_id"], "output": "sunny"}]
    after = ask(client, stream, model=MODEL, input=items, tools=tools, temperature=0, max_output_tokens=8, store=False)
    assert after["status"] in ("completed", "incomplete")
    assert after["usage"]["input_tokens"] > reply["usage"]["input_tokens"]


def test_a_codex_request_as_sent_is_answered(server):
    """Codex CLI 0.171's fields (max_output_tokens added, to keep it short): a 200 stream, not a 400."""
    body = {"model": MODEL, "stream": True, "tool_choice": "auto", "parallel_tool_calls": True,
            "reasoning": {"summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "0199a213-81c0-7800-8aa1-bbab2a035a53", "max_output_tokens": 8,
            "client_metadata": {"x-codex-installation-id": "5c2f", "session_id": "0199a213"},
            "input": [{"type": "message", "id": "msg_1", "role": "developer",
                       "content": [{"type": "input_text", "text": "You are a coding agent running in the Codex CLI."}]},
                      {"type": "message", "id": "msg_2", "role": "user",
                       "content": [{"type": "input_text", "text": "Say hello"}]}],
            "tools": [dict(WEATHER, strict=False),
                      {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [
                          {"type": "function", "name": "close_agent", "description": "Close an agent.", "strict": False,
                           "parameters": {"type": "object", "properties": {"target": {"type": "string"}},
                                          "required": ["target"], "additionalProperties": False}}]},
                      {"type": "web_search", "external_web_access": False}]}
    with requests.post(server.base_url + "/v1/responses", json=body, stream=True, timeout=120,
                       headers={"Authorization": "Bearer key-a", "Accept": "text/event-stream"}) as http:
        assert http.status_code == 200, http.text
        text = http.text
    last = json.loads(text.rstrip().rsplit("\ndata: ", 1)[1])
    assert last["type"] in ("response.completed", "response.incomplete")
    assert last["response"]["store"] is False
    assert [t["type"] for t in last["response"]["tools"]] == ["function", "namespace"]


def test_a_response_replayed_as_input_continues_statelessly(client):
    """The stateless pattern: the last response's output items go back as input, with the call's output."""
    first = client.responses.create(model=MODEL, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                    temperature=0, max_output_tokens=60, store=False)
    call = next(item for item in first.output if item.type == "function_call")
    items = [{"role": "user", "content": ASK_WEATHER}, *first.output,
             {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}]
    reply = client.responses.create(model=MODEL, input=items, tools=[WEATHER], temperature=0, max_output_tokens=8)
    assert reply.status in ("completed", "incomplete") and reply.usage.input_tokens > first.usage.input_tokens


def test_a_function_call_output_answers_the_previous_responses_call(client):
    """The stateful agent loop: only the call's output goes back, with previous_response_id."""
    first = client.responses.create(model=MODEL, input=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
                                    parallel_tool_calls=False, temperature=0, max_output_tokens=60)
    (call,) = [item for item in first.output if item.type == "function_call"]
    reply = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[WEATHER], temperature=0,
                                    max_output_tokens=8, input=[{"type": "function_call_output",
                                                                 "call_id": call.call_id, "output": "sunny"}])
    assert reply.status in ("completed", "incomplete") and reply.usage.input_tokens > first.usage.input_tokens


def test_the_stream_helper_builds_the_final_response(client):
    with client.responses.stream(model=MODEL, input=ASK_WEATHER, tools=[dict(WEATHER, strict=True)],
                                 tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
                                 max_output_tokens=60) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    (call,) = [item for item in final.output if item.type == "function_call"]
    _validate_weather(call.arguments)
    assert call.parsed_arguments == json.loads(call.arguments)  # strict tools are parsed by the SDK


# -- structured output ------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_a_json_schema_format_gives_valid_json(client, stream):
    reply = ask(client, stream, model=MODEL, input="Invent a club member.", temperature=1.0, max_output_tokens=120,
                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}})
    assert reply["status"] == "completed"
    person = json.loads(text_of(reply))
    assert set(person) == {"name", "age"} and len(person["name"]) <= 16 and 0 <= person["age"] <= 120
    assert reply["text"]["format"]["type"] == "json_schema" and reply["text"]["format"]["name"] == "person"


# -- stored responses -------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_previous_response_id_continues_a_stored_conversation(client, other_client, stream):
    first = ask(client, stream, model=MODEL, input="My name is Ada.", instructions="Be brief.", max_output_tokens=6,
                temperature=0)
    second = ask(client, stream, model=MODEL, input="What is my name?", previous_response_id=first["id"],
                 max_output_tokens=6, temperature=0)
    alone = ask(client, stream, model=MODEL, input="What is my name?", max_output_tokens=6, temperature=0)
    assert second["previous_response_id"] == first["id"] and second["store"] is True
    assert second["usage"]["input_tokens"] > alone["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    stored = client.responses.retrieve(second["id"]).model_dump()
    assert stored == {k: v for k, v in second.items() if k not in ("fragments", "streamed")}
    with pytest.raises(openai.NotFoundError):  # another key's responses are not there
        other_client.responses.retrieve(second["id"])
    with pytest.raises(openai.NotFoundError) as info:
        other_client.responses.create(model=MODEL, input="hi", previous_response_id=first["id"])
    assert info.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize("stream", BOTH)
def test_store_false_keeps_nothing(client, stream):
    reply = ask(client, stream, model=MODEL, input="Hi.", max_output_tokens=2, store=False)
    assert reply["store"] is False
    with pytest.raises(openai.NotFoundError) as info:
        client.responses.retrieve(reply["id"])
    assert info.value.body["code"] == "response_not_found"


@pytest.mark.parametrize("stream", BOTH)
def test_an_unknown_previous_response_id_is_a_404(client, stream):
    with pytest.raises(openai.NotFoundError) as info:
        ask(client, stream, model=MODEL, input="Hi.", previous_response_id="resp_unknown", max_output_tokens=2)
    assert info.value.body["param"] == "previous_response_id"


def test_delete_removes_a_stored_response(client):
    reply = client.responses.create(model=MODEL, input="Hi.", max_output_tokens=2)
    assert client.responses.retrieve(reply.id).id == reply.id
    client.responses.delete(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(reply.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(reply.id)


# -- hosted tools, raw events -----------------------------------------------------------------------
@pytest.mark.parametrize("stream", BOTH)
def test_hosted_tool_types_are_ignored(client, stream):
    bare = ask(client, stream, model=MODEL, input="Hi.", max_output_tokens=2, temperature=0)
    reply = ask(client, stream, model=MODEL, input="Hi.", max_output_tokens=2, temperature=0,
                tools=[{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}])
    assert reply["usage"]["input_tokens"] == bare["usage"]["input_tokens"] and reply["tools"] == []
    assert text_of(reply) == text_of(bare)


def test_raw_events_of_a_streamed_function_call(server):
    body = {"model": MODEL, "input": ASK_WEATHER, "tools": [WEATHER], "tool_choice": "required", "stream": True,
            "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 60}
    with requests.post(server.base_url + "/v1/responses", json=body, stream=True, timeout=120,
                       headers={"Authorization": "Bearer key-a"}) as http:
        assert http.status_code == 200 and http.headers["Content-Type"].startswith("text/event-stream")
        blocks = [b for b in http.text.split("\n\n") if b.strip() and not b.startswith(":")]
    events = []
    for block in blocks:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        payload = json.loads(data[len("data: "):])
        assert payload["type"] == name[len("event: "):]
        events.append(payload)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.function_call_arguments.delta")
    assert deltas > 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                    *["response.function_call_arguments.delta"] * deltas,
                                    "response.function_call_arguments.done", "response.output_item.done",
                                    "response.completed"]
    added, done = events[2], events[-2]
    assert added["item"]["type"] == "function_call" and added["item"]["arguments"] == ""
    assert done["item"]["id"] == added["item"]["id"] and done["item"]["status"] == "completed"
    assert "".join(e["delta"] for e in events if "arguments.delta" in e["type"]) == done["item"]["arguments"]
    assert events[-1]["response"]["output"] == [done["item"]]
