"""Request model of OpenAI's legacy completions, validated strictly like the chat request."""
from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import Field, field_validator, model_validator

from app.api.sampling_fields import SamplingFields

MAX_PROMPTS = 64
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenList,
               Annotated[list[TokenList], Field(min_length=1, max_length=MAX_PROMPTS)]]


class CompletionRequest(SamplingFields):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: Prompt
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = 16  # OpenAI's default; 0 only with echo
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    best_of: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    user: Optional[Annotated[str, Field(max_length=256)]] = None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:  # insertion needs a fill-in-the-middle model and prompt format
            raise ValueError("suffix (insertion) is not supported by this server")
        return value

    @model_validator(mode="after")
    def _consistent(self):
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValueError("best_of must equal n: this server returns every generated choice")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens=0 is only meaningful with echo (to score the prompt)")
        return self


    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
