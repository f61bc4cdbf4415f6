"""Per-key request and token limits (unit level; the HTTP path is in test_hardening_e2e)."""
import pytest
from flask import Flask

from app.errors import APIError
from app.rate_limit import RateLimiter


@pytest.fixture
def ctx():
    with Flask("t").test_request_context():
        yield


def test_tokens_are_charged_as_prompt_plus_max_tokens(ctx):
    limiter = RateLimiter(requests_per_minute=0, tokens_per_minute=100)
    headers = limiter.charge("key-a", 60)
    assert headers["x-ratelimit-remaining-tokens"] == "40"
    with pytest.raises(APIError) as info:
        limiter.charge("key-a", 50)
    assert info.value.status == 429 and info.value.type == "rate_limit_error"
    assert 1 <= int(info.value.headers["Retry-After"]) <= 60
    assert limiter.charge("key-a", 40)["x-ratelimit-remaining-tokens"] == "0"  # a refusal cost nothing
    assert limiter.charge("key-b", 100)["x-ratelimit-remaining-tokens"] == "0"  # per key


def test_a_request_larger_than_the_whole_limit_says_so(ctx):
    with pytest.raises(APIError, match="more than the limit"):
        RateLimiter(0, 10).charge("k", 11)


def test_no_limits_means_no_headers(ctx):
    limiter = RateLimiter(0, 0)
    assert not limiter.enabled


def test_without_limits_nothing_is_charged_and_no_storage_timer_starts(ctx):
    import threading

    before = threading.active_count()
    limiter = RateLimiter(0, 0)
    assert not limiter.enabled and limiter.charge("k", 10**9) == {}
    assert threading.active_count() == before  # MemoryStorage would start its expiry timer
