"""GGUF import: convert llama.cpp GGUF files into mlx-lm model directories.

Public API:
    convert_gguf(gguf_path, out_dir, *, dtype=None, progress=None) -> Path
    import_gguf(gguf_path, cache_root, dtype=None, progress=None) -> Path
    UnsupportedGGUF (ValueError)
"""

from .convert import CONVERTER_VERSION, convert_gguf, import_gguf
from .errors import UnsupportedGGUF
from .reader import GGUFHeader, read_header

__all__ = [
    "CONVERTER_VERSION",
    "GGUFHeader",
    "UnsupportedGGUF",
    "convert_gguf",
    "import_gguf",
    "read_header",
]
