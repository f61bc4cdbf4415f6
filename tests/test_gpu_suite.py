"""The GPU benchmark script, run end to end on the CPU with the tiny shape, so a lent GPU's
minutes are never spent discovering that the script itself is broken."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_runs_and_splits_engine_time_by_level(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--shapes", "tiny", "--levels", "1,2",
                    "--max-tokens", "4", "--requests", "2", "--max-running", "4", "--prefill-batch", "2",
                    "--dtype", "float32", "--out", str(out)],
                   cwd=ROOT, check=True, timeout=300, capture_output=True)
    summary = json.loads((out / "gpu_suite.json").read_text())["tiny"]
    by_level = summary["engine_time_by_level"][0]
    assert set(by_level) == {"1", "2"}
    for level in by_level.values():
        assert level["generated_tokens"] >= 2 * 4 and level["steps"] >= 4
        assert level["step_seconds"] > 0 and level["prompt_tokens"] > 0
    assert (out / "orchard-tiny-c2.json").exists() and summary["status"]["engine"]["state"] == "ready"
