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
    cache_limit = min(limit // 4, 2 << 30)
    mx.set_cache_limit(cache_limit)
    trim_cache(cache_limit)
    log.info("memory budget %.1f MiB (weights %.1f MiB + KV); MLX memory limit %.1f MiB",
             (weight_bytes + kv_budget) / 2**20, weight_bytes / 2**20, limit / 2**20)
    return limit


def trim_cache(cache_limit: int) -> None:
    """Bring MLX's buffer cache under a limit just lowered, now rather than in the next request.

    Setting the limit frees nothing: the allocator trims its cache in its next allocation.
    After the start-up warm-up (an 8k-token prompt, batches up to the slot count) the cache
    holds more than the limit, so the first request's first allocation freed the surplus.
    On CUDA each free of managed memory synchronizes the device: that cost the first long
    prompt 180-200 ms in its first step, against 14-24 ms for every later prompt's (H100,
    issue 14 goal 3). One allocation here runs that trim; whatever is still over (an
    allocator that trims elsewhere) is emptied."""
    import mlx.core as mx

    if mx.get_cache_memory() <= cache_limit:
        return
    mx.eval(mx.zeros((1 << 20,), dtype=mx.uint8))  # 1 MiB: past the small-block pool
    if mx.get_cache_memory() > cache_limit:
        mx.clear_cache()
