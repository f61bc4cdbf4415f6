"""Memory arithmetic: KV-cache bytes per token, the default budget, and MLX's own limits.

Runs on the engine thread (it asks MLX about the device).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import psutil

log = logging.getLogger("orchard.engine")

METAL_SHARE = 0.75  # of the recommended working set left after the weights
CPU_SHARE = 0.5  # of the memory available when the model has loaded
CACHE_CAP = 2 << 30  # the most MLX's buffer cache keeps: while serving, and during the warm-up


def kv_bytes_per_token(config: dict, activation_bytes: int) -> int:
    text = config.get("text_config", config)
    layers = text["num_hidden_layers"]
    heads = text["num_attention_heads"]
    kv_heads = text.get("num_key_value_heads") or heads
    head_dim = text.get("head_dim") or text["hidden_size"] // heads
    return 2 * layers * kv_heads * head_dim * activation_bytes  # keys and values


def activation_bytes(dtypes: str) -> int:
    """Bytes per KV element: the activations follow the float weights (fp32 on the CPU path)."""
    return 4 if "float32" in dtypes else 2


def auto_budget(weight_bytes: int) -> int:
    import mlx.core as mx

    if sys.platform == "darwin" and mx.metal.is_available():
        working_set = mx.device_info().get("max_recommended_working_set_size", 0)
        return max(int((working_set - weight_bytes) * METAL_SHARE), 256 << 20)
    return max(int(psutil.virtual_memory().available * CPU_SHARE), 256 << 20)


def apply_mlx_limits(weight_bytes: int, kv_budget: int) -> Optional[int]:
    """Cap MLX's allocator just above weights + KV budget, so a runaway allocation fails
    in MLX (an error we catch) rather than as a Metal out-of-memory abort of the process."""
    import mlx.core as mx

    limit = int((weight_bytes + kv_budget) * 1.25) + (512 << 20)
    mx.set_memory_limit(limit)
    cache_limit = min(limit // 4, CACHE_CAP)
    empty_cache_under(cache_limit)
    log.info("memory budget %.1f MiB (weights %.1f MiB + KV); MLX memory limit %.1f MiB",
             (weight_bytes + kv_budget) / 2**20, weight_bytes / 2**20, limit / 2**20)
    return limit


def empty_cache_under(cache_limit: int) -> None:
    """Set MLX's buffer-cache limit and empty the cache, now rather than in the next request.

    After the start-up warm-up (an 8k-token prompt, every prompt-batch shape, batches up to the
    slot count) the cache holds far more than the limit: about 70 GB on an H100 for
    Qwen2.5-0.5B. Setting a limit frees nothing on CUDA; the allocator trims in its next
    allocation, and each free of managed memory synchronizes the device. Left to the first
    request, that trim cost the first long prompt 180-200 ms in its first step (issue 14,
    goal 3). Trimming to the limit instead of emptying is worse (stop 21, H100): a cache held at
    its limit frees every buffer it cannot keep with a synchronizing cudaFree, so each step of
    the first long prompt slowed by 5-10 ms and its last by 60 ms. An empty cache costs fresh
    allocations, which do not synchronize, and fills as the first requests run."""
    import mlx.core as mx

    mx.set_cache_limit(cache_limit)
    mx.clear_cache()
