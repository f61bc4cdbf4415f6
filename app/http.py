"""Helpers every API route shares: the JSON body, and the SSE response around an event iterator."""
from __future__ import annotations

from typing import Iterator

from flask import Response, request, stream_with_context
from werkzeug.exceptions import RequestEntityTooLarge

from app.errors import APIError


def json_body() -> bytes:
    """The body of a JSON request, at most MAX_BODY_BYTES.

    Only a JSON content type is accepted: a browser page can send text/plain, form or
    multipart bodies cross-site without a CORS preflight, and must not drive the server.
    Werkzeug refuses a Content-Length over the limit, but cuts a chunked body at the
    limit without a word; a byte past the limit is 413, not a truncated JSON document."""
    if not request.is_json:
        raise APIError(415, f"Unsupported Content-Type {request.mimetype[:100] or '(none)'!r}: send "
                            f"'Content-Type: application/json'", code="unsupported_media_type")
    data = request.get_data(cache=False)
    limit = request.max_content_length
    if (request.content_length is None and limit is not None and len(data) >= limit
            and request.environ["wsgi.input"].read(1)):
        raise RequestEntityTooLarge()
    return data


def sse_response(events: Iterator[str]) -> Response:
    """A streamed text/event-stream response; proxies must not buffer it."""
    return Response(stream_with_context(events), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
