"""What a new shape costs the first time on this device: prefill passes (rows x length over a
fresh cache) and decode steps (rows) timed cold and again warm, on a random-weight shape.

    python -m bench.shape_costs [--shape qwen2.5-0.5b] [--out $OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    folder = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False,
                                dtype="bfloat16", tokenizer_from=args.tokenizer)
    model, _, _ = _load_dummy(folder)

    def prefill(rows: int, length: int, start: int = 0) -> float:
        """A pass of rows x length over a fresh cache that already holds `start` positions."""
        cache = make_prompt_cache(model)
        if start:
            model(mx.ones((rows, start), dtype=mx.int32), cache=cache)
            mx.eval([c.state for c in cache])
        tic = time.perf_counter()
        model(mx.ones((rows, length), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
        return (time.perf_counter() - tic) * 1000

    def decode(rows: int, context: int) -> float:
        cache = make_prompt_cache(model)
        model(mx.ones((rows, context), dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
        tic = time.perf_counter()
        for _ in range(5):
            out = model(mx.ones((rows, 1), dtype=mx.int32), cache=cache)
            mx.eval(out)
        return (time.perf_counter() - tic) * 1000 / 5

    rows = []
    model(mx.ones((1, 8), dtype=mx.int32))  # the first call of all
    for kind, shape in [("prefill", (1, 100)), ("prefill", (1, 101)), ("prefill", (7, 73)), ("prefill", (7, 75)),
                        ("prefill", (16, 150)), ("prefill", (16, 151)), ("prefill", (1, 512, 512)),
                        ("prefill", (1, 512, 1024)), ("prefill", (1, 512, 1031)),
                        ("decode", (5, 140)), ("decode", (6, 140)), ("decode", (6, 141)), ("decode", (37, 150)),
                        ("decode", (85, 150))]:
        fn = prefill if kind == "prefill" else decode
        cold = fn(*shape)
        warm = fn(*shape)
        rows.append({"kind": kind, "shape": shape, "cold_ms": round(cold, 2), "warm_ms": round(warm, 2)})
        print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shape_costs.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
