"""Chat completions: from a validated request to engine work and back to OpenAI shapes.

Runs on the request's greenlet. Template rendering and tokenization happen here,
outside the engine step, so the engine thread only ever sees token ids.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Iterator, Optional

from app import disconnect
from app.errors import APIError, bad_request, overloaded
from app.formatting import SSE_DONE, SSE_KEEPALIVE, ChunkWriter, chat_completion, sse
from app.metrics import Metrics
from app.output import TextAssembler
from app.protocol import ChatCompletionRequest
from app.rate_limit import RateLimiter
from app.request_log import log_completion
from config import Settings
from engine.detokenizer import Detokenizer
from engine.engine import Engine
from engine.messages import AddRequest, Admitted, Finished, TokenDelta

KEEPALIVE_S = 5.0


@dataclass
class Prepared:
    completion_id: str
    created: int
    prompt_tokens: list[int]
    max_tokens: int
    request: ChatCompletionRequest
    request_id: str = ""
    prompt_text: Optional[str] = None  # only when LOG_PROMPTS is on
    cache_scope: str = ""  # the API key's id when keys are on: tenants never share cached prompts


class Exchange:
    """One request in flight: its engine stream, its text, its timings."""

    def __init__(self, service: "ChatService", p: Prepared, environ: dict):
        self.p = p
        self._engine = service.engine
        self._queue_timeout = service.settings.queue_timeout
        self.admitted = False
        self.cached_tokens = 0  # prompt tokens the engine's prefix cache supplied
        self.timer = service.metrics.timer()
        self.stream = self._engine.submit(AddRequest(
            p.completion_id, p.prompt_tokens, p.max_tokens, p.request.sampling_params(),
            ignore_eos=p.request.ignore_eos, cache_scope=p.cache_scope))
        self.text = TextAssembler(Detokenizer(service.text.hf_tokenizer, service.text.table),
                                  p.request.stop_strings)
        self._watcher = disconnect.watch(environ, self.abort)
        self.finished: Optional[Finished] = None

    @property
    def wait_s(self) -> float:
        """How long to wait for engine output: short enough to notice a queue timeout."""
        return KEEPALIVE_S if self.admitted else min(KEEPALIVE_S, float(self._queue_timeout))

    def next_text(self, timeout: float) -> Optional[str]:
        """Text released by the next engine messages ('' if none yet); None on an idle timeout.
        Raises APIError(503) when the request waited in the queue too long."""
        messages = self.stream.next_batch(timeout=timeout)
        if not messages:
            if not self.admitted and time.perf_counter() - self.timer.arrived > self._queue_timeout:
                self.close()
                raise overloaded(f"The request waited {self._queue_timeout} s for a batch slot; retry later",
                                 retry_after=min(60, self._queue_timeout))
            return None
        pieces = []
        for message in messages:
            if isinstance(message, TokenDelta):
                self.timer.tokens(len(message.token_ids))
                pieces.append(self.text.add(message.token_ids))
                if self.text.stopped:  # a stop string: end here, the engine is told below
                    self._finish(Finished("stop", len(self.p.prompt_tokens), self.text.tokens))
                    break
            elif isinstance(message, Admitted):
                self.admitted = True
                self.cached_tokens = message.cached_tokens
                self.timer.admitted()
            elif isinstance(message, Finished):
                if message.finish_reason != "error":
                    pieces.append(self.text.finish())
                self._finish(message)
        return "".join(pieces)

    def _finish(self, finished: Finished) -> None:
        reason = finished.finish_reason
        self.finished = finished
        self.timer.finished(reason, finished.prompt_tokens or len(self.p.prompt_tokens), self.cached_tokens)
        log_completion(self.p.request_id, reason, len(self.p.prompt_tokens), finished.completion_tokens,
                       time.perf_counter() - self.timer.arrived, self.p.prompt_text,
                       cached_tokens=self.cached_tokens)
        self.close()

    def abort(self) -> None:
        if self.stream.finished is None:
            self._engine.abort(self.p.completion_id)

    def close(self) -> None:
        disconnect.stop(self._watcher)
        self._watcher = None
        self.abort()  # no-op once the engine has finished the request


class ChatService:
    def __init__(self, engine: Engine, settings: Settings, text_tools, metrics: Metrics,
                 limiter: Optional[RateLimiter] = None):
        self.engine = engine
        self.settings = settings
        self._limiter = limiter
        self.text = text_tools  # app.model_text.ModelText
        self.metrics = metrics
        self._keys_on = bool(settings.keys())  # then a client is a key id, and scopes the prefix cache

    @property
    def model(self):
        return self.engine.model

    def prepare(self, request: ChatCompletionRequest, client: str, request_id: str) -> Prepared:
        """Validate against the model and the server's limits; nothing is queued yet."""
        if request.model != self.model.model_id:
            raise APIError(404, f"The model '{request.model}' does not exist; this server serves "
                                f"'{self.model.model_id}'", type="not_found_error", param="model",
                           code="model_not_found")
        messages = request.template_messages()
        prompt = self.text.encode_chat(messages)
        max_tokens = self._max_tokens(request, len(prompt))
        self._check_memory(len(prompt) + max_tokens)
        self._admit()
        if self._limiter is not None and self._limiter.enabled:
            self._limiter.charge(client, len(prompt) + max_tokens)
        text = repr(messages) if self.settings.log_prompts else None
        return Prepared(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), prompt, max_tokens, request,
                        request_id, text, cache_scope=client if self._keys_on else "")

    def _check_memory(self, max_length: int) -> None:
        if not self.engine.fits_alone(max_length):
            raise APIError(503, f"A request of {max_length} tokens (prompt + max_tokens) needs more KV-cache "
                                f"memory than this server's budget of {self.engine.kv_budget} bytes; lower "
                                f"max_tokens or ask the operator to raise KV_CACHE_BUDGET",
                           type="server_is_overloaded", code="insufficient_memory", headers={"Retry-After": "60"})

    def _max_tokens(self, request: ChatCompletionRequest, prompt_len: int) -> int:
        limit, context = self.settings.max_tokens_limit, self.model.context_length
        asked = request.requested_max_tokens
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        if asked is not None and asked > limit:
            raise bad_request(f"{param}={asked} exceeds this server's limit of {limit}", param=param)
        room = context - prompt_len
        wanted = asked if asked is not None else min(self.settings.default_max_tokens, max(room, 1))
        if prompt_len + wanted > context:
            raise bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + wanted} tokens ({prompt_len} in the messages, {wanted} in the completion). "
                f"Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        return wanted

    def _admit(self) -> None:
        capacity = self.settings.max_concurrent_requests + self.settings.request_queue_size
        if self.engine.running + self.engine.waiting >= capacity:
            raise overloaded(f"The server is at capacity ({capacity} requests running or queued); "
                             f"retry shortly", retry_after=2)

    def complete(self, p: Prepared, environ: dict) -> dict:
        exchange = Exchange(self, p, environ)
        parts: list[str] = []
        try:
            while exchange.finished is None:
                parts.append(exchange.next_text(exchange.wait_s) or "")
        finally:
            exchange.close()
        finished = exchange.finished
        if finished.finish_reason == "error":
            raise APIError(500, f"Generation failed: {finished.error}", type="server_error", code="engine_error")
        return chat_completion(p.completion_id, p.created, self.model.model_id, "".join(parts),
                               finished.finish_reason, len(p.prompt_tokens), finished.completion_tokens,
                               exchange.cached_tokens)

    def stream(self, p: Prepared, environ: dict) -> Iterator[str]:
        """SSE events. Errors after the first byte become an error event, then [DONE]."""
        exchange = Exchange(self, p, environ)
        chunks = ChunkWriter(p.completion_id, p.created, self.model.model_id, p.request.include_usage)
        try:
            yield chunks.delta("", role=True)
            while exchange.finished is None:
                try:
                    piece = exchange.next_text(exchange.wait_s)
                except APIError as error:  # after the first byte, errors travel as an event
                    yield sse(error.body())
                    yield SSE_DONE
                    return
                if piece:
                    yield chunks.delta(piece)
                elif piece is None:
                    yield SSE_KEEPALIVE  # queued or slow: lets a gone client be noticed
            finished = exchange.finished
            if finished.finish_reason == "error":
                yield sse(APIError(500, f"Generation failed: {finished.error}", type="server_error",
                                   code="engine_error").body())
            else:
                yield chunks.delta(finish_reason=finished.finish_reason)
                if p.request.include_usage:
                    yield chunks.usage(len(p.prompt_tokens), finished.completion_tokens, exchange.cached_tokens)
            yield SSE_DONE
        finally:
            exchange.close()  # the client went away, or the text hit a stop string: free the slot
