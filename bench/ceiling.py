"""How fast the model itself can go, without the server: the ceiling the HTTP numbers sit under.

Three rows per batch size, measured back to back in one process:
  model    the bare forward pass (plain KV caches of ~100 tokens, no batch machinery)
  batchgen mlx-lm's BatchGenerator, 45-token prompts, 64 tokens each: tok/s over the whole
           round (prefill included) and over its decode steps alone
  engine   Orchard's engine in-process (no HTTP): the same round through the scheduler,
           the prefix cache and the output bridge; the second round (prompts cached);
           with CPU_MATH=mlx and =auto (engine/cpu_math.py), and the bare model with both

    python -m bench.ceiling [--model DIR] [--batches 1,8,20]
"""
from __future__ import annotations

import argparse
import contextlib
import time

from gevent import monkey

monkey.patch_all()

from config import load_settings  # noqa: E402


def bare_model(model, batch: int, steps: int = 10) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[5] * 100] * batch), cache=cache)
    token = mx.array([[7]] * batch)
    for _ in range(3):
        mx.eval(model(token, cache=cache))
    started = time.perf_counter()
    for _ in range(steps):
        mx.eval(model(token, cache=cache))
    return batch * steps / (time.perf_counter() - started)


def prompts(batch: int) -> list[list[int]]:
    return [[(7 * i + j) % 40000 + 10 for j in range(45)] for i in range(batch)]


def batch_generator(model, batch: int) -> tuple[float, float]:
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=64, completion_batch_size=max(32, batch), prefill_batch_size=8,
                               stop_tokens=[])
    started = time.perf_counter()
    generator.insert(prompts(batch))
    finished = 0
    while finished < batch:
        finished += sum(r.finish_reason is not None for r in generator.next_generated())
    wall = time.perf_counter() - started
    counters = generator._counters
    generator.close()
    return counters.generation_tokens / wall, counters.generation_tokens / counters.decode_time


def run_round(built, batch: int, tag: str) -> None:
    """Submit `batch` requests from greenlets at once and wait for every end marker."""
    import gevent

    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    def one(i: int) -> None:
        stream = built.submit(AddRequest(f"{tag}-{i}", prompts(batch)[i], 64, SamplingParams(temperature=0.0),
                                         ignore_eos=True))
        while stream.finished is None:
            stream.next_batch(timeout=60)

    gevent.joinall([gevent.spawn(one, i) for i in range(batch)], raise_error=True)


def engine(model_dir: str, batch: int, cpu_math: str) -> float:
    import gevent

    from engine.engine import EngineState
    from engine.factory import build_engine

    built = build_engine(load_settings({"MODEL": model_dir, "MAX_CONCURRENT_REQUESTS": str(max(32, batch)),
                                        "CPU_MATH": cpu_math}, dotenv=False))
    built.start()
    while built.state is EngineState.LOADING:
        gevent.sleep(0.05)
    try:
        run_round(built, batch, "warm")  # fills the prefix cache
        before = built.stats.generated_tokens
        started = time.perf_counter()
        run_round(built, batch, "timed")
        return (built.stats.generated_tokens - before) / (time.perf_counter() - started)
    finally:
        built.shutdown()


@contextlib.contextmanager
def model_functions_kept():
    """CPU_MATH installs its functions into mlx-lm's model modules for the whole process: put
    MLX's back afterwards, so every row measures the math it names."""
    import sys

    names = ("swiglu", "scaled_dot_product_attention")
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("mlx_lm.models.") and m is not None]
    kept = [(m, name, getattr(m, name)) for m in modules for name in names if hasattr(m, name)]
    try:
        yield
    finally:
        for module, name, value in kept:
            setattr(module, name, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: the embedded model, imported)")
    parser.add_argument("--batches", default="1,8,20")
    args = parser.parse_args()
    settings = load_settings()
    from engine import blas

    print("BLAS:", blas.activate(settings.blas))
    from mlx_lm import load

    from engine.model_source import resolve

    model_dir = args.model or resolve("embedded", settings.cache_dir, dtype_setting=settings.model_dtype).location
    model, _ = load(model_dir)
    from engine import cpu_math

    print("| batch | bare model tok/s | bare model, CPU_MATH | BatchGenerator round tok/s | its decode steps tok/s "
          "| Orchard engine round, CPU_MATH=mlx | Orchard engine round, CPU_MATH=auto |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch in (int(b) for b in args.batches.split(",")):
        row = [bare_model(model, batch)]
        with model_functions_kept():
            if cpu_math.wanted("auto"):
                cpu_math.install(model)
            row.append(bare_model(model, batch))
        row += batch_generator(model, batch)
        for setting in ("mlx", "auto"):
            with model_functions_kept():
                row.append(engine(str(model_dir), batch, setting))
        print(f"| {batch} | " + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)


if __name__ == "__main__":
    main()
