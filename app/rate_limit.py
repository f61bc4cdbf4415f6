"""Per-key request and token rate limits (the `limits` library, moving windows of one minute).

Tokens are charged at admission as prompt + max_tokens, the worst case, as OpenAI
does; a refused request is charged nothing. Responses carry OpenAI's
x-ratelimit-* headers.
"""
from __future__ import annotations

import math
import time

from flask import g
from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from app.errors import APIError


class RateLimiter:
    def __init__(self, requests_per_minute: int, tokens_per_minute: int):
        # Built only when a limit is set: MemoryStorage starts an expiry timer thread (a
        # greenlet under gevent) that a server without limits has no use for.
        self._limiter = MovingWindowRateLimiter(MemoryStorage()) if requests_per_minute or tokens_per_minute else None
        self._requests = RateLimitItemPerMinute(requests_per_minute) if requests_per_minute else None
        self._tokens = RateLimitItemPerMinute(tokens_per_minute) if tokens_per_minute else None

    @property
    def enabled(self) -> bool:
        return bool(self._requests or self._tokens)

    def charge(self, client: str, tokens: int) -> dict:
        """Take one request and `tokens` from the client's budget, or raise 429."""
        headers: dict = {}
        for kind, item, cost in (("requests", self._requests, 1), ("tokens", self._tokens, tokens)):
            if item is None:
                continue
            if cost > item.amount:
                raise APIError(429, f"This request needs {cost} {kind}, more than the limit of {item.amount} "
                                    f"per minute", type="rate_limit_error", code="rate_limit_exceeded")
            if not self._limiter.test(item, client, cost=cost):
                raise self._refusal(kind, item, client)
        for kind, item, cost in (("requests", self._requests, 1), ("tokens", self._tokens, tokens)):
            if item is not None:
                self._limiter.hit(item, client, cost=cost)
                headers.update(self._headers(kind, item, client))
        g.rate_limit_headers = headers
        return headers

    def _headers(self, kind: str, item, client: str) -> dict:
        stats = self._limiter.get_window_stats(item, client)
        reset = max(0.0, stats.reset_time - time.time())
        return {f"x-ratelimit-limit-{kind}": str(item.amount),
                f"x-ratelimit-remaining-{kind}": str(stats.remaining),
                f"x-ratelimit-reset-{kind}": f"{reset:.3f}s"}

    def _refusal(self, kind: str, item, client: str) -> APIError:
        headers = self._headers(kind, item, client)
        retry = min(60, max(1, math.ceil(float(headers[f"x-ratelimit-reset-{kind}"][:-1]))))
        headers["Retry-After"] = str(retry)
        return APIError(429, f"Rate limit reached for {kind}: {item.amount} per minute. Try again in {retry} s.",
                        type="rate_limit_error", code="rate_limit_exceeded", headers=headers)
