"""The embeddings request and response, without HTTP or a model."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from app.api.embeddings.protocol import (MAX_INPUTS, EmbeddingRequest, check_dimensions,
                                         embedding_response)
from app.errors import APIError, from_validation


def parse(**fields) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate_json(json.dumps({"model": "m", **fields}))


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]


@pytest.mark.parametrize("value, expected", [
    ("hi", [[104, 105]]),
    (["hi", "a"], [[104, 105], [97]]),
    ([5, 0, 7], [[5, 0, 7]]),
    ([[5], [1, 2, 3]], [[5], [1, 2, 3]]),
    (["x"] * MAX_INPUTS, [[120]] * MAX_INPUTS),
])
def test_every_input_form_becomes_token_lists(value, expected):
    assert parse(input=value).token_inputs(tokenize) == expected


def test_defaults_and_options():
    req = parse(input="hi")
    assert (req.encoding_format, req.dimensions, req.user) == ("float", None, None)
    req = parse(input="hi", encoding_format="base64", dimensions=8, user="u")
    assert (req.encoding_format, req.dimensions, req.user) == ("base64", 8, "u")


@pytest.mark.parametrize("fields, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [""]}, "input.0"),
    ({"input": ["a", ""]}, "input.1"),
    ({"input": [[]]}, "input.0"),
    ({"input": [[1], []]}, "input.1"),
    ({"input": [1, -2]}, "input.1"),
    ({"input": [[1], [-2]]}, "input.1.0"),
    ({"input": [[1, "a"]]}, "input.0.1"),
    ({"input": ["a", 1]}, "input.1"),
    ({"input": ["a", ["b"]]}, "input.1"),
    ({"input": [1, "a"]}, "input.1"),
    ({"input": [1.5]}, "input.0"),
    ({"input": [True]}, "input.0"),
    ({"input": [2**40]}, "input.0"),
    ({"input": ["a"] * (MAX_INPUTS + 1)}, "input"),
    ({"input": [[1]] * (MAX_INPUTS + 1)}, "input"),
    ({"input": None}, "input"),
    ({"input": 5}, "input"),
    ({"input": {"text": "a"}}, "input"),
    ({}, "input"),
    ({"input": "a", "encoding_format": "float16"}, "encoding_format"),
    ({"input": "a", "dimensions": 0}, "dimensions"),
    ({"input": "a", "dimensions": "8"}, "dimensions"),
    ({"input": "a", "extra": 1}, "extra"),
])
def test_bad_requests_are_400s_naming_the_parameter(fields, param):
    with pytest.raises(ValidationError) as info:
        parse(**fields)
    error = from_validation(info.value)
    assert (error.status, error.param, error.type) == (400, param, "invalid_request_error")


def test_an_input_without_tokens_is_a_400():
    with pytest.raises(APIError) as info:
        parse(input=["a", " "]).token_inputs(lambda text: tokenize(text.strip()))
    assert (info.value.status, info.value.param) == (400, "input") and "Input 1" in info.value.message


def _vectors(count=3, size=16, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, size)).astype(np.float32)
    return list(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))


def test_float_response_has_openais_shape():
    vectors = _vectors()
    body = embedding_response("m", vectors, 7, "float", None, True)
    assert body["object"] == "list" and body["model"] == "m"
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    json.dumps(body)  # plain JSON types only
    for d, v in zip(body["data"], vectors):
        assert np.array_equal(np.array(d["embedding"], dtype=np.float32), v)


def test_base64_round_trips_through_the_openai_client():
    from openai._models import construct_type
    from openai._types import omit
    from openai.lib._parsing._embeddings import parse_embedding_response
    from openai.types import CreateEmbeddingResponse

    vectors = _vectors()
    body = json.loads(json.dumps(embedding_response("m", vectors, 7, "base64", None, True)))
    assert all(isinstance(d["embedding"], str) for d in body["data"])
    # The client asks for base64 when the caller names no format, and decodes it itself.
    parsed = parse_embedding_response(construct_type(type_=CreateEmbeddingResponse, value=body), encoding_format=omit)
    for item, v in zip(parsed.data, vectors):
        assert np.array_equal(np.array(item.embedding, dtype=np.float32), v)
    for d, v in zip(body["data"], vectors):  # little-endian float32, whatever this machine's order
        assert np.array_equal(np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4"), v)


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_dimensions_truncate_then_renormalize(fmt):
    vectors = _vectors()
    body = embedding_response("m", vectors, 1, fmt, 5, True)
    for d, v in zip(body["data"], vectors):
        got = (np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if fmt == "base64"
               else np.array(d["embedding"], dtype=np.float32))
        assert got.shape == (5,) and abs(np.linalg.norm(got) - 1) < 1e-6
        assert np.allclose(got, v[:5] / np.linalg.norm(v[:5]), atol=1e-7)


def test_dimensions_without_normalization_only_truncate():
    vectors = [v * 3 for v in _vectors()]
    body = embedding_response("m", vectors, 1, "float", 4, False)
    for d, v in zip(body["data"], vectors):
        assert np.array_equal(np.array(d["embedding"], dtype=np.float32), v[:4])
    full = embedding_response("m", vectors, 1, "float", 16, False)  # the model's own size: untouched
    assert all(np.array_equal(np.array(d["embedding"], dtype=np.float32), v) for d, v in zip(full["data"], vectors))


@pytest.mark.parametrize("dimensions, model_dimensions, truncatable, ok", [
    (None, 64, True, True), (64, 64, True, True), (1, 64, True, True), (65, 64, True, False),
    (None, 64, False, True), (64, 64, False, True), (32, 64, False, False),
])
def test_check_dimensions(dimensions, model_dimensions, truncatable, ok):
    if ok:
        check_dimensions(dimensions, model_dimensions, truncatable=truncatable)
        return
    with pytest.raises(APIError) as info:
        check_dimensions(dimensions, model_dimensions, truncatable=truncatable)
    assert (info.value.status, info.value.param) == (400, "dimensions")
