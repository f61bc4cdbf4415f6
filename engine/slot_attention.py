"""A decode step's attention over a slot group's batch cache, without a mask (CUDA).

Why: rows of a batch cache have different lengths, so each is left-padded to the cache's
width and mlx-lm hands attention a padding mask. MLX's CUDA backend runs single-query
attention in its fused vector kernel (or cuDNN) only without an array mask
(`supports_sdpa_vector` in mlx/backend/cuda/scaled_dot_product_attention.cu), so every
layer of every batched decode step fell back to the unfused path: a scores matmul, the mask,
a softmax and a values matmul, with a (rows, heads, width) scores array in between. That is
most of the gap between a batched step and a lean single-length one (issue 14).

The kernel here takes each row's left padding instead of a mask: one block per (row, head),
its warps walk that row's own columns with an online softmax in float32 and merge at the end.
It reads the cache where it lies (a view of the slot group's buffer, no copy).

How it is reached: a decode group's caches are `SlotKVCache`s; for one query token their
`make_mask` returns no mask when the group decodes fused, and `install` routes the model's
attention call (mlx-lm's `scaled_dot_product_attention`, which is handed the cache) here for
exactly those caches. Every other cache (prefill, one-at-a-time, other engines) takes mlx-lm's
path unchanged. Models whose attention calls MLX directly are left alone (`install` says no).
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable, Optional

import mlx.core as mx
from mlx_lm.models import base
from mlx_lm.models.cache import BatchKVCache

_BLOCK = 256  # threads per (row, head): 8 warps share the row's columns
_DTYPES = (mx.bfloat16, mx.float16, mx.float32)

_SOURCE = r"""
    constexpr int WARPS = BLOCK / 32;
    constexpr int PER = D / 32;           // elements of a head each lane holds
    constexpr float NONE = -3.0e38f;      // "no column seen yet" (finite: no inf arithmetic)
    const int head = blockIdx.x;
    const int row = blockIdx.y;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int width = keys_shape[2];
    const int first = padding[row];       // the row's columns are [first, width)
    const int kv_head = head / (queries_shape[1] / keys_shape[1]);
    const T* q = queries + row * queries_strides[0] + head * queries_strides[1];
    const T* k = keys + row * keys_strides[0] + kv_head * keys_strides[1];
    const T* v = values + row * values_strides[0] + kv_head * values_strides[1];
    const float qscale = scale[0] * 1.4426950408889634f;  // scores in log2 units: exp2
    float qs[PER], acc[PER];
    for (int i = 0; i < PER; ++i) {
        qs[i] = static_cast<float>(q[(lane * PER + i) * queries_strides[3]]) * qscale;
        acc[i] = 0.f;
    }
    float m = NONE, l = 0.f;
    for (int j = first + warp; j < width; j += WARPS) {
        const T* kj = k + j * keys_strides[2];
        float s = 0.f;
        for (int i = 0; i < PER; ++i) s += qs[i] * static_cast<float>(kj[(lane * PER + i) * keys_strides[3]]);
        for (int o = 16; o > 0; o /= 2) s += __shfl_xor_sync(0xffffffff, s, o);
        const float top = fmaxf(m, s);
        const float rescale = exp2f(m - top);
        const float p = exp2f(s - top);
        l = l * rescale + p;
        const T* vj = v + j * values_strides[2];
        for (int i = 0; i < PER; ++i) acc[i] = acc[i] * rescale + p * static_cast<float>(vj[(lane * PER + i) * values_strides[3]]);
        m = top;
    }
    __shared__ float maxes[WARPS];
    __shared__ float sums[WARPS];
    __shared__ float parts[WARPS][D];
    if (lane == 0) { maxes[warp] = m; sums[warp] = l; }
    for (int i = 0; i < PER; ++i) parts[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (warp == 0) {
        float top = NONE;
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, maxes[w]);
        float weight[WARPS];
        float total = 0.f;
        for (int w = 0; w < WARPS; ++w) {
            weight[w] = maxes[w] == NONE ? 0.f : exp2f(maxes[w] - top);
            total += sums[w] * weight[w];
        }
        T* o = out + (row * gridDim.x + head) * D;
        for (int i = 0; i < PER; ++i) {
            float x = 0.f;
            for (int w = 0; w < WARPS; ++w) x += parts[w][lane * PER + i] * weight[w];
            o[lane * PER + i] = static_cast<T>(total > 0.f ? x / total : 0.f);
        }
    }
"""

_kernel = None
_scales: dict[float, mx.array] = {}


def available() -> bool:
    """Custom CUDA kernels, on the device MLX computes on."""
    try:
        return mx.cuda.is_available() and mx.default_device().type == mx.gpu
    except AttributeError:  # an MLX without the CUDA module
        return False


def fits(queries: mx.array, keys: mx.array, values: mx.array) -> bool:
    """One query token, a head size the lanes split evenly, one dtype throughout."""
    d = queries.shape[-1]
    return (queries.shape[2] == 1 and d % 32 == 0 and d <= 256 and values.shape[-1] == d
            and queries.dtype in _DTYPES and keys.dtype == queries.dtype == values.dtype)


def decode_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     padding: mx.array) -> mx.array:
    """softmax(q k^T * scale) v per row over columns padding[row]: of keys/values (B, H_kv, W, D);
    queries (B, H, 1, D). The CUDA kernel."""
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(name="orchard_slot_decode_attention",
                                      input_names=["queries", "keys", "values", "padding", "scale"],
                                      output_names=["out"], source=_SOURCE, ensure_row_contiguous=False)
    b, h, _, d = queries.shape
    if scale not in _scales:
        _scales[scale] = mx.array([scale], dtype=mx.float32)
    if padding.dtype != mx.int32:
        padding = padding.astype(mx.int32)
    return _kernel(inputs=[queries, keys, values, padding, _scales[scale]],
                   template=[("T", queries.dtype), ("D", d), ("BLOCK", _BLOCK)],
                   grid=(h * _BLOCK, b, 1), threadgroup=(_BLOCK, 1, 1),
                   output_shapes=[(b, h, 1, d)], output_dtypes=[queries.dtype])[0]


def masked_attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
                     padding: mx.array, sinks: Optional[mx.array] = None) -> mx.array:
    """The same result through MLX's own attention and a padding mask: the kernel's reference,
    and the route's answer for what the kernel does not take."""
    columns = mx.arange(keys.shape[2])
    mask = (padding[:, None] <= columns[None])[:, None, None, :]
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask, sinks=sinks)


class SlotKVCache(BatchKVCache):
    """A decode group's per-layer cache. With `fused` set, a one-token step builds no mask:
    attention reads each row's left padding instead (`decode_attention`)."""

    fused = False

    def make_mask(self, N: int, return_array: bool = False, **kwargs):
        if N == 1 and self.fused and not return_array:
            return None
        return super().make_mask(N, return_array=return_array, **kwargs)


def install(model, attention: Optional[Callable] = None) -> bool:
    """Route the model's decode attention over `SlotKVCache`s to `attention` (the CUDA kernel
    by default). False, and nothing changed, where it cannot be done: no CUDA kernel (and none
    given), a head size the kernel does not take, or a model whose attention does not go
    through mlx-lm's shared function."""
    attention = attention or (decode_attention if available() else None)
    if attention is None or not _head_size_fits(model):
        return False
    modules = {sys.modules.get(type(m).__module__) for _, m in model.named_modules()}
    routed = [m for m in modules if m is not None and _calls_shared_attention(m)]
    if not routed:
        return False
    for module in routed:
        original = getattr(module, "scaled_dot_product_attention")
        original = getattr(original, "_orchard_original", original)
        module.scaled_dot_product_attention = _route(original, attention)
    return True


def _head_size_fits(model) -> bool:
    """The kernel's lanes split a head evenly (`fits`). Decided once here: a model that never
    fits would otherwise build a mask per layer in the route's fallback, where mlx-lm builds one
    per step."""
    args = getattr(model, "args", None)
    heads = getattr(args, "num_attention_heads", None)
    size = getattr(args, "head_dim", None) or (args.hidden_size // heads if heads else None)
    return size is None or (size % 32 == 0 and size <= 256)


def _calls_shared_attention(module) -> bool:
    """The module's attention goes through mlx-lm's `scaled_dot_product_attention` (which is
    handed the cache), and nowhere calls MLX's attention directly (that call would get no mask)."""
    function = getattr(module, "scaled_dot_product_attention", None)
    if getattr(function, "_orchard_original", function) is not base.scaled_dot_product_attention:
        return False
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return False
    return "fast.scaled_dot_product_attention" not in source


def _route(original: Callable, attention: Callable) -> Callable:
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if type(cache) is SlotKVCache and cache.fused and mask is None and queries.shape[2] == 1:
            # No mask was built for this step: the padding must be applied here, one way or the other.
            if sinks is None and fits(queries, keys, values):
                return attention(queries, keys, values, scale, cache.left_padding)
            return masked_attention(queries, keys, values, scale, cache.left_padding, sinks)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention._orchard_original = original
    return scaled_dot_product_attention
