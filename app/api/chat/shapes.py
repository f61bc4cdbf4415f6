"""OpenAI chat completion bodies as plain dicts: testable without HTTP. Finish reasons are
mapped to OpenAI's words here, in one place."""
from __future__ import annotations

from typing import Optional

from app.generation.events import FinishReason, LogprobEntry
from app.text.tool_parsers import ToolCall, ToolCallDelta

FINISH_REASON = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.TOOL_CALLS: "tool_calls",
                 FinishReason.ABORT: "abort", FinishReason.ERROR: "error"}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprobs_content(entries: list[LogprobEntry]) -> list[dict]:
    return [{"token": e.token, "bytes": e.bytes, "logprob": e.logprob,
             "top_logprobs": [{"token": t.token, "bytes": t.bytes, "logprob": t.logprob} for t in e.top]}
            for e in entries]


def tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def choice(index: int, text: str, calls: list[ToolCall], reason: FinishReason,
           logprobs: Optional[list[LogprobEntry]]) -> dict:
    message: dict = {"role": "assistant", "content": text if text or not calls else None, "refusal": None}
    if calls:
        message["tool_calls"] = [tool_call(c) for c in calls]
    return {"index": index, "message": message,
            "logprobs": None if logprobs is None else {"content": logprobs_content(logprobs), "refusal": None},
            "finish_reason": FINISH_REASON[reason]}


def chat_completion(completion_id: str, created: int, model: str, choices: list[dict], usage_body: dict) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, "usage": usage_body}


class ChunkWriter:
    """chat.completion.chunk events of one stream, sharing id/created/model."""

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool, logprobs: bool):
        self._head = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                      "model": model, "system_fingerprint": None}
        self._include_usage = include_usage
        self._logprobs = logprobs

    def delta(self, index: int, *, content: Optional[str] = None, role: bool = False,
              tool_call: Optional[ToolCallDelta] = None, logprobs: Optional[list[LogprobEntry]] = None,
              finish_reason: Optional[FinishReason] = None) -> dict:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if content is not None:
            delta["content"] = content
        if tool_call is not None:
            delta["tool_calls"] = [_tool_call_delta(tool_call)]
        lp = {"content": logprobs_content(logprobs), "refusal": None} if self._logprobs and logprobs else None
        chunk = dict(self._head, choices=[{"index": index, "delta": delta, "logprobs": lp,
                                           "finish_reason": FINISH_REASON[finish_reason] if finish_reason else None}])
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
        return dict(self._head, choices=[], usage=usage(prompt_tokens, completion_tokens, cached_tokens))


def _tool_call_delta(d: ToolCallDelta) -> dict:
    out: dict = {"index": d.index}
    if d.id is not None:
        out.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
    else:
        out["function"] = {"arguments": d.arguments}
    return out
