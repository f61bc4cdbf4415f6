"""scripts/install-openblas.sh (run by `make setup`/`make run`): what it does on each kind of
machine, with stub commands on PATH; it never fails."""
from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-openblas.sh"
STUBS = {
    "uname": 'echo "${STUB_OS:-Linux}"',
    "id": 'echo "${STUB_UID:-0}"',
    "python": 'exit "${STUB_PRESENT:-1}"',  # `python -m engine.blas`: 0 when OpenBLAS is installed
    "sudo": '[ "$1 $2" = "-n true" ] && exit "${STUB_SUDO:-1}"; echo "sudo $*" >> "$STUB_LOG"; shift; exec "$@"',
    "apt-get": ('echo "apt-get $*" >> "$STUB_LOG"\n'
                '[ -n "$STUB_APT_BROKEN" ] && exit 100\n'
                '[ "$1" = update ] && { touch "$STUB_LOG.updated"; exit 0; }\n'
                '[ -z "$STUB_NEEDS_UPDATE" ] || [ -e "$STUB_LOG.updated" ]'),
}
INSTALL = "apt-get install -y -qq --no-install-recommends libopenblas0-pthread"


def run(tmp_path: Path, without: tuple = (), **env) -> tuple[str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        if name not in without:
            path = bin_dir / name
            path.write_text("#!/bin/sh\n" + body + "\n")
            path.chmod(path.stat().st_mode | stat.S_IXUSR)
    log = tmp_path / "calls.log"
    log.touch()
    result = subprocess.run(["/bin/sh", str(SCRIPT), str(bin_dir / "python")], capture_output=True, text=True,
                            env={"PATH": str(bin_dir), "STUB_LOG": str(log), **env}, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout, log.read_text().splitlines()


@pytest.mark.parametrize("env, without, says, calls", [
    ({"STUB_PRESENT": "0"}, (), "", []),  # already installed: silent, nothing run
    ({"STUB_OS": "Darwin"}, (), "", []),  # macOS: MLX uses Metal/Accelerate
    ({"ORCHARD_BLAS": "bundled"}, (), "", []),
    ({}, (), "installing libopenblas0-pthread", [INSTALL]),  # root in a container, CI
    ({"STUB_NEEDS_UPDATE": "1"}, (), "installing", [INSTALL, "apt-get update -qq", INSTALL]),  # fresh image
    ({"STUB_APT_BROKEN": "1"}, (), "could not install libopenblas0-pthread",
     [INSTALL, "apt-get update -qq"]),  # offline: one line, no failure
    ({"STUB_UID": "1000", "STUB_SUDO": "0"}, (), "installing", [f"sudo -n {INSTALL}", INSTALL]),
    ({"STUB_UID": "1000"}, (), "run: sudo apt-get install libopenblas0-pthread", []),  # sudo asks a password
    ({"STUB_UID": "1000"}, ("sudo",), "run: sudo apt-get install libopenblas0-pthread", []),
    ({}, ("apt-get",), "install your distribution's OpenBLAS", []),  # not Debian
])
def test_install_openblas(tmp_path, env, without, says, calls):
    out, logged = run(tmp_path, without, **env)
    assert (says in out) if says else out == ""
    assert len(out.splitlines()) <= 2
    assert logged == calls
