"""What an upstream's failure becomes for Orchard's client: an APIError in Orchard's envelope.

Unreachable -> 502 upstream_unavailable; too slow -> 504 upstream_timeout; full (429/503) ->
UpstreamAtCapacity, which an alias route takes as "try the next target"; the upstream's own
4xx -> the same status with its message; anything else -> 502 upstream_error. A client never
learns the upstream's address, and the key is scrubbed from anything carried over.
"""
from __future__ import annotations

import json
import re

import requests

from app.errors import APIError

DEFAULT_RETRY_AFTER = "1"
_RETRY_AFTER = re.compile(r"\d{1,6}|[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")
_MAX_MESSAGE = 1000


class UpstreamAtCapacity(APIError):
    """The upstream answered 429 or 503: it is full now, and another target may not be."""

    def __init__(self, status: int, message: str, retry_after: str):
        super().__init__(status, message, type="rate_limit_error" if status == 429 else "server_is_overloaded",
                         code="upstream_at_capacity", headers={"Retry-After": retry_after})


def from_exception(exc: requests.RequestException, model_id: str) -> APIError:
    """A request that got no answer: the connection failed, or the upstream was too slow."""
    if _timed_out(exc):
        return APIError(504, f"The upstream server for model '{model_id}' did not answer in time",
                        type="server_error", code="upstream_timeout")
    if isinstance(exc, requests.ConnectionError):
        return APIError(502, f"The upstream server for model '{model_id}' is unreachable; try again later",
                        type="server_error", code="upstream_unavailable")
    return upstream_error(model_id, "the request to it failed")


def midstream(exc: Exception, model_id: str) -> APIError:
    """A stream that broke after its first byte."""
    if _timed_out(exc):
        return from_exception(requests.Timeout(), model_id)
    return upstream_error(model_id, "the stream broke off")


def _timed_out(exc: Exception) -> bool:
    """ConnectTimeout is also a ConnectionError, and requests reports a read timeout during
    iter_content as a ConnectionError wrapping urllib3's ReadTimeoutError."""
    from urllib3.exceptions import TimeoutError as Urllib3Timeout

    return isinstance(exc, (requests.Timeout, Urllib3Timeout, TimeoutError)) or any(
        isinstance(arg, Urllib3Timeout) for arg in getattr(exc, "args", ()))


def upstream_error(model_id: str, what: str) -> APIError:
    return APIError(502, f"The upstream server for model '{model_id}' failed: {what}", type="server_error",
                    code="upstream_error")


def from_status(status: int, headers, body: bytes, model_id: str, secret: str | None) -> APIError:
    """An upstream's non-2xx answer."""
    message, kind, param, code = _their_error(body)
    message = scrub(message, secret)
    if status in (429, 503):
        retry = headers.get("Retry-After", "").strip()
        return UpstreamAtCapacity(status, f"upstream: {message or 'at capacity'}",
                                  retry if _RETRY_AFTER.fullmatch(retry) else DEFAULT_RETRY_AFTER)
    if status in (401, 403):  # Orchard's own key for the upstream is wrong: the operator's problem
        return upstream_error(model_id, f"it refused Orchard's credentials (HTTP {status}); "
                                        f"the operator should check the model's api_key_env")
    if 400 <= status < 500:
        return APIError(status, f"upstream: {message or f'HTTP {status}'}", type=kind or "invalid_request_error",
                        param=param, code=code)
    if 300 <= status < 400:
        return upstream_error(model_id, f"it redirected (HTTP {status}); the operator should set base_url to "
                                        f"the final address")
    return upstream_error(model_id, f"HTTP {status}" + (f": {message}" if message else ""))


def _their_error(body: bytes) -> tuple[str, str | None, str | None, str | None]:
    """(message, type, param, code) from OpenAI's {"error": {...}}, Anthropic's {"type": "error",
    "error": {...}}, or a bare {"error": "..."} / {"message": "..."} / {"detail": "..."}."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:_MAX_MESSAGE], None, None, None
    error = doc.get("error", doc) if isinstance(doc, dict) else doc
    if isinstance(error, dict):
        message = error.get("message") or error.get("detail") or ""
        fields = [error.get(k) for k in ("type", "param", "code")]
        fields = [str(f) if f is not None else None for f in fields]
        return (message if isinstance(message, str) else json.dumps(message))[:_MAX_MESSAGE], *fields
    return str(error)[:_MAX_MESSAGE], None, None, None


def scrub(text: str, secret: str | None) -> str:
    """The upstream may quote the key it was sent (e.g. 'Incorrect API key provided: sk-...')."""
    return text.replace(secret, "***") if secret and text else text
