"""Goal 3 without the server: the engine's own steps for the first long prompt after the
start-up warm-up, against the same-length prompts that follow (issue 14).

The Generator is built as the server's factory builds it (settings from the environment, the
same warm-up), on a random-weight shape; each long prompt is the bench's chat text through the
model's chat template. Every step is synchronized and timed, so a step that is slow only the
first time (a kernel build, an allocation) shows up by its index and its prompt offset.

    python -m bench.first_prompt --tokenizer DIR [--prompts 4] [--words 6000] [--out $OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--words", type=int, default=6000)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()

    import mlx.core as mx

    from bench.server_vs_engine import distinct_prompts
    from bench.served_engine import served_generator, warm_as_served
    from engine.messages import AddRequest
    from engine.sampling import SamplingParams

    generator, model, tokenizer, config, settings = served_generator(args.shape, "bfloat16", args.tokenizer)
    started = time.perf_counter()
    warm_steps = warm_as_served(generator, settings, config)
    result = {"shape": args.shape, "warm_up_s": round(time.perf_counter() - started, 2), "warm_up_steps": warm_steps,
              "prompts": []}
    for k in range(args.prompts):
        text = distinct_prompts(1, 7 + k, args.words)[0]
        tokens = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        tic = time.perf_counter()
        uid, cached = generator.insert(AddRequest(f"long-{k}", list(tokens), 2, SamplingParams(temperature=0.0),
                                                  ignore_eos=True))
        steps, first = [], None
        while generator.busy:
            t0 = time.perf_counter()
            out = generator.step()
            mx.synchronize()
            steps.append(round((time.perf_counter() - t0) * 1000, 2))
            if out and first is None:
                first = time.perf_counter() - tic
        row = {"tokens": len(tokens), "cached": cached, "ttft_s": round(first, 4), "step_ms": steps}
        result["prompts"].append(row)
        print(k, row, flush=True)
    ttfts = [p["ttft_s"] for p in result["prompts"]]
    result["first_over_best_later"] = round(ttfts[0] / min(ttfts[1:]), 2) if len(ttfts) > 1 else None
    print("first over best later:", result["first_over_best_later"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "first-prompt.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
