"""A batched decode step with and without Orchard's decode-attention kernel (no server).

Per batch size, in one process and interleaved (mask, kernel, mask, kernel) against the
machine's drift: the slot batcher's steady-state decode step with mlx-lm's masked attention
(`DECODE_ATTENTION=mask`) and with the kernel (`auto` on CUDA); mlx-lm's raw `BatchGenerator`
step; and a lean step (the model on plain KV caches of one length: no padding, no mask,
greedy argmax, pipelined), the floor a batched step can reach without owning the kernels.
Every row holds a distinct 128-token prompt and decodes `--steps` tokens after a warm-up.

    python -m bench.decode_attention [--shape qwen2.5-0.5b] [--batches 1,8,64,128] [--steps 100] [--ramp 128]

`--ramp N` first times N rows joining one per step, twice on fresh batches: the difference is
what each batch size's first step costs (what the start-up warm-up pays in advance).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path


def slot_step_ms(model, vocab: int, batch: int, attention: str, steps: int, seed: int) -> float:
    from engine.generator import Generator
    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    rnd = random.Random(seed)
    gen = Generator(model, [], max_batch=batch, prefill_batch_size=16, prefill_step_size=4096,
                    prefill_bucket=64, decode_attention=attention)
    if attention == "auto" and not gen.fused_attention:
        print("(no kernel here: auto runs the masked attention)", flush=True)
    for i in range(batch):
        gen.insert(AddRequest(f"r{i}", [rnd.randrange(10, vocab) for _ in range(128)], steps + 200,
                              SamplingParams(temperature=0.0), ignore_eos=True))
    while len(gen.step()) < batch:  # until every row decodes
        pass
    return steady_ms(gen.step, steps)


def steady_ms(step, steps: int) -> float:
    """Milliseconds per call of `step` after 20 unmeasured ones, the device drained at both ends."""
    import mlx.core as mx

    for _ in range(20):
        step()
    mx.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    mx.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def ramp_ms(model, vocab: int, rows: int, seed: int) -> list[float]:
    """Each step's milliseconds while rows join one per step (slot counts 1, 2, ... rows),
    synchronized per step: a batch size's first step shows what it costs to see it first."""
    import mlx.core as mx

    from engine.generator import Generator
    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    rnd = random.Random(seed)
    gen = Generator(model, [], max_batch=rows, prefill_batch_size=16, prefill_step_size=4096, prefill_bucket=64)
    times = []
    for k in range(rows):
        gen.insert(AddRequest(f"r{k}", [rnd.randrange(10, vocab) for _ in range(40)], rows + 4,
                              SamplingParams(temperature=0.0), ignore_eos=True))
        start = time.perf_counter()
        gen.step()
        mx.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    while gen.busy:
        gen.step()
    return times


def raw_step_ms(model, vocab: int, batch: int, steps: int, seed: int) -> float:
    from mlx_lm.generate import BatchGenerator

    rnd = random.Random(seed)
    gen = BatchGenerator(model, max_tokens=steps + 200, completion_batch_size=batch, prefill_batch_size=min(batch, 16))
    gen.insert([[rnd.randrange(10, vocab) for _ in range(128)] for _ in range(batch)])
    while len(gen.next_generated()) < batch:
        pass
    elapsed = steady_ms(gen.next_generated, steps)
    gen.close()
    return elapsed


def lean_step_ms(model, vocab: int, batch: int, steps: int, seed: int) -> float:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rnd = random.Random(seed)
    cache = make_prompt_cache(model)
    prompts = mx.array([[rnd.randrange(10, vocab) for _ in range(128)] for _ in range(batch)])
    tokens = mx.argmax(model(prompts, cache=cache)[:, -1, :], axis=-1)
    for n in range(steps + 20):
        if n == 20:
            mx.synchronize()
            start = time.perf_counter()
        nxt = mx.argmax(model(tokens[:, None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(nxt)
        tokens = nxt
    mx.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 128])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--ramp", type=int, default=0, help="also: rows joining one per step up to this many, twice")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import mlx.core as mx

    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    model_dir = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False, dtype="bfloat16")
    model, _, config = _load_dummy(model_dir)
    vocab = config["vocab_size"]
    doc_ramp = {}
    if args.ramp:
        first, second = ramp_ms(model, vocab, args.ramp, 1), ramp_ms(model, vocab, args.ramp, 2)
        doc_ramp = {"rows": args.ramp, "first_ms": round(sum(first), 1), "second_ms": round(sum(second), 1),
                    "first_steps_ms": [round(t, 1) for t in first], "second_steps_ms": [round(t, 1) for t in second]}
        print(f"ramp to {args.ramp} rows, one joining per step: first {doc_ramp['first_ms']} ms, "
              f"again {doc_ramp['second_ms']} ms", flush=True)
    rows = []
    for batch in args.batches:
        row = {"batch": batch, "mask_ms": [], "kernel_ms": []}
        for rep in range(2):
            row["mask_ms"].append(round(slot_step_ms(model, vocab, batch, "mask", args.steps, rep), 2))
            row["kernel_ms"].append(round(slot_step_ms(model, vocab, batch, "auto", args.steps, rep), 2))
            mx.clear_cache()
        row["raw_batchgenerator_ms"] = round(raw_step_ms(model, vocab, batch, args.steps, 7), 2)
        row["lean_ms"] = round(lean_step_ms(model, vocab, batch, args.steps, 7), 2)
        row["mask_over_kernel"] = round(min(row["mask_ms"]) / min(row["kernel_ms"]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        mx.clear_cache()
    doc = {"shape": args.shape, "steps": args.steps, "device": str(mx.default_device()), "rows": rows, "ramp": doc_ramp}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))
    print("| batch | mask ms | kernel ms | mask / kernel | raw BatchGenerator ms | lean ms |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['batch']} | {' / '.join(map(str, r['mask_ms']))} | {' / '.join(map(str, r['kernel_ms']))} | "
              f"{r['mask_over_kernel']} | {r['raw_batchgenerator_ms']} | {r['lean_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
