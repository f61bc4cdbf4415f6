"""The fields OpenAI's chat and legacy completions share (sampling, stop, streaming), their
checks, and their conversion to the engine's SamplingParams: one place for both endpoints."""
from __future__ import annotations

from typing import Annotated, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.sampling import SamplingParams

TokenBias = Annotated[float, Field(ge=-100.0, le=100.0)]
MAX_STOP_SEQUENCES = 4


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False
    include_obfuscation: Optional[bool] = None  # OpenAI's padding against length side channels: not needed locally


class SamplingFields(StrictModel):
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    temperature: Optional[Annotated[float, Field(ge=0.0, le=2.0)]] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    seed: Optional[Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]] = None
    presence_penalty: Optional[Annotated[float, Field(ge=-2.0, le=2.0)]] = None
    frequency_penalty: Optional[Annotated[float, Field(ge=-2.0, le=2.0)]] = None
    logit_bias: Optional[Annotated[dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], TokenBias], Field(max_length=1024)]] = None
    # Extensions most local servers accept (vLLM, llama.cpp, mlx_lm.server).
    top_k: Optional[Annotated[int, Field(ge=0, le=1_000_000)]] = None
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0.0, le=2.0)]] = None
    # Extension (as in vLLM): keep generating through EOS, so benchmarks do fixed work.
    ignore_eos: bool = False

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value, info):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=None if self.seed is None else self.seed % (2**32),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple(sorted((int(k), float(v)) for k, v in (self.logit_bias or {}).items())),
        )

    def logit_bias_ids(self) -> list[int]:
        return [int(k) for k in self.logit_bias or {}]
