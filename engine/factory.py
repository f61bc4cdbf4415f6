"""Build the engine from settings: the one place that wires source, loader and generator."""
from __future__ import annotations

import logging

from config import Settings
from engine.engine import Engine
from engine.model import LoadedModel

log = logging.getLogger("orchard.engine")
_UNBOUNDED = 1 << 62  # 'auto': the engine trims the prefix cache to what the KV budget leaves free


def build_engine(settings: Settings) -> Engine:
    sources = []

    def preload() -> None:
        """Runs in the worker before it serves: imports, and fetching/importing a local model.
        (`orchard serve` already did the slow part, so this normally hits the cache.)"""
        from engine import blas
        from engine.model_source import resolve

        engine.blas = blas.activate(settings.blas)  # must precede the first `import mlx`
        import mlx.core  # noqa: F401
        import mlx_lm.generate  # noqa: F401
        import mlx_lm.utils  # noqa: F401

        sources.append(resolve(settings.model, settings.cache_dir, dtype_setting=settings.model_dtype,
                               model_id=settings.model_id))

    def load() -> LoadedModel:
        from engine.loader import load as load_model

        source = sources[-1]
        log.info("loading %s from %s", source.model_id, source.location if source.is_local else "the hub")
        return load_model(source, settings.load_format)

    def make_generator(model: LoadedModel, max_running: int):
        if settings.load_format == "synthetic":
            from engine.synthetic import SyntheticGenerator, text_tokens

            return SyntheticGenerator(text_tokens(model.tokenizer), max_running)
        from engine.generator import Generator

        return Generator(model.model, model.eos_token_ids, max_batch=max_running,
                         prefill_batch_size=settings.prefill_batch_size,
                         prefill_step_size=settings.prefill_step_size,
                         prefix_cache_bytes=_UNBOUNDED if settings.prefix_cache_cap is None else settings.prefix_cache_cap,
                         grammar_tokenizer=model.grammar_tokenizer)

    engine = Engine(load, max_running=settings.max_concurrent_requests, generator_factory=make_generator,
                    preload=preload, kv_budget=settings.kv_budget_bytes,
                    admission_group=settings.prefill_batch_size, admission_wait_steps=settings.admission_wait_steps)
    return engine
