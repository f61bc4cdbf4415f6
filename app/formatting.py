"""OpenAI response bodies as plain dicts: testable without HTTP."""
from __future__ import annotations

import json
from typing import Optional


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def chat_completion(completion_id: str, created: int, model: str, text: str,
                    finish_reason: str, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int = 0) -> dict:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


class ChunkWriter:
    """Serialises chat.completion.chunk events of one stream, sharing id/created/model."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool):
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                      "model": model, "system_fingerprint": None}
        self._include_usage = include_usage

    def delta(self, content: Optional[str] = None, *, role: bool = False,
              finish_reason: Optional[str] = None) -> str:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        chunk = dict(self._head, choices=[{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish_reason}])
        if self._include_usage:
            chunk["usage"] = None
        return sse(chunk)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> str:
        return sse(dict(self._head, choices=[], usage=usage(prompt_tokens, completion_tokens, cached_tokens)))


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_KEEPALIVE = ": keep-alive\n\n"
