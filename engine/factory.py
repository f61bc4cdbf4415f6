"""Build engines from settings: the one place that wires source, loader and generator.

`build_engine` serves one model (MODEL; tests and benchmarks); `build_host` serves every local
model of the operator's models file on one engine host thread, under one memory budget.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Optional

from config import Settings
from engine.engine import Engine
from engine.model import LoadedModel

if TYPE_CHECKING:
    from engine.host import EngineHost

log = logging.getLogger("orchard.engine")
# On a GPU, prefill passes pad to multiples of this so their shapes repeat (engine/batcher.py);
# the CPU compiles nothing per shape, and there padding would only cost compute.
PREFILL_BUCKET_GPU = 64
_UNBOUNDED = 1 << 62  # 'auto': the engine trims the prefix cache to what the KV budget leaves free


def build_engine(settings: Settings) -> Engine:
    return model_engine(settings, settings.model, settings.model_id, settings.max_concurrent_requests,
                        pinned=True, kv_budget=settings.kv_budget_bytes)


def build_single_host(settings: Settings) -> "EngineHost":
    """MODEL alone on a host of its own (in a distributed group when DISTRIBUTED_HOSTFILE is set)."""
    from engine.host import EngineHost

    return EngineHost([build_engine(settings)], memory_budget=None, join_group=group_joiner(settings))


def group_joiner(settings: Settings):
    if not settings.distributed_hostfile:
        return None
    from engine.distributed import join

    return lambda: join(settings.distributed_hostfile, settings.distributed_rank, settings.distributed_backend)


def build_host(settings: Settings, entries) -> "EngineHost":
    """One engine per local model entry (config.models_file.ModelEntry), embedding models included."""
    from engine.host import EngineHost

    engines = []
    for entry in entries:
        max_running = entry.max_concurrent or settings.max_concurrent_requests
        if entry.kind == "embedding":
            from engine.embedding_engine import EmbeddingEngine

            sources: list = []
            engines.append(EmbeddingEngine(_loader(settings, entry.source, entry.id, sources),
                                           preload=_preload(settings, sources, entry.source, entry.id),
                                           model_id=entry.id, pinned=entry.pinned, pooling=entry.pooling or "last",
                                           normalize=entry.normalize, max_running=max_running))
        else:
            engines.append(model_engine(settings, entry.source, entry.id, max_running, pinned=entry.pinned))
    return EngineHost(engines, memory_budget=settings.memory_budget_bytes, join_group=group_joiner(settings))


def model_engine(settings: Settings, source_setting: str, model_id: str, max_running: int, *,
                 pinned: bool, kv_budget: Optional[int] = None) -> Engine:
    sources = []
    engine: Optional[Engine] = None

    def make_generator(model: LoadedModel, max_running: int, stream=None):
        if settings.load_format == "synthetic":
            from engine.synthetic import SyntheticGenerator, text_tokens

            return SyntheticGenerator(text_tokens(model.tokenizer), max_running)
        import mlx.core as mx

        from engine.generator import Generator

        return Generator(model.model, model.eos_token_ids, max_batch=max_running,
                         prefill_batch_size=settings.prefill_batch_size,
                         prefill_step_size=settings.prefill_tokens(mx.default_device().type == mx.cpu),
                         prefill_chunk=settings.prefill_chunk(mx.default_device().type == mx.cpu),
                         prefill_bucket=1 if mx.default_device().type == mx.cpu else PREFILL_BUCKET_GPU,
                         prefix_cache_bytes=_UNBOUNDED if settings.prefix_cache_cap is None else settings.prefix_cache_cap,
                         grammar_tokenizer=model.grammar_tokenizer, stream=stream,
                         decode_batch=settings.decode_batch, decode_attention=settings.decode_attention,
                         cpu_math=settings.cpu_math)

    def warm_up(generator, model: LoadedModel, max_running: int) -> None:
        import mlx.core as mx

        tokens = settings.warmup(mx.default_device().type == mx.cpu)
        if not tokens or not hasattr(generator, "warm_up"):
            return
        started = time.perf_counter()
        steps = generator.warm_up(tokens, max_running, model.context_length,
                                 prompt_batches=settings.warmup_shapes == "all")
        log.info("warmed up %s: a %d-token prompt, batches up to %d and %s prompt-batch shapes in %d steps, %.1f s",
                 model.model_id, tokens, max_running, "every" if settings.warmup_shapes == "all" else "no",
                 steps, time.perf_counter() - started)

    def preload() -> None:
        _preload(settings, sources, source_setting, model_id)()
        from engine.loader import weight_file_bytes

        engine.weight_bytes = weight_file_bytes(sources[-1].location)

    engine = Engine(_loader(settings, None, model_id, sources), max_running=max_running,
                    generator_factory=make_generator, preload=preload, kv_budget=kv_budget,
                    admission_group=settings.prefill_batch_size, admission_wait_steps=settings.admission_wait(),
                    model_id=model_id, pinned=pinned, warm_up=warm_up)
    return engine


def _preload(settings: Settings, sources: list, source_setting: Optional[str] = None, model_id: str = ""):
    def preload() -> None:
        """Runs in the worker before it serves: imports, and fetching/importing a local model.
        (`orchard serve` already did the slow part, so this normally hits the cache.)"""
        from engine import blas
        from engine.model_source import resolve

        blas.activate(settings.blas)  # must precede the first `import mlx`
        import mlx.core  # noqa: F401
        import mlx_lm.generate  # noqa: F401
        import mlx_lm.utils  # noqa: F401

        if source_setting is not None:
            sources.append(resolve(source_setting, settings.cache_dir, dtype_setting=settings.model_dtype,
                                   model_id=model_id))

    return preload


def _loader(settings: Settings, source_setting: Optional[str], model_id: str, sources: Optional[list] = None):
    sources = sources if sources is not None else []

    def load(with_weights: bool, group=None, tokenizer=None) -> LoadedModel:
        from engine.loader import load as load_model
        from engine.model_source import resolve

        if not sources:
            sources.append(resolve(source_setting, settings.cache_dir, dtype_setting=settings.model_dtype,
                                   model_id=model_id))
        source = sources[-1]
        if with_weights:
            log.info("loading %s from %s", source.model_id, source.location if source.is_local else "the hub")
        return load_model(source, settings.load_format, with_weights=with_weights, group=group, tokenizer=tokenizer)

    return load
