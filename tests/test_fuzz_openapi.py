"""Property-based fuzzing (schemathesis) of the app's own OpenAPI document, in-process.

Schemathesis reads /openapi.json from the WSGI app and generates valid and invalid
requests for every operation. Whatever it sends, the server never answers 5xx, and
every 4xx is OpenAI's error envelope. The run is bounded and derandomized, so it is
reproducible and takes well under a minute.
"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from config import load_settings
from tests.engine_harness import running_app

MAX_EXAMPLES = 60
OPERATIONS = ["GET /health", "GET /v1/models", "GET /v1/models/{model_id}", "GET /v1/system/status",
              "POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses",
              "GET /v1/responses/{response_id}", "DELETE /v1/responses/{response_id}", "POST /v1/messages",
              "POST /v1/messages/count_tokens"]
GENERATING = {"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"}


@pytest.fixture(scope="module")
def fuzz_app(tiny_model_dir):
    # MAX_TOKENS_LIMIT keeps every generation short; DEFAULT_MAX_TOKENS may not exceed it.
    settings_ = load_settings({"MODEL": str(tiny_model_dir), "MODEL_ID": "tiny", "MAX_TOKENS_LIMIT": "16",
                               "DEFAULT_MAX_TOKENS": "16", "API_KEYS": ""}, dotenv=False)
    with running_app(settings_) as app:
        yield app


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    config = schemathesis.Config.from_dict({"generation": {"max-examples": MAX_EXAMPLES, "deterministic": True}})
    return schemathesis.openapi.from_wsgi("/openapi.json", fuzz_app, config=config)


def assert_envelope(response, path: str) -> None:
    headers = {key.lower(): values for key, values in response.headers.items()}
    assert headers["content-type"][0].startswith("application/json"), headers
    body = response.json()
    if path.startswith("/v1/messages"):  # Anthropic's clients read Anthropic's envelope
        assert set(body) == {"type", "error"} and body["type"] == "error", body
        assert set(body["error"]) == {"type", "message"} and body["error"]["message"], body
        return
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def for_the_served_model(case):
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    if case.path_parameters and "model_id" in case.path_parameters:
        case.path_parameters["model_id"] = "tiny"
    return case


SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "seed", "stream", "stop", "presence_penalty")


def plain_chat(case):
    """A generated valid request cut down to a plain chat turn plus its sampling fields: most full
    valid requests combine options whose cross-field rules (tool_choice needs tools, a tool message
    answers a call, n <= MAX_N, ...) the schema cannot state, so they rightly end in a 400."""
    case = for_the_served_model(case)
    if isinstance(case.body, dict) and "model" in case.body:
        kept = {k: case.body[k] for k in SAMPLING_FIELDS if k in case.body}
        case.body = {"model": "tiny", **kept, **_plain_turn(case)}
    return case


def _plain_turn(case) -> dict:
    path = case.operation.path
    if path == "/v1/completions":
        return {"prompt": "hi"}
    if path == "/v1/responses":
        return {"input": "hi"}
    turn = {"messages": [{"role": "user", "content": "hi"}]}
    return dict(turn, max_tokens=4) if path.startswith("/v1/messages") and path != "/v1/messages/count_tokens" else turn


def test_every_operation_in_the_document_is_fuzzed(api_schema):
    documented = {f"{method.upper()} {path}" for path, methods in api_schema.raw_schema["paths"].items()
                  for method in methods}
    assert documented == set(OPERATIONS)


# schemathesis.pytest.from_fixture(...).parametrize() needs a fixture-built schema, but in 4.32
# it reads pytest's private `node._nodeid`, which pytest 9 no longer has; so each operation's
# schemathesis strategy (valid and invalid requests) drives Hypothesis directly.
@pytest.mark.parametrize("label", OPERATIONS)
def test_no_server_errors_and_every_client_error_is_an_envelope(api_schema, label):
    method, path = label.split()
    operation = api_schema[path][method]
    valid = operation.as_strategy(GenerationMode.POSITIVE)
    # Valid requests name some random model (404); as many again name the served one, and as many
    # again are cut down to a plain turn, so the fuzz reaches the template, the tokenizer and the
    # engine too.
    cases = st.one_of(valid, valid.map(for_the_served_model), valid.map(plain_chat),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    statuses: dict[int, int] = {}

    @given(case=cases)
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        response = case.call()
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error])
        assert response.status_code < 500, response.text
        if 400 <= response.status_code < 500:
            assert_envelope(response, path)

    run()
    print(f"{label}: statuses {dict(sorted(statuses.items()))}")
    if path in GENERATING:
        assert statuses.get(200), f"no generated request reached the engine: {statuses}"
