"""The engine in a closed loop, without the server: where a wave of distinct requests loses
time against raw mlx-lm (issue 14, goal 1 at 8 streams).

A server's clients run a closed loop: each request that ends is followed by a new one, so
rows finish and join a few at a time and each wave pays a turnover. Raw `BatchGenerator`, as
`bench.server_vs_engine` reads it, inserts all its prompts at once and decodes one wave. This
puts, in one process and interleaved (A B A B):
  raw-wave     BatchGenerator, all prompts inserted at once, one wave (server_vs_engine's raw row)
  raw-loop     BatchGenerator in the same closed loop as the engine
  engine-loop  Orchard's Generator, built and warmed as the server builds it, in a closed loop:
               `waves` x `streams` requests, a new one inserted `--lag` steps after each ends
               (the client's round trip, in steps: deterministic)
with each engine step's wall time split by kind (decode only / carrying a prefill pass), so the
turnover's cost can be read off.

    python -m bench.closed_loop --tokenizer DIR [--streams 8] [--waves 3] [--lag 2] [--spread 3] [--rounds 3] [--out $OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path


def make_prompts(n: int, vocab: int, seed: int, length: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def raw_wave(model, streams: int, gen: int, prompts: list[list[int]]) -> float:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=gen, completion_batch_size=streams,
                               prefill_batch_size=min(streams, 16))
    start = time.perf_counter()
    generator.insert(prompts[:streams])
    tokens = finished = 0
    while finished < streams:
        for r in generator.next_generated():
            tokens += 1
            finished += r.finish_reason is not None
    mx.synchronize()
    elapsed = time.perf_counter() - start
    generator.close()
    return tokens / elapsed


class _Loop:
    """The closed loop's clients: `streams` at a time, each next request `lag` steps after an end."""

    def __init__(self, prompts: list[list[int]], streams: int, lag: int, spread: int = 1):
        self.prompts, self.lag, self.spread = list(prompts), lag, max(1, spread)
        self.sent, self.done, self.due = streams, 0, []  # due: (step, count) of requests to send
        self.ends = 0

    def first(self, streams: int) -> list[list[int]]:
        return self.prompts[:streams]

    def after_step(self, step: int, ended: int) -> list[list[int]]:
        for _ in range(ended):  # the k-th end's next request comes lag + k % spread steps later
            self.done += 1
            self.due.append((step + self.lag + self.ends % self.spread, 1))
            self.ends += 1
        ready = sum(n for s, n in self.due if s <= step)
        self.due = [(s, n) for s, n in self.due if s > step]
        ready = min(ready, len(self.prompts) - self.sent)
        out = self.prompts[self.sent:self.sent + ready]
        self.sent += ready
        return out


def raw_loop(model, streams: int, gen: int, prompts: list[list[int]], lag: int, spread: int) -> float:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=gen, completion_batch_size=streams,
                               prefill_batch_size=min(streams, 16))
    loop = _Loop(prompts, streams, lag, spread)
    start = time.perf_counter()
    generator.insert(loop.first(streams))
    tokens = step = 0
    while loop.done < len(prompts):
        responses = generator.next_generated()
        tokens += len(responses)
        new = loop.after_step(step, sum(r.finish_reason is not None for r in responses))
        if new:
            generator.insert(new)
        step += 1
    mx.synchronize()
    elapsed = time.perf_counter() - start
    generator.close()
    return tokens / elapsed


def engine_loop(generator, streams: int, gen: int, prompts: list[list[int]], lag: int, spread: int, tag: str) -> dict:
    import mlx.core as mx

    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    loop = _Loop(prompts, streams, lag, spread)
    count = iter(range(1 << 30))

    def insert(batch):
        for p in batch:
            generator.insert(AddRequest(f"{tag}-{next(count)}", list(p), gen, SamplingParams(temperature=0.0),
                                        ignore_eos=True))

    kinds: dict[str, list[float]] = {"decode": [], "prefill": []}
    start = time.perf_counter()
    insert(loop.first(streams))
    tokens = step = 0
    while loop.done < len(prompts):
        batch = generator._batch
        kind = "prefill" if (batch._unprocessed_sequences or batch._prompt_batch.uids) else "decode"
        tic = time.perf_counter()
        out = generator.step()
        kinds[kind].append(time.perf_counter() - tic)
        tokens += len(out)
        new = loop.after_step(step, sum(t.finish_reason is not None for t in out))
        if new:
            insert(new)
        step += 1
    mx.synchronize()
    elapsed = time.perf_counter() - start

    def ms(xs):
        return {"n": len(xs), "median_ms": round(statistics.median(xs) * 1000, 2) if xs else None,
                "sum_ms": round(sum(xs) * 1000, 1)}

    return {"tok_s": round(tokens / elapsed, 1), "tokens": tokens, "steps": step, "wall_s": round(elapsed, 3),
            "decode_steps": ms(kinds["decode"]), "prefill_steps": ms(kinds["prefill"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--waves", type=int, default=3)
    parser.add_argument("--gen", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--lag", type=int, default=2, help="steps between a request's end and the next one's insert")
    parser.add_argument("--spread", type=int, default=3,
                        help="the k-th end's next request comes lag + k %% spread steps later (arrivals spread, as a server's do)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-seconds", type=float, default=20, help="raw waves first, so the device is warm")
    parser.add_argument("--profile", action="store_true", help="and one engine round under cProfile")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()

    import mlx.core as mx

    from bench.served_engine import served_generator, warm_as_served

    generator, model, _, config, settings = served_generator(args.shape, args.dtype, args.tokenizer)
    vocab = config["vocab_size"]
    warm_as_served(generator, settings, config)
    n = args.streams * args.waves
    deadline = time.perf_counter() + args.warm_seconds
    while time.perf_counter() < deadline:
        raw_wave(model, args.streams, args.gen, make_prompts(args.streams, vocab, 1, args.prompt_tokens))
    engine_loop(generator, args.streams, args.gen, make_prompts(n, vocab, 2, args.prompt_tokens), args.lag, args.spread, "warm")
    rounds = []
    for r in range(args.rounds):
        seed = 100 + 10 * r
        row = {"raw_wave_tok_s": round(raw_wave(model, args.streams, args.gen,
                                                make_prompts(args.streams, vocab, seed, args.prompt_tokens)), 1)}
        row["raw_loop_tok_s"] = round(raw_loop(model, args.streams, args.gen,
                                               make_prompts(n, vocab, seed + 1, args.prompt_tokens), args.lag, args.spread), 1)
        row["engine_loop"] = engine_loop(generator, args.streams, args.gen,
                                         make_prompts(n, vocab, seed + 2, args.prompt_tokens), args.lag, args.spread, f"r{r}")
        row["engine_over_raw_wave"] = round(row["engine_loop"]["tok_s"] / row["raw_wave_tok_s"], 3)
        row["engine_over_raw_loop"] = round(row["engine_loop"]["tok_s"] / row["raw_loop_tok_s"], 3)
        rounds.append(row)
        print(json.dumps(row), flush=True)
    if args.profile:  # one more engine round under cProfile: where the host's time goes, by function
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        profiler.enable()
        engine_loop(generator, args.streams, args.gen, make_prompts(n, vocab, 7, args.prompt_tokens), args.lag,
                    args.spread, "profiled")
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(45)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"closed-loop-{args.streams}-profile.txt").write_text(text.getvalue())
    result = {"shape": args.shape, "dtype": args.dtype, "device": str(mx.default_device()), "streams": args.streams,
              "waves": args.waves, "gen": args.gen, "prompt_tokens": args.prompt_tokens, "lag_steps": args.lag, "spread": args.spread,
              "rounds": rounds}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"closed-loop-{args.streams}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
