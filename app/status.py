"""The operator's one-look summary (/v1/system/status) and the recent-throughput meter."""
from __future__ import annotations

import collections
import os
import platform
import time

import gevent
import psutil

from engine import blas
from engine.engine import Engine

WINDOW_S = 60


class ThroughputMeter:
    """Samples the engines' token counters once a second in a greenlet; rates over a window."""

    def __init__(self, engines: list[Engine]):
        self._engines = engines
        self._samples: collections.deque = collections.deque(maxlen=WINDOW_S + 1)
        self._greenlet = None

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while True:
            self.sample()
            gevent.sleep(1.0)

    def sample(self) -> None:
        tokens = sum(e.stats.generated_tokens for e in self._engines)
        requests = sum(e.stats.requests_finished for e in self._engines)
        self._samples.append((time.monotonic(), tokens, requests))

    def rates(self, seconds: int) -> tuple[float, float]:
        """(tokens/s, requests/s) over the last `seconds`."""
        self.sample()
        now, tokens, requests = self._samples[-1]
        old = next((x for x in self._samples if now - x[0] <= seconds), self._samples[0])
        span = now - old[0]
        if span <= 0:
            return 0.0, 0.0
        return (tokens - old[1]) / span, (requests - old[2]) / span


class StatusReporter:
    def __init__(self, engine: Engine, settings, meter: ThroughputMeter, version: str, catalog=None):
        self._engine, self._settings, self._meter, self._version = engine, settings, meter, version
        self._catalog = catalog
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # prime: the first reading is always 0
        self._started = time.time()

    def _total(self, read) -> int:
        engines = self._catalog.engines if self._catalog is not None else [self._engine]
        return sum(read(e) for e in engines)

    def report(self) -> dict:
        engine, s = self._engine, self._engine.stats
        model = engine.model
        tps_10, rps_10 = self._meter.rates(10)
        tps_60, rps_60 = self._meter.rates(WINDOW_S)
        mem = self._process.memory_info()
        blas_now = blas.describe()  # what MLX's matmuls bind to, asked of the dynamic linker
        return {
            "object": "system.status",
            "version": self._version,
            "uptime_s": round(time.time() - self._started, 1),
            "engine": {"state": engine.state.value, "error": engine.error,
                       "last_beat_age_s": round(time.monotonic() - s.last_beat, 3) if s.last_beat else None},
            "model": None if model is None else {
                "id": model.model_id, "context_length": model.context_length, "dtype": model.dtype,
                "weight_bytes": model.weight_bytes},
            # requests and tokens: every model's together (the first model's own are in `models`)
            "requests": {"running": self._total(lambda e: e.running), "waiting": self._total(lambda e: e.waiting),
                         "finished": self._total(lambda e: e.stats.requests_finished),
                         "failed": self._total(lambda e: e.stats.requests_failed)},
            "tokens": {"prompt": self._total(lambda e: e.stats.prompt_tokens),
                       "prompt_cached": self._total(lambda e: e.stats.cached_prompt_tokens),
                       "generated": self._total(lambda e: e.stats.generated_tokens),
                       "per_second_10s": round(tps_10, 2), "per_second_60s": round(tps_60, 2),
                       "requests_per_second_60s": round(rps_60, 3)},
            "batch": {"current": s.current_batch, "max_seen": s.max_batch_seen, "steps": s.steps,
                      "core": engine.decode_core, "attention": engine.decode_attention,
                      "cpu_math": engine.cpu_math, "decode_groups": s.decode_groups,
                      "decode_groups_max_seen": s.decode_groups_max_seen,
                      "step_seconds": round(s.step_seconds, 3), "prefill_seconds": round(s.prefill_seconds, 3),
                      "decode_seconds": round(s.decode_seconds, 3)},
            "memory": {"rss_bytes": mem.rss, "mlx_active_bytes": s.mlx_active_bytes,
                       "mlx_peak_bytes": s.mlx_peak_bytes, "mlx_cache_bytes": s.mlx_cache_bytes,
                       "kv_cache_bytes": s.kv_cache_bytes, "kv_budget_bytes": engine.kv_budget,
                       "kv_reserved_bytes": engine.kv_reserved},
            "prefix_cache": engine.prefix_cache(),
            "cpu": {"process_percent": self._process.cpu_percent(None), "cores": psutil.cpu_count()},
            "limits": {"max_concurrent_requests": self._settings.max_concurrent_requests,
                       "request_queue_size": self._settings.request_queue_size,
                       "max_tokens_limit": self._settings.max_tokens_limit},
            "backend": {"platform": f"{platform.system()} {platform.machine()}", "blas": engine.blas,
                        "blas_fast": blas_now["fast"], "blas_threads": blas_now["threads"]},
            "models": self._catalog.report() if self._catalog is not None else [],
        }
