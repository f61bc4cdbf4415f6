"""DNS-rebinding guard: a server without API keys answers only requests addressed to a loopback
name (or one the operator listed in ALLOWED_HOSTS).

A web page whose name rebinds to 127.0.0.1 can make a browser send requests to a keyless local
server; the browser still sends the page's own name in `Host` (the hole Ollama had,
CVE-2024-28224). Keys close it anyway, so with keys on every Host is accepted as before.
"""
from __future__ import annotations

from flask import Flask, request

from app.errors import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(host_header: str) -> str:
    """The name in a Host header, without port or IPv6 brackets, lower case."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8001
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def allowed(host_header: str, extra: tuple[str, ...]) -> bool:
    name = host_name(host_header)
    return name in LOOPBACK_NAMES or name in extra or (name.startswith("127.") and name.count(".") == 3
                                                       and name.replace(".", "").isdigit())


def accepted_names(settings) -> tuple[str, ...]:
    """ALLOWED_HOSTS, plus the address the server binds to (an IP literal is never a rebound name:
    the watchdog scripts probe /health at HOST)."""
    bind = host_name(settings.host)
    wildcard = bind in ("", "0.0.0.0", "::")
    return settings.hosts() + (() if wildcard else (bind,))


def install(app: Flask, keys_on: bool, extra: tuple[str, ...]) -> None:
    if keys_on:
        return

    @app.before_request
    def _check_host():
        host = request.headers.get("Host", "")
        if not allowed(host, extra):
            raise APIError(403, f"This server answers only requests to localhost (Host {host_name(host)[:100]!r} "
                                f"refused); the operator can list more names in ALLOWED_HOSTS",
                           type="permission_error", code="host_not_allowed")
