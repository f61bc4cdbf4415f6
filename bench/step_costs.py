"""Where one decode step's time goes, by part of the model and by batch size (no server).

Batching pays when a step over B rows costs much less than B single-row steps. On a GPU or a
Mac most of a small step is reading the weights, so it does; on a CPU some parts grow with B
in full: the attention over each row's own cache, and element-wise functions (exp in the
softmax, SiLU, the log-softmax over the vocabulary) that MLX's x86 CPU build runs one element
at a time. This prints each part's milliseconds per step, so the batch ceiling can be read
off directly.

    python -m bench.step_costs [--model DIR] [--batches 1,20] [--context 150]
"""
from __future__ import annotations

import argparse
import time


def timed_ms(fn, repeats: int = 8) -> float:
    import mlx.core as mx

    for _ in range(2):
        mx.eval(fn())
    started = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - started) / repeats * 1000


def part_costs(model, batch: int, context: int) -> dict[str, float]:
    """Milliseconds per decode step of the whole model and of its parts, at `batch` rows
    that each have `context` tokens of KV cache."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    inner = model.model
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[5 + i % 7] * context for i in range(batch)]), cache=cache))
    token = mx.array([[7]] * batch)

    def rewind(result):  # keep every repeat at the same cache length
        for c in cache:
            c.offset -= 1
        return result

    hidden = mx.random.normal((batch, 1, inner.embed_tokens.weight.shape[1]))
    head = getattr(model, "lm_head", None) or inner.embed_tokens.as_linear
    logits = head(hidden)[:, -1, :]
    mx.eval(hidden, logits)
    return {
        "whole step": timed_ms(lambda: rewind(model(token, cache=cache))),
        "attention (all layers)": timed_ms(lambda: rewind([l.self_attn(hidden, None, c)
                                                          for l, c in zip(inner.layers, cache)])),
        "MLP (all layers)": timed_ms(lambda: [l.mlp(hidden) for l in inner.layers]),
        "LM head": timed_ms(lambda: head(hidden)),
        "log-softmax over vocab": timed_ms(lambda: logits - mx.logsumexp(logits, axis=-1, keepdims=True)),
    }


def element_costs(n: int = 1 << 20) -> dict[str, float]:
    """Nanoseconds per element of a cheap and an exp-based element-wise op."""
    import mlx.core as mx

    x = mx.random.normal((n,))
    mx.eval(x)
    return {"add": timed_ms(lambda: x + x) * 1e6 / n, "exp": timed_ms(lambda: mx.exp(x)) * 1e6 / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX model folder (default: the embedded model, imported)")
    parser.add_argument("--batches", default="1,20")
    parser.add_argument("--context", type=int, default=150, help="cached tokens per row (default 150)")
    args = parser.parse_args(argv)

    from config import load_settings
    from engine import blas

    settings = load_settings()
    print("BLAS:", blas.activate(settings.blas))
    from mlx_lm import load

    from engine.model_source import resolve

    model_dir = args.model or resolve("embedded", settings.cache_dir, dtype_setting=settings.model_dtype).location
    model, _ = load(str(model_dir))
    batches = [int(b) for b in args.batches.split(",")]
    costs = {b: part_costs(model, b, args.context) for b in batches}
    first = batches[0]
    print("| part (ms per step) | " + " | ".join(f"batch {b}" for b in batches) + f" | growth {first} -> {batches[-1]} |")
    print("| --- | " + " | ".join("---:" for _ in batches) + " | ---: |")
    for part in costs[first]:
        values = [costs[b][part] for b in batches]
        growth = f"{values[-1] / values[0]:.1f}x" if values[0] > 0 else "-"
        print(f"| {part} | " + " | ".join(f"{v:.2f}" for v in values) + f" | {growth} |")
    whole = [costs[b]["whole step"] for b in batches]
    print("| tokens/s (batch / step) | " + " | ".join(f"{b / w * 1000:.1f}" for b, w in zip(batches, whole)) + " | |")
    elements = element_costs()
    print(f"\nelement-wise: add {elements['add']:.2f} ns/element, exp {elements['exp']:.2f} ns/element")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
