"""The whole Orchard server on random-weight Qwen2.5 shapes, as `docs/benchmarks.md` records it.

For each shape: write a LOAD_FORMAT=dummy model folder (config + a real tokenizer),
start Gunicorn, run every concurrency level once to warm its batch shape (the first
call of a shape compiles kernels), then run them again for the record.

    python -m bench.gpu_suite --tokenizer DIR --out DIR [--shapes qwen2.5-0.5b,qwen2.5-7b]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("server not healthy in time")


def status_of(base: str) -> dict:
    with urllib.request.urlopen(base + "/v1/system/status") as r:
        return json.loads(r.read())


def metric_sums(base: str) -> dict:
    """Sum and count of the server's latency histograms (Prometheus text format)."""
    with urllib.request.urlopen(base + "/metrics") as r:
        text = r.read().decode()
    sums = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.endswith(("_seconds_sum", "_seconds_count")) and "{" not in name:
            sums[name.removeprefix("orchard:")] = float(value)
    return sums


def server_latency_split(before: dict, after: dict) -> dict:
    """Mean queue time and TTFT as the server saw them (arrival in the route to first token delivered)."""
    means = {}
    for metric in ("request_queue_time", "time_to_first_token"):
        count = after.get(f"{metric}_seconds_count", 0) - before.get(f"{metric}_seconds_count", 0)
        total = after.get(f"{metric}_seconds_sum", 0) - before.get(f"{metric}_seconds_sum", 0)
        means[f"server_{metric}_mean_s"] = round(total / count, 4) if count else None
    return means


def engine_time_split(before: dict, after: dict) -> dict:
    """Where the engine thread's time went between two status snapshots."""
    keys = ("step_seconds", "prefill_seconds", "decode_seconds", "steps")
    delta = {k: round(after["batch"][k] - before["batch"][k], 3) for k in keys}
    delta["generated_tokens"] = after["tokens"]["generated"] - before["tokens"]["generated"]
    delta["prompt_tokens"] = after["tokens"]["prompt"] - before["tokens"]["prompt"]
    delta["prompt_cached"] = after["tokens"]["prompt_cached"] - before["tokens"]["prompt_cached"]
    return delta


def run_shape(shape: str, args, out: Path) -> dict:
    from engine.random_model import write_random_model

    model_dir = write_random_model(Path(f"/tmp/orchard-{shape}"), shape, weights=False, dtype=args.dtype,
                                   tokenizer_from=args.tokenizer)
    port = 8100
    env = {**os.environ, "MODEL": str(model_dir), "MODEL_ID": shape, "LOAD_FORMAT": "dummy", "PORT": str(port),
           "MAX_CONCURRENT_REQUESTS": str(args.max_running), "REQUEST_QUEUE_SIZE": "512",
           "WORKER_CONNECTIONS": "2000", "PREFILL_BATCH_SIZE": str(args.prefill_batch), "LOG_LEVEL": "warning"}
    log = open(out / f"server-{shape}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        def bench(levels: str, json_name: str) -> list[str]:
            cmd = [sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", levels,
                   "--max-tokens", str(args.max_tokens), "--quiet", "--json", str(out / json_name)]
            return cmd + (["--requests-per-level", str(args.requests)] if args.requests else [])

        subprocess.run(bench(args.levels, f"warm-{shape}.json"), cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        passes = []
        for n in range(args.passes):  # later passes show what shape compilation cost the first
            suffix = "" if n == 0 else f"-pass{n + 1}"
            levels = {}
            for level in args.levels.split(","):  # one call per level, so engine timings split by level
                before, before_metrics = status_of(base), metric_sums(base)
                result = subprocess.run(bench(level, f"orchard-{shape}{suffix}-c{level}.json"),
                                        cwd=ROOT, check=True, capture_output=True, text=True)
                print(result.stdout, flush=True)
                levels[level] = {**engine_time_split(before, status_of(base)),
                                 **server_latency_split(before_metrics, metric_sums(base))}
            passes.append(levels)
        status = status_of(base)
        return {"status": status, "engine_time_by_level": passes}
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: a small built-in one)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    parser.add_argument("--shapes", default="qwen2.5-0.5b")
    parser.add_argument("--levels", default="1,8,32,64,128")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=0, help="per level (default: the bench tool's)")
    parser.add_argument("--max-running", type=int, default=128)
    parser.add_argument("--prefill-batch", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--passes", type=int, default=1, help="measured passes after the warm-up pass")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {shape: run_shape(shape, args, args.out) for shape in args.shapes.split(",")}
    (args.out / "gpu_suite.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
