"""Server-sent events: one JSON payload per event, the end marker, the keep-alive comment."""
from __future__ import annotations

import json

SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"


def sse(payload: dict, event: str | None = None) -> str:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n" if event else f"data: {data}\n\n"
