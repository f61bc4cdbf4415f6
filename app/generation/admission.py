"""Admission checks every API runs before any work is queued: the context window, max_tokens,
KV-cache memory, queue capacity and the per-key token budget."""
from __future__ import annotations

from typing import Optional

from app.errors import APIError, bad_request, overloaded
from app.rate_limit import RateLimiter
from config import Settings
from engine.engine import Engine


class Admission:
    def __init__(self, engine: Engine, settings: Settings, limiter: Optional[RateLimiter] = None):
        self._engine = engine
        self._settings = settings
        self._limiter = limiter

    def resolve_model(self, name: str, param: str = "model") -> str:
        """The id this model answers under. The name was already matched to this model by the
        catalog (app/catalog.py: ids and operator-set aliases only; a request never loads a path)."""
        return self._engine.model.model_id

    def max_tokens(self, asked: Optional[int], param: str, prompt_len: int, prompt_param: str = "messages") -> int:
        """The completion budget: what was asked, checked against the limit and the context."""
        limit, context = self._settings.max_tokens_limit, self._engine.model.context_length
        if asked is not None and asked > limit:
            raise bad_request(f"{param}={asked} exceeds this server's limit of {limit}", param=param)
        room = context - prompt_len
        wanted = asked if asked is not None else min(self._settings.default_max_tokens, max(room, 1))
        if prompt_len + wanted > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the {prompt_param}, {wanted} in the completion). "
                f"Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param, code="context_length_exceeded")
        return wanted

    def cap_tokens(self, asked: int, prompt_len: int) -> int:
        """A completion budget that is a cap, not a demand (Anthropic's max_tokens, Responses'
        max_output_tokens: agents send their hosted model's maximum): what the context, the
        KV-cache budget and MAX_TOKENS_LIMIT leave, if less. At least 1, so that a prompt that
        alone fills the context still gets max_tokens()'s 400."""
        room = [asked, self._engine.model.context_length - prompt_len, self._settings.max_tokens_limit]
        longest = self._engine.longest_alone()
        if longest is not None:
            room.append(longest - prompt_len)
        return max(1, min(room))

    def check_n(self, n: int) -> None:
        if n > self._settings.max_n:
            raise bad_request(f"n={n} exceeds this server's limit of {self._settings.max_n} choices (MAX_N)",
                              param="n", code="invalid_value")

    def check_token_ids(self, ids, param: str) -> None:
        """Token ids a request names (logit_bias keys, token prompts) must exist in the vocabulary:
        the engine's gathers do not check bounds."""
        vocab = self._engine.model.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise bad_request(f"Token id {bad[0]} is outside this model's vocabulary (0..{vocab - 1})",
                              param=param, code="invalid_value")

    def admit(self, prompt_len: int, max_tokens: int, n: int, client: str) -> None:
        """Memory, capacity and rate limit, in that order; raises the API error that applies."""
        self._check_memory(prompt_len + max_tokens)
        capacity = self._engine.max_running + self._settings.request_queue_size
        if self._engine.running + self._engine.waiting + n > capacity:
            raise overloaded(f"The server is at capacity ({capacity} requests running or queued); "
                             f"retry shortly", retry_after=2)
        if self._limiter is not None and self._limiter.enabled:
            self._limiter.charge(client, prompt_len + n * max_tokens)

    def _check_memory(self, max_length: int) -> None:
        if not self._engine.fits_alone(max_length):
            raise APIError(503, f"A request of {max_length} tokens (prompt + max_tokens) needs more KV-cache "
                                f"memory than this server's budget of {self._engine.kv_budget} bytes; lower "
                                f"max_tokens or ask the operator to raise KV_CACHE_BUDGET",
                           type="server_is_overloaded", code="insufficient_memory", headers={"Retry-After": "60"})
