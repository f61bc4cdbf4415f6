"""Typed messages that cross the boundary between request greenlets and the engine thread.

Inbox (greenlet -> engine): AddRequest, AddGroup, AbortRequest, AbortAll, Shutdown, InjectFault,
UnloadModel. Each travels with the model engine it is for (engine.host.EngineHost's one inbox).
Outbox (engine -> greenlet): PromptLogprobs (when asked), Admitted, TokenDelta per step (with logprobs
when asked), then exactly one Finished.
Exceptions never cross as raises: they become Finished(error=...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from engine.sampling import SamplingParams


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Generate through EOS (benchmarks that need fixed work per request).
    ignore_eos: bool = False
    # Prefix-cache partition: requests only reuse state left by requests of the same scope.
    cache_scope: str = ""
    # None: no log-probabilities; k >= 0: the sampled token's and the k most likely (k <= 20).
    logprobs: Optional[int] = None
    # An llguidance grammar (JSON text) the output must match; built into a mask on the engine thread.
    grammar: Optional[str] = None
    # None: no prompt log-probabilities; k >= 0: score every prompt token first (k alternatives).
    prompt_logprobs: Optional[int] = None


@dataclass(frozen=True)
class AddGroup:
    """Requests that arrive together (the n choices of one API request): queued in one message,
    so they are admitted in the same step when slots allow, and share one prefill."""

    requests: tuple[AddRequest, ...]


@dataclass(frozen=True)
class AbortRequest:
    request_id: str
    reason: str = "abort"


@dataclass(frozen=True)
class AbortAll:
    """End every queued and running request (the drain budget ran out)."""

    reason: str = "abort"


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class EmbedRequest:
    """Token inputs of one /v1/embeddings request; answered with Embedded, then Finished."""

    request_id: str
    inputs: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Embedded:
    vectors: list  # float32 numpy vectors, one per input, in order


@dataclass(frozen=True)
class UnloadModel:
    """Free an idle model's weights and caches (idle_unload_s ran out on the web side's clock);
    the engine thread checks that it is still idle and not pinned, so a late message is harmless."""


@dataclass(frozen=True)
class InjectFault:
    """Resilience tests only (FAULT_INJECTION=true): 'step' fails the next step,
    'loop' kills the engine loop itself, 'stall' blocks the next step (for an hour)."""

    kind: str


@dataclass(frozen=True)
class Admitted:
    """The request left the queue and joined the batch."""

    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed


@dataclass(frozen=True)
class TokenLogprob:
    """The log-probability of one sampled token, and the `top` most likely (id, logprob) pairs,
    from the distribution it was sampled from (after penalties, logit_bias and a grammar mask)."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of the prompt's tokens (the first is None: nothing precedes it)."""

    entries: list


@dataclass
class TokenDelta:
    """New tokens for one request from one engine step; `logprobs` is aligned with `token_ids`
    when the request asked for them."""

    token_ids: list[int]
    logprobs: Optional[list[TokenLogprob]] = None


@dataclass(frozen=True)
class Finished:
    """The explicit end marker of every request's stream.

    finish_reason: 'stop' (EOS / stop token), 'length', 'abort', or 'error'.
    The stop token itself is not part of the delivered text.
    """

    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    cached_tokens: int = 0
