"""The Generator as the server's factory builds it (settings from the environment), on a
random-weight shape: what the engine-only benchmarks (bench.first_prompt, bench.closed_loop)
measure, so their numbers are the server's engine's."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def served_generator(shape: str, dtype: str, tokenizer: Optional[Path]):
    """(generator, model, tokenizer, config, settings) for `shape` with random `dtype` weights."""
    import mlx.core as mx

    from config import load_settings
    from engine.factory import PREFILL_BUCKET_GPU
    from engine.generator import Generator
    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    settings = load_settings(dotenv=False)
    cpu = mx.default_device().type == mx.cpu
    folder = write_random_model(Path(f"/tmp/orchard-{shape}-{dtype}"), shape, weights=False, dtype=dtype,
                                tokenizer_from=tokenizer)
    model, tokenizer_, config = _load_dummy(folder)
    generator = Generator(model, [], max_batch=settings.max_concurrent_requests,
                          prefill_batch_size=settings.prefill_batch_size,
                          prefill_step_size=settings.prefill_tokens(cpu), prefill_chunk=settings.prefill_chunk(cpu),
                          prefill_bucket=1 if cpu else PREFILL_BUCKET_GPU, prefix_cache_bytes=1 << 30,
                          decode_batch=settings.decode_batch, decode_attention=settings.decode_attention,
                          cpu_math=settings.cpu_math)
    return generator, model, tokenizer_, config, settings


def warm_as_served(generator, settings, config) -> int:
    """The start-up warm-up the server's factory runs (WARMUP_TOKENS, WARMUP_SHAPES); its steps."""
    import mlx.core as mx

    return generator.warm_up(settings.warmup(mx.default_device().type == mx.cpu), settings.max_concurrent_requests,
                             config.get("max_position_embeddings", 32768),
                             prompt_batches=settings.warmup_shapes == "all")
