"""bench.step_costs, run for real on the tiny random model: every part is timed at every batch."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_costs_times_every_part_at_every_batch(tiny_model_dir):
    out = subprocess.run([sys.executable, "-m", "bench.step_costs", "--model", str(tiny_model_dir),
                          "--batches", "1,3", "--context", "8"],
                         cwd=ROOT, check=True, timeout=300, capture_output=True, text=True).stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| ") and "---" not in line}
    assert float(rows["whole step"][0]) > 0
    for part in ("whole step", "attention (all layers)", "MLP (all layers)", "LM head", "log-softmax over vocab"):
        batch1, batch3, growth = rows[part]
        assert float(batch1) >= 0 and float(batch3) > 0 and (growth.endswith("x") or growth == "-")
    tokens_per_s = [float(v) for v in rows["tokens/s (batch / step)"][:2]]
    assert all(v > 0 for v in tokens_per_s)
    add, exp = map(float, re.search(r"add ([\d.]+) ns/element, exp ([\d.]+) ns/element", out).groups())
    assert add > 0 and exp > 0
