"""The Responses API at the edge: a validated request becomes one GenerationRequest; the
Generation's events become a response object, or its stream of typed events.

Both paths run the same OutputWriter over the same events, so a streamed response and a plain
one have the same items. Finish reasons become a status in one place (STATUS). Runs on the
request's greenlet, like chat: the engine thread only ever sees token ids.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator, Optional

from app.api.responses.protocol import (NamedFunction, ResponsesRequest, input_messages, output_messages,
                                        tool_definitions)
from app.api.responses.store import ResponseStore
from app.api.serving import Serving
from app.errors import APIError
from app.generation.admission import Admission
from app.generation.constraints import Constraints
from app.generation.events import ChoiceDone, FinishReason, TextDelta, ToolCallEvent
from app.generation.generation import Generation, GenerationContext
from app.generation.request import GenerationRequest
from app.sse import SSE_KEEPALIVE, sse
from app.text import offload
from app.text.tool_parsers import ToolCallDelta
from config import Settings

# (status, incomplete_details.reason); ERROR never gets here (it is a 500 or an error event).
STATUS = {FinishReason.STOP: ("completed", None), FinishReason.TOOL_CALLS: ("completed", None),
          FinishReason.LENGTH: ("incomplete", "max_output_tokens"), FinishReason.ABORT: ("incomplete", "abort")}


@dataclass(frozen=True)
class Prepared:
    request: GenerationRequest
    head: dict  # the response object before generation: what echoes the request
    conversation: list[dict]  # chat messages before the output (instructions aside: they never carry over)
    scope: str  # the client's, for the store
    store: bool
    namespaced: dict = field(default_factory=dict)  # ResponsesRequest.namespaced(): how calls go out


class ResponsesServing(Serving):
    def __init__(self, ctx: GenerationContext, settings: Settings, admission: Admission, constraints: Constraints,
                 store: Optional[ResponseStore] = None):
        super().__init__(ctx, settings, admission, constraints)
        self.store = store or ResponseStore(settings.responses_store_count, settings.responses_store_bytes,
                                            float(settings.responses_store_ttl))

    def prepare(self, body: ResponsesRequest, client: str, request_id: str) -> Prepared:
        """Validate against the model, the store and the server's limits; nothing is queued yet."""
        model = self.admission.resolve_model(body.model)
        history = self._history(body.previous_response_id, client)
        messages = history + input_messages(body, history)
        system = [{"role": "system", "content": body.instructions}] if body.instructions else []
        plan = self.constraints.plan(body.output_spec())
        tools = tool_definitions(body) if body.tool_choice != "none" else None
        prompt = offload.render(self.ctx.text, system + messages, tools or None)
        # max_output_tokens is a cap, not a demand; not given keeps Admission's default.
        asked = body.max_output_tokens
        cap = None if asked is None else self.admission.cap_tokens(asked, len(prompt))
        max_tokens = self.admission.max_tokens(cap, "max_output_tokens", len(prompt), "input")
        self.admission.admit(len(prompt), max_tokens, 1, client)
        request = GenerationRequest(
            f"resp_{uuid.uuid4().hex}", prompt, max_tokens, body.sampling_params(), grammar=plan.grammar,
            tool_parser=plan.parser, parallel_tool_calls=plan.parallel,
            cache_scope=self.cache_scope(client), log_id=request_id,
            prompt_text=repr(system + messages) if self.settings.log_prompts else None)
        store = body.store is not False
        return Prepared(request, _head(request.id, model, body, store), messages, client, store, body.namespaced())

    def complete(self, prepared: Prepared, environ: dict) -> dict:
        generation = Generation(self.ctx, prepared.request, environ)
        writer = OutputWriter(stream=False, namespaced=prepared.namespaced)
        for event in generation.events():
            _write(writer, event)
        return self._finish(prepared, generation, writer)

    def stream(self, prepared: Prepared, environ: dict) -> Iterator[str]:
        """SSE events. Errors after the first byte become an error event, and the stream ends."""
        generation = Generation(self.ctx, prepared.request, environ)
        writer = OutputWriter(stream=True, namespaced=prepared.namespaced)
        try:
            writer.event("response.created", response=prepared.head)
            writer.event("response.in_progress", response=prepared.head)
            yield writer.take()
            try:
                for event in generation.events():
                    if event is None:
                        yield SSE_KEEPALIVE  # queued or slow: lets a gone client be noticed
                        continue
                    _write(writer, event)
                    if chunk := writer.take():
                        yield chunk
                self._finish(prepared, generation, writer)
            except APIError as error:  # after the first byte, errors travel as an event
                writer.event("error", code=error.code, message=error.message, param=error.param)
            yield writer.take()
        finally:
            generation.close()  # the client went away: free the slot

    def retrieve(self, response_id: str, client: str) -> dict:
        entry = self.store.get(client, response_id)
        if entry is None:
            raise _not_found(response_id)
        return entry.response

    def delete(self, response_id: str, client: str) -> dict:
        if not self.store.delete(client, response_id):
            raise _not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    def _history(self, previous_id: Optional[str], client: str) -> list[dict]:
        if previous_id is None:
            return []
        entry = self.store.get(client, previous_id)
        if entry is None:
            raise _not_found(previous_id, "previous_response_id")
        return entry.conversation

    def _finish(self, prepared: Prepared, generation: Generation, writer: "OutputWriter") -> dict:
        """The final response object: written out, stored, and announced on a stream."""
        status, reason = STATUS[generation.choices[0].done.reason]
        writer.finish(status)
        usage = _usage(len(prepared.request.prompt_tokens), generation.completion_tokens, generation.cached_tokens)
        response = dict(prepared.head, status=status, output=writer.items, output_text=writer.text,
                        incomplete_details={"reason": reason} if reason else None, usage=usage)
        if prepared.store:
            self.store.put(prepared.scope, response, prepared.conversation + output_messages(writer.items))
        writer.event("response.completed" if status == "completed" else "response.incomplete", response=response)
        return response


def _write(writer: "OutputWriter", event) -> None:
    if isinstance(event, TextDelta) and event.text:
        writer.add_text(event.text)
    elif isinstance(event, ToolCallEvent):
        writer.add_call(event.delta)
    elif isinstance(event, ChoiceDone) and event.reason is FinishReason.ERROR:
        raise APIError(500, f"Generation failed: {event.error}", type="server_error", code="engine_error")


class OutputWriter:
    """A response's output items, built from Generation events; when streaming, also the events
    that announce each step, numbered from 0 (`take()` hands them over)."""

    def __init__(self, stream: bool, namespaced: Optional[dict] = None):
        self.items: list[dict] = []
        self._namespaced = namespaced or {}
        self._open: Optional[dict] = None  # the item being generated
        self._stream, self._pending, self._seq = stream, [], 0

    @property
    def text(self) -> str:
        return "".join(p["text"] for item in self.items if item["type"] == "message" for p in item["content"])

    def event(self, kind: str, **fields) -> None:
        if self._stream:  # serialised now: items change after
            self._pending.append(sse({"type": kind, "sequence_number": self._seq, **fields}, event=kind))
            self._seq += 1

    def take(self) -> str:
        out, self._pending = "".join(self._pending), []
        return out

    def add_text(self, delta: str) -> None:
        if self._open is None or self._open["type"] != "message":
            self._start_message()
        self._open["content"][0]["text"] += delta
        self.event("response.output_text.delta", **self._where(), content_index=0, delta=delta, logprobs=[])

    def add_call(self, delta: ToolCallDelta) -> None:
        if delta.id is not None:  # a call's first piece
            namespace, name = self._namespaced.get(delta.name, (None, delta.name))
            self._start({"type": "function_call", "id": _new_id("fc"), "call_id": delta.id, "name": name,
                         **({"namespace": namespace} if namespace else {}), "arguments": "", "status": "in_progress"})
        if delta.arguments:
            self._open["arguments"] += delta.arguments
            self.event("response.function_call_arguments.delta", **self._where(), delta=delta.arguments)

    def finish(self, status: str) -> None:
        """The last item is as complete as the response; a response without any has one empty message."""
        if not self.items:
            self._start_message()
        self._close(status)

    def _start_message(self) -> None:
        self._start({"type": "message", "id": _new_id("msg"), "status": "in_progress", "role": "assistant",
                     "content": []})
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        self.event("response.content_part.added", **self._where(), content_index=0, part=part)
        self._open["content"].append(part)

    def _start(self, item: dict) -> None:
        self._close("completed")
        self.items.append(item)
        self._open = item
        self.event("response.output_item.added", output_index=len(self.items) - 1, item=item)

    def _where(self) -> dict:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _close(self, status: str) -> None:
        if self._open is None:
            return
        item, where = self._open, self._where()
        if item["type"] == "message":
            part = item["content"][0]
            self.event("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            self.event("response.content_part.done", **where, content_index=0, part=part)
        else:
            self.event("response.function_call_arguments.done", **where, name=item["name"],
                       arguments=item["arguments"])
        item["status"] = status
        self.event("response.output_item.done", output_index=where["output_index"], item=item)
        self._open = None


def _head(response_id: str, model: str, body: ResponsesRequest, store: bool) -> dict:
    fmt = body.text.format if body.text and body.text.format else None
    choice = body.tool_choice
    return {"id": response_id, "object": "response", "created_at": int(time.time()), "status": "in_progress",
            "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens, "metadata": body.metadata or {}, "model": model,
            "output": [], "output_text": "", "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "service_tier": "default", "store": store,
            "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else (choice or "auto"),
            "tools": body.echoed_tools(), "top_p": 1.0 if body.top_p is None else body.top_p,
            "truncation": "disabled", "usage": None, "user": body.user}


def _usage(prompt: int, output: int, cached: int) -> dict:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _not_found(response_id: str, param: Optional[str] = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", type="not_found_error", param=param,
                    code="response_not_found")
