"""The bare decode step of a random-weight model, whole on one process vs split across N ranks
(no server): where a distributed server's time goes. Each step: the model on a KV cache, greedy
argmax, one host sync (as the server's engine does).

    python -m bench.tp_step --shape qwen2.5-7b --ranks 2 --backend nccl --batches 1,32,128
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def step_ms(model, batch: int, steps: int) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens = mx.argmax(model(mx.zeros((batch, 32), dtype=mx.int32), cache=cache)[:, -1], axis=-1)
    mx.eval(tokens)
    for _ in range(3):  # warm: the first calls of a shape compile
        tokens = mx.argmax(model(tokens[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(tokens)
    started = time.perf_counter()
    for _ in range(steps):
        tokens = mx.argmax(model(tokens[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(tokens)
    return (time.perf_counter() - started) / steps * 1000


def measure(args) -> dict:
    import mlx.core as mx

    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    folder = write_random_model(Path(f"/tmp/orchard-tp-{args.shape}"), args.shape, weights=False, dtype=args.dtype)
    model, _, _ = _load_dummy(folder)
    world = mx.distributed.init(strict=True, backend=args.backend) if "MLX_RANK" in os.environ else None
    how = "whole"
    if world is not None and world.size() > 1:
        from engine.distributed import shard

        how = shard(model, world)
    mx.eval(model.parameters())
    rows = {str(b): round(step_ms(model, b, args.steps), 2) for b in map(int, args.batches.split(","))}
    return {"ranks": world.size() if world is not None else 1, "split": how, "ms_per_step": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="nccl")
    parser.add_argument("--batches", default="1,32,128")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = measure(args)
        if int(os.environ.get("MLX_RANK", "0")) == 0:
            print("RESULT " + json.dumps(result), flush=True)
        return 0
    argv = [sys.executable, "-m", "bench.tp_step", "--worker"] + sys.argv[1:]
    results = []
    one = subprocess.run(argv, env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"}, capture_output=True, text=True)
    results.append(one.stdout)
    env = {**os.environ, "NCCL_HOST_IP": "127.0.0.1", "NCCL_PORT": "29533", "MLX_WORLD_SIZE": str(args.ranks)}
    procs = [subprocess.Popen(argv, env={**env, "MLX_RANK": str(r), "CUDA_VISIBLE_DEVICES": str(r)},
                              stdout=subprocess.PIPE, text=True) for r in range(args.ranks)]
    results.append(procs[0].communicate()[0])
    for p in procs[1:]:
        p.wait()
    rows = [json.loads(line[7:]) for out in results for line in out.splitlines() if line.startswith("RESULT ")]
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
