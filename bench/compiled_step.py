"""The moonshot's first question: what does compiling the whole decode step buy? (no server)

Issue 14's moonshot asks for an owned decode step (compiled, KV slots that do not move, one
host sync per step) at 1.3x raw mlx-lm. The lean step (`bench.decode_attention`: the model on
plain KV caches, greedy argmax, pipelined) is what a step costs without padding or per-row
work; this times that same step once more with the forward pass and the argmax compiled
(`mx.compile`) as one function. Compiling needs shapes that hold from step to step, so the KV
lives in fixed-capacity buffers (one block of room past the prompt, as the slot batcher's are)
written at a position passed in as an array, and attention reads the whole buffer under a mask
of the columns written so far. Per batch size, in one process, interleaved (lean, compiled,
lean, compiled) against drift; every row holds a distinct 128-token prompt. The compiled step's
logits are checked against the lean step's over six steps fed the same tokens (exit 1 if they
differ by more than rounding).

    python -m bench.compiled_step [--shape qwen2.5-0.5b] [--batches 1,8,64,128] [--steps 100]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

from bench.decode_attention import lean_step_ms

PROMPT = 128


class FixedKV:
    """One layer's KV for the compiled step: a buffer of fixed capacity, written at `position`
    (a scalar array, so one compiled graph serves every step) and read whole under a mask."""

    def __init__(self, keys, values, position):
        self.keys, self.values, self.offset = keys, values, position

    def update_and_fetch(self, keys, values):
        import mlx.core as mx

        self.keys = mx.slice_update(self.keys, keys, self.offset[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset[None], axes=(2,))
        return self.keys, self.values

    def make_mask(self, n, return_array=False, window_size=None):
        import mlx.core as mx

        return mx.arange(self.keys.shape[2]) <= self.offset  # the columns written, this step's included


def prefilled(model, vocab: int, batch: int, seed: int, room: int):
    """Each row's prompt through the model on plain caches, then copied into buffers with `room`
    columns past it; returns (buffers per layer as [k, v, ...], first tokens)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rnd = random.Random(seed)
    cache = make_prompt_cache(model)
    prompts = mx.array([[rnd.randrange(10, vocab) for _ in range(PROMPT)] for _ in range(batch)])
    tokens = mx.argmax(model(prompts, cache=cache)[:, -1, :], axis=-1)
    kv = []
    for c in cache:
        b, h, _, d = c.keys.shape
        for part in (c.keys, c.values):
            buffer = mx.zeros((b, h, PROMPT + room, part.shape[3]), dtype=part.dtype)
            buffer[:, :, :PROMPT] = part[:, :, :PROMPT]
            kv.append(buffer)
    mx.eval(kv, tokens)
    return kv, tokens


def compiled_step(model, kv: list, with_logits: bool = False):
    """One decode step as one compiled function of (tokens, position); the KV buffers in `kv`
    are its implicit inputs and outputs (updated in place in the list). It returns the greedy
    tokens, and with `with_logits` the last position's logits too (for the check)."""
    import mlx.core as mx

    layers = len(kv) // 2

    def step(tokens, position):
        caches = [FixedKV(kv[2 * i], kv[2 * i + 1], position) for i in range(layers)]
        logits = model(tokens[:, None], cache=caches)[:, -1, :]
        for i, c in enumerate(caches):
            kv[2 * i], kv[2 * i + 1] = c.keys, c.values
        return (mx.argmax(logits, axis=-1), logits) if with_logits else mx.argmax(logits, axis=-1)

    return mx.compile(step, inputs=kv, outputs=kv)


def compiled_step_ms(model, vocab: int, batch: int, steps: int, seed: int) -> float:
    import mlx.core as mx

    kv, tokens = prefilled(model, vocab, batch, seed, room=steps + 32)
    step = compiled_step(model, kv)
    for n in range(steps + 20):
        if n == 20:
            mx.synchronize()
            start = time.perf_counter()
        tokens = step(tokens, mx.array(PROMPT + n, dtype=mx.int32))
        mx.async_eval(tokens)
    mx.synchronize()
    return (time.perf_counter() - start) / steps * 1000


def logit_gap(model, vocab: int, batch: int, seed: int, count: int = 6, shift: int = 0) -> float:
    """The largest difference between the compiled step's logits and the lean step's over
    `count` steps, both fed the lean step's tokens (`shift` moves the compiled step's write
    position: a wrong position must show up here)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    rnd = random.Random(seed)
    cache = make_prompt_cache(model)
    prompts = mx.array([[rnd.randrange(10, vocab) for _ in range(PROMPT)] for _ in range(batch)])
    tokens = mx.argmax(model(prompts, cache=cache)[:, -1, :], axis=-1)
    kv, _ = prefilled(model, vocab, batch, seed, room=count + shift + 8)
    step = compiled_step(model, kv, with_logits=True)
    gap = 0.0
    for n in range(count):
        lean = model(tokens[:, None], cache=cache)[:, -1, :]
        _, compiled = step(tokens, mx.array(PROMPT + n + shift, dtype=mx.int32))
        gap = max(gap, mx.abs(lean.astype(mx.float32) - compiled.astype(mx.float32)).max().item())
        tokens = mx.argmax(lean, axis=-1)
    return gap


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64, 128])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    import mlx.core as mx

    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    model_dir = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False, dtype=args.dtype)
    model, _, config = _load_dummy(model_dir)
    vocab = config["vocab_size"]
    rows = []
    for batch in args.batches:
        row = {"batch": batch, "lean_ms": [], "compiled_ms": []}
        for rep in range(2):
            row["lean_ms"].append(round(lean_step_ms(model, vocab, batch, args.steps, rep), 2))
            row["compiled_ms"].append(round(compiled_step_ms(model, vocab, batch, args.steps, rep), 2))
            mx.clear_cache()
        row["max_logit_gap"] = logit_gap(model, vocab, batch, 0)
        row["lean_over_compiled"] = round(min(row["lean_ms"]) / min(row["compiled_ms"]), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    doc = {"shape": args.shape, "dtype": args.dtype, "steps": args.steps, "device": str(mx.default_device()),
           "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    tolerance = 1e-3 if args.dtype == "float32" else 5e-2  # bf16 rounds differently when fused
    return 0 if all(r["max_logit_gap"] <= tolerance for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
