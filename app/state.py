"""Everything one app instance holds: settings, the engine, and services built on it."""
from __future__ import annotations

import time
from typing import Optional

from app.chat import ChatService
from app.errors import APIError
from app.metrics import Metrics
from app.model_text import ModelText
from app.status import StatusReporter, ThroughputMeter
from config import Settings
from engine.engine import Engine, EngineState
from orchard import __version__

STALL_S = 30.0  # engine loop silent this long while it has work: unhealthy


class Orchard:
    def __init__(self, settings: Settings, engine: Engine):
        self.settings = settings
        self.engine = engine
        self.meter = ThroughputMeter(engine)
        self.status = StatusReporter(engine, settings, self.meter, __version__)
        self.metrics = Metrics(engine, settings)
        self._chat: Optional[ChatService] = None

    @classmethod
    def start(cls, settings: Settings, engine: Optional[Engine] = None) -> "Orchard":
        if engine is None:
            from engine.factory import build_engine

            engine = build_engine(settings)
        orchard = cls(settings, engine)
        engine.start()
        orchard.meter.start()
        return orchard

    def health(self) -> tuple[bool, str]:
        engine = self.engine
        if engine.state is EngineState.LOADING:
            return False, "The model is still loading"
        if engine.state is not EngineState.READY:
            return False, f"The engine is {engine.state.value}: {engine.error or 'stopped'}"
        beat = engine.stats.last_beat
        if engine.running and beat and time.monotonic() - beat > STALL_S:
            return False, f"The engine made no progress for {time.monotonic() - beat:.0f} s"
        return True, "ok"

    def require_ready(self) -> ChatService:
        ok, why = self.health()
        if not ok:
            raise APIError(503, why, type="server_error", code="engine_unavailable",
                           headers={"Retry-After": "5"})
        if self._chat is None:
            self._chat = ChatService(self.engine, self.settings, ModelText(self.engine.model), self.metrics)
        return self._chat
