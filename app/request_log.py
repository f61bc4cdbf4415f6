"""Request ids and structured logs.

Every response carries X-Request-Id (the client's own if it sent a sane one).
Logs are JSON lines; prompt text never appears unless LOG_PROMPTS is on, and
everything user-supplied is JSON-escaped, so CR/LF cannot forge log lines.
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid

from flask import Flask, g, request

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
access_log = logging.getLogger("orchard.access")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(level: str) -> None:
    logger = logging.getLogger("orchard")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.Formatter.converter = time.gmtime
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def install(app: Flask) -> None:
    @app.before_request
    def _assign_id():
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _tag_and_log(response):
        request_id = getattr(g, "request_id", None) or uuid.uuid4().hex
        response.headers["X-Request-Id"] = request_id
        for key, value in getattr(g, "rate_limit_headers", {}).items():
            response.headers[key] = value
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        if route not in ("/health", "/metrics"):
            access_log.info("request", extra={"fields": {
                "request_id": request_id, "method": request.method, "route": route, "path": request.path[:256],
                "status": response.status_code, "client": getattr(g, "client_id", None),
                "latency_ms": round((time.perf_counter() - getattr(g, "started", time.perf_counter())) * 1000, 1)}})
        return response


def log_completion(request_id: str, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                   latency_s: float, prompt_text: str | None = None, cached_tokens: int = 0,
                   model: str | None = None) -> None:
    fields = {"request_id": request_id, "model": model, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
              "cached_tokens": cached_tokens, "completion_tokens": completion_tokens, "latency_ms": round(latency_s * 1000, 1)}
    if prompt_text is not None:
        fields["prompt"] = prompt_text
    access_log.info("completion", extra={"fields": fields})
