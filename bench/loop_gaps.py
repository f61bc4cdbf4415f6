"""How long a model load on demand stops the event loop (no server).

A load on demand runs on the engine thread while the event loop serves every stream; whatever
it does while holding the GIL stops the loop for that long. This measures the worst gap of a
stand-in loop (the main thread sleeping 1 ms at a time, as a gevent hub between events) while
another thread does, in one process and interleaved against drift:

- `whole load`: mlx-lm's load of the model, tokenizer included (what a load on demand did);
- `weights alone`: the load Orchard does now, keeping the text side's tokenizer;
- `collect, nothing frozen`: the `gc.collect()` around every load and unload, with the process's
  start-up objects (this process imports what a worker does) and one model loaded since in
  the collector's reach;
- `collect, start-up frozen`: the same after `gc.freeze()` of the start-up objects, as a
  serving process now does (the model loaded since is still walked).

    python -m bench.loop_gaps [--model DIR] [--rounds 3] [--json FILE]

The default model is the embedded SmolLM2 (imported once, as `make model` does).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import threading
import time
from pathlib import Path


def worst_gap_ms(work) -> tuple[float, float]:
    """Run `work` on a thread; (the main thread's worst gap between 1 ms sleeps, work's own ms)."""
    took: list[float] = []

    def timed():
        started = time.perf_counter()
        work()
        took.append((time.perf_counter() - started) * 1000)

    thread = threading.Thread(target=timed)
    worst, last = 0.0, time.perf_counter()
    thread.start()
    while thread.is_alive():
        time.sleep(0.001)
        now = time.perf_counter()
        worst, last = max(worst, now - last), now
    thread.join()
    return worst * 1000, took[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="an MLX model folder (default: the embedded SmolLM2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the readings here")
    args = parser.parse_args(argv)

    importlib.import_module("app")  # what a worker imports, so the collector has a worker's objects to walk
    from engine.loader import load
    from engine.model_source import ModelSource, resolve

    if args.model:
        source = ModelSource(Path(args.model).name, args.model, True)
    else:
        source = resolve("embedded", Path("~/.cache/orchard").expanduser())
    text = load(source, with_weights=False)
    cases = {
        "whole load": lambda: load(source),
        "weights alone": lambda: load(source, tokenizer=text.tokenizer),
        "collect, nothing frozen": gc.collect,
        "collect, start-up frozen": gc.collect,
    }
    readings: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    objects: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, work in cases.items():
            loaded = None
            if name.startswith("collect"):
                if name.endswith("start-up frozen"):
                    gc.collect()
                    gc.freeze()
                # as at an unload: one model loaded on demand since start-up, in reach either way
                loaded = load(source, tokenizer=text.tokenizer)
            gc.collect()  # every case starts from a clean heap: the load before left garbage
            objects[name] = len(gc.get_objects())
            readings[name].append(worst_gap_ms(work))
            del loaded
            gc.unfreeze()
    print(f"model {source.model_id}; {args.rounds} rounds; the worst loop gap (ms) while the engine thread ...")
    print(f"{'':28} {'worst gap':>24} {'its own time':>24} {'objects walked':>15}")
    for name, values in readings.items():
        gaps = ", ".join(f"{g:.0f}" for g, _ in values)
        own = ", ".join(f"{t:.0f}" for _, t in values)
        walked = f"{objects[name]:,}" if name.startswith("collect") else ""
        print(f"{name:28} {gaps:>24} {own:>24} {walked:>15}")
    if args.json:
        args.json.write_text(json.dumps({"model": source.model_id, "readings": readings, "objects": objects}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
