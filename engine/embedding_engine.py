"""An embedding model's engine: the same life cycle as a chat model's (text side at start,
weights on demand, unload when idle, one memory budget), but its turn is a batched forward
pass with pooling instead of a decode step.

Requests queue as they arrive; each turn takes up to `max_running` of them, oldest first, and
embeds all their inputs together (engine.embedder batches them by padded tokens), so requests
that arrive together share forward passes.
"""
from __future__ import annotations

import collections
import logging

from engine.engine import Engine, _error
from engine.messages import AbortRequest, EmbedRequest, Embedded, Finished

log = logging.getLogger("orchard.engine")


class EmbeddingEngine(Engine):
    is_embedding = True

    def __init__(self, loader, *, preload, model_id: str, pinned: bool, pooling: str, normalize: bool,
                 max_running: int):
        super().__init__(loader, max_running=max_running, generator_factory=_no_generator, preload=preload,
                         model_id=model_id, pinned=pinned)
        self.pooling, self.normalize = pooling, normalize
        self.dimensions = 0  # the hidden size, known once the weights are loaded
        self._queue: collections.deque[EmbedRequest] = collections.deque()
        self._embedder = None

    # ---- web side -------------------------------------------------------
    def embed(self, request: EmbedRequest, ready=None):
        stream = self._bridge.open(request.request_id, ready)
        self._host.post(self, request)
        if not self._host.alive:
            self._bridge.post([(request.request_id, Finished("error", error=self.error or "the engine has stopped"))])
        return stream

    @property
    def running(self) -> int:
        return 0  # a request is embedded within one turn: nothing stays running

    @property
    def waiting(self) -> int:
        return len(self._queue)

    # ---- host thread -----------------------------------------------------
    def _start_serving(self, model) -> None:
        from engine.embedder import Embedder

        self._embedder = Embedder(model.model, self.pooling, self.normalize)
        self.dimensions = self._embedder.dimensions
        super()._start_serving(model)

    def unload(self) -> None:
        self._embedder = None
        super().unload()

    @property
    def has_work(self) -> bool:
        return bool(self._queue)

    @property
    def reserved_bytes(self) -> int:
        return 0

    def first_reservation(self) -> int:
        return 0

    def apply(self, message) -> None:
        if isinstance(message, EmbedRequest):
            self._queue.append(message)
        elif isinstance(message, AbortRequest):
            queued = next((r for r in self._queue if r.request_id == message.request_id), None)
            if queued is not None:
                self._queue.remove(queued)
                self._publish([(queued.request_id, Finished(message.reason))])
        else:
            super().apply(message)

    def turn(self) -> None:
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_running))]
        inputs = [list(ids) for request in batch for ids in request.inputs]
        try:
            vectors = self._embedder.embed(inputs)
        except Exception as exc:  # e.g. an input the model cannot take: this batch fails, the model stays
            log.error("embedding failed: %s", exc)
            self.stats.requests_failed += len(batch)
            self._publish([(r.request_id, _error(exc)) for r in batch])
            return
        out, start = [], 0
        for request in batch:
            count = len(request.inputs)
            tokens = sum(len(ids) for ids in request.inputs)
            out.append((request.request_id, Embedded(vectors[start:start + count])))
            out.append((request.request_id, Finished("stop", tokens, 0)))
            start += count
            self.stats.prompt_tokens += tokens
        self.stats.requests_finished += len(batch)
        self.stats.steps += 1
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(inputs))
        self._publish(out)

    def fail_all(self, why: str, finish_reason: str = "error") -> None:
        ended = [(r.request_id, Finished(finish_reason, error=why)) for r in self._queue]
        self._queue.clear()
        if ended and self._host is not None and self._host.bridge is not None:
            self._publish(ended)


def _no_generator(model, max_running, stream=None):
    return None
