"""The exp-heavy parts of a forward pass, rewritten for MLX's x86 CPU backend (`CPU_MATH`).

Why: MLX's x86 CPU build runs `exp` (and `sigmoid`, `tanh`) one element at a time, 9-14 ns an
element on this 2-core machine against 0.22 ns for an add, while its `power` is vectorized
(3 ns). A decode step calls exp for every row in two places: SwiGLU's sigmoid (rows x the
MLP's width x layers) and attention's softmax (rows x heads x context x layers). Both grow
with the batch, so at 20 rows they were 10-18 % of a step of the embedded model (bench
`bench.step_costs`; docs/benchmarks.md, stop 19). Here both go through 2**(x * log2 e), which
equals exp(x) to float32 rounding (a test checks), at a third of the cost.

How it is reached: model modules that take mlx-lm's shared `swiglu` and
`scaled_dot_product_attention` (llama, qwen2, and most others) get these in their place.
Attention keeps mlx-lm's semantics for every mask form (none, "causal", boolean, additive);
quantized caches and attention sinks go to the original unchanged. Elsewhere (a GPU, Metal,
an ARM CPU whose build has vector exp) nothing is installed.
"""
from __future__ import annotations

import math
import platform
import sys
from functools import partial
from typing import Callable

import mlx.core as mx
from mlx_lm.models import activations, base

_LOG2E = math.log2(math.e)
_X86 = ("x86_64", "amd64", "i386", "i686")


def wanted(setting: str = "auto") -> bool:
    """`auto` on an x86 CPU device; never elsewhere, and never with `mlx`."""
    return (setting == "auto" and mx.default_device().type == mx.cpu
            and platform.machine().lower() in _X86)


def exp(x: mx.array) -> mx.array:
    """exp(x) through MLX's vectorized power."""
    return mx.power(2.0, x * _LOG2E)


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """silu(gate) * x, as mlx-lm's, with silu(g) = g / (1 + e^-g)."""
    return gate / (1 + mx.power(2.0, gate * -_LOG2E)) * x


def softmax(scores: mx.array) -> mx.array:
    """Softmax over the last axis, in float32 (as MLX's precise softmax)."""
    scores = scores.astype(mx.float32)
    e = exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask) -> mx.array:
    """softmax(q k^T * scale + mask) v with grouped KV heads: queries (B, H, L, D), keys and
    values (B, H_kv, K, D). What MLX's CPU attention computes (it has no fused kernel there),
    with the softmax's exp vectorized."""
    b, h, length, d = queries.shape
    kv_heads, columns = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(b, kv_heads, h // kv_heads, length, d)
    scores = q @ keys[:, :, None].swapaxes(-1, -2)  # (B, H_kv, group, L, K)
    if isinstance(mask, str):  # "causal": the queries are the last `length` positions
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        mask = mx.arange(columns - length, columns)[:, None] >= mx.arange(columns)[None]
    if mask is not None:
        if mask.ndim == 4:  # (B or 1, H or 1, L, K): line it up with the grouped heads
            mask = _grouped(mask, kv_heads)
        elif mask.ndim == 3:  # (B, L, K)
            mask = mask[:, None, None]
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = softmax(scores).astype(values.dtype)
    return (weights @ values[:, :, None]).reshape(b, h, length, values.shape[-1])


def _grouped(mask: mx.array, kv_heads: int) -> mx.array:
    b, h, length, columns = mask.shape
    if h == 1:
        return mask[:, :, None]  # (B, 1, 1, L, K)
    return mask.reshape(b, kv_heads, h // kv_heads, length, columns)


def install(model) -> bool:
    """Give the model's modules the functions above; True if any module took them. Idempotent;
    the caller decides where (`wanted`)."""
    modules = {sys.modules.get(type(m).__module__) for _, m in model.named_modules()} - {None}
    changed = False
    for module in modules:
        if getattr(module, "swiglu", None) is activations.swiglu:
            module.swiglu = swiglu
            changed = True
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is not None and _original(current) is base.scaled_dot_product_attention:
            if not getattr(current, "_orchard_cpu_math", False):
                module.scaled_dot_product_attention = _route(current)
            changed = True
    return changed


def _original(function: Callable) -> Callable:
    return getattr(function, "_orchard_original", function)


def _route(original: Callable) -> Callable:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if sinks is not None or hasattr(cache, "bits"):  # attention sinks, a quantized cache
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)
        return attention(queries, keys, values, scale, mask)

    scaled_dot_product_attention._orchard_original = _original(original)
    scaled_dot_product_attention._orchard_cpu_math = True
    return scaled_dot_product_attention
