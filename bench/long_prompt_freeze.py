"""How much a long prompt freezes the streams already decoding beside it (issue 14).

For each setting, one real server (MODEL=embedded unless --model): 8 streaming clients decode
(ignore_eos), then one ~4k-token prompt of fresh text arrives (max_tokens small). Reported per
setting: the decoding streams' longest gap and inter-token p50/p95 before it arrived, during
(its arrival to its first token) and after (the same length as before, from its first token);
their tok/s during vs before; the long prompt's TTFT. Settings run side by side, one fresh
server each, interleaved when repeated (A B C A B C).

    python -m bench.long_prompt_freeze --compare PREFILL_STEP_SIZE=2048,512,128 [--repeat 2]
        [--json docs/results/cpu/long-prompt-freeze.json]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from bench.gpu_suite import ROOT, status_of, wait_healthy
from bench.stats import percentile

SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "app").rglob("*.py")))
CHARS_PER_TOKEN = 3.7  # Python source in SmolLM2's tokenizer, about
MODEL_ID: dict[str, str] = {}  # server URL -> the model id it serves


def long_text(tokens: int, offset: int) -> str:
    """Orchard's own source from `offset` on: one text per round, the same for every setting
    (each setting's server is fresh, so no cache has seen it)."""
    text = SOURCE[offset:] + SOURCE
    return "Summarize this code.\n\n" + text[:int(tokens * CHARS_PER_TOKEN)]


def served_model(base: str) -> str:
    return requests.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]


def chat(base: str, text: str, max_tokens: int, ignore_eos: bool) -> requests.Response:
    body = {"model": MODEL_ID[base], "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "stream": True, "ignore_eos": ignore_eos, "stream_options": {"include_usage": True},
            "temperature": 0}
    response = requests.post(base + "/v1/chat/completions", json=body, stream=True, timeout=600)
    response.raise_for_status()
    return response


def events(response: requests.Response):
    """(arrival time, parsed chunk) of each SSE data event."""
    for line in response.iter_lines(chunk_size=1):
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            yield time.monotonic(), json.loads(line[6:])


def decode_stream(base: str, i: int, times: list[float], stop: threading.Event) -> None:
    with chat(base, f"Count from {i} upwards, one number a line.", 8000, True) as response:
        for now, chunk in events(response):
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                times.append(now)
            if stop.is_set():
                return


def long_request(base: str, text: str, max_tokens: int) -> dict:
    sent = time.monotonic()
    first, usage = None, {}
    with chat(base, text, max_tokens, False) as response:
        for now, chunk in events(response):
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", ())):
                first = now
            usage = chunk.get("usage") or usage
    return {"sent": sent, "first": first, "prompt_tokens": usage.get("prompt_tokens")}


def phase(streams: list[list[float]], start: float, end: float, overlap: bool) -> dict:
    """Gaps between consecutive tokens of each stream: inside [start, end], or (overlap) any gap
    that overlaps it (a freeze that began before the window or ends after it counts whole)."""
    inside = (lambda a, b: b > start and a < end) if overlap else (lambda a, b: a >= start and b <= end)
    spans = [(b - a, a) for times in streams for a, b in zip(times, times[1:]) if inside(a, b)]
    gaps = [g for g, _ in spans]
    tokens = sum(start <= t <= end for times in streams for t in times)
    return {"seconds": round(end - start, 2), "tokens": tokens, "tok_s": round(tokens / (end - start), 2),
            "longest_gap_s": round(max(gaps, default=0.0), 3),
            # where it began, from the window's start (a freeze at the end of a prefill is the join)
            "longest_gap_from_start_s": round(max(spans)[1] - start, 3) if spans else None, "itl_p50_s": _r(percentile(gaps, 50)),
            "itl_p95_s": _r(percentile(gaps, 95))}


def _r(value):
    return None if value is None else round(value, 3)


def run_one(setting: dict[str, str], args, offset: int, text_seed: int, log_dir: Path) -> dict:
    port = 8300 + offset % 500
    env = {**os.environ, "MODEL": args.model, "HOST": "127.0.0.1", "PORT": str(port), "LOG_LEVEL": "warning",
           "MAX_CONCURRENT_REQUESTS": str(args.streams + 4), **setting}
    name = ",".join(f"{k}={v}" for k, v in setting.items()) or "defaults"
    log = open(log_dir / f"server-{name}-{offset}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    streams: list[list[float]] = [[] for _ in range(args.streams)]
    try:
        wait_healthy(base, proc)
        MODEL_ID[base] = served_model(base)
        with chat(base, "Hello", 4, True) as response:  # warm the path once
            list(events(response))
        threads = [threading.Thread(target=decode_stream, args=(base, i, streams[i], stop), daemon=True)
                   for i in range(args.streams)]
        for thread in threads:
            thread.start()
        while min(len(times) for times in streams) < 3:
            time.sleep(0.05)
        time.sleep(args.window)
        generated = status_of(base)["tokens"]["generated"]
        long = long_request(base, long_text(args.prompt_tokens, text_seed), args.long_max_tokens)
        time.sleep(max(0.0, long["first"] + args.window - time.monotonic()))
        stop.set()
        chunks = sum(t >= long["sent"] for times in streams for t in times)
        generated = status_of(base)["tokens"]["generated"] - generated
    finally:
        proc.terminate()
        proc.wait(60)
    sent, first = long["sent"], long["first"]
    before = phase(streams, sent - args.window, sent, overlap=False)
    during = phase(streams, sent, first, overlap=True)
    return {"setting": name, "prompt_tokens": long["prompt_tokens"], "ttft_s": round(first - sent, 2),
            "before": before, "during": during, "after": phase(streams, first, first + args.window, overlap=False),
            "during_vs_before_tok_s": round(during["tok_s"] / before["tok_s"], 2) if before["tok_s"] else None,
            # a chunk is one token unless the server merged several: these two agree when none were
            "stream_chunks_since_arrival": chunks, "server_tokens_since_arrival": generated}


def parse_compare(spec: str) -> list[dict[str, str]]:
    """'PREFILL_STEP_SIZE=2048,512,128' -> one settings dict per value ('' for the defaults)."""
    if not spec:
        return [{}]
    key, _, values = spec.partition("=")
    return [{key: v} for v in values.split(",")]


def table(rows: list[dict]) -> str:
    head = ("| setting | prompt tokens | TTFT s | longest gap before / during / after s "
            "| ITL p50 before / during / after s | ITL p95 during s | tok/s before / during (ratio) |")
    lines = [head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        b, d, a = r["before"], r["during"], r["after"]
        lines.append(f"| {r['setting']} | {r['prompt_tokens']} | {r['ttft_s']} "
                     f"| {b['longest_gap_s']} / **{d['longest_gap_s']}** / {a['longest_gap_s']} "
                     f"| {b['itl_p50_s']} / {d['itl_p50_s']} / {a['itl_p50_s']} | {d['itl_p95_s']} "
                     f"| {b['tok_s']} / {d['tok_s']} ({r['during_vs_before_tok_s']}x) |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", default="PREFILL_STEP_SIZE=2048,512,128",
                        help="one setting, several values: KEY=v1,v2,... (one server each)")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE for every server")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=4000)
    parser.add_argument("--long-max-tokens", type=int, default=8)
    parser.add_argument("--window", type=float, default=6.0, help="seconds measured before and after")
    parser.add_argument("--repeat", type=int, default=1, help="rounds, settings interleaved in each")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/long-prompt-freeze"))
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    args.logs.mkdir(parents=True, exist_ok=True)
    common = dict(kv.split("=", 1) for kv in args.set)
    rows = []
    for round_ in range(args.repeat):
        for i, setting in enumerate(parse_compare(args.compare)):
            row = run_one({**common, **setting}, args, round_ * 100 + i, round_ * 9973, args.logs)
            rows.append({"round": round_ + 1, **row})
            print(json.dumps(row), flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"command": " ".join(sys.argv), "common": common, "streams": args.streams,
                                         "window_s": args.window, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
