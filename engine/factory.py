"""Build the engine from settings: the one place that wires source, loader and generator."""
from __future__ import annotations

import logging

from config import Settings
from engine.engine import Engine
from engine.model import LoadedModel

log = logging.getLogger("orchard.engine")


def build_engine(settings: Settings) -> Engine:
    def load() -> LoadedModel:
        from engine import blas
        from engine.loader import load as load_model
        from engine.model_source import resolve

        engine.blas = blas.activate(settings.blas)
        source = resolve(settings.model, settings.cache_dir, dtype_setting=settings.model_dtype,
                         model_id=settings.model_id)
        log.info("loading %s from %s", source.model_id, source.location if source.is_local else "the hub")
        return load_model(source, settings.load_format)

    def make_generator(model: LoadedModel, max_running: int):
        from engine.generator import Generator

        return Generator(model.model, model.eos_token_ids, max_batch=max_running,
                         prefill_batch_size=settings.prefill_batch_size,
                         prefill_step_size=settings.prefill_step_size)

    engine = Engine(load, max_running=settings.max_concurrent_requests, generator_factory=make_generator)
    return engine
