"""Request validation and conversion, without HTTP."""
import pytest
from pydantic import ValidationError

from app.errors import from_validation
from app.api.chat.protocol import ChatCompletionRequest

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(**changes):
    return ChatCompletionRequest.model_validate({**BASE, **changes})


@pytest.mark.parametrize("changes, param", [
    ({"messages": []}, "messages"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "warm"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.1}, "frequency_penalty"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": 123}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"unknown_field": 1}, "unknown_field"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_requests_name_the_parameter(changes, param):
    with pytest.raises(ValidationError) as info:
        parse(**changes)
    error = from_validation(info.value)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(param.split(".")[0])
    assert param.split(".")[-1] in error.param or param in error.message


def test_text_parts_and_developer_role_render_as_messages():
    req = parse(messages=[{"role": "developer", "content": "be brief"},
                          {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    from app.api.chat.serving import _message
    from app.text.chat_prompt import _plain

    assert [_plain(_message(m)) for m in req.messages] == [{"role": "system", "content": "be brief"},
                                                           {"role": "user", "content": "ab"}]


def test_sampling_defaults_follow_openai():
    params = parse().sampling_params()
    assert (params.temperature, params.top_p, params.seed) == (1.0, 1.0, None)
    params = parse(temperature=0, seed=2**40 + 5, max_completion_tokens=7).sampling_params()
    assert params.greedy and params.seed == 5


def test_max_completion_tokens_wins_over_max_tokens_and_stop_normalises():
    req = parse(max_tokens=5, max_completion_tokens=9, stop="END")
    assert req.requested_max_tokens == 9 and req.stop_strings == ["END"]


def test_invalid_json_is_reported_as_json():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(b"{not json")
    assert from_validation(info.value).code == "invalid_json"


def test_extensions_and_logit_bias_become_sampling_params():
    params = parse(temperature=0.7, top_k=40, min_p=0.05, repetition_penalty=1.1, seed=3,
                   logit_bias={"17": -100, "5": 2.5}).sampling_params()
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert params.logit_bias == ((5, 2.5), (17, -100.0))


def test_documented_but_meaningless_fields_are_accepted():
    req = parse(store=True, metadata={"k": "v"}, service_tier="auto", user="u", modalities=["text"],
                prediction={"type": "content", "content": "x"}, parallel_tool_calls=False,
                reasoning_effort="low", prompt_cache_key="k", safety_identifier="s")
    assert req.model == "m"


def test_tool_history_parses():
    req = parse(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": "{\"c\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert req.messages[1].tool_calls[0].function.name == "w" and req.messages[2].tool_call_id == "call_1"
