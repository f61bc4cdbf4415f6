"""Request model of OpenAI's legacy completions, validated strictly like the chat request."""
from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import Field, field_validator, model_validator

from app.api.chat.protocol import MAX_STOP_SEQUENCES, StreamOptions, TokenBias, _Strict
from engine.sampling import SamplingParams

MAX_PROMPTS = 64
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenList = Annotated[list[TokenId], Field(min_length=1, max_length=1_000_000)]
Prompt = Union[str, Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)], TokenList,
               Annotated[list[TokenList], Field(min_length=1, max_length=MAX_PROMPTS)]]


class CompletionRequest(_Strict):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: Prompt
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = 16  # OpenAI's default; 0 only with echo
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    n: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    best_of: Optional[Annotated[int, Field(ge=1, le=128)]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    logprobs: Optional[Annotated[int, Field(ge=0, le=5)]] = None
    echo: Optional[bool] = False
    stop: Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    seed: Optional[Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=-2.0, le=2.0)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2.0, le=2.0)]] = None
    logit_bias: Optional[Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], TokenBias], Field(max_length=1024)]] = None
    suffix: Optional[str] = None
    user: Optional[Annotated[str, Field(max_length=256)]] = None
    # Extensions, as on the chat endpoint.
    top_k: Optional[Annotated[int, Field(ge=0, le=1_000_000)]] = None
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, le=2.0)]] = None
    ignore_eos: bool = False

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

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0, min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed % (2**32),
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items())),
        )
