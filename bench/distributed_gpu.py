"""One model on one process vs split across N ranks, through the whole server (issue 15.4).

For a random-weight Qwen2.5 shape (LOAD_FORMAT=dummy: the same seeded weights in every
process), start the server on one rank, then as an N-rank group (`orchard serve --ranks N`;
NCCL on one GPU per rank, or the ring on the CPU); for each: the greedy answers to eight fixed
prompts, a warm-up pass of every concurrency level (the first call of a shape compiles), then
the measured pass. Writes distributed.json (summaries only) and prints a table.

    python -m bench.distributed_gpu --shape qwen2.5-7b --ranks 2 --backend nccl --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from bench.gpu_suite import engine_time_split, status_of, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [f"Tell me about {w}" for w in ("apples", "rivers", "the moon", "bread", "trains", "winter", "cats", "music")]


def greedy_answers(base: str, model: str, max_tokens: int) -> list[list[int]]:
    """Token ids of each prompt's greedy answer (logprobs carry them), one request at a time."""
    answers = []
    for prompt in PROMPTS:
        body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                           "ignore_eos": True, "logprobs": 0}).encode()
        request = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as r:
            choice = json.loads(r.read())["choices"][0]
        answers.append(choice["logprobs"]["tokens"])
    return answers


def run_server(ranks: int, args, model_dir: Path, out: Path) -> dict:
    port = 8200 + ranks
    env = {**os.environ, "MODEL": str(model_dir), "MODEL_ID": args.shape, "LOAD_FORMAT": "dummy",
           "PORT": str(port), "MAX_CONCURRENT_REQUESTS": str(args.max_running), "REQUEST_QUEUE_SIZE": "512",
           "WORKER_CONNECTIONS": "2000", "LOG_LEVEL": "warning", "DISTRIBUTED_BACKEND": args.backend}
    if ranks == 1:
        if args.backend == "nccl":
            env["CUDA_VISIBLE_DEVICES"] = "0"
        argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]
    else:
        argv = [sys.executable, "-m", "orchard.cli", "serve", "--ranks", str(ranks)]
    log = open(out / f"server-{ranks}-ranks.log", "w")
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, timeout=args.start_timeout)
        answers = greedy_answers(base, args.shape, args.greedy_tokens)

        def bench(name: str, levels: str) -> dict:
            path = out / f"bench-{ranks}-ranks-{name}.json"
            subprocess.run([sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", levels,
                            "--max-tokens", str(args.max_tokens), "--quiet", "--json", str(path)],
                           cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            doc = json.loads(path.read_text())
            path.unlink()  # raw records stay out of the results: the summary is what is kept
            return {str(level["summary"]["concurrency"]): level["summary"] for level in doc["levels"]}

        bench("warmup", args.levels)
        measured = {}
        for level in args.levels.split(","):  # one call per level: the engine's time splits by level
            before = status_of(base)
            measured.update(bench(f"c{level}", level))
            measured[level]["engine"] = engine_time_split(before, status_of(base))
        return {"answers": answers, "levels": measured}
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-7b")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--backend", default="nccl", choices=("nccl", "ring"))
    parser.add_argument("--levels", default="1,32,128")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--greedy-tokens", type=int, default=32)
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: the built-in one)")
    parser.add_argument("--start-timeout", type=float, default=300.0, help="seconds for a server to become healthy")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from engine.random_model import write_random_model

    model_dir = write_random_model(Path(f"/tmp/orchard-dist-{args.shape}"), args.shape, weights=False,
                                   dtype=args.dtype, tokenizer_from=args.tokenizer)
    runs = {}
    for ranks in (1, args.ranks):  # each written as soon as it is done: a cut run keeps what it had
        runs[str(ranks)] = run_server(ranks, args, model_dir, args.out)
        (args.out / f"run-{ranks}-ranks.json").write_text(json.dumps(runs[str(ranks)], indent=1))
    one, many = runs["1"], runs[str(args.ranks)]
    same = [a == b for a, b in zip(one["answers"], many["answers"])]
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
              for a, b in zip(one["answers"], many["answers"])]
    summary = {"shape": args.shape, "dtype": args.dtype, "backend": args.backend, "ranks": args.ranks,
               "max_tokens": args.max_tokens, "greedy_equal": same, "greedy_equal_prefix_tokens": prefix,
               "tok_per_s": {level: {"1": one["levels"][level]["tok_per_s"],
                                     str(args.ranks): many["levels"][level]["tok_per_s"]}
                             for level in one["levels"]},
               "levels": {"1": one["levels"], str(args.ranks): many["levels"]}}
    (args.out / "distributed.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.shape} {args.dtype}, {args.backend}: greedy answers equal {sum(same)}/{len(same)} "
          f"(equal prefix tokens {prefix})")
    print(f"{'streams':>8} {'1 rank tok/s':>14} {f'{args.ranks} ranks tok/s':>16} {'ratio':>7}")
    for level, row in summary["tok_per_s"].items():
        a, b = row["1"], row[str(args.ranks)]
        print(f"{level:>8} {a:>14.1f} {b:>16.1f} {b / a if a else 0:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
