"""Request and response of OpenAI's embeddings API, without HTTP or the engine.

`input` is told apart by its JSON shape (a callable discriminator), so a bad input gets one
precise error ("input.1.0: should be >= 0") instead of one error per union member.
"""
from __future__ import annotations

import base64
from typing import Annotated, Callable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from app.errors import bad_request

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Text = Annotated[str, Field(min_length=1)]
TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]
INPUT_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"


def _input_form(value) -> Optional[str]:
    """The union member a JSON value is meant as, by its shape; tags are capitalized so that
    app.errors leaves them out of `param`."""
    if isinstance(value, str):
        return "Text"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, list):
        return "TokenLists"
    return "Tokens" if isinstance(first, (int, float)) else "Texts"


Input = Annotated[
    Union[Annotated[Text, Tag("Text")],
          Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS), Tag("Texts")],
          Annotated[TokenList, Tag("Tokens")],
          Annotated[list[TokenList], Field(min_length=1, max_length=MAX_INPUTS), Tag("TokenLists")]],
    Discriminator(_input_form, custom_error_type="invalid_input", custom_error_message=f"input must be {INPUT_FORMS}"),
]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[Annotated[int, Field(ge=1)]] = None
    user: Optional[Annotated[str, Field(max_length=256)]] = None

    def token_inputs(self, tokenize: Callable[[str], list[int]]) -> list[list[int]]:
        """Each input as token ids: strings through `tokenize`, token ids as they are."""
        items = [self.input] if isinstance(self.input, str) or isinstance(self.input[0], int) else self.input
        inputs = [tokenize(item) if isinstance(item, str) else list(item) for item in items]
        for index, ids in enumerate(inputs):
            if not ids:  # a non-empty string a tokenizer turns into nothing
                raise bad_request(f"Input {index} has no tokens", param="input", code="invalid_value")
        return inputs


def check_dimensions(dimensions: Optional[int], model_dimensions: int, *, truncatable: bool = True) -> None:
    """Before any work: `dimensions` must fit the model (and the model must allow truncation)."""
    if dimensions is None or dimensions == model_dimensions:
        return
    if not truncatable:
        raise bad_request("This model does not support specifying dimensions", param="dimensions",
                          code="invalid_value")
    if dimensions > model_dimensions:
        raise bad_request(f"dimensions={dimensions} exceeds this model's {model_dimensions} dimensions",
                          param="dimensions", code="invalid_value")


def embedding_response(model: str, vectors: list[np.ndarray], prompt_tokens: int, encoding_format: str,
                       dimensions: Optional[int], normalize: bool) -> dict:
    """OpenAI's response body; base64 is little-endian float32 bytes, as its clients decode."""
    data = [{"object": "embedding", "index": index,
             "embedding": _encode(_shorten(vector, dimensions, normalize), encoding_format)}
            for index, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _shorten(vector: np.ndarray, dimensions: Optional[int], normalize: bool) -> np.ndarray:
    """The first `dimensions` components (Matryoshka), unit length again where the model normalizes."""
    vector = np.asarray(vector, dtype=np.float32)
    if dimensions is None or dimensions == vector.shape[0]:
        return vector
    check_dimensions(dimensions, vector.shape[0])
    vector = vector[:dimensions]
    return vector / max(float(np.linalg.norm(vector)), 1e-12) if normalize else vector


def _encode(vector: np.ndarray, encoding_format: str) -> Union[list[float], str]:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
