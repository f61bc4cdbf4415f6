"""bench.closed_loop, run for real on the tiny random model: raw mlx-lm and the engine in the same
closed loop, every round measured, the engine's steps split by kind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_closed_loop_compares_the_engine_with_raw_mlx_lm(tmp_path):
    subprocess.run([sys.executable, "-m", "bench.closed_loop", "--shape", "tiny", "--dtype", "float32",
                    "--streams", "3", "--waves", "2", "--gen", "6", "--prompt-tokens", "12", "--rounds", "2",
                    "--warm-seconds", "0", "--profile", "--out", str(tmp_path)],
                   cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    result = json.loads((tmp_path / "closed-loop-3.json").read_text())
    assert len(result["rounds"]) == 2
    for row in result["rounds"]:
        engine = row["engine_loop"]
        assert row["raw_wave_tok_s"] > 0 and row["raw_loop_tok_s"] > 0 and engine["tok_s"] > 0
        # every request of the loop decoded all its tokens: 3 streams x 2 waves x 6 tokens
        assert engine["tokens"] == 36
        assert engine["prefill_steps"]["n"] >= 1 and engine["decode_steps"]["n"] >= 5
        assert row["engine_over_raw_loop"] == round(engine["tok_s"] / row["raw_loop_tok_s"], 3)
    assert "engine/batcher.py" in (tmp_path / "closed-loop-3-profile.txt").read_text()
