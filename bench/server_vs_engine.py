"""Issue 14 on the GPU, in one run: the server against its own engine, every prompt distinct.

1. Raw rows (before and again after the servers): mlx-lm's BatchGenerator on the same random-weight shape, in this process,
   distinct 128-token prompts all inserted at once, 128 tokens each (each level warmed
   first); plus its single-row decode step time (the inter-token reference).
2. For each server setting (e.g. DECODE_BATCH=slots and DECODE_BATCH=mlx-lm), one fresh
   Gunicorn server: the first long prompt after /health (cold) and a second one (warm),
   then each level warmed once and measured once with prompts nobody has seen (no prefix
   cache hit beyond the chat template), then SIGTERM while streams run: its exit code.

    python -m bench.server_vs_engine --tokenizer DIR [--settings DECODE_BATCH=slots,DECODE_BATCH=mlx-lm]
        [--levels 1,8,64,128] [--interleave] [--out $OUT]

With --interleave, each server level also sits between two raw readings of that level taken
seconds before and after it (the server idles meanwhile), so its ratio does not depend on how
far the machine drifted between the run's first and last minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.gpu_suite import ROOT, metric_sums, server_latency_split, status_of, wait_healthy

WORDS = ("time year people way day man thing woman life child world school state family student group country "
         "problem hand part place case week company system program question work government number night point "
         "home water room mother area money story fact month lot right study book eye job word business issue side "
         "kind head house service friend father power hour game line end member law car city community name "
         "president team minute idea kid body information back parent face others level office door health person "
         "art war history party result change morning reason research girl guy moment air teacher force education").split()


def distinct_prompts(n: int, seed: int, words: int = 100) -> list[str]:
    """n prompts of ordinary words (~128 tokens each), distinct from their first word on."""
    rnd = random.Random(seed)
    return [f"{seed}-{i}: " + " ".join(rnd.choice(WORDS) for _ in range(words)) for i in range(n)]


def raw_rows(shape: str, model_dir: Path, levels: list[int], gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator

    from bench.closed_loop import raw_wave
    from engine.loader import _load_dummy

    model, _, config = _load_dummy(model_dir)
    vocab = config["vocab_size"]

    def once(batch: int, seed: int) -> float:
        rnd = random.Random(seed)
        return raw_wave(model, batch, gen, [[rnd.randrange(10, vocab) for _ in range(128)] for _ in range(batch)])

    rows = {}
    for batch in levels:
        once(batch, batch)  # warm this batch shape
        rows[batch] = round(once(batch, 1000 + batch), 1)
        print(f"raw BatchGenerator batch {batch}: {rows[batch]} tok/s", flush=True)
    # The single-row decode step, timed over a long generation (prefill excluded).
    generator = BatchGenerator(model, max_tokens=400, completion_batch_size=1, prefill_batch_size=1)
    generator.insert([[11] * 128])
    for _ in range(20):
        generator.next_generated()
    mx.synchronize()
    start, steps = time.perf_counter(), 0
    while steps < 300:
        steps += len(generator.next_generated())
    mx.synchronize()
    step_ms = (time.perf_counter() - start) / steps * 1000
    generator.close()
    print(f"raw single-row decode step: {step_ms:.2f} ms", flush=True)
    model = None  # this process lets its copy go before a server loads its own
    mx.clear_cache()
    return {"tok_s": rows, "step_ms_batch1": round(step_ms, 3)}


def long_prompt_ttft(base: str, model: str, text: str) -> float:
    start = time.perf_counter()
    with requests.post(base + "/v1/chat/completions", stream=True, timeout=600, json={
            "model": model, "max_tokens": 2, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": text}]}) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # the first chunk with text (the role chunk comes at admission)
            if line.startswith(b"data: {"):
                choices = json.loads(line[6:]).get("choices") or [{}]
                if (choices[0].get("delta") or {}).get("content"):
                    return time.perf_counter() - start
    raise RuntimeError("no token")


def bench_level(base: str, level: int, prompts_file: Path, json_out: Path, gen: int, requests_n: int,
                streams_per_process: int = 0) -> dict:
    processes = -(-level // streams_per_process) if streams_per_process else 1
    cmd = [sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", str(level), "--max-tokens",
           str(gen), "--quiet", "--warmup", "0", "--prompts", str(prompts_file), "--json", str(json_out),
           "--requests-per-level", str(requests_n), "--processes", str(processes)]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    level_doc = json.loads(json_out.read_text())["levels"][0]
    summary = level_doc.get("summary") or level_doc
    keep = ("tok_per_s", "ttft_p50", "ttft_p95", "itl_mean", "itl_p95", "failed", "ok", "tpot_mean")
    return {k: summary.get(k) for k in keep}


def burn_in(seconds: float, read_once, clock=time.monotonic) -> int:
    """Raw readings, thrown away, until `seconds` have passed; returns how many ran. Lent GPU
    machines drift, and in stop 23 the earlier servers of a lease read slower (one setting rose
    from 4,3xx to 5,1xx-5,5xx tok/s over a lease), so no kept reading should come first."""
    deadline, readings = clock() + seconds, 0
    while clock() < deadline:
        read_once()
        readings += 1
    return readings


def long_prompt_summary(ttfts: list[float], words: int) -> dict:
    """The long prompts' TTFTs, and the first over the best later one (goal 3) when there is a later one."""
    summary: dict = {"words": words, "ttfts_s": [round(t, 3) for t in ttfts]}
    if len(ttfts) >= 2:
        summary["first_over_best_later"] = round(ttfts[0] / min(ttfts[1:]), 2)
    return summary


def level_key(levels: dict, level: int) -> str:
    """A level's key in the summary: a level read again (--levels 64,8,64) keeps both readings
    ("64", then "64#2"), since the machine drifts between them."""
    key, n = str(level), 1
    while key in levels:
        n += 1
        key = f"{level}#{n}"
    return key


def server_tag(setting: str, index: int, settings: list[str]) -> str:
    """File-name tag of a server run; a setting run more than once (A,B,A,B) gets its position."""
    tag = setting.replace("=", "-").replace("+", "_").lower()
    return f"{tag}-{index + 1}" if settings.count(setting) > 1 else tag


def run_server(setting: str, shape_dir: Path, args, out: Path, tag: str = "") -> dict:
    overrides = dict(part.partition("=")[::2] for part in setting.split("+"))  # A=1+B=2
    port = 8100
    env = {**os.environ, "MODEL": str(shape_dir), "MODEL_ID": "m", "LOAD_FORMAT": "dummy", "PORT": str(port),
           "MAX_CONCURRENT_REQUESTS": str(max(args.levels or [64])), "REQUEST_QUEUE_SIZE": "1024",
           "WORKER_CONNECTIONS": "4000", "PREFILL_BATCH_SIZE": "16", "LOG_LEVEL": "warning", **overrides}
    tag = tag or server_tag(setting, 0, [setting])
    scratch = Path("/tmp/server-vs-engine-prompts")
    scratch.mkdir(exist_ok=True)
    log = open(out / f"server-{tag}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    result: dict = {"setting": setting}
    try:
        wait_healthy(base, proc)
        words = args.long_words
        ttfts = [long_prompt_ttft(base, "m", distinct_prompts(1, 7 + k, words)[0]) for k in range(args.long_prompts)]
        result["long_prompt"] = long_prompt_summary(ttfts, words)
        print(setting, "long prompt", result["long_prompt"], flush=True)
        levels = {}
        for level in args.levels:
            n = max(args.rounds * level, 8)
            for phase, seed in (("warm", 10 * level), ("measured", 10 * level + 1)):
                prompts = scratch / f"{tag}-{level}-{phase}.json"
                prompts.write_text(json.dumps(distinct_prompts(n, seed + hash(tag) % 1000)))
                raw_before = raw_rows(args.shape, shape_dir, [level], args.max_tokens) \
                    if args.interleave and phase == "measured" else None
                before, before_metrics = status_of(base), metric_sums(base)
                json_out = scratch / f"{tag}-c{level}-{phase}.json"  # the summary keeps what matters
                row = bench_level(base, level, prompts, json_out, args.max_tokens, n, args.streams_per_process)
                after = status_of(base)
                if raw_before is not None:  # raw read right before and right after this level (the server idles)
                    raw_after = raw_rows(args.shape, shape_dir, [level], args.max_tokens)
                    row["raw_tok_s"] = [raw_before["tok_s"][level], raw_after["tok_s"][level]]
                    row["raw_step_ms_batch1"] = [raw_before["step_ms_batch1"], raw_after["step_ms_batch1"]]
                    row["over_raw"] = [round(row["tok_per_s"] / r, 3) for r in row["raw_tok_s"]]
                row["first_pass"] = phase == "warm"
                if phase == "warm":
                    first = row
            row["first_pass_tok_s"] = first["tok_per_s"]
            for key in ("steps", "step_seconds", "prefill_seconds", "decode_seconds"):
                row[f"engine_{key}"] = round(after["batch"][key] - before["batch"][key], 3)
            row.update(server_latency_split(before_metrics, metric_sums(base)))
            levels[level_key(levels, level)] = row
            print(setting, level, row, flush=True)
        result["levels"] = levels
        # A stop under load: SIGTERM while streams decode; the drain must end with exit 0.
        prompts = scratch / f"{tag}-stop.json"
        prompts.write_text(json.dumps(distinct_prompts(64, 99)))
        load = subprocess.Popen([sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", "32",
                                 "--max-tokens", "64", "--quiet", "--warmup", "0", "--prompts", str(prompts),
                                 "--requests-per-level", "64"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(2)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result["exit_code_on_stop"] = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["exit_code_on_stop"] = "killed after 120 s"
    if "load" in locals():
        load.wait(120)
    log.close()
    result["log_tail"] = (out / f"server-{tag}.log").read_text()[-1500:]
    print(setting, "exit code on stop:", result["exit_code_on_stop"], flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--settings", default="DECODE_BATCH=slots,DECODE_BATCH=mlx-lm")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",") if x], default=[1, 8, 64, 128],
                        help="'' for none (start, long prompts and the stop only)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--long-words", type=int, default=6000, help="the long prompt's length in words")
    parser.add_argument("--long-prompts", type=int, default=2, help="long prompts sent one after another at start")
    parser.add_argument("--rounds", type=int, default=3, help="requests per level = rounds x streams")
    parser.add_argument("--streams-per-process", type=int, default=0,
                        help="client processes per level: one per this many streams (0: one process)")
    parser.add_argument("--no-raw", action="store_true")
    parser.add_argument("--interleave", action="store_true",
                        help="also read raw right before and after each server level (the machine drifts within minutes)")
    parser.add_argument("--warm-seconds", type=float, default=0,
                        help="raw waves for this long first, discarded, so the machine is warm before any kept reading")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()
    if args.long_prompts < 0:
        parser.error("--long-prompts must be 0 or more")
    args.out.mkdir(parents=True, exist_ok=True)
    from engine.random_model import write_random_model

    shape_dir = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False,
                                   dtype="bfloat16", tokenizer_from=args.tokenizer)
    doc: dict = {"shape": args.shape, "levels": args.levels, "max_tokens": args.max_tokens}
    summary = args.out / "server_vs_engine.json"
    if args.warm_seconds > 0:
        levels = args.levels or [8]
        doc["burn_in"] = {"seconds": args.warm_seconds, "readings": burn_in(
            args.warm_seconds, lambda: raw_rows(args.shape, shape_dir, levels, args.max_tokens))}
    if not args.no_raw:
        doc["raw"] = raw_rows(args.shape, shape_dir, args.levels, args.max_tokens)
        summary.write_text(json.dumps(doc, indent=1))
    doc["servers"] = []
    settings = args.settings.split(",")
    for index, setting in enumerate(settings):  # A,B,A,B: each setting read twice, in turn (the machine drifts)
        doc["servers"].append(run_server(setting, shape_dir, args, args.out, server_tag(setting, index, settings)))
        summary.write_text(json.dumps(doc, indent=1))
    if not args.no_raw:  # a second reading: the machine drifts, so the servers sit between two
        doc["raw_after"] = raw_rows(args.shape, shape_dir, args.levels, args.max_tokens)
        summary.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
