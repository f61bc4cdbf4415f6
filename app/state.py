"""Everything one app instance holds: settings, the engine, and services built on it.

Also the worker's life cycle around the engine: draining on SIGTERM, and the
watchdog that ends the worker when the engine thread died or stalled, so that
Gunicorn's master starts a fresh one with the model reloaded.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import time
from typing import Callable, Optional

import gevent

from app.api.chat.serving import ChatServing
from app.catalog import ModelCatalog, at_capacity
from app.errors import APIError
from app.generation.admission import Admission
from app.generation.constraints import Constraints
from app.generation.generation import GenerationContext
from app.metrics import Metrics
from app.model_text import ModelText
from app.rate_limit import RateLimiter
from app.status import StatusReporter, ThroughputMeter
from config import Settings
from engine.engine import Engine, EngineState
from orchard import __version__

log = logging.getLogger("orchard.worker")
LOAD_STALL_S = 900.0  # engine loop silent this long while it loads a model's weights on demand: stalled
WATCHDOG_PERIOD_S = 1.0
EXIT_CODE_ENGINE_DEAD = 70
EXIT_GRACE_S = 3.0  # a dying worker's in-flight requests get this long to receive their errors
# Every API's serving class takes (GenerationContext, Settings, Admission, Constraints).
API_PATHS = {"chat": "/chat/completions", "completions": "/completions", "responses": "/responses",
             "messages": "/messages", "embeddings": "/embeddings"}
SERVINGS = {"completions": "app.api.completions.serving:CompletionsServing",
            "responses": "app.api.responses.serving:ResponsesServing",
            "messages": "app.api.messages.serving:MessagesServing"}


def remote_cost(raw: bytes, body: dict, default_max_tokens: int) -> int:
    """Tokens a forwarded request is charged against TOKEN_RATE_LIMIT: its prompt estimated at
    4 bytes a token (the upstream has the tokenizer) plus the completion it may ask for."""
    asked = next((body[k] for k in ("max_completion_tokens", "max_tokens", "max_output_tokens")
                  if isinstance(body.get(k), int)), default_max_tokens)
    return len(raw) // 4 + max(asked, 0)


class ModelServices:
    """One local chat model's serving objects: built once its text side is loaded, shared by
    every API (one GenerationContext, one Admission, one Constraints)."""

    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, limiter: RateLimiter, store):
        self.text = text = ModelText(engine.model)
        ctx = GenerationContext(engine, text, metrics, settings.queue_timeout)
        self.chat = ChatServing(ctx, settings, Admission(engine, settings, limiter), Constraints(text, settings.tool_parser))
        self._settings, self._store = settings, store
        self._servings: dict[str, object] = {"chat": self.chat}

    def serving(self, api: str):
        if api not in self._servings:
            module, name = SERVINGS[api].split(":")
            cls = getattr(importlib.import_module(module), name)
            chat = self.chat
            extra = {"store": self._store} if api == "responses" else {}
            self._servings[api] = cls(chat.ctx, self._settings, chat.admission, chat.constraints, **extra)
        return self._servings[api]


class Orchard:
    def __init__(self, settings: Settings, engine: Optional[Engine] = None, catalog: Optional[ModelCatalog] = None):
        self.settings = settings
        self.catalog = catalog or ModelCatalog.serving_one(settings, engine)
        self.engine = self.catalog.first_engine  # the host's heartbeat and BLAS; the first model's counters
        self.meter = ThroughputMeter(self.catalog.engines)
        self.status = StatusReporter(self.engine, settings, self.meter, __version__, self.catalog)
        self.metrics = Metrics(self.engine, settings)
        self.catalog.register_metrics(self.metrics.registry)
        self.limiter = RateLimiter(settings.rate_limit, settings.token_rate_limit)
        self.draining = False
        self.dying = False  # the engine died: answering 503 until this worker exits
        self._stop_accepting: Optional[Callable[[], None]] = None
        self._drainer = None  # the greenlet running _drain, once SIGTERM arrived
        self._engine_stuck = False  # the drain asked the engine thread to stop and it did not
        self._services: dict[str, ModelServices] = {}
        from app.api.responses.store import ResponseStore

        self._store = ResponseStore(settings.responses_store_count, settings.responses_store_bytes,
                                    settings.responses_store_ttl)

    @classmethod
    def start(cls, settings: Settings, engine: Optional[Engine] = None) -> "Orchard":
        catalog = None
        if engine is None:
            catalog = ModelCatalog.from_settings(settings)
        orchard = cls(settings, engine, catalog)
        orchard.catalog.start()
        orchard.meter.start()
        gevent.spawn(orchard.catalog.unload_idle_models)
        gevent.spawn(orchard.prepare_services)
        return orchard

    def prepare_services(self, poll_s: float = 0.2) -> int:
        """Build each pinned chat model's serving objects once its engine is ready, and render
        and tokenize one probe conversation (the chat template's first compile, the tool
        probe): paid at start, not by the first request. Returns how many were prepared."""
        pending = [e for e in self.catalog.pinned_engines() if not getattr(e, "is_embedding", False)]
        prepared = 0
        while pending and not self.draining:
            for engine in list(pending):
                if engine.state is EngineState.READY and engine.text_ready:
                    pending.remove(engine)
                    try:
                        text = self.services(engine.model_id).text
                        text.encode_chat([{"role": "user", "content": "Orchard is starting."}])
                        text.template_renders_tools  # noqa: B018  (cached: the tool probe renders once)
                        prepared += 1
                    except Exception:  # the first request builds them instead, and reports why
                        log.debug("preparing %s's serving objects failed", engine.model_id, exc_info=True)
                elif engine.state not in (EngineState.LOADING, EngineState.READY):
                    pending.remove(engine)  # failed or stopped: health reports it
            if pending:
                gevent.sleep(poll_s)
        return prepared

    def start_watchdog(self, stop_accepting: Optional[Callable[[], None]] = None) -> None:
        """Only in a Gunicorn worker (gunicorn.conf.py): a dead engine ends the process."""
        self._stop_accepting = stop_accepting
        gevent.spawn(self._watch_engine)

    def health(self) -> tuple[bool, str]:
        if self.dying:
            return False, "The engine failed; a fresh worker is starting"
        if self.draining:
            return False, "The server is shutting down"
        for engine in self.catalog.engines:  # every model's text side is loaded at start, before serving
            if engine.state is EngineState.LOADING and engine.model is None:
                return False, f"The model {engine.model_id} is still loading"
        for engine in self.catalog.pinned_engines():
            if engine.state is EngineState.LOADING:
                return False, f"The model {engine.model_id} is still loading"
            if engine.state is not EngineState.READY:
                return False, f"The engine of {engine.model_id} has {engine.state.value}: {engine.error or 'stopped'}"
        if not self.catalog.host_alive():
            return False, f"The engine has stopped: {self.engine.error or 'stopped'}"
        if self.stalled():
            return False, f"The engine made no progress for {time.monotonic() - self.engine.stats.last_beat:.0f} s"
        return True, "ok"

    def stalled(self) -> bool:
        """No loop progress for ENGINE_STALL_TIMEOUT while there is work; in a distributed group
        also when idle (the leader shares a plan at least once a second, so silence means a lost rank)."""
        beat = self.engine.stats.last_beat
        busy = self.catalog.distributed or any(e.running or e.waiting for e in self.catalog.engines)
        # A model loading on demand holds the loop for as long as its weights take to read: a
        # big one longer than ENGINE_STALL_TIMEOUT. That is progress, up to LOAD_STALL_S.
        limit = LOAD_STALL_S if any(e.state is EngineState.LOADING and e.model is not None
                                    for e in self.catalog.engines) else self.settings.engine_stall_timeout
        return bool(busy and beat and time.monotonic() - beat > limit)

    def require_ready(self) -> ChatServing:
        """The first local chat model's chat serving (in-process callers that serve one model)."""
        return self.services(self.catalog.first_chat_id).chat

    def services_check(self, model_id: str) -> None:
        """503 while the server, or this model, cannot serve."""
        ok, why = self.health()
        engine = self.catalog.engine(model_id)
        if not ok or not engine.text_ready:
            why = why if not ok else f"The model {model_id} is not available: {engine.error or engine.state.value}"
            raise APIError(503, why, type="server_error", code="engine_unavailable", headers={"Retry-After": "5"})

    def services(self, model_id: str) -> ModelServices:
        """A local chat model's serving objects; 503 while the server cannot serve it."""
        self.services_check(model_id)
        if model_id not in self._services:
            self._services[model_id] = ModelServices(self.catalog.engine(model_id), self.settings, self.metrics,
                                                     self.limiter, self._store)
        return self._services[model_id]

    def serving(self, api: str, model_id: Optional[str] = None):
        """The serving object of one API (`chat`, `completions`, `responses`, `messages`) for a
        local chat model (default: the first), or `embeddings` for an embedding model; built on
        its first request."""
        if api == "embeddings":
            return self._embeddings(model_id)
        return self.services(model_id or self.catalog.first_chat_id).serving(api)

    def _embeddings(self, model_id: str):
        self.services_check(model_id)
        if model_id not in self._services:
            from app.api.embeddings.serving import EmbeddingsServing

            self._services[model_id] = EmbeddingsServing(self.catalog.engine(model_id), self.settings, self.limiter)
        return self._services[model_id]

    def answer(self, api: str, name: str, local: Callable, raw: bytes = b"{}", stream: bool = False):
        """Serve a request for a model name: its targets in order (an id or alias names one; an
        operator's alias may name several), a local model through `local(serving)`, a remote one
        by forwarding the client's JSON (`raw`); the next target is tried only when one is at capacity."""
        targets = self.catalog.targets(name, kind="embedding" if api == "embeddings" else "chat")
        for position, entry in enumerate(targets):
            try:
                if entry.is_remote:
                    from flask import g

                    body = json.loads(raw)
                    if self.limiter.enabled:  # the upstream tokenizes; charge what the request could cost
                        self.limiter.charge(g.client_id, remote_cost(raw, body, self.settings.default_max_tokens))
                    return self.catalog.remote(entry.id).forward(API_PATHS[api], body, stream=stream,
                                                                  request_id=g.request_id)
                return local(self.serving(api, entry.id))
            except APIError as exc:
                if position == len(targets) - 1 or not at_capacity(exc):
                    raise
                log.info("model %s is at capacity (%s): trying %s", entry.id, exc.message, targets[position + 1].id)
        raise AssertionError("unreachable: targets() never returns an empty tuple")

    def refuse_if_draining(self) -> None:
        if self.dying:
            raise APIError(503, "The engine failed; a fresh worker is starting. Retry shortly",
                           type="server_error", code="engine_unavailable", headers={"Retry-After": "5"})
        if self.draining:
            raise APIError(503, "The server is shutting down; retry on another instance or shortly",
                           type="server_error", code="shutting_down", headers={"Retry-After": "10"})

    # ---- life cycle ------------------------------------------------------
    def begin_drain(self) -> None:
        """SIGTERM: refuse new work, let in-flight requests finish within DRAIN_TIMEOUT,
        end the rest with finish_reason 'abort', then stop the engine thread."""
        if self.draining:
            return
        self.draining = True
        log.info("draining: %d requests running or waiting", self._in_flight())
        self._drainer = gevent.spawn(self._drain)

    def _in_flight(self) -> int:
        return sum(e.running + e.waiting for e in self.catalog.engines)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout
        while self._in_flight() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if self._in_flight():
            log.warning("drain budget spent: ending %d requests", self._in_flight())
            for engine in self.catalog.engines:
                engine.abort_all("abort")
        self.stop_engine()
        if self.catalog.host_alive():  # stuck in a step: nothing it holds would ever end
            self._engine_stuck = True
            ended = self.catalog.end_open_requests("the engine did not stop when the server shut down")
            log.critical("the engine did not stop; ended the %d requests it held", ended)
        log.info("drained; engine %s", self.engine.state.value)

    def finish(self, timeout: float = 5.0) -> None:
        """Worker exit: let a drain that is under way finish (its requests are done once
        Gunicorn exits; the drain notices within a poll), then make sure the engine stopped."""
        if self._drainer is not None:
            self._drainer.join(timeout)
        if not self._engine_stuck:  # it waited for the thread already; the exit ends it
            self.stop_engine(timeout)

    def stop_engine(self, timeout: float = 5.0) -> None:
        """Ask the engine thread to finish its step and stop; wait for it."""
        if self.catalog.host_alive():
            self.engine.shutdown()
        deadline = time.monotonic() + timeout
        while self.catalog.host_alive() and time.monotonic() < deadline:
            gevent.sleep(0.05)

    def _watch_engine(self) -> None:
        """Exit the worker if the engine loop died or stalled (a failed model load stays up
        and reports 503 instead: restarting would only fail again)."""
        while True:
            gevent.sleep(WATCHDOG_PERIOD_S)
            died = self.catalog.host_died()
            if (died or self.stalled()) and not self.draining:
                log.critical("engine %s: exiting so Gunicorn starts a fresh worker",
                             "died" if died else "stalled")
                self.dying = True  # new requests: 503 at once
                if not died:
                    # A dead loop answered its requests as it died; a stalled one holds them
                    # and never will: answer them here, or their clients would see the
                    # connection reset when the worker exits.
                    ended = self.catalog.end_open_requests(
                        f"the engine made no progress for {self.settings.engine_stall_timeout} s; "
                        "a fresh worker is starting")
                    log.critical("ended %d requests the stalled engine held", ended)
                if self._stop_accepting is not None:
                    self._stop_accepting()  # Gunicorn's worker loop closes its listener and ends
                gevent.sleep(EXIT_GRACE_S)  # let in-flight requests flush their error responses
                os._exit(EXIT_CODE_ENGINE_DEAD)
