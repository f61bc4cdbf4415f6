"""/v1/embeddings for one local embedding model: tokenize, check, queue on the engine thread
(requests that arrive together are embedded in the same forward passes), shape the answer."""
from __future__ import annotations

import time
import uuid

from app.api.embeddings.protocol import EmbeddingRequest, check_dimensions, embedding_response
from app.errors import APIError, bad_request, overloaded
from app.text import offload
from config import Settings
from engine.messages import EmbedRequest, Embedded


class EmbeddingsServing:
    def __init__(self, engine, settings: Settings, limiter=None):
        self._engine, self._settings, self._limiter = engine, settings, limiter
        model = engine.model
        self._tokenizer = model.tokenizer
        self._context, self._vocab = model.context_length, model.vocab_size

    def create(self, body: EmbeddingRequest, client: str) -> dict:
        inputs = body.token_inputs(lambda text: offload.tokenize(self._tokenizer, text))
        self._check(inputs, body)
        tokens = sum(len(ids) for ids in inputs)
        if self._limiter is not None and self._limiter.enabled:
            self._limiter.charge(client, tokens)
        request_id = f"embd-{uuid.uuid4().hex}"
        stream = self._engine.embed(EmbedRequest(request_id, tuple(tuple(ids) for ids in inputs)))
        vectors = self._wait(stream, request_id)
        return embedding_response(self._engine.model_id, vectors, tokens, body.encoding_format, body.dimensions,
                                  self._engine.normalize)

    def _check(self, inputs: list[list[int]], body: EmbeddingRequest) -> None:
        for index, ids in enumerate(inputs):
            if len(ids) > self._context:
                raise bad_request(f"Input {index} has {len(ids)} tokens; this model's maximum context length is "
                                  f"{self._context} tokens", param="input", code="context_length_exceeded")
            bad = next((i for i in ids if i >= self._vocab), None)
            if bad is not None:
                raise bad_request(f"Token id {bad} is outside this model's vocabulary (0..{self._vocab - 1})",
                                  param="input", code="invalid_value")
        if self._engine.dimensions:  # known once loaded; before that, the response check catches it
            check_dimensions(body.dimensions, self._engine.dimensions)
        capacity = self._engine.max_running + self._settings.request_queue_size
        if self._engine.waiting + 1 > capacity:
            raise overloaded(f"The embedding model is at capacity ({capacity} requests queued); retry shortly",
                             retry_after=2)

    def _wait(self, stream, request_id: str) -> list:
        """Its vectors; 503 if it waited past QUEUE_TIMEOUT (say, for the model to load)."""
        deadline = time.monotonic() + self._settings.queue_timeout
        vectors = None
        while stream.finished is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self._engine.abort(request_id)
                raise overloaded(f"The request waited {self._settings.queue_timeout} s for the embedding model; "
                                 f"retry later", retry_after=min(60, self._settings.queue_timeout))
            for message in stream.next_batch(timeout=left):
                if isinstance(message, Embedded):
                    vectors = message.vectors
        if stream.finished.error is not None or vectors is None:
            raise APIError(500, f"Embedding failed: {stream.finished.error or stream.finished.finish_reason}",
                           type="server_error", code="engine_error")
        return vectors
