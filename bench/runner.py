"""Closed-loop load: per level, c workers send requests back-to-back."""
from __future__ import annotations

import asyncio
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Optional
from time import perf_counter

from bench.client import RequestSpec, preflight, stream_chat
from bench.httpconn import Connection, Endpoint, get_json
from bench.stats import summarize


class BenchError(Exception):
    """A target cannot be benchmarked (unreachable, no model...)."""


@dataclass
class Target:
    """One server under test."""

    label: str
    url: str
    spec: RequestSpec
    notes: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint.parse(self.url)


class Progress:
    """Completion counter: one rewritten line on a TTY, periodic lines otherwise."""

    def __init__(self, stream=None, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()

    def start(self, tag: str, total: int) -> None:
        self.tag, self.total, self.done, self.errors, self.tokens = tag, total, 0, 0, 0
        self.t0 = self.last = perf_counter()
        self.every = max(1, total // 4)

    def update(self, res) -> None:
        self.done += 1
        self.errors += not res.ok
        self.tokens += res.tokens if res.ok else 0
        if not self.enabled:
            return
        now = perf_counter()
        final = self.done == self.total
        if self.tty and (final or now - self.last >= 0.1):
            self._emit("\r\033[K", "\n" if final else "")
        elif not self.tty and (final or self.done % self.every == 0 or now - self.last >= 5):
            self._emit("", "\n")

    def _emit(self, prefix: str, suffix: str) -> None:
        self.last = now = perf_counter()
        dt = max(now - self.t0, 1e-9)
        self.stream.write(f"{prefix}[{self.tag}] {self.done}/{self.total} "
                          f"err={self.errors} {self.done / dt:.2f} req/s "
                          f"{self.tokens / dt:.0f} tok/s{suffix}")
        self.stream.flush()


async def run_level(target: Target, concurrency: int, n_requests: int,
                    prompts: list[str], timeout: float,
                    progress: Progress, processes: int = 1) -> dict:
    """Run one level; return {'summary': ..., 'requests': [...]}. With `processes` > 1 the
    workers are spread over that many client processes (one Python process parsing thousands
    of SSE events a second falls behind the server and adds its own lag to every TTFT)."""
    parts = _split(concurrency, n_requests, processes)
    progress.start(f"{target.label} c={concurrency}", n_requests)
    if len(parts) == 1:
        start = perf_counter()
        results = await _workers(target, concurrency, range(n_requests), prompts, timeout, progress, start)
    else:
        start = perf_counter() + 1.5 + 0.25 * len(parts)  # every process is up and waiting by then
        loop = asyncio.get_running_loop()
        with ProcessPoolExecutor(len(parts), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [loop.run_in_executor(pool, _process_workers, target, c, indices, prompts, timeout, start)
                       for c, indices in parts]
            results = [r for part in await asyncio.gather(*futures) for r in part]
        for res in results:
            progress.update(res)
    wall = perf_counter() - start
    results.sort(key=lambda r: r.start)
    return {"summary": summarize(results, wall, concurrency),
            "requests": [r.to_dict(start) for r in results]}


def _split(concurrency: int, n_requests: int, processes: int) -> list[tuple[int, range]]:
    """(workers, request indices) per process: workers spread evenly, requests in proportion."""
    processes = max(1, min(processes, concurrency))
    workers = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    parts, first = [], 0
    for k, c in enumerate(workers):
        last = n_requests if k == processes - 1 else first + round(n_requests * c / concurrency)
        parts.append((c, range(first, last)))
        first = last
    return parts


async def _workers(target: Target, concurrency: int, indices: range, prompts: list[str], timeout: float,
                   progress: Optional[Progress], start: float) -> list:
    ep = target.endpoint
    order = iter(indices)  # shared: next() never awaits
    results = []
    delay = start - perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)

    async def worker():
        conn = Connection(ep, min(timeout, 10.0))
        try:
            for idx in order:
                res = await stream_chat(conn, target.spec, prompts[idx % len(prompts)],
                                        timeout)
                results.append(res)
                if progress is not None:
                    progress.update(res)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _process_workers(target: Target, concurrency: int, indices: range, prompts: list[str], timeout: float,
                     start: float) -> list:
    """One client process's share of a level (perf_counter is the system's monotonic clock on
    Linux and macOS, so `start` means the same instant in every process)."""
    return asyncio.run(_workers(target, concurrency, indices, prompts, timeout, None, start))


async def prepare(target: Target, warmup: int, prompts: list[str],
                  timeout: float) -> None:
    """Resolve the model, probe extensions, and send warmup requests."""
    headers = target.spec.headers()
    if not target.spec.model:
        try:
            models = await get_json(target.url, "/models", headers, min(timeout, 30))
            target.spec.model = models["data"][0]["id"]
        except Exception as exc:  # noqa: BLE001
            raise BenchError(f"{target.label}: cannot list models at {target.url}/models "
                             f"({exc!r}); pass --model") from exc
    conn = Connection(target.endpoint, min(timeout, 10.0))
    try:
        res, notes = await preflight(conn, target.spec, prompts[0], timeout)
        target.notes.extend(notes)
        if res.error in ("connection_refused", "os_error_111"):
            raise BenchError(f"{target.label}: {res.error} at {target.url}")
        if not res.ok:
            target.notes.append(f"preflight request failed: {res.error} {res.detail[:120]}")
        for i in range(1, warmup):
            await stream_chat(conn, target.spec, prompts[i % len(prompts)], timeout)
    finally:
        conn.close()


async def run_all(targets: list[Target], levels: list[int], n_for_level,
                  prompts: list[str], timeout: float, warmup: int,
                  progress: Progress, processes: int = 1) -> list[dict]:
    """Prepare every target, then for each level run each target in turn (A B A B)."""
    for t in targets:
        await prepare(t, warmup, prompts, timeout)
    records = []
    for c in levels:
        for t in targets:
            rec = await run_level(t, c, n_for_level(c), prompts, timeout, progress, processes)
            rec["target"] = t.label
            records.append(rec)
    return records
