"""The served models: the operator's models file (or MODEL alone), their local engines on the one
engine host, and their remote upstreams. Answers which model serves a requested name, lists
them for /v1/models, reports them per model, and unloads idle ones on the web side's clock.

A requested name only ever matches an id or an alias from the operator's configuration: it is
never treated as a path, so no request can make the server load anything else.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

import gevent

from app.errors import APIError, bad_request
from config import Settings
from config.models_file import ModelEntry, ModelsConfig, load_models_file, single_model_config
from engine.engine import Engine, EngineState

log = logging.getLogger("orchard.models")
IDLE_POLL_S = 1.0
# Refusals that mean "no room here now": the next target of an alias may have some. A client's own
# rate limit (429 rate_limit_exceeded) and a request too big for any budget are not among them.
CAPACITY_CODES = {"server_is_overloaded", "upstream_at_capacity", "engine_unavailable"}


def at_capacity(error: APIError) -> bool:
    return error.status in (429, 503) and error.code in CAPACITY_CODES


class ModelCatalog:
    def __init__(self, config: ModelsConfig, engines: dict[str, Engine], host=None, remotes: Optional[dict] = None):
        self.config = config
        self._engines = engines
        self._host = host
        self._remotes = remotes or {}
        self._busy_at: dict[str, tuple[float, int]] = {}  # model id -> (last seen busy, loads then)
        if not engines:
            raise ValueError("the models file names no local model: at least one is needed")

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelCatalog":
        host = cls.build_host(settings)
        if not settings.models_file:
            return cls.serving_one(settings, host.engines[0], host)
        config = load_models_file(settings.models_file)
        engines = {engine.model_id: engine for engine in host.engines}
        remotes = {}
        for entry in config.entries:
            if entry.is_remote:
                from app.remote.model import RemoteModel

                remotes[entry.id] = RemoteModel(entry, os.environ)
        return cls(config, engines, host, remotes)

    @staticmethod
    def build_host(settings: Settings):
        """The engine host of every local model (the same on every rank of a distributed group)."""
        from engine.factory import build_host, build_single_host

        if not settings.models_file:
            return build_single_host(settings)
        return build_host(settings, [e for e in load_models_file(settings.models_file).entries if not e.is_remote])

    @classmethod
    def serving_one(cls, settings: Settings, engine: Engine, host=None) -> "ModelCatalog":
        """MODEL alone: one pinned chat model, its MODEL_ALIASES (globs allowed) as aliases."""
        from engine.model_source import served_id

        model_id = engine.model_id or served_id(settings.model, settings.model_id)
        engine.model_id = model_id
        return cls(single_model_config(model_id, settings.model, settings.aliases()), {model_id: engine}, host)

    def start(self) -> None:
        if self._host is not None:
            self._host.start()
        else:
            self.first_engine.start()

    # ---- lookups ---------------------------------------------------------
    @property
    def engines(self) -> list[Engine]:
        return list(self._engines.values())

    @property
    def first_engine(self) -> Engine:
        return next(iter(self._engines.values()))

    @property
    def first_chat_id(self) -> str:
        chat = [e.model_id for e in self.engines if not getattr(e, "is_embedding", False)]
        return chat[0] if chat else self.first_engine.model_id

    def engine(self, model_id: str) -> Engine:
        return self._engines[model_id]

    def remote(self, model_id: str):
        return self._remotes[model_id]

    def pinned_engines(self) -> list[Engine]:
        return [e for e in self.engines if e.pinned]

    @property
    def host(self):
        """The EngineHost every local model runs on (a single MODEL's engine starts its own)."""
        return self._host or getattr(self.first_engine, "_host", None)

    @property
    def distributed(self) -> bool:
        host = self.host
        return bool(host is not None and host.group is not None)

    def host_alive(self) -> bool:
        host = self.host
        return bool(host is not None and host.alive)

    def end_open_requests(self, why: str) -> int:
        """End every request the engine thread holds with an error, from the hub (a stalled
        thread never will); how many there were."""
        from engine.messages import Finished

        host = self.host
        if host is None or host.bridge is None:
            return 0
        return host.bridge.end_all(Finished("error", error=why))

    def host_died(self) -> bool:
        host = self.host
        return bool(host is not None and host.error is not None)

    def targets(self, name: str, kind: str = "chat", param: str = "model") -> tuple[ModelEntry, ...]:
        """The entries that may serve `name`, in the order to try them; 404 for an unknown name,
        400 when the name is a model of the other kind (a chat model asked for embeddings)."""
        try:
            targets = self.config.resolve(name) if isinstance(name, str) else ()
        except KeyError:
            targets = ()
        if not targets:
            served = ", ".join(e.id for e in self.config.entries if e.kind == kind)
            raise APIError(404, f"The model '{str(name)[:200]}' does not exist; this server serves: {served}",
                           type="not_found_error", param=param, code="model_not_found")
        fitting = tuple(t for t in targets if t.kind == kind)
        if not fitting:
            what = "an embedding model: use /v1/embeddings" if kind == "chat" else \
                "a chat model, not an embedding model: use it with the chat or completions APIs"
            raise bad_request(f"The model '{name}' is {what}", param=param, code="wrong_model_kind")
        return fitting

    # ---- reports -----------------------------------------------------------
    def state_of(self, entry: ModelEntry) -> str:
        if entry.is_remote:
            return "remote"
        engine = self._engines[entry.id]
        return {EngineState.READY: "loaded", EngineState.LOADING: "loading",
                EngineState.UNLOADED: "unloaded"}.get(engine.state, engine.state.value)

    def listing(self) -> list[dict]:
        """/v1/models: every configured model, with its state and size."""
        rows = []
        for entry in self.config.entries:
            row = {"id": entry.id, "object": "model", "created": 0, "owned_by": "orchard", "kind": entry.kind,
                   "state": self.state_of(entry), "aliases": list(entry.aliases)}
            if entry.is_remote:
                row["owned_by"] = "remote"
            else:
                engine = self._engines[entry.id]
                model = engine.model
                if model is not None:
                    row.update(created=model.created, context_length=model.context_length)
                row.update(size_bytes=engine.weight_bytes, pinned=entry.pinned)
            rows.append(row)
        return rows

    def report(self) -> list[dict]:
        """/v1/system/status: one row per model."""
        rows = []
        for entry in self.config.entries:
            row = {"id": entry.id, "kind": entry.kind, "state": self.state_of(entry)}
            if entry.is_remote:
                row["remote"] = {"base_url": entry.remote.base_url, "model": entry.remote.model,
                                 **self._remotes[entry.id].stats.snapshot()}
            else:
                engine, s = self._engines[entry.id], self._engines[entry.id].stats
                row.update(pinned=entry.pinned, weight_bytes=engine.weight_bytes, running=engine.running,
                           waiting=engine.waiting, max_concurrent=engine.max_running,
                           finished=s.requests_finished, failed=s.requests_failed,
                           generated_tokens=s.generated_tokens, prompt_tokens=s.prompt_tokens,
                           loads=s.loads, unloads=s.unloads, kv_budget_bytes=engine.kv_budget,
                           kv_reserved_bytes=engine.kv_reserved, error=engine.error)
            rows.append(row)
        return rows

    def register_metrics(self, registry) -> None:
        from app.model_metrics import ModelCollector

        registry.register(ModelCollector(self))

    # ---- idle unload (web side: the clock lives here, the engine only checks idleness) ----
    def unload_idle_models(self) -> None:
        while True:
            gevent.sleep(IDLE_POLL_S)
            self.unload_idle_once(time.monotonic())

    def unload_idle_once(self, now: float) -> None:
        for entry in self.config.entries:
            if entry.is_remote or entry.pinned or not entry.idle_unload_s:
                continue
            engine = self._engines[entry.id]
            seen, loads = self._busy_at.get(entry.id, (now, engine.stats.loads))
            if engine.running or engine.waiting or engine.stats.loads != loads or not engine.loaded:
                self._busy_at[entry.id] = (now, engine.stats.loads)
            elif now - seen >= entry.idle_unload_s:
                log.info("model %s idle for %.0f s: unloading", entry.id, now - seen)
                engine.unload_if_idle()
                self._busy_at[entry.id] = (now, engine.stats.loads)
