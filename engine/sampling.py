"""Sampling parameters and the per-request samplers and logits processors built from them.

Unseeded requests with equal parameters share one sampler object, because
mlx-lm's BatchGenerator samples a whole batch in one call only when every row
holds the same sampler. A seeded request gets its own sampler with its own
PRNG key, so its output does not depend on what else is in the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

Sampler = Callable


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off (multiplicative, over the last REPETITION_WINDOW tokens)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])

    def __post_init__(self):
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError("min_p must be in [0, 1]")
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError("repetition_penalty must be in (0, 2]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        if any(not -100.0 <= bias <= 100.0 for _, bias in self.logit_bias):
            raise ValueError("logit_bias values must be in [-100, 100]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_seed(self, seed: Optional[int]) -> "SamplingParams":
        return replace(self, seed=seed)


REPETITION_WINDOW = 64  # tokens the repetition penalty looks back over (prompt included, as llama.cpp)


class SamplerFactory:
    """Builds samplers; caches shared ones by parameters. Engine thread only."""

    def __init__(self):
        self._shared: dict[tuple, Sampler] = {}

    def sampler(self, params: SamplingParams) -> Sampler:
        from mlx_lm.sample_utils import greedy_sampler, make_sampler

        if params.greedy:
            return greedy_sampler
        if params.seed is not None:
            return _seeded_sampler(params)
        key = (params.temperature, params.top_p, params.top_k, params.min_p)
        if key not in self._shared:
            self._shared[key] = make_sampler(temp=params.temperature, top_p=_top_p(params),
                                             min_p=params.min_p, top_k=params.top_k)
        return self._shared[key]

    @staticmethod
    def logits_processors(params: SamplingParams, max_tokens: int) -> list:
        if not (params.presence_penalty or params.frequency_penalty or params.logit_bias
                or params.repetition_penalty != 1.0):
            return []
        from mlx_lm.sample_utils import make_logits_processors

        # OpenAI's penalties cover every generated token, so the window is the whole output.
        return make_logits_processors(
            logit_bias=dict(params.logit_bias) or None,
            repetition_penalty=None if params.repetition_penalty == 1.0 else params.repetition_penalty,
            repetition_context_size=REPETITION_WINDOW,
            presence_penalty=params.presence_penalty or None,
            presence_context_size=max_tokens,
            frequency_penalty=params.frequency_penalty or None,
            frequency_context_size=max_tokens,
        )


def _top_p(params: SamplingParams) -> float:
    return 0.0 if params.top_p >= 1.0 else params.top_p


def _seeded_sampler(params: SamplingParams) -> Sampler:
    """The same filter chain as mlx-lm's make_sampler, drawing from this request's own key."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    state = {"key": mx.random.key(params.seed)}
    top_p = _top_p(params)

    def sample(logprobs):
        state["key"], step_key = mx.random.split(state["key"])
        if top_p:
            logprobs = apply_top_p(logprobs, top_p)
        if params.min_p:
            logprobs = apply_min_p(logprobs, params.min_p)
        if params.top_k:
            logprobs = apply_top_k(logprobs, params.top_k)
        return mx.random.categorical(logprobs * (1 / params.temperature), key=step_key)

    return sample
