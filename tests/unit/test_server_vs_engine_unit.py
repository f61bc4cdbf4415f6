"""bench.server_vs_engine's bookkeeping: readings are never lost or mislabelled when a level or a
setting is read more than once, and fewer than two long prompts is a valid run."""
from __future__ import annotations

import pytest

from bench.server_vs_engine import burn_in, level_key, long_prompt_summary, main, server_tag


def test_a_level_read_again_keeps_both_readings():
    levels: dict = {}
    for level, value in ((64, "first"), (8, "eight"), (64, "second"), (64, "third")):
        levels[level_key(levels, level)] = value
    assert levels == {"64": "first", "8": "eight", "64#2": "second", "64#3": "third"}


@pytest.mark.parametrize("ttfts, ratio", [([2.0, 1.0, 1.25], 2.0), ([1.5, 1.0], 1.5)])
def test_long_prompts_first_over_best_later(ttfts, ratio):
    summary = long_prompt_summary(ttfts, 6000)
    assert summary["first_over_best_later"] == ratio
    assert summary["ttfts_s"] == ttfts and summary["words"] == 6000


@pytest.mark.parametrize("ttfts", [[], [1.234567]])
def test_fewer_than_two_long_prompts_has_no_ratio(ttfts):
    # --long-prompts 0 crashed here (min of an empty list) after the raw rows had been read.
    summary = long_prompt_summary(ttfts, 100)
    assert "first_over_best_later" not in summary
    assert summary["ttfts_s"] == [round(t, 3) for t in ttfts]


def test_a_repeated_setting_gets_a_tag_per_run():
    settings = ["DECODE_BATCH=slots", "A=1+B=2", "DECODE_BATCH=slots"]
    tags = [server_tag(s, i, settings) for i, s in enumerate(settings)]
    assert tags == ["decode_batch-slots-1", "a-1_b-2", "decode_batch-slots-3"]
    assert len(set(tags)) == len(tags)


def test_negative_long_prompts_is_refused_before_any_work(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["server_vs_engine", "--long-prompts", "-1"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "--long-prompts" in capsys.readouterr().err


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, each, want", [(0, 1.0, 0), (3, 1.0, 3), (3, 2.0, 2), (0.5, 5.0, 1)])
def test_burn_in_reads_until_its_time_is_spent(seconds, each, want):
    clock, reads = FakeClock(), []

    def read_once():
        reads.append(clock.now)
        clock.now += each

    assert burn_in(seconds, read_once, clock) == want
    assert len(reads) == want


def test_warm_seconds_runs_discarded_raw_readings_before_the_kept_ones(monkeypatch, tmp_path):
    import json
    import time

    import engine.random_model
    from bench import server_vs_engine

    calls = []

    def fake_raw_rows(shape, shape_dir, levels, gen):
        calls.append(("raw", tuple(levels)))
        time.sleep(0.02)
        return {"tok_s": {level: 1.0 for level in levels}, "step_ms_batch1": 1.0}

    monkeypatch.setattr(engine.random_model, "write_random_model", lambda *a, **k: tmp_path)
    monkeypatch.setattr(server_vs_engine, "raw_rows", fake_raw_rows)
    monkeypatch.setattr(server_vs_engine, "run_server",
                        lambda setting, *a, **k: calls.append(("server", setting)) or {"setting": setting})
    monkeypatch.setattr("sys.argv", ["server_vs_engine", "--warm-seconds", "0.1", "--levels", "8",
                                     "--settings", "A=1", "--out", str(tmp_path)])
    assert main() == 0
    doc = json.loads((tmp_path / "server_vs_engine.json").read_text())
    burned = doc["burn_in"]["readings"]
    assert burned >= 2 and doc["burn_in"]["seconds"] == 0.1
    # The discarded readings all come first; then the kept raw row, the server, the raw row after.
    assert calls == [("raw", (8,))] * burned + [("raw", (8,)), ("server", "A=1"), ("raw", (8,))]
