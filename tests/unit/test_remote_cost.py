"""What a request forwarded to a remote model costs against the per-key token budget."""
import json

from app.state import remote_cost


def test_prompt_bytes_over_four_plus_the_completion_asked_for():
    body = {"model": "big", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    raw = json.dumps(body).encode()
    assert remote_cost(raw, body, 1024) == len(raw) // 4 + 50


def test_each_api_names_its_completion_budget():
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        assert remote_cost(b"{}", {key: 7}, 1024) == 7


def test_the_server_default_when_none_is_asked():
    assert remote_cost(b"{}", {}, 1024) == 1024
