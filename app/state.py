"""Everything one app instance holds: settings, the engine, and services built on it.

Also the worker's life cycle around the engine: draining on SIGTERM, and the
watchdog that ends the worker when the engine thread died or stalled, so that
Gunicorn's master starts a fresh one with the model reloaded.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import gevent

from app.api.chat.serving import ChatServing
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
STALL_S = 30.0  # engine loop silent this long while it has work: unhealthy
WATCHDOG_PERIOD_S = 1.0
EXIT_CODE_ENGINE_DEAD = 70
# Every API's serving class takes (GenerationContext, Settings, Admission, Constraints).
SERVINGS = {"completions": "app.api.completions.serving:CompletionsServing",
            "responses": "app.api.responses.serving:ResponsesServing",
            "messages": "app.api.messages.serving:MessagesServing"}


class Orchard:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.meter = ThroughputMeter(engine)
        self.status = StatusReporter(engine, settings, self.meter, __version__)
        self.metrics = Metrics(engine, settings)
        self.limiter = RateLimiter(settings.rate_limit, settings.token_rate_limit)
        self.draining = False
        self._drainer = None  # the greenlet running _drain, once SIGTERM arrived
        self._chat: Optional[ChatServing] = None
        self._servings: dict[str, object] = {}

    @classmethod
    def start(cls, settings: Settings, engine: Optional[Engine] = None) -> "Orchard":
        if engine is None:
            from engine.factory import build_engine

            engine = build_engine(settings)
        orchard = cls(settings, engine)
        engine.start()
        orchard.meter.start()
        return orchard

    def start_watchdog(self) -> None:
        """Only in a Gunicorn worker (gunicorn.conf.py): a dead engine ends the process."""
        gevent.spawn(self._watch_engine)

    def health(self) -> tuple[bool, str]:
        engine = self.engine
        if self.draining:
            return False, "The server is shutting down"
        if engine.state is EngineState.LOADING:
            return False, "The model is still loading"
        if engine.state is not EngineState.READY:
            return False, f"The engine has {engine.state.value}: {engine.error or 'stopped'}"
        if self.stalled():
            return False, f"The engine made no progress for {time.monotonic() - engine.stats.last_beat:.0f} s"
        return True, "ok"

    def stalled(self) -> bool:
        beat = self.engine.stats.last_beat
        return bool((self.engine.running or self.engine.waiting) and beat and time.monotonic() - beat > STALL_S)

    def require_ready(self) -> ChatServing:
        ok, why = self.health()
        if not ok:
            raise APIError(503, why, type="server_error", code="engine_unavailable",
                           headers={"Retry-After": "5"})
        if self._chat is None:  # the model's text side exists once the engine has loaded it
            text = ModelText(self.engine.model)
            ctx = GenerationContext(self.engine, text, self.metrics, self.settings.queue_timeout)
            self._chat = ChatServing(ctx, self.settings, Admission(self.engine, self.settings, self.limiter),
                                     Constraints(text, self.settings.tool_parser))
        return self._chat

    def serving(self, api: str):
        """The serving object of one API (`chat`, `completions`, `responses`, `messages`), built on
        the first request once the model is ready; all share one GenerationContext."""
        chat = self.require_ready()
        if api == "chat":
            return chat
        if api not in self._servings:
            module, name = SERVINGS[api].split(":")
            import importlib

            cls = getattr(importlib.import_module(module), name)
            self._servings[api] = cls(chat.ctx, self.settings, chat.admission, chat.constraints)
        return self._servings[api]

    def refuse_if_draining(self) -> None:
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
        log.info("draining: %d running, %d waiting", self.engine.running, self.engine.waiting)
        self._drainer = gevent.spawn(self._drain)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.settings.drain_timeout
        while (self.engine.running or self.engine.waiting) and time.monotonic() < deadline:
            gevent.sleep(0.1)
        if self.engine.running or self.engine.waiting:
            log.warning("drain budget spent: ending %d requests", self.engine.running + self.engine.waiting)
            self.engine.abort_all("abort")
        self.stop_engine()
        log.info("drained; engine %s", self.engine.state.value)

    def finish(self, timeout: float = 5.0) -> None:
        """Worker exit: let a drain that is under way finish (its requests are done once
        Gunicorn exits; the drain notices within a poll), then make sure the engine stopped."""
        if self._drainer is not None:
            self._drainer.join(timeout)
        self.stop_engine(timeout)

    def stop_engine(self, timeout: float = 5.0) -> None:
        """Ask the engine thread to finish its step and stop; wait for it."""
        if self.engine.state is EngineState.READY:
            self.engine.shutdown()
        deadline = time.monotonic() + timeout
        while self.engine.state is EngineState.READY and time.monotonic() < deadline:
            gevent.sleep(0.05)

    def _watch_engine(self) -> None:
        """Exit the worker if the engine loop died or stalled (a failed model load stays up
        and reports 503 instead: restarting would only fail again)."""
        while True:
            gevent.sleep(WATCHDOG_PERIOD_S)
            died = self.engine.state is EngineState.FAILED and self.engine.model is not None
            if (died or self.stalled()) and not self.draining:
                log.critical("engine %s: exiting so Gunicorn starts a fresh worker",
                             "died" if died else "stalled")
                gevent.sleep(0.5)  # let failing requests flush their error responses
                os._exit(EXIT_CODE_ENGINE_DEAD)
