"""Prometheus metrics (prometheus_client), named as vLLM users know them, under `orchard:`.

Each app has its own registry. Request-level metrics are observed by a RequestTimer on
the request greenlet; gauges read the engine's counters at scrape time, so none is NaN
and every family exists at zero from the start.
"""
from __future__ import annotations

import time

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
FINISH_REASONS = ("stop", "length", "tool_calls", "abort", "error")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self, engine, settings):
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram("orchard:time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("orchard:inter_token_latency_seconds", "Time between output tokens", registry=r,
                             buckets=ITL_BUCKETS)
        self.e2e = Histogram("orchard:e2e_request_latency_seconds", "End-to-end request latency", registry=r,
                             buckets=LATENCY_BUCKETS)
        self.queue = Histogram("orchard:request_queue_time_seconds", "Time from arrival to admission into the batch",
                               registry=r, buckets=LATENCY_BUCKETS)
        self.prompt_tokens = Counter("orchard:prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_prompt_tokens = Counter("orchard:prompt_tokens_cached",
                                            "Prompt tokens served from the prefix cache (part of prompt_tokens)",
                                            registry=r)
        self.generation_tokens = Counter("orchard:generation_tokens", "Tokens generated", registry=r)
        self.success = Counter("orchard:request_success", "Finished requests by finish reason",
                               ["finished_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.success.labels(reason)
        self.http = Counter("orchard:http_requests", "HTTP responses by route and status", ["route", "status"],
                            registry=r)
        self._gauges(engine, settings)

    def _gauges(self, engine, settings) -> None:
        r, s = self.registry, engine.stats
        process = psutil.Process()
        process.cpu_percent(None)
        gauges = {
            "num_requests_running": ("Sequences in the running batch", lambda: engine.running),
            "num_requests_waiting": ("Requests waiting for a batch slot", lambda: engine.waiting),
            "request_queue_capacity": ("Requests that may wait", lambda: settings.request_queue_size),
            "batch_size": ("Sequences decoded in the last step", lambda: s.current_batch),
            "kv_cache_bytes": ("Bytes held by KV caches", lambda: s.kv_cache_bytes),
            "prefix_cache_bytes": ("Bytes held by the prefix cache", lambda: engine.prefix_cache()["bytes"]),
            "prefix_cache_entries": ("Sequences kept in the prefix cache", lambda: engine.prefix_cache()["entries"]),
            "mlx_active_memory_bytes": ("MLX active memory", lambda: s.mlx_active_bytes),
            "mlx_peak_memory_bytes": ("MLX peak memory", lambda: s.mlx_peak_bytes),
            "engine_up": ("1 when the engine is ready", lambda: 1 if engine.state.value == "ready" else 0),
            "model_weight_bytes": ("Bytes of model weights",
                                   lambda: engine.model.weight_bytes if engine.model else 0),
            "process_resident_memory_bytes": ("Resident memory of the worker", lambda: process.memory_info().rss),
            "process_cpu_percent": ("CPU use of the worker since the last scrape, percent",
                                    lambda: process.cpu_percent(None)),
            "system_memory_used_ratio": ("Share of system memory in use, 0..1",
                                         lambda: psutil.virtual_memory().percent / 100.0),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"orchard:{name}", doc, registry=r).set_function(read)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """One request's timings, observed as its tokens arrive (request greenlet only)."""

    def __init__(self, metrics: Metrics):
        self._m = metrics
        self.arrived = time.perf_counter()
        self._last = None

    def admitted(self) -> None:
        self._m.queue.observe(time.perf_counter() - self.arrived)

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.observe(now - self.arrived)
            gaps = count - 1
            step = 0.0
        else:
            gaps = count
            step = (now - self._last) / count
        for _ in range(gaps):  # tokens that arrived together share the step's time
            self._m.itl.observe(step)
        self._last = now
        self._m.generation_tokens.inc(count)

    def finished(self, reason: str, prompt_tokens: int, cached_tokens: int = 0) -> None:
        self._m.e2e.observe(time.perf_counter() - self.arrived)
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.cached_prompt_tokens.inc(cached_tokens)
        self._m.success.labels(reason if reason in FINISH_REASONS else "error").inc()
