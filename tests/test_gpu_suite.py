"""The GPU benchmark script, run end to end on the CPU with the tiny shape, so a lent GPU's
minutes are never spent discovering that the script itself is broken."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.timeline import occupancy, summarize

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
        assert 0 < level["server_request_queue_time_mean_s"] <= level["server_time_to_first_token_mean_s"]
    assert (out / "orchard-tiny-c2.json").exists() and summary["status"]["engine"]["state"] == "ready"

    # The occupancy timeline reads the same real bench output.
    level = json.loads((out / "orchard-tiny-c2.json").read_text())["levels"][0]
    occupancy = summarize(level, bucket_s=0.001)
    # A request whose tokens decode to no text (the tiny model's random output may be special
    # tokens) has no TTFT: it counts as in flight, never as decoding.
    done = [r for r in level["requests"] if r["ok"]]
    wall = level["summary"]["wall_s"]
    assert len(done) == 2 and wall > 0
    assert occupancy["mean_in_flight"] == round(sum(r["e2e"] for r in done) / wall, 2)
    assert occupancy["mean_decoding"] == round(sum(r["e2e"] - r["ttft"] for r in done if r["ttft"] is not None) / wall, 2)
    assert 0 < occupancy["mean_in_flight"] <= 2 and occupancy["mean_decoding"] <= occupancy["mean_in_flight"]
    rows = occupancy["timeline"]
    assert max(in_flight for _, in_flight, _ in rows) >= 1 and all(d <= f for _, f, d in rows)


def test_timeline_counts_requests_waiting_for_their_first_token():
    records = [{"ok": True, "start": 0.0, "ttft": 0.5, "e2e": 2.0},   # waits 0.5 s, decodes to 2.0
               {"ok": True, "start": 1.0, "ttft": 0.1, "e2e": 0.5},   # decodes 1.1 .. 1.5
               {"ok": True, "start": 0.02, "ttft": 0.02, "e2e": 0.06},  # between two rows: only in the means
               {"ok": False, "start": 0.0, "ttft": None, "e2e": None}]
    rows = dict((t, (f, d)) for t, f, d in occupancy([r for r in records], wall_s=2.0, bucket_s=0.25))
    assert rows[0.25] == (1, 0)      # in flight, no token yet
    assert rows[1.25] == (2, 2)
    assert rows[1.75] == (1, 1)
    # The means are exact time integrals over the wall time, not averages of the sampled rows.
    means = summarize({"summary": {"concurrency": 2, "wall_s": 2.0}, "requests": records})
    assert (means["mean_in_flight"], means["mean_decoding"]) == (1.28, 0.97)
