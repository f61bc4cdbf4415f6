"""bench/compiled_step.py on the tiny random model: the compiled decode step (fixed-capacity KV
written at a position given as an array, one mx.compile'd function) computes the lean step's
logits, a wrong write position does not, and the run reports both timings."""
import json
from pathlib import Path

from bench import compiled_step


def test_the_compiled_step_computes_the_lean_steps_logits(tmp_path):
    out = tmp_path / "compiled.json"
    code = compiled_step.main(["--shape", "tiny", "--batches", "1,3", "--steps", "6", "--dtype", "float32",
                               "--out", str(out)])
    doc = json.loads(out.read_text())
    assert code == 0, doc
    assert [r["batch"] for r in doc["rows"]] == [1, 3]
    for row in doc["rows"]:
        assert row["max_logit_gap"] <= 1e-3
        assert len(row["lean_ms"]) == len(row["compiled_ms"]) == 2 and min(row["compiled_ms"]) > 0


def test_a_wrong_position_shows_in_the_check():
    """The check is not vacuous: the compiled step written one column off computes other logits."""
    from engine.loader import _load_dummy
    from engine.random_model import write_random_model

    model, _, config = _load_dummy(write_random_model(Path("/tmp/orchard-tiny"), "tiny", weights=False, dtype="float32"))
    vocab = config["vocab_size"]
    assert compiled_step.logit_gap(model, vocab, 3, 0) <= 1e-3
    assert compiled_step.logit_gap(model, vocab, 3, 0, shift=1) > 1e-3
