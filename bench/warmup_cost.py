"""What the start-up warm-up leaves behind: the decode step, Orchard's engine and raw mlx-lm
`BatchGenerator` in the same process, before and after the warm-up (or one part of it).

Issue 14, stop 22 (H100): the server's engine decoded 1.5-2x slower per step than the same
engine built in a fresh process, minutes apart on one machine. Built and measured in one
process, the engine's step and raw's both slowed by 25-90 % once the full warm-up had run,
and stayed slow. The part that did it was the prompt-batch shapes (every batch size with every
bucketed length); the long prompt alone did not. So this compares, in one process:

    before   steady decode steps at 1 and 8 rows (engine, then raw), `--reps` times
    part     the warm-up, or one part of it: full | lean | long | buckets | decode
    after    the same steps again

    python -m bench.warmup_cost --tokenizer DIR --part full [--reps 2] [--out $OUT]

Each reading is a median over one request's decode steps (its first ten dropped), and raw's
is taken right after the engine's, so a ratio is read within seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

PARTS = ("full", "lean", "long", "buckets", "decode")


def engine_step_ms(generator, vocab: int, rows: int, seed: int, gen: int = 160) -> float:
    """Median wall time of the engine's steps while exactly `rows` rows decode (no prefill)."""
    from bench.closed_loop import make_prompts
    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    for k, prompt in enumerate(make_prompts(rows, vocab, seed, 128)):
        generator.insert(AddRequest(f"cost-{seed}-{k}", prompt, gen, SamplingParams(temperature=0.0), ignore_eos=True))
    steps, done = [], 0
    while done < rows:
        batch = generator._batch
        prefilling = bool(batch._unprocessed_sequences or batch._prompt_batch.uids)
        started = time.perf_counter()
        out = generator.step()
        if not prefilling and len(out) == rows:
            steps.append(time.perf_counter() - started)
        done += sum(t.finish_reason is not None for t in out)
    return round(1000 * statistics.median(steps[10:] or steps), 3)


def run_part(generator, part: str, settings, context: int, vocab: int) -> int:
    """The warm-up, or one part of it; returns the steps it took."""
    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    tokens = settings.warmup(False) or 8192
    rows = settings.max_concurrent_requests
    if part == "full":
        return generator.warm_up(tokens, rows, context)
    if part == "lean":
        return generator.warm_up(tokens, rows, context, prompt_batches=False)
    if part == "buckets":  # the prompt-batch shapes (and one decode batch, one tiny prompt)
        return generator.warm_up(16, 1, context)
    if part == "decode":  # decode batches 1, 2, 4... with their 16-token prompts
        return generator.warm_up(16, rows, context, prompt_batches=False)
    prompt = [(i * 104729) % (vocab - 2) + 1 for i in range(min(tokens, context - 4))]  # long
    generator.insert(AddRequest("cost-long", prompt, 2, SamplingParams(temperature=0.0), ignore_eos=True))
    steps = 0
    while generator.busy:
        generator.step()
        steps += 1
    return steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--part", choices=PARTS, default="full")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()

    import mlx.core as mx

    from bench.decode_attention import raw_step_ms
    from bench.served_engine import served_generator

    generator, model, _, config, settings = served_generator(args.shape, args.dtype, args.tokenizer)
    vocab, context = config["vocab_size"], config.get("max_position_embeddings", 32768)
    seeds = iter(range(1000, 10**6))
    for rows in (1, 8, 1, 8):  # this shape's own kernels, before anything is read
        engine_step_ms(generator, vocab, rows, next(seeds))

    def readings(label: str) -> list[dict]:
        rows_out = []
        for rep in range(args.reps):
            row = {"when": label, "rep": rep}
            for rows in (1, 8):
                row[f"engine_{rows}_ms"] = engine_step_ms(generator, vocab, rows, next(seeds))
                row[f"raw_{rows}_ms"] = round(raw_step_ms(model, vocab, rows, 150, next(seeds)), 3)
            print(json.dumps(row), flush=True)
            rows_out.append(row)
        return rows_out

    result = {"shape": args.shape, "dtype": args.dtype, "device": str(mx.default_device()), "part": args.part,
              "readings": readings("before")}
    started = time.perf_counter()
    result["part_steps"] = run_part(generator, args.part, settings, context, vocab)
    result["part_s"] = round(time.perf_counter() - started, 2)
    result["cache_bytes_after_part"] = mx.get_cache_memory()
    result["readings"] += readings("after")

    def mean(key: str, when: str) -> float:
        return statistics.mean(r[key] for r in result["readings"] if r["when"] == when)

    result["after_over_before"] = {key: round(mean(key, "after") / mean(key, "before"), 3)
                                   for key in ("engine_1_ms", "engine_8_ms", "raw_1_ms", "raw_8_ms")}
    print(json.dumps({k: result[k] for k in ("part", "part_steps", "part_s", "after_over_before")}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"warmup-cost-{args.part}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
