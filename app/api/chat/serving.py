"""Chat completions at the edge: a validated request becomes one GenerationRequest; the
Generation's events become OpenAI's chat.completion body or its chunk stream.

Runs on the request's greenlet. Template rendering and tokenization happen here (long prompts in a
worker thread, `app/text/offload.py`, so the event loop keeps serving), outside
the engine step, so the engine thread only ever sees token ids.
"""
from __future__ import annotations

import time
import uuid
from typing import Iterator

from app.api.chat import shapes
from app.api.chat.protocol import ChatCompletionRequest, ChatMessage
from app.api.serving import Serving
from app.errors import APIError, bad_request
from app.generation.constraints import OutputSpec
from app.generation.events import ChoiceDone, FinishReason, TextDelta, ToolCallEvent
from app.generation.generation import Generation
from app.generation.request import GenerationRequest
from app.sse import SSE_DONE, SSE_KEEPALIVE, sse
from app.text import offload


class ChatServing(Serving):
    @property
    def model(self):
        return self.ctx.engine.model

    def prepare(self, body: ChatCompletionRequest, client: str, request_id: str) -> GenerationRequest:
        """Validate against the model and the server's limits; nothing is queued yet."""
        self.admission.resolve_model(body.model)
        n = body.n or 1
        self.admission.check_n(n)
        if body.logit_bias:
            self.admission.check_token_ids(body.logit_bias_ids(), "logit_bias")
        _refuse_media(body.messages)
        tools = body.tools if body.tools and body.tool_choice != "none" else None
        plan = self.constraints.plan(output_spec(body))
        messages = [_message(m) for m in body.messages]
        prompt = offload.render(self.ctx.text, messages, body.tool_definitions() if tools else None)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.admission.max_tokens(body.requested_max_tokens, param, len(prompt))
        self.admission.admit(len(prompt), max_tokens, n, client)
        return GenerationRequest(
            f"chatcmpl-{uuid.uuid4().hex}", prompt, max_tokens, body.sampling_params(), n=n,
            logprobs=body.logprobs_k, grammar=plan.grammar, stop_strings=tuple(body.stop_strings),
            tool_parser=plan.parser, parallel_tool_calls=plan.parallel, ignore_eos=body.ignore_eos,
            cache_scope=self.cache_scope(client), log_id=request_id,
            prompt_text=repr(messages) if self.settings.log_prompts else None)

    def complete(self, request: GenerationRequest, environ: dict) -> dict:
        generation = Generation(self.ctx, request, environ)
        texts = [[] for _ in range(request.n)]
        logprobs = [[] for _ in range(request.n)] if request.logprobs is not None else None
        for event in generation.events():
            if isinstance(event, TextDelta):
                texts[event.index].append(event.text)
                if logprobs is not None:
                    logprobs[event.index].extend(event.logprobs)
        choices = []
        for c in generation.choices:
            done = c.done
            if done.reason is FinishReason.ERROR:
                raise APIError(500, f"Generation failed: {done.error}", type="server_error", code="engine_error")
            choices.append(shapes.choice(c.index, "".join(texts[c.index]), done.tool_calls, done.reason,
                                         None if logprobs is None else logprobs[c.index]))
        return shapes.chat_completion(request.id, int(time.time()), self.model.model_id, choices,
                                      self._usage(request, generation))

    def stream(self, request: GenerationRequest, include_usage: bool, environ: dict) -> Iterator[str]:
        """SSE events. Errors after the first byte become an error event, then [DONE]."""
        generation = Generation(self.ctx, request, environ)
        chunks = shapes.ChunkWriter(request.id, int(time.time()), self.model.model_id, include_usage,
                                    request.logprobs is not None)
        try:
            for i in range(request.n):
                yield sse(chunks.delta(i, content="", role=True))
            try:
                for event in generation.events():
                    if isinstance(event, ChoiceDone) and event.reason is FinishReason.ERROR:
                        raise APIError(500, f"Generation failed: {event.error}", type="server_error",
                                       code="engine_error")
                    yield self._chunk(chunks, event)
            except APIError as error:  # after the first byte, errors travel as an event
                yield sse(error.body())
                yield SSE_DONE
                return
            if include_usage:
                yield sse(chunks.usage(len(request.prompt_tokens), generation.completion_tokens,
                                       generation.cached_tokens))
            yield SSE_DONE
        finally:
            generation.close()  # the client went away, or the text hit a stop string: free the slots

    @staticmethod
    def _chunk(chunks: shapes.ChunkWriter, event) -> str:
        if event is None:
            return SSE_KEEPALIVE  # queued or slow: lets a gone client be noticed
        if isinstance(event, TextDelta):
            return sse(chunks.delta(event.index, content=event.text, logprobs=event.logprobs))
        if isinstance(event, ToolCallEvent):
            return sse(chunks.delta(event.index, tool_call=event.delta))
        return sse(chunks.delta(event.index, finish_reason=event.reason))

    @staticmethod
    def _usage(request: GenerationRequest, generation: Generation) -> dict:
        return shapes.usage(len(request.prompt_tokens), generation.completion_tokens, generation.cached_tokens)


def _refuse_media(messages: list[ChatMessage]) -> None:
    for i, message in enumerate(messages):
        kind = message.media()
        if kind is not None:
            raise bad_request(f"messages[{i}] has a '{kind}' part, but this model reads text only",
                              param=f"messages.{i}.content", code="unsupported_content")


def _message(m: ChatMessage) -> dict:
    """OpenAI's chat message as the API-neutral dict the prompt renderer takes."""
    out: dict = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out


def output_spec(body: ChatCompletionRequest) -> OutputSpec:
    """OpenAI chat's tool and response_format options in neutral terms."""
    choice = body.tool_choice
    named = choice if not isinstance(choice, (str, type(None))) else None
    rf = body.response_format
    json_mode = {"json_object": "object", "json_schema": "schema"}.get(rf.type) if rf else None
    return OutputSpec(
        tools=[{"name": t.function.name, "parameters": t.function.parameters} for t in body.tools or []],
        tool_choice="named" if named else (choice or "auto"), tool_name=named.function.name if named else None,
        parallel=body.parallel_tool_calls is not False, json_mode=json_mode,
        schema=rf.json_schema.schema_ if json_mode == "schema" else None,
        strict=bool(rf and rf.json_schema and rf.json_schema.strict))
