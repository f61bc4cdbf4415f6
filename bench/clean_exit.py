"""Issue 14, goal 6: stops under load end cleanly, the worker included, many times over.

Each round starts a fresh Gunicorn server (random-weight model of a shape, dummy weights),
lets 32 streams decode, sends SIGTERM and records the master's exit status and how the
worker ended, read from the master's log: Gunicorn logs a worker killed by a signal ("was
sent SIGABRT!") or one that exited non-zero. `--conf` runs another gunicorn.conf.py (an
older one, to reproduce a failure next to the fix in the same run).

    python -m bench.clean_exit --tokenizer DIR [--rounds 6] [--conf PATH] [--set K=V,...] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu_suite import ROOT, wait_healthy
from bench.server_vs_engine import distinct_prompts

WORKER_ENDS = ("was sent SIG", "exited with code", "terminate called")


def one_stop(shape_dir: Path, conf: Path, overrides: dict, out: Path, k: int, port: int) -> dict:
    env = {**os.environ, "MODEL": str(shape_dir), "MODEL_ID": "m", "LOAD_FORMAT": "dummy", "PORT": str(port),
           "MAX_CONCURRENT_REQUESTS": "64", "LOG_LEVEL": "info", **overrides}
    log_path = out / f"clean-exit-{conf.stem}-{k}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(conf)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, proc)
        prompts = out / "clean-exit-prompts.json"
        prompts.write_text(json.dumps(distinct_prompts(64, 99 + k)))
        load = subprocess.Popen([sys.executable, "-m", "bench", "--url", base + "/v1", "--concurrency", "32",
                                 "--max-tokens", "64", "--quiet", "--warmup", "0", "--prompts", str(prompts),
                                 "--requests-per-level", "64"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(2)  # streams decoding
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            status = "killed after 120 s"
        load.wait(120)
    text = log_path.read_text(errors="replace")
    ends = [line for line in text.splitlines() if any(mark in line for mark in WORKER_ENDS)]
    return {"master_status": status, "worker_clean": not ends, "worker_lines": ends[-3:],
            "drained": "drained" in text}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path)
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--conf", type=Path, action="append", help="gunicorn.conf.py files to alternate "
                        "(default: this tree's)")
    parser.add_argument("--set", default="WARMUP_TOKENS=0", help="server settings, K=V,...")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench-results")))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from engine.random_model import write_random_model

    shape_dir = write_random_model(Path(f"/tmp/orchard-{args.shape}"), args.shape, weights=False,
                                   dtype="bfloat16", tokenizer_from=args.tokenizer)
    overrides = dict(item.split("=", 1) for item in args.set.split(",") if item)
    confs = args.conf or [ROOT / "gunicorn.conf.py"]
    doc: dict = {"shape": args.shape, "settings": overrides, "runs": {str(c): [] for c in confs}}
    for k in range(args.rounds):
        for conf in confs:  # interleaved: the machine's drift hits each alike
            row = one_stop(shape_dir, conf, overrides, args.out, k, 8100)
            doc["runs"][str(conf)].append(row)
            print(conf.name, k, row, flush=True)
    doc["summary"] = {str(c): {"stops": len(rows), "master_status_0": sum(r["master_status"] == 0 for r in rows),
                               "worker_clean": sum(r["worker_clean"] for r in rows)}
                      for c, rows in doc["runs"].items()}
    (args.out / "clean_exit.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
