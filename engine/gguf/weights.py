"""GGUF tensors -> mlx-lm weights (names, RoPE layout, dtype, quantization)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlx.core as mx

from .arch import QUANT_BITS, QUANT_GROUP_SIZE, hf_name
from .errors import UnsupportedGGUF
from .reader import GGUFHeader

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def load_gguf_tensors(path: Path) -> dict[str, mx.array]:
    """Load all tensors of a GGUF file with MLX.

    MLX's bundled gguflib maps the file read/write, so it cannot open a file
    the process may not write to; such files are read from a private copy.
    """
    try:
        if os.access(path, os.W_OK):
            return mx.load(str(path))
        with tempfile.TemporaryDirectory(prefix="orchard-gguf-") as tmp:
            copy = Path(tmp) / path.name
            shutil.copyfile(path, copy)
            weights = mx.load(str(copy))
            mx.eval(weights)  # materialize before the copy disappears
            return weights
    except (RuntimeError, ValueError) as e:
        raise UnsupportedGGUF(f"MLX could not read the tensors of {path}: {e}") from e


def _unpermute_rope_rows(x: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE).

    Rows are output features; quantization groups run along the input
    dimension, so the same row shuffle applies to packed weights, scales,
    biases and the Linear bias alike.
    """
    rows = x.shape[0]
    rest = x.shape[1:]
    x = x.reshape(n_heads, rows // n_heads // 2, 2, *rest)
    return x.swapaxes(1, 2).reshape(rows, *rest)


def _dequantize(weights: dict[str, mx.array], base: str, bits: int, dtype: mx.Dtype) -> mx.array:
    # mx.dequantize computes in the dtype of scales/biases; doing it in
    # float32 avoids rounding every weight through the file's float16.
    w = mx.dequantize(
        weights[f"{base}.weight"],
        weights[f"{base}.scales"].astype(mx.float32),
        weights[f"{base}.biases"].astype(mx.float32),
        group_size=QUANT_GROUP_SIZE,
        bits=bits,
    )
    return w.astype(dtype)


def convert_weights(
    header: GGUFHeader,
    tensors: dict[str, mx.array],
    config: dict[str, Any],
    dtype: str | None,
) -> tuple[dict[str, mx.array], dict[str, Any] | None]:
    """Rename and transform GGUF tensors into mlx-lm weights.

    Returns ``(weights, quantization)``; ``quantization`` is the config.json
    entry (default plus per-layer overrides) or None when nothing stays
    quantized.
    """
    target = DTYPES[dtype] if dtype is not None else None
    # Keyed by module path ("model.layers.0.self_attn.q_proj") -> bits.
    quantized: dict[str, int] = {}
    out: dict[str, mx.array] = {}

    for gguf_name, info in header.tensors.items():
        base = gguf_name.rsplit(".", 1)[0]
        module = hf_name(gguf_name).rsplit(".", 1)[0]
        bits = QUANT_BITS.get(info.type_name)
        if bits is not None and target is not None:
            out[f"{module}.weight"] = _dequantize(tensors, base, bits, target)
            continue
        if bits is not None:
            quantized[module] = bits
            for suffix in ("weight", "scales", "biases"):
                out[f"{module}.{suffix}"] = tensors[f"{base}.{suffix}"]
            continue
        value = tensors[gguf_name]
        if target is not None:
            value = value.astype(target)
        elif info.type_name not in ("F32", "F16") and value.ndim > 1:
            # K-quants come back from MLX as float32; half the size is plenty.
            value = value.astype(mx.float16)
        out[hf_name(gguf_name)] = value

    if config["model_type"] == "llama":
        _unpermute_llama_qk(out, config)
    return out, _quantization_entry(quantized)


def _unpermute_llama_qk(weights: dict[str, mx.array], config: dict[str, Any]) -> None:
    heads = {
        "q_proj": config["num_attention_heads"],
        "k_proj": config["num_key_value_heads"],
    }
    for name in list(weights):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in heads:
            weights[name] = _unpermute_rope_rows(weights[name], heads[parts[-2]])


def _quantization_entry(quantized: dict[str, int]) -> dict[str, Any] | None:
    """config.json "quantization": most common bits as default, plus
    explicit per-module entries for the rest (mlx-lm's mixed-quant format)."""
    if not quantized:
        return None
    values = list(quantized.values())
    default = max(set(values), key=values.count)
    entry: dict[str, Any] = {"group_size": QUANT_GROUP_SIZE, "bits": default}
    for module, bits in sorted(quantized.items()):
        if bits != default:
            entry[module] = {"group_size": QUANT_GROUP_SIZE, "bits": bits}
    return entry


def save_weights(out_dir: Path, weights: dict[str, mx.array], max_shard_bytes: int = 4 << 30) -> None:
    """Write weights as model.safetensors, or shards plus an index."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for name in sorted(weights):
        value = weights[name]
        if shards[-1] and size + value.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = value
        size += value.nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out_dir / "model.safetensors"), shards[0], metadata={"format": "mlx"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        mx.save_safetensors(str(out_dir / fname), shard, metadata={"format": "mlx"})
        weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
