"""A model served by another server: Orchard forwards the request, streaming included.

Under Gunicorn's gevent worker `requests` is cooperative (sockets are monkey-patched), and
every wait has a deadline: connect_timeout_s to connect, timeout_s for each read. Errors
before the first byte raise APIError (rendered in the route's envelope by app/errors.py);
after it they become one error event in the API's own format, and the stream ends.
The key is read once from the environment and sent only to the upstream: it is never
logged, never in an error message, a repr or the stats.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import gevent
import requests
from flask import Response, has_request_context, request

from app import disconnect
from app.errors import APIError
from app.remote import failures
from app.remote.relay import MESSAGES, EventRelay, rename_model
from config.models_file import ModelEntry

log = logging.getLogger("orchard.remote")
ANTHROPIC_VERSION = "2023-06-01"
API_PATHS = ("/chat/completions", "/completions", "/responses", "/messages", "/embeddings")


@dataclass
class RemoteStats:
    """Plain counters for /metrics and /status; never the key."""
    requests: int = 0
    in_flight: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by code: upstream_timeout, upstream_at_capacity, ...
    client_disconnects: int = 0
    latency_s_sum: float = 0.0  # time until the upstream's response headers
    latency_s_count: int = 0
    latency_s_max: float = 0.0

    def error(self, code: str | None) -> None:
        self.errors[code or "unknown"] = self.errors.get(code or "unknown", 0) + 1

    def answered(self, seconds: float) -> None:
        self.latency_s_sum += seconds
        self.latency_s_count += 1
        self.latency_s_max = max(self.latency_s_max, seconds)

    def snapshot(self) -> dict:
        return asdict(self)


class RemoteModel:
    """Forwards requests for one `remote` entry of the models file to its upstream."""

    def __init__(self, entry: ModelEntry, env: Mapping[str, str]):
        if entry.remote is None:
            raise ValueError(f"model {entry.id!r} has no remote upstream")
        self.entry, self.spec = entry, entry.remote
        self.stats = RemoteStats()
        self._key = self.spec.api_key(env)
        self._host = urlsplit(self.spec.base_url).netloc
        self._session = requests.Session()
        # gevent imports its DNS resolver on the first lookup: here, at start, not inside the
        # first forwarded request, where the import (a cold disk on CI) blocked the event loop.
        gevent.get_hub().resolver

    def __repr__(self) -> str:
        return f"RemoteModel(id={self.entry.id!r}, base_url={self.spec.base_url!r}, model={self.spec.model!r})"

    def forward(self, api_path: str, body: dict, *, stream: bool, request_id: str) -> Response:
        """Send `body` (with the upstream's model name) to base_url + api_path; the answer carries
        Orchard's model id. Raises APIError (UpstreamAtCapacity for 429/503) before the first byte."""
        if api_path not in API_PATHS:
            raise ValueError(f"not a forwardable API path: {api_path!r}")
        self.stats.requests += 1
        self.stats.in_flight += 1
        started, streaming = time.perf_counter(), False
        try:
            upstream = self._send(api_path, {**body, "model": self.spec.model}, stream, request_id)
            self.stats.answered(time.perf_counter() - started)
            if upstream.status_code >= 300:
                raise failures.from_status(upstream.status_code, upstream.headers, _read_small(upstream),
                                           self.entry.id, self._key)
            if stream and upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                streaming = True  # the stream's close() counts it out
                return self._relay(api_path, upstream, request_id)
            return self._json(upstream)
        except requests.RequestException as exc:
            raise self._failed(failures.from_exception(exc, self.entry.id), request_id, exc) from None
        except APIError as error:
            raise self._failed(error, request_id) from None
        finally:
            self.stats.in_flight -= not streaming

    def _send(self, api_path: str, payload: dict, stream: bool, request_id: str) -> requests.Response:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id, "User-Agent": "orchard",
                   "Accept": "text/event-stream" if stream else "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if api_path == MESSAGES:
            headers["anthropic-version"] = ANTHROPIC_VERSION
            if self._key:
                headers["x-api-key"] = self._key
        # No redirects: one could carry x-api-key to another host.
        return self._session.post(self.spec.base_url + api_path, data=json.dumps(payload), headers=headers,
                                  stream=True, allow_redirects=False,
                                  timeout=(self.spec.connect_timeout_s, self.spec.timeout_s))

    def _json(self, upstream: requests.Response) -> Response:
        try:
            doc = json.loads(upstream.content)
        except ValueError:
            raise failures.upstream_error(self.entry.id, "its answer is not JSON") from None
        finally:
            upstream.close()
        return Response(json.dumps(rename_model(doc, self.entry.id), ensure_ascii=False),
                        status=upstream.status_code, mimetype="application/json")

    def _relay(self, api_path: str, upstream: requests.Response, request_id: str) -> Response:
        stream = _Stream(self, EventRelay(api_path, self.entry.id), upstream, request_id)
        return Response(stream, mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _failed(self, error: APIError, request_id: str, exc: Exception | None = None) -> APIError:
        self.stats.error(error.code)
        log.warning("upstream failed", extra={"fields": {
            "request_id": request_id, "model": self.entry.id, "upstream": self._host, "status": error.status,
            "code": error.code, "detail": failures.scrub(f"{type(exc).__name__}: {exc}"[:500] if exc else error.message,
                                                         self._key)}})
        return error


class _Stream:
    """The relayed SSE body. close() (the WSGI server calls it when the response ends or the
    client leaves, iterated or not) closes the upstream connection and counts the stream out."""

    def __init__(self, model: RemoteModel, relay: EventRelay, upstream: requests.Response, request_id: str):
        self.model, self.relay, self.upstream, self.request_id = model, relay, upstream, request_id
        self.gone = self.closed = self.finished = False
        # A quiet upstream writes nothing for a while: watch the client's socket meanwhile.
        self.watcher = disconnect.watch(request.environ, self._client_gone) if has_request_context() else None

    def __iter__(self) -> Iterator[str]:
        model_id = self.model.entry.id
        try:
            yield from self.relay.feed(self.upstream.iter_content(chunk_size=None))
            if tail := self.relay.flush():
                yield tail
            if not self.relay.ended:
                raise failures.upstream_error(model_id, "it closed the stream before the end")
            self.finished = True
        except Exception as exc:  # after the first byte, every failure is one error event
            if self.gone:  # reading was cut off because the client left: nobody to tell
                return
            error = exc if isinstance(exc, APIError) else failures.midstream(exc, model_id)
            self.finished = True
            yield self.relay.error_event(self.model._failed(error, self.request_id, exc))
        finally:
            self.close()

    def _client_gone(self) -> None:
        self.gone = True
        self.upstream.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.gone = self.gone or not self.finished  # closed before the end: the client left
        disconnect.stop(self.watcher)
        self.upstream.close()
        self.model.stats.in_flight -= 1
        self.model.stats.client_disconnects += self.gone


def _read_small(upstream: requests.Response, limit: int = 64 * 1024) -> bytes:
    """An error body, at most `limit` bytes: enough for a message, never a flood."""
    try:
        data = b""
        for chunk in upstream.iter_content(chunk_size=8192):
            data += chunk
            if len(data) >= limit:
                break
        return data[:limit]
    except requests.RequestException:
        return b""
    finally:
        upstream.close()
