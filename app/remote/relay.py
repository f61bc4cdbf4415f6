"""Relay an upstream's JSON or SSE body to Orchard's client, with Orchard's model id in it.

Each API names the model in one place per object: the top level (chat, completions,
embeddings), `response` (Responses events) or `message` (Anthropic's message_start).
A stream must end the way its API ends one; anything else is a failure, reported as
that API's error event.
"""
from __future__ import annotations

import json
from typing import Iterable, Iterator

from app.errors import APIError, anthropic_body
from app.sse import SSE_DONE, sse

MESSAGES = "/messages"
RESPONSES = "/responses"
_RESPONSES_END = {"response.completed", "response.failed", "response.incomplete", "error"}
_MESSAGES_END = {"message_stop", "error"}


def rename_model(doc, model_id: str):
    """Orchard's id in every `model` field the API has; the upstream's own name never shows."""
    if isinstance(doc, dict):
        for holder in (doc, doc.get("response"), doc.get("message")):
            if isinstance(holder, dict) and isinstance(holder.get("model"), str):
                holder["model"] = model_id
    return doc


class EventRelay:
    """Turns upstream byte chunks into whole SSE events, rewritten; knows whether the stream ended."""

    def __init__(self, api_path: str, model_id: str):
        self.api_path, self.model_id = api_path, model_id
        self.ended = False
        self._buffer = b""
        self._sequence = 0  # Responses events are numbered; an error event takes the next number

    def feed(self, chunks: Iterable[bytes]) -> Iterator[str]:
        for chunk in chunks:
            self._buffer += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\n\n", 1)
                event = self._event(raw.decode("utf-8", "replace"))
                if event:
                    yield event

    def flush(self) -> str:
        """An event the upstream did not close with a blank line before it hung up."""
        raw, self._buffer = self._buffer, b""
        return self._event(raw.decode("utf-8", "replace"))

    def _event(self, raw: str) -> str:
        lines = []
        for line in raw.split("\n"):
            if line.startswith("data:"):
                line = "data: " + self._data(line[5:].strip())
            lines.append(line)
        return "\n".join(lines) + "\n\n" if raw.strip() else ""

    def _data(self, data: str) -> str:
        if data == "[DONE]":
            self.ended = True
            return data
        try:
            doc = json.loads(data)
        except ValueError:
            return data  # not ours to judge: pass it on as it came
        if isinstance(doc, dict):
            if isinstance(doc.get("sequence_number"), int):
                self._sequence = max(self._sequence, doc["sequence_number"] + 1)
            ends = {RESPONSES: _RESPONSES_END, MESSAGES: _MESSAGES_END}.get(self.api_path, ())
            self.ended = self.ended or doc.get("type") in ends
        return json.dumps(rename_model(doc, self.model_id), ensure_ascii=False, separators=(",", ":"))

    def error_event(self, error: APIError) -> str:
        """One error event in the API's own format; the stream ends after it."""
        if self.api_path == MESSAGES:
            return sse(anthropic_body(error), event="error")
        if self.api_path == RESPONSES:
            return sse({"type": "error", "sequence_number": self._sequence, "code": error.code,
                        "message": error.message, "param": error.param}, event="error")
        return sse(error.body()) + SSE_DONE
