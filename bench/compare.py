"""Start two servers on this machine and benchmark them side by side (A B A B per level).

    python -m bench.compare --a orchard:MAX_CONCURRENT_REQUESTS=1 --b orchard --levels 1,8,20
    python -m bench.compare --a mlx_lm --b orchard --levels 1,8

A target is `orchard[:KEY=VALUE,...]` (settings for that server) or `mlx_lm`
(mlx_lm.server on the same model folder, with OpenBLAS preloaded as Orchard loads it).
Remaining arguments go to the bench tool (`python -m bench --help`).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from bench.gpu_suite import wait_healthy

ROOT = Path(__file__).resolve().parents[1]


def start(spec: str, port: int, model_dir: str, out: Path, label: str) -> subprocess.Popen:
    kind, _, extra = spec.partition(":")
    env = {**os.environ, "PORT": str(port), "LOG_LEVEL": "warning"}
    log = open(out / f"server-{label}.log", "w")
    if kind == "mlx_lm":
        from engine.blas import find_openblas

        lib = find_openblas()
        if lib:
            env["LD_PRELOAD"] = lib
        cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model_dir, "--port", str(port),
               "--decode-concurrency", "32", "--prompt-concurrency", "8"]
    elif kind == "orchard":
        env.update(dict(item.split("=", 1) for item in extra.split(",") if item))
        env.setdefault("MODEL", model_dir)
        cmd = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]
    else:
        raise SystemExit(f"unknown target {spec!r}: use orchard[:K=V,...] or mlx_lm")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--model-dir", help="model folder (default: the embedded model, imported)")
    args, rest = parser.parse_known_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir
    if model_dir is None:
        from config import load_settings
        from engine.model_source import resolve

        s = load_settings()
        model_dir = resolve("embedded", s.cache_dir, dtype_setting=s.model_dtype).location
    servers = [start(args.a, 8201, model_dir, args.out, "A"), start(args.b, 8202, model_dir, args.out, "B")]
    try:
        for port, proc in zip((8201, 8202), servers):
            wait_healthy(f"http://127.0.0.1:{port}", proc)
        cmd = [sys.executable, "-m", "bench", "--url", "http://127.0.0.1:8201/v1", "--url-b",
               "http://127.0.0.1:8202/v1", "--label-a", args.a, "--label-b", args.b, *rest]
        return subprocess.run(cmd, cwd=ROOT).returncode
    finally:
        for proc in servers:
            proc.terminate()
            proc.wait(60)


if __name__ == "__main__":
    sys.exit(main())
