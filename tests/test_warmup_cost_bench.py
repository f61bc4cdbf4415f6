"""bench.warmup_cost, run for real on the tiny random model: engine and raw decode steps read
before and after a warm-up part in one process, and the ratios computed from those readings."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("engine_1_ms", "engine_8_ms", "raw_1_ms", "raw_8_ms")


@pytest.mark.parametrize("part", ["full", "long"])
def test_warmup_cost_reads_the_steps_before_and_after_the_part(tmp_path, part):
    subprocess.run([sys.executable, "-m", "bench.warmup_cost", "--shape", "tiny", "--part", part, "--reps", "2",
                    "--out", str(tmp_path)], cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    result = json.loads((tmp_path / f"warmup-cost-{part}.json").read_text())
    assert result["part"] == part and result["part_steps"] > 0
    assert [r["when"] for r in result["readings"]] == ["before", "before", "after", "after"]
    for row in result["readings"]:
        assert all(row[k] > 0 for k in KEYS)
    for key in KEYS:
        before = statistics.mean(r[key] for r in result["readings"] if r["when"] == "before")
        after = statistics.mean(r[key] for r in result["readings"] if r["when"] == "after")
        assert result["after_over_before"][key] == round(after / before, 3)
