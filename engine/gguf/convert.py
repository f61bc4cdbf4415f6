"""Convert a GGUF file into an mlx-lm model directory, with a cached front door."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .arch import build_config, check_supported
from .reader import read_header
from .tokenizer import build_tokenizer, eos_token_ids, tokenizer_config
from .weights import DTYPES, convert_weights, load_gguf_tensors, save_weights

# Bump whenever the output of convert_gguf changes, to invalidate caches.
CONVERTER_VERSION = 1

Progress = Callable[[str, float], None]


def _no_progress(stage: str, fraction: float) -> None:
    pass


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert ``gguf_path`` into an mlx-lm loadable directory ``out_dir``.

    ``dtype=None`` keeps Q4_0/Q4_1/Q8_0 tensors quantized (MLX affine, group
    size 32); "float32"/"float16"/"bfloat16" dequantizes every tensor to that
    dtype. Raises UnsupportedGGUF for files this converter cannot translate.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    report = progress or _no_progress
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or None, not {dtype!r}")

    report("reading GGUF header", 0.0)
    header = read_header(gguf_path)
    check_supported(header)
    config = build_config(header)
    # Build the tokenizer before the weights: it fails fast on unsupported
    # vocabularies without paying for the tensor load.
    tokenizer = build_tokenizer(header)

    report("loading tensors", 0.1)
    tensors = load_gguf_tensors(gguf_path)

    report("converting weights", 0.3)
    weights, quantization = convert_weights(header, tensors, config, dtype)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    if dtype is not None:
        config["torch_dtype"] = dtype
    mx.eval(weights)  # the (lazy) dequantization runs here
    del tensors

    report("writing weights", 0.7)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_weights(out_dir, weights)
    del weights

    report("writing config and tokenizer", 0.9)
    _write_json(out_dir / "config.json", config)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(
        out_dir / "tokenizer_config.json",
        tokenizer_config(header, config["max_position_embeddings"]),
    )
    generation = {"eos_token_id": eos_token_ids(header)}
    if "bos_token_id" in config:
        generation["bos_token_id"] = config["bos_token_id"]
    if (pad := header.metadata.get("tokenizer.ggml.padding_token_id")) is not None:
        generation["pad_token_id"] = int(pad)
    _write_json(out_dir / "generation_config.json", generation)
    report("done", 1.0)
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))


def cache_key(gguf_path: Path, dtype: str | None) -> str:
    """Short hash of what determines the conversion output."""
    st = Path(gguf_path).stat()
    raw = json.dumps([st.st_size, st.st_mtime_ns, dtype, CONVERTER_VERSION])
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def import_gguf(
    gguf_path: Path,
    cache_root: Path,
    dtype: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert ``gguf_path`` once into ``cache_root`` and return the model dir.

    The directory name is ``<stem>-<hash>`` where the hash covers the file's
    size and mtime, ``dtype`` and the converter version. The conversion goes
    to a temporary directory that is renamed into place, so a half-written
    conversion is never returned, and concurrent importers agree on one result.
    """
    gguf_path, cache_root = Path(gguf_path), Path(cache_root)
    target = cache_root / f"{gguf_path.stem}-{cache_key(gguf_path, dtype)}"
    if (target / "config.json").is_file():
        if progress:
            progress("using cached conversion", 1.0)
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_root))
    try:
        start = time.monotonic()
        convert_gguf(gguf_path, tmp, dtype=dtype, progress=progress)
        _write_json(
            tmp / "orchard_source.json",
            {
                "gguf": str(gguf_path.resolve()),
                "dtype": dtype,
                "converter_version": CONVERTER_VERSION,
                "seconds": round(time.monotonic() - start, 3),
            },
        )
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty).
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
