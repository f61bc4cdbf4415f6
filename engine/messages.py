"""Typed messages that cross the boundary between request greenlets and the engine thread.

Inbox (greenlet -> engine): AddRequest, AbortRequest, AbortAll, Shutdown, InjectFault.
Outbox (engine -> greenlet): Admitted, TokenDelta per step, then exactly one Finished.
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
    # Extra stop token ids beyond the model's EOS set (e.g. from a grammar).
    stop_token_ids: tuple[int, ...] = ()
    # Generate through EOS (benchmarks that need fixed work per request).
    ignore_eos: bool = False
    # Prefix-cache partition: requests only reuse state left by requests of the same scope.
    cache_scope: str = ""


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
class InjectFault:
    """Resilience tests only (FAULT_INJECTION=true): 'step' fails the next step,
    'loop' kills the engine loop itself."""

    kind: str


@dataclass(frozen=True)
class Admitted:
    """The request left the queue and joined the batch."""

    cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed


@dataclass
class TokenDelta:
    """New tokens for one request from one engine step."""

    token_ids: list[int]


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
    error_type: Optional[str] = None
    cached_tokens: int = 0
