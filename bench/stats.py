"""Percentiles and per-level aggregation of request results."""
from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation (numpy's default).

    Returns None for an empty sequence.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, None when empty."""
    xs = list(values)
    return sum(xs) / len(xs) if xs else None


def ratio(num: float | None, den: float | None) -> float | None:
    """num/den, None when either is missing or den is zero."""
    if num is None or den is None or den == 0:
        return None
    return num / den


def summarize(results: list, wall: float, concurrency: int) -> dict:
    """Aggregate RequestResult-like objects of one level into a flat dict.

    Latencies are in seconds. Throughputs divide by the level's wall time
    (first request sent to last response finished).
    """
    ok = [r for r in results if r.ok]
    e2e = [r.e2e for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    tpot = [(r.e2e - r.ttft) / (r.tokens - 1)
            for r in ok if r.ttft is not None and r.tokens > 1]
    itl = gaps or tpot
    tokens = sum(r.tokens for r in ok)
    n = len(results)
    return {
        "concurrency": concurrency,
        "requests": n,
        "ok": len(ok),
        "failed": n - len(ok),
        "success_rate": len(ok) / n if n else 0.0,
        "errors": dict(sorted(Counter(r.error for r in results if not r.ok).items())),
        "wall_s": wall,
        "latency_mean": mean(e2e),
        "latency_p50": percentile(e2e, 50),
        "latency_p95": percentile(e2e, 95),
        "latency_p99": percentile(e2e, 99),
        "ttft_mean": mean(ttft),
        "ttft_p50": percentile(ttft, 50),
        "ttft_p95": percentile(ttft, 95),
        "itl_mean": mean(itl),
        "itl_p95": percentile(itl, 95),
        "itl_source": "chunk_gaps" if gaps else "tpot",
        "tpot_mean": mean(tpot),
        "req_per_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tokens": tokens,
        "tokens_per_req": tokens / len(ok) if ok else None,
        "tok_per_s": tokens / wall if wall > 0 else 0.0,
        "stream_tok_per_s": mean(r.tokens / r.e2e for r in ok if r.e2e),
        "token_source": sorted({r.token_source for r in ok}),
    }
