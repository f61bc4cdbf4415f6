"""A long prompt's template rendering and tokenization run off the event loop: while a
16k-token prompt arrives, streams already running keep getting their chunks, and gevent's
monitor sees no block of the loop (real Gunicorn server on the 32k-context tiny Qwen2)."""
from __future__ import annotations

import re
import threading
import time

from pathlib import Path

import pytest
import requests

from engine import cpu_math, slot_attention
from tests.conftest import assert_never_blocked
from tests.server import ROOT, ServerProcess

STREAMS = 4
PROMPT_TOKENS = (16_000, 64_000)
REPEATS = 3
# The largest pause between two chunks of one stream while a long prompt is read, templated
# and tokenized. Inline, the loop stalled for all of it: 60 ms for 16k tokens, 300 ms for 64k
# on the 2-core development machine. Off the loop the gaps were 15-55 ms, with a rare 110-170
# ms when other test runs starved the whole process (the engine thread waits then, not the
# loop: gevent's monitor, asserted as well, is the precise check of the loop). Taking the best
# of a few repeats and 100 ms keeps the test stable on a loaded 2-core machine and still
# fails an inline 64k prompt; the 20 ms goal is for a quiet machine.
MAX_GAP_S = 0.1


@pytest.fixture(scope="module")
def model_dir(embedded_model_dir, tmp_path_factory) -> Path:
    """The tiny 32k-context Qwen2 with SmolLM2's real tokenizer (49k vocabulary) and template:
    the tiny model's own 8k-vocabulary tokenizer is several times cheaper per token than real ones."""
    from engine.random_model import write_random_model

    return write_random_model(tmp_path_factory.mktemp("tiny-32k-smol"), "tiny-32k", tokenizer_from=embedded_model_dir)


SOURCE = "\n".join(p.read_text() for p in sorted((ROOT / "app").rglob("*.py")) + sorted((ROOT / "engine").rglob("*.py")))


def long_text(tokens: int, offset: int) -> str:
    """Orchard's own Python source (what agents send: code, ~3.7 characters a token)."""
    text = SOURCE[offset:] + SOURCE
    return text[:int(tokens * 3.7)]


def stream_times(server: ServerProcess, times: list[float], stop: threading.Event) -> None:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "count"}], "max_tokens": 4000,
            "ignore_eos": True, "stream": True}
    with requests.post(server.base_url + "/v1/chat/completions", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines(chunk_size=1):
            if line.startswith(b"data:"):
                times.append(time.monotonic())
            if stop.is_set():
                return


def worst_gap(streams: list[list[float]], start: float, end: float) -> float:
    """The longest pause between consecutive chunks of any stream that overlaps [start, end]."""
    gaps = [b - a for times in streams for a, b in zip(times, times[1:]) if b > start and a < end]
    return max(gaps, default=0.0)


def test_a_long_prompt_leaves_running_streams_flowing(model_dir, tmp_path):
    server = ServerProcess({"MODEL": str(model_dir), "MODEL_ID": "tiny", "MAX_TOKENS_LIMIT": "32768"},
                           tmp_path / "server.log").start()
    stop = threading.Event()
    streams: list[list[float]] = [[] for _ in range(STREAMS)]
    threads = [threading.Thread(target=stream_times, args=(server, times, stop), daemon=True) for times in streams]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while min(len(times) for times in streams) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        quiet_start = time.monotonic()
        time.sleep(0.5)
        quiet = worst_gap(streams, quiet_start, time.monotonic())
        windows: dict[int, list[tuple[float, float]]] = {size: [] for size in PROMPT_TOKENS}
        for i, size in enumerate(PROMPT_TOKENS * REPEATS):
            # max_tokens past the context: templated, tokenized, then refused, so the engine never
            # prefills it and the window times the web side alone.
            body = {"model": "tiny", "messages": [{"role": "user", "content": long_text(size, 30_000 * i)}],
                    "max_tokens": 32_768}
            start = time.monotonic()
            answer = requests.post(server.base_url + "/v1/chat/completions", json=body, timeout=60)
            windows[size].append((start, time.monotonic()))
            assert answer.status_code == 400, answer.text
            assert answer.json()["error"]["code"] == "context_length_exceeded"
            prompt_tokens = int(re.search(r"\((\d+) in the messages", answer.json()["error"]["message"])[1])
            assert 0.75 * size < prompt_tokens < 1.25 * size, prompt_tokens
            time.sleep(0.2)
        stop.set()
        assert all(len(times) > 50 for times in streams), [len(times) for times in streams]
        gaps = {size: [worst_gap(streams, *window) for window in spans] for size, spans in windows.items()}
        print(f"worst chunk gap: quiet {quiet * 1000:.0f} ms; during long prompts, by size: "
              + "; ".join(f"{size}: {[round(g * 1000) for g in gaps[size]]} ms in "
                          f"{[round((end - start) * 1000) for start, end in windows[size]]} ms" for size in gaps))
        for size, size_gaps in gaps.items():
            # The best of the repeats: an inline tokenizer stalls every one of them, while a
            # starved process on a shared machine stalls one at random.
            assert min(size_gaps) < MAX_GAP_S, f"streams stalled {min(size_gaps) * 1000:.0f} ms beside {size} tokens"
        assert_never_blocked(server)
    finally:
        stop.set()
        server.stop()


def test_a_long_row_beside_short_streams_answers_exactly_as_alone(model_dir, tmp_path):
    """A ~3k-token prompt joins four short streams mid-decode: it decodes in a width class of
    its own (engine/batcher.py), so nobody's cache is widened, and every answer, streamed or
    not, is the one it gets alone (greedy; the official openai client; prefix cache off, so
    the long prompt is prefilled in full both times)."""
    import openai

    server = ServerProcess({"MODEL": str(model_dir), "MODEL_ID": "tiny", "MAX_TOKENS_LIMIT": "32768",
                            "PREFIX_CACHE_BYTES": "0"}, tmp_path / "server.log").start()
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    fixed = {"temperature": 0, "extra_body": {"ignore_eos": True}}
    long_prompt = long_text(3_000, 0)

    def ask(content: str, max_tokens: int) -> str:
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, **fixed)
        return answer.choices[0].message.content

    def stream(content: str, max_tokens: int, chunks: list[str]) -> None:
        for chunk in client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": content}],
                                                    max_tokens=max_tokens, stream=True, **fixed):
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(chunk.choices[0].delta.content)

    try:
        short_alone, long_alone = ask("count", 1000), ask(long_prompt, 24)
        assert client.completions.create(model="tiny", prompt="x", max_tokens=1)  # the server is up
        short_chunks: list[list[str]] = [[] for _ in range(4)]
        threads = [threading.Thread(target=stream, args=("count", 1000, chunks)) for chunks in short_chunks]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while min(len(c) for c in short_chunks) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        long_chunks: list[str] = []
        stream(long_prompt, 24, long_chunks)  # arrives while the short rows decode
        still_decoding = [len(c) for c in short_chunks]
        long_beside = ask(long_prompt, 24)
        for thread in threads:
            thread.join(60)
        assert max(still_decoding) < 1000, still_decoding  # the long answer ended beside them
        assert "".join(long_chunks) == long_alone == long_beside
        assert all("".join(chunks) == short_alone for chunks in short_chunks)
        batch = requests.get(server.base_url + "/v1/system/status", timeout=10).json()["batch"]
        assert batch["core"] == "slots" and batch["decode_groups_max_seen"] == 2  # short rows, the long one
        assert batch["attention"] == ("kernel" if slot_attention.available() else "mask")  # the kernel is CUDA's
        assert batch["cpu_math"] is cpu_math.wanted("auto")  # CPU_MATH=auto reached the engine (x86 CPU only)
        assert_never_blocked(server)
    finally:
        server.stop()


def test_the_start_up_warm_up_runs_before_ready_and_changes_no_answer(model_dir, tmp_path):
    """WARMUP_TOKENS (on by default on a GPU only) runs its synthetic prompts before /health
    says ready and leaves nothing behind: the prefix cache is empty and a greedy answer equals
    a server's without a warm-up, here one on mlx-lm's batching core (which status reports)."""
    import openai

    answers, cores = [], []
    for name, env in (("warm", {"WARMUP_TOKENS": "600"}), ("plain", {"WARMUP_TOKENS": "0", "DECODE_BATCH": "mlx-lm"})):
        server = ServerProcess({"MODEL": str(model_dir), "MODEL_ID": "tiny", **env}, tmp_path / f"{name}.log").start()
        try:
            status = requests.get(server.base_url + "/v1/system/status", timeout=10).json()
            if name == "warm":
                assert "warmed up tiny: a 600-token prompt" in server.log_path.read_text(errors="replace")
                assert status["prefix_cache"]["entries"] == 0 and status["prefix_cache"]["hits"] == 0
            client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused")
            for stream in (False, True):
                kwargs = dict(model="tiny", messages=[{"role": "user", "content": "warm up"}], max_tokens=16,
                              temperature=0, extra_body={"ignore_eos": True}, stream=stream)
                if stream:
                    answers.append("".join(c.choices[0].delta.content or "" for c in
                                           client.chat.completions.create(**kwargs) if c.choices))
                else:
                    answers.append(client.chat.completions.create(**kwargs).choices[0].message.content)
            cores.append(requests.get(server.base_url + "/v1/system/status", timeout=10).json()["batch"]["core"])
        finally:
            server.stop()
    assert cores == ["slots", "mlx-lm"]
    assert len(set(answers)) == 1 and answers[0]
