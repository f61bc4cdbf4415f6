"""Where a live server's time goes under load (py-spy), beside the engine alone in-process.

One fresh Gunicorn server on a random-weight shape; for each level, closed-loop streams of
distinct prompts run while py-spy samples the worker (every thread, idle included) and, in a
second window, only the threads holding the GIL. Per thread, the summary gives the share of
samples in each leaf function and in a few named places (the decode step's launch, its
read-back, graph building, the event loop's delivery and SSE writes). Before the server,
the same Generator's decode step is timed in this process at each level: the step the
server would take if nothing else competed.

    python -m bench.profile_server --tokenizer DIR [--levels 1,64] [--seconds 6] [--out $OUT]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_suite import ROOT, status_of, wait_healthy
from bench.server_vs_engine import distinct_prompts

PLACES = {  # substring of a frame -> name in the summary (inclusive: anywhere on the stack)
    "DecodeGroup.launch (": "decode launch (graph + async_eval)",
    "DecodeGroup.emit (": "decode read-back (tolist)",
    "SlotBatcher._prefill (": "prefill",
    "Model.__call__ (mlx_lm/models": "model graph building",
    "Engine.turn (": "engine turn",
    "Engine._admit (": "admission",
    "OutputBridge._deliver (": "event loop: delivery",
    "Generation.": "request greenlets: generation",
    "write_chunk (": "request greenlets: socket writes",
}


def summarize(raw: Path, top: int = 12) -> dict:
    """py-spy's raw (collapsed) output -> per thread: samples, top leaf frames, named places."""
    threads: dict[str, dict] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = re.sub(r"\s*\(0x[0-9a-f]+\)", "", frames[0])
        t = threads.setdefault(thread, {"samples": 0, "leaf": collections.Counter(), "places": collections.Counter()})
        n = int(count)
        t["samples"] += n
        t["leaf"][re.sub(r":\d+\)", ")", frames[-1])] += n
        for needle, name in PLACES.items():
            if any(needle in f for f in frames[1:]):
                t["places"][name] += n
    out = {}
    for thread, t in sorted(threads.items(), key=lambda kv: -kv[1]["samples"]):
        total = t["samples"]
        out[thread] = {"samples": total,
                       "places": {k: round(v / total, 3) for k, v in t["places"].most_common()},
                       "leaf": {k: round(v / total, 3) for k, v in t["leaf"].most_common(top)}}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 64])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--setting", default="", help="extra server settings, A=1+B=2")
    parser.add_argument("--py-spy", default="py-spy")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from bench.decode_attention import slot_step_ms
    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    shape_dir = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False,
                                   dtype="bfloat16", tokenizer_from=args.tokenizer)
    doc: dict = {"shape": args.shape, "setting": args.setting, "in_process_step_ms": {}, "levels": {}}
    model, _, config = _load_dummy(shape_dir)
    for level in args.levels:
        doc["in_process_step_ms"][level] = round(slot_step_ms(model, config["vocab_size"], level, "auto", 100, 0), 2)
    del model
    print("in-process step ms", doc["in_process_step_ms"], flush=True)

    overrides = dict(p.partition("=")[::2] for p in args.setting.split("+") if p)
    port = 8100
    env = {**os.environ, "MODEL": str(shape_dir), "MODEL_ID": "m", "LOAD_FORMAT": "dummy", "PORT": str(port),
           "MAX_CONCURRENT_REQUESTS": str(max(args.levels)), "REQUEST_QUEUE_SIZE": "1024", "WORKER_CONNECTIONS": "4000",
           "PREFILL_BATCH_SIZE": "16", "LOG_LEVEL": "warning", **overrides}
    log = open(args.out / "profile-server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")], cwd=ROOT,
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc)
        worker = int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
        for level in args.levels:
            prompts = Path(f"/tmp/profile-prompts-{level}.json")
            prompts.write_text(json.dumps(distinct_prompts(level * 40, level)))
            load = subprocess.Popen([sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", str(level),
                                     "--max-tokens", "128", "--quiet", "--warmup", "0", "--prompts", str(prompts),
                                     "--requests-per-level", str(level * 40)], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(4)
            before = status_of(base)["batch"]
            row: dict = {}
            for kind, flags in (("all", ["--idle"]), ("gil", ["--gil"])):
                raw = args.out / f"profile-{level}-{kind}.txt"  # collapsed stacks: small, kept
                subprocess.run([args.py_spy, "record", "--pid", str(worker), "--duration", str(args.seconds),
                                "--rate", "250", "--format", "raw", "--threads", "--nonblocking", "-o", str(raw), *flags],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                row[kind] = summarize(raw)
            after = status_of(base)["batch"]
            steps = after["steps"] - before["steps"]
            row["server_step_ms"] = round((after["step_seconds"] - before["step_seconds"]) / max(1, steps) * 1000, 2)
            row["server_decode_ms"] = round((after["decode_seconds"] - before["decode_seconds"]) / max(1, steps) * 1000, 2)
            row["steps_per_s"] = round(steps / (2 * args.seconds), 1)
            load.send_signal(signal.SIGINT)
            load.wait(60)
            doc["levels"][level] = row
            print(level, json.dumps({k: row[k] for k in ("server_step_ms", "server_decode_ms", "steps_per_s")}), flush=True)
            for kind in ("all", "gil"):
                for thread, t in list(row[kind].items())[:3]:
                    print(f"  [{kind}] {thread}: {t['samples']} samples; places {t['places']}", flush=True)
                    print(f"      leaf {dict(list(t['leaf'].items())[:8])}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()
    (args.out / "profile_server.json").write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
