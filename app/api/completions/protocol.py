"""Request model of OpenAI's legacy completions, validated strictly like the chat request."""
from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import Field, field_validator, model_validator

from app.api.chat.protocol import MAX_STOP_SEQUENCES, StreamOptions
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
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    echo: Optional[bool] = False
    stop: Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    suffix: Optional[str] = None
    user: Optional[Annotated[str, Field(max_length=256)]] = None

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

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

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def prompts(self) -> list[Union[str, list[int]]]:
        """Each prompt as text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)
