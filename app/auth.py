"""API-key authentication for every route but the open ones: `Authorization: Bearer <key>`
(OpenAI's clients) or `x-api-key: <key>` (Anthropic's).

The decision uses the endpoint Flask routed to, never the raw path, so `//v1/..`,
`/v1/../v1/..`, percent-encoding, trailing slashes or a hostile Host header cannot
reach a protected view without a key. Unknown routes need a key too (they answer
401, not 404, so they reveal nothing). Keys are compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Optional

from flask import Flask, g, request

from app.errors import APIError

OPEN_ENDPOINTS = {"api.health", "console.page", "console.asset"}


class KeyRing:
    def __init__(self, keys: tuple[str, ...]):
        # Compare digests: equal length, so compare_digest leaks nothing about key lengths.
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def identify(self, presented: str) -> Optional[str]:
        """A stable, non-secret id for a valid key (for rate limits and logs), else None."""
        digest = hashlib.sha256(presented.encode()).digest()
        match = False
        for known in self._digests:
            match |= hmac.compare_digest(digest, known)
        return "key-" + digest.hex()[:12] if match else None


def install(app: Flask, keys: KeyRing, metrics_open: bool) -> None:
    open_endpoints = OPEN_ENDPOINTS | ({"api.metrics"} if metrics_open else set())

    @app.before_request
    def _authenticate():
        g.client_id = request.remote_addr or "anonymous"
        if not keys.enabled or request.endpoint in open_endpoints:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else ""
        presented = presented or request.headers.get("x-api-key", "").strip()  # Anthropic's clients
        client = keys.identify(presented) if presented else None
        if client is None:
            message = ("Missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
                       if not (header or request.headers.get("x-api-key")) else "Incorrect API key provided")
            raise APIError(401, message, type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": 'Bearer realm="orchard"'})
        g.client_id = client
        return None
