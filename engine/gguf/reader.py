"""Pure-Python reader for the GGUF header (metadata and tensor table).

We parse the header ourselves, instead of relying on ``mx.load`` alone, so
that we can reject unsupported files (architecture, tensor types) *before*
loading gigabytes of weights, and so that metadata comes back as plain
Python values rather than ``mx.array`` scalars.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .errors import UnsupportedGGUF

GGUF_MAGIC = b"GGUF"

# GGUF metadata value types -> struct format (scalars only).
_SCALAR_FORMATS = {
    0: "<B",  # uint8
    1: "<b",  # int8
    2: "<H",  # uint16
    3: "<h",  # int16
    4: "<I",  # uint32
    5: "<i",  # int32
    6: "<f",  # float32
    7: "<?",  # bool
    10: "<Q",  # uint64
    11: "<q",  # int64
    12: "<d",  # float64
}
_STRING, _ARRAY = 8, 9

# ggml tensor types, by id (names as llama.cpp prints them).
GGML_TYPE_NAMES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1",
    8: "Q8_0", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K",
    14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS",
    19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS",
    24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    30: "BF16", 34: "TQ1_0", 35: "TQ2_0",
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table (shape in MLX/numpy order)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def type_name(self) -> str:
        return GGML_TYPE_NAMES.get(self.ggml_type, f"type#{self.ggml_type}")


@dataclass
class GGUFHeader:
    """Parsed GGUF header: format version, metadata and tensor table."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")


class _Stream:
    """Little-endian primitive reads over a binary file."""

    def __init__(self, f: BinaryIO):
        self._f = f

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self._f.read(size)
        if len(data) != size:
            raise UnsupportedGGUF("truncated GGUF header")
        return struct.unpack(fmt, data)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        data = self._f.read(n)
        if len(data) != n:
            raise UnsupportedGGUF("truncated GGUF header")
        # Some vocabularies hold invalid UTF-8 fragments; keep them readable.
        return data.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR_FORMATS:
                # Bulk-read numeric arrays (token_type can be ~150k entries).
                fmt = _SCALAR_FORMATS[etype]
                size = struct.calcsize(fmt)
                data = self._f.read(size * count)
                return list(struct.unpack(f"<{count}{fmt[1]}", data))
            return [self.value(etype) for _ in range(count)]
        raise UnsupportedGGUF(f"GGUF metadata value type {vtype}")


def read_header(path: Path | str) -> GGUFHeader:
    """Read the metadata and tensor table of a GGUF file (no tensor data)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise UnsupportedGGUF(f"{path} is not a GGUF file (bad magic)")
        s = _Stream(f)
        version = s.unpack("<I")
        if version not in (2, 3):
            raise UnsupportedGGUF(f"GGUF format version {version} (need 2 or 3)")
        n_tensors, n_kv = s.unpack("<Q"), s.unpack("<Q")
        header = GGUFHeader(version=version)
        for _ in range(n_kv):
            key = s.string()
            header.metadata[key] = s.value(s.unpack("<I"))
        for _ in range(n_tensors):
            name = s.string()
            n_dims = s.unpack("<I")
            dims = [s.unpack("<Q") for _ in range(n_dims)]
            ggml_type = s.unpack("<I")
            s.unpack("<Q")  # data offset: mx.load reads the data for us
            # GGML lists the fastest-varying dimension first; MLX is row-major.
            header.tensors[name] = TensorInfo(name, tuple(reversed(dims)), ggml_type)
    return header
