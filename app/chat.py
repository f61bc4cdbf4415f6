"""Chat completions: from a validated request to engine work and back to OpenAI shapes.

Runs on the request's greenlet. Template rendering and tokenization happen here,
outside the engine step, so the engine thread only ever sees token ids.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Iterator

from app.errors import APIError, bad_request, overloaded
from app.formatting import SSE_DONE, SSE_KEEPALIVE, ChunkWriter, chat_completion, sse
from app.output import TextAssembler
from app.protocol import ChatCompletionRequest
from config import Settings
from engine.detokenizer import Detokenizer
from engine.engine import Engine
from engine.messages import AddRequest, Finished, TokenDelta
from engine.model import LoadedModel

KEEPALIVE_S = 5.0
_IDLE = object()


@dataclass
class Prepared:
    completion_id: str
    created: int
    prompt_tokens: list[int]
    max_tokens: int
    request: ChatCompletionRequest


class ChatService:
    def __init__(self, engine: Engine, settings: Settings, text_tools):
        self._engine = engine
        self._settings = settings
        self._text = text_tools  # app.model_text.ModelText: template, tokenizer, detokenizer table

    @property
    def model(self) -> LoadedModel:
        return self._engine.model

    def prepare(self, request: ChatCompletionRequest) -> Prepared:
        if request.model != self.model.model_id:
            raise APIError(404, f"The model '{request.model}' does not exist; this server serves "
                                f"'{self.model.model_id}'", type="not_found_error", param="model",
                           code="model_not_found")
        prompt = self._text.encode_chat(request.template_messages())
        max_tokens = self._max_tokens(request, len(prompt))
        self._admit()
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), prompt, max_tokens, request)

    def _max_tokens(self, request: ChatCompletionRequest, prompt_len: int) -> int:
        limit, context = self._settings.max_tokens_limit, self.model.context_length
        asked = request.requested_max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if asked is not None and asked > limit:
            raise bad_request(f"{param}={asked} exceeds this server's limit of {limit}", param=param)
        room = context - prompt_len
        wanted = asked if asked is not None else min(self._settings.default_max_tokens, max(room, 1))
        if prompt_len + wanted > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the messages, {wanted} in the completion). "
                f"Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        return wanted

    def _admit(self) -> None:
        capacity = self._settings.max_concurrent_requests + self._settings.request_queue_size
        if self._engine.running + self._engine.waiting >= capacity:
            raise overloaded(f"The server is at capacity ({capacity} requests running or queued); "
                             f"retry shortly", retry_after=2)

    def _submit(self, p: Prepared):
        return self._engine.submit(AddRequest(
            p.completion_id, p.prompt_tokens, p.max_tokens, p.request.sampling_params(),
            ignore_eos=p.request.ignore_eos))

    def _assembler(self, p: Prepared) -> TextAssembler:
        return TextAssembler(Detokenizer(self._text.hf_tokenizer, self._text.table), p.request.stop_strings)

    def complete(self, p: Prepared) -> dict:
        stream, text = self._submit(p), self._assembler(p)
        parts: list[str] = []
        try:
            finished = self._drain(stream, text, parts.append)
        finally:
            if stream.finished is None:
                self._engine.abort(p.completion_id)
        if finished.finish_reason == "error":
            raise APIError(500, f"Generation failed: {finished.error}", type="server_error", code="engine_error")
        reason, completion = self._outcome(finished, text)
        return chat_completion(p.completion_id, p.created, self.model.model_id, "".join(parts), reason,
                               len(p.prompt_tokens), completion)

    def stream(self, p: Prepared) -> Iterator[str]:
        """SSE events. Errors after the first byte become an error event, then [DONE]."""
        stream, text = self._submit(p), self._assembler(p)
        chunks = ChunkWriter(p.completion_id, p.created, self.model.model_id, p.request.include_usage)
        try:
            yield chunks.delta("", role=True)
            pieces: list[str] = []
            while True:
                finished = self._drain(stream, text, pieces.append, once=True)
                if pieces:
                    yield chunks.delta("".join(pieces))
                    pieces.clear()
                elif finished is _IDLE:
                    yield SSE_KEEPALIVE  # queued or slow: lets a gone client be noticed
                if finished not in (None, _IDLE):
                    break
            if finished.finish_reason == "error":
                yield sse(APIError(500, f"Generation failed: {finished.error}", type="server_error",
                                   code="engine_error").body())
            else:
                reason, completion = self._outcome(finished, text)
                yield chunks.delta(finish_reason=reason)
                if p.request.include_usage:
                    yield chunks.usage(len(p.prompt_tokens), completion)
            yield SSE_DONE
        finally:
            if stream.finished is None:  # the client went away, or the text hit a stop string
                self._engine.abort(p.completion_id)

    def _drain(self, stream, text: TextAssembler, emit, once: bool = False):
        """Feed engine messages into `text`; returns the Finished marker, or (once=True) None
        after one batch of messages, _IDLE after a wait that brought nothing."""
        while True:
            messages = stream.next_batch(timeout=KEEPALIVE_S)
            if once and not messages:
                return _IDLE
            for message in messages:
                if isinstance(message, TokenDelta):
                    piece = text.add(message.token_ids)
                    if piece:
                        emit(piece)
                    if text.stopped:
                        return Finished("stop", completion_tokens=text.tokens)
                elif isinstance(message, Finished):
                    if message.finish_reason != "error":
                        tail = text.finish()
                        if tail:
                            emit(tail)
                    return message
            if once:
                return None

    @staticmethod
    def _outcome(finished: Finished, text: TextAssembler) -> tuple[str, int]:
        if text.stopped:
            return "stop", text.tokens
        reason = "length" if finished.finish_reason == "length" else "stop"
        return reason, finished.completion_tokens
