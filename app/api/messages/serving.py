"""Anthropic's Messages API at the edge: a validated request becomes one GenerationRequest; the
Generation's events become a `message` body or Anthropic's event stream.

One fold (ContentBlocks) turns text and tool-call events into content blocks for both paths,
so a streamed reply and a plain one carry the same blocks. Finish reasons map in STOP_REASON.
"""
from __future__ import annotations

import json
import uuid
from typing import Iterator, Optional

from app.api.messages.protocol import CountTokensRequest, MessagesRequest
from app.api.serving import Serving
from app.errors import APIError, anthropic_body
from app.generation.events import ChoiceDone, FinishReason, TextDelta
from app.generation.generation import Choice, Generation
from app.generation.request import GenerationRequest
from app.sse import sse
from app.text import offload
from app.text.tool_parsers import ToolCallDelta

# ERROR is no stop reason: it becomes an error response or an `error` event. ABORT (the server
# drained) is pause_turn: Anthropic's clients continue such a turn by sending it back.
STOP_REASON = {FinishReason.STOP: "end_turn", FinishReason.LENGTH: "max_tokens",
               FinishReason.TOOL_CALLS: "tool_use", FinishReason.ABORT: "pause_turn"}


def stop_reason(reason: FinishReason, stopped: bool) -> str:
    """`stopped`: a stop sequence ended the text (the core reports that end as STOP)."""
    return "stop_sequence" if stopped and reason is FinishReason.STOP else STOP_REASON[reason]


def matched_stop(choice: Choice, stops: tuple[str, ...]) -> Optional[str]:
    """The stop sequence that ended the text. TEMPORARY: the core does not say which one matched
    yet; `assembler.matched` is the attribute asked for, and with one stop sequence it is that one."""
    if not choice.assembler.stopped:
        return None
    return getattr(choice.assembler, "matched", None) or (stops[0] if len(stops) == 1 else None)


def usage(prompt_tokens: int, output_tokens: int, cached_tokens: int) -> dict:
    """Anthropic counts input_tokens without the cache reads: the prompt is the sum of both."""
    return {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens, "output_tokens": output_tokens}


def message(msg_id: str, model: str, content: list[dict], reason: Optional[str], stop: Optional[str],
            usage_body: dict) -> dict:
    return {"id": msg_id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": reason, "stop_sequence": stop, "usage": usage_body}


def tool_use_id(call_id: str) -> str:
    """Anthropic's prefix on the parser's call id: the same id streamed and not."""
    return "toolu_" + call_id.removeprefix("call_")


class ContentBlocks:
    """The reply's content blocks in order, folded from a Generation's events; `add` returns the
    stream events each one makes (stop the open block, start one, a delta; a ping)."""

    def __init__(self):
        self._blocks: list[dict] = []
        self._arguments: dict[int, str] = {}  # tool_use block index -> its input JSON so far
        self._open = False

    def add(self, event) -> list[dict]:
        if event is None:  # nothing came for a while: lets a gone client be noticed
            return [{"type": "ping"}]
        if isinstance(event, ChoiceDone):
            _raise_failure(event)
            return []
        return self._text(event.text) if isinstance(event, TextDelta) else self._tool(event.delta)

    def _text(self, text: str) -> list[dict]:
        if not text:
            return []
        out = [] if self._open and self._blocks[-1]["type"] == "text" else self._start({"type": "text", "text": ""})
        self._blocks[-1]["text"] += text
        return out + [self._delta({"type": "text_delta", "text": text})]

    def _tool(self, d: ToolCallDelta) -> list[dict]:
        """A call's first delta (with its id) opens its block; arguments stream as JSON pieces."""
        out = self._start({"type": "tool_use", "id": tool_use_id(d.id), "name": d.name, "input": {}}) if d.id else []
        if not d.arguments:
            return out
        index = len(self._blocks) - 1
        self._arguments[index] = self._arguments.get(index, "") + d.arguments
        return out + [self._delta({"type": "input_json_delta", "partial_json": d.arguments})]

    def stop(self) -> list[dict]:
        if not self._open:
            return []
        self._open = False
        return [{"type": "content_block_stop", "index": len(self._blocks) - 1}]

    def content(self) -> list[dict]:
        return [dict(b, input=_input(self._arguments.get(i, ""))) if b["type"] == "tool_use" else b
                for i, b in enumerate(self._blocks)]

    def _start(self, block: dict) -> list[dict]:
        out = self.stop()
        self._blocks.append(block)
        self._open = True
        return out + [{"type": "content_block_start", "index": len(self._blocks) - 1, "content_block": dict(block)}]

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self._blocks) - 1, "delta": delta}


def _input(arguments: str) -> dict:
    """A tool_use input must be an object; the grammar guarantees one for forced calls, but a free
    (tool_choice auto) call cut short or malformed reads as no arguments."""
    try:
        value = json.loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class MessagesServing(Serving):
    def count_tokens(self, body: CountTokensRequest) -> dict:
        self.admission.resolve_model(body.model)
        return {"input_tokens": len(offload.render(self.ctx.text, body.chat_messages(), body.tool_definitions()))}

    def prepare(self, body: MessagesRequest, client: str, request_id: str) -> GenerationRequest:
        """Validate against the model and the server's limits; nothing is queued yet."""
        self.admission.resolve_model(body.model)
        plan = self.constraints.plan(body.output_spec())
        messages = body.chat_messages()
        prompt = offload.render(self.ctx.text, messages, body.tool_definitions())
        # max_tokens is a cap (Claude Code asks 32000-128000 whatever the model): generation stops
        # where the context, memory or MAX_TOKENS_LIMIT end it, with stop_reason max_tokens.
        cap = self.admission.cap_tokens(body.max_tokens, len(prompt))
        max_tokens = self.admission.max_tokens(cap, "max_tokens", len(prompt))
        self.admission.admit(len(prompt), max_tokens, 1, client)
        return GenerationRequest(
            f"msg_{uuid.uuid4().hex}", prompt, max_tokens, body.sampling_params(), grammar=plan.grammar,
            stop_strings=tuple(body.stop_sequences or ()), tool_parser=plan.parser, parallel_tool_calls=plan.parallel,
            cache_scope=self.cache_scope(client), log_id=request_id,
            prompt_text=repr(messages) if self.settings.log_prompts else None)

    def complete(self, request: GenerationRequest, model: str, environ: dict) -> dict:
        generation = Generation(self.ctx, request, environ)
        blocks = ContentBlocks()
        for event in generation.events():
            blocks.add(event)
        return message(request.id, model, blocks.content(), *self._ending(request, generation))

    def stream(self, request: GenerationRequest, model: str, environ: dict) -> Iterator[str]:
        """Anthropic's events. Errors after the first byte become an `error` event."""
        generation = Generation(self.ctx, request, environ)
        blocks = ContentBlocks()
        try:
            start = message(request.id, model, [], None, None, usage(len(request.prompt_tokens), 0, 0))
            yield _event({"type": "message_start", "message": start})
            yield _event({"type": "ping"})
            try:
                for event in generation.events():
                    yield from map(_event, blocks.add(event))
            except APIError as error:
                yield sse(anthropic_body(error), event="error")
                return
            yield from map(_event, blocks.stop())
            reason, stop, usage_body = self._ending(request, generation)
            yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": stop},
                          "usage": usage_body})
            yield _event({"type": "message_stop"})
        finally:
            generation.close()  # the client went away, or the text hit a stop string: free the slot

    @staticmethod
    def _ending(request: GenerationRequest, generation: Generation) -> tuple[str, Optional[str], dict]:
        """stop_reason, stop_sequence and usage of a finished generation."""
        choice = generation.choices[0]
        stop = matched_stop(choice, request.stop_strings)
        return (stop_reason(choice.done.reason, choice.assembler.stopped), stop,
                usage(len(request.prompt_tokens), generation.completion_tokens, generation.cached_tokens))


def _raise_failure(done: ChoiceDone) -> None:
    if done.reason is FinishReason.ERROR:
        raise APIError(500, f"Generation failed: {done.error}", type="server_error", code="engine_error")


def _event(payload: dict) -> str:
    return sse(payload, event=payload["type"])
