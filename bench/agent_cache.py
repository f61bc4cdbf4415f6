"""An agent's conversation through /v1/messages: does each turn read the last one from the prefix cache?

Claude Code opens every system prompt with a billing header whose nonce changes per request
(`x-anthropic-billing-header: ...; cch=<nonce>;`). Orchard leaves it out of the prompt, so a
conversation's turns share their prefix. This runs a conversation shaped like an agent's: a
~4k-token system prompt after that header (a fresh nonce each turn), each turn appending the
last answer and a short user message, small streamed answers; and reports per turn the prompt
tokens, the tokens read from the cache and the time to the first text delta (TTFT).

Targets: from turn 2 on, cache_read_input_tokens >= 90 % of the previous turn's prompt, and the
TTFT p50 of those turns <= 0.25x turn 1's. It starts its own server (MODEL, default embedded).

    python -m bench.agent_cache [--turns 10] [--system-tokens 4000] [--max-tokens 16]
                                [--prefill-step-size N] [--out FILE]

--prefill-step-size sets the server's PREFILL_STEP_SIZE (default: its own, 512). On a Linux CPU
without OpenBLAS (MLX's bundled reference BLAS, ~3 GFLOP/s) a 512-token step of the embedded
model takes ~50 s, past the engine watchdog's 30 s, and the worker restarts mid-prefill: use 128.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import requests

ALIAS = "claude-bench"
PARAGRAPH = ("You are a coding agent working in a large Python repository. Read the files you are shown, "
             "keep your changes small, explain each change in one sentence, and run the tests that cover "
             "what you touched before you say you are done. Prefer the standard library; ask before adding "
             "a dependency. When a test fails, read its output before changing anything. ")
QUESTIONS = ["Where is the request parsed?", "Which test covers it?", "Run that test.", "Why did it fail?",
             "Fix the off-by-one.", "Run it again.", "Any other callers?", "Update them too.",
             "Summarise the change.", "Write the commit message."]


def billing_block() -> dict:
    nonce = uuid.uuid4().hex[:5]
    text = f"x-anthropic-billing-header: cc_version=2.1.332.1c9; cc_entrypoint=cli; cch={nonce};"
    return {"type": "text", "text": text}


def system_prompt(base_url: str, tokens: int) -> str:
    """PARAGRAPH repeated to about `tokens` tokens of prompt (counted by the server)."""
    def count(text: str) -> int:
        body = {"model": ALIAS, "system": text, "messages": [{"role": "user", "content": "hi"}]}
        return requests.post(base_url + "/v1/messages/count_tokens", json=body, timeout=60).json()["input_tokens"]

    one, two = count(PARAGRAPH), count(PARAGRAPH * 2)
    return PARAGRAPH * max(1, round((tokens - (one - (two - one))) / (two - one)))


def turn(base_url: str, system: str, messages: list[dict], max_tokens: int) -> dict:
    """One streamed request: its usage, answer and time to the first text delta."""
    body = {"model": ALIAS, "max_tokens": max_tokens, "temperature": 0, "stream": True, "messages": messages,
            "system": [billing_block(), {"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]}
    started, ttft, text, usage = time.perf_counter(), None, "", {}
    with requests.post(base_url + "/v1/messages", json=body, stream=True, timeout=3600) as response:
        response.raise_for_status()
        for line in response.iter_lines(decode_unicode=True):
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if event["type"] == "content_block_delta" and event["delta"]["type"] == "text_delta":
                ttft = ttft if ttft is not None else time.perf_counter() - started
                text += event["delta"]["text"]
            elif event["type"] == "message_delta":
                usage = event["usage"]
            elif event["type"] == "error":
                raise RuntimeError(event)
    cached = usage["cache_read_input_tokens"]
    return {"prompt": usage["input_tokens"] + cached, "cached": cached, "output": usage["output_tokens"],
            "ttft": ttft, "total": time.perf_counter() - started, "text": text}


def conversation(base_url: str, turns: int, system_tokens: int, max_tokens: int) -> list[dict]:
    system = system_prompt(base_url, system_tokens)
    turn(base_url, "Warm-up.", [{"role": "user", "content": "hi"}], 2)  # first-request costs are not turn 1's
    messages, rows = [], []
    for i in range(turns):
        messages.append({"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]})
        row = turn(base_url, system, messages, max_tokens)
        messages.append({"role": "assistant", "content": row["text"] or "..."})
        rows.append(row)
    return rows


def report(rows: list[dict], command: str, machine: str) -> str:
    lines = [f"`{command}`", "", machine, "",
             "| turn | prompt tokens | cache_read_input_tokens | read / previous prompt | TTFT (s) | output tokens |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(rows):
        share = f"{row['cached'] / rows[i - 1]['prompt']:.0%}" if i else "-"
        ttft = f"{row['ttft']:.3f}" if row["ttft"] is not None else "no text"
        lines.append(f"| {i + 1} | {row['prompt']} | {row['cached']} | {share} | {ttft} | {row['output']} |")
    later = rows[1:]
    shares = [row["cached"] / rows[i]["prompt"] for i, row in enumerate(later)]
    ttfts = [row["ttft"] for row in later if row["ttft"] is not None]
    p50 = statistics.median(ttfts) if ttfts else float("nan")
    first = rows[0]["ttft"] or float("nan")
    lines += ["", f"- cache reads, turns 2-{len(rows)}: every turn >= 90 % of the previous prompt: "
                  f"{'PASS' if min(shares) >= 0.9 else 'FAIL'} (lowest {min(shares):.0%})",
              f"- TTFT p50, turns 2-{len(rows)}: {p50:.3f} s = {p50 / first:.2f}x turn 1's {first:.3f} s "
              f"(target <= 0.25x): {'PASS' if p50 <= 0.25 * first else 'FAIL'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("MODEL", "embedded"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--system-tokens", type=int, default=4000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--prefill-step-size", type=int)
    parser.add_argument("--out", help="also write the markdown here")
    args = parser.parse_args(argv)
    from tests.server import ServerProcess

    load = os.getloadavg()[0]
    command = "python -m bench.agent_cache " + " ".join(argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        env = {"MODEL": args.model, "MODEL_ALIASES": "claude-*"}
        if args.prefill_step_size:
            env["PREFILL_STEP_SIZE"] = str(args.prefill_step_size)
        server = ServerProcess(env, Path(tmp) / "server.log").start()
        try:
            rows = conversation(server.base_url, args.turns, args.system_tokens, args.max_tokens)
            blas = next((line.split("MLX CPU BLAS: ")[1].split('"')[0] for line in server.full_log().splitlines()
                         if "MLX CPU BLAS: " in line), "unknown")
        finally:
            server.stop()
    text = report(rows, command.strip(), f"{os.cpu_count()} CPUs, load average {load:.2f} at start; "
                                         f"MLX CPU BLAS: {blas}")
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
