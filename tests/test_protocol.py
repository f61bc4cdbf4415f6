"""Request validation and conversion, without HTTP."""
import pytest
from pydantic import ValidationError

from app.errors import from_validation
from app.protocol import ChatCompletionRequest

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
    ({"n": 2}, "n"),
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
    assert req.template_messages() == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]


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
