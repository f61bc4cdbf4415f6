"""A model loaded on demand must not stall the streams the event loop serves meanwhile.

The load runs on the engine thread, and whatever it does while holding the GIL stops the loop:
building a fast tokenizer (about 0.1 s for SmolLM2's on this CPU), or a full garbage collection
(~0.12 s for a worker's objects). So a load reads the weights alone and keeps the text side's
tokenizer (a second build fails these tests loudly), and a serving process freezes its
start-up objects, so the collection around a load walks only what came after."""
from __future__ import annotations

import contextlib
import gc
import json

import gevent
import mlx.core as mx
import mlx_lm.utils
import pytest
from mlx.utils import tree_flatten

from config import load_settings
from config.models_file import ModelEntry
from engine.engine import EngineState
from engine.host import EngineHost
from engine.loader import load
from engine.model_source import ModelSource
from tests.engine_harness import run


def _no_second_tokenizer(*args, **kwargs):
    raise AssertionError("a load on demand built the tokenizer again")


@pytest.mark.parametrize("load_format", ["weights", "dummy"])
def test_the_weights_alone_load_with_the_text_sides_tokenizer(tiny_model_dir, monkeypatch, load_format):
    source = ModelSource("tiny", str(tiny_model_dir), True)
    text = load(source, load_format, with_weights=False)
    whole = load(source, load_format)
    monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", _no_second_tokenizer)
    weights = load(source, load_format, tokenizer=text.tokenizer)
    assert weights.tokenizer is text.tokenizer
    assert weights.weight_bytes == whole.weight_bytes > 0 and weights.dtype == whole.dtype
    mine, theirs = dict(tree_flatten(weights.model.parameters())), dict(tree_flatten(whole.model.parameters()))
    assert mine.keys() == theirs.keys()
    assert all(mx.array_equal(mine[k], theirs[k]).item() for k in mine)


@contextlib.contextmanager
def on_demand_engine(model_dir):
    """A started host serving `model_dir` unpinned: its text side open, its weights on disk."""
    from engine.factory import build_host

    settings = load_settings({"MODEL": str(model_dir)}, dotenv=False)
    host = build_host(settings, [ModelEntry(id="tiny", source=str(model_dir))])  # not pinned: on demand
    engine = host.engines[0]
    host.start()
    try:
        with gevent.Timeout(60):
            while engine.state is not EngineState.UNLOADED:
                assert engine.state is not EngineState.FAILED, engine.error
                gevent.sleep(0.02)
        yield engine
    finally:
        host.shutdown()


def test_an_engine_loading_on_demand_keeps_its_tokenizer_and_answers(tiny_model_dir, monkeypatch):
    with on_demand_engine(tiny_model_dir) as engine:
        tokenizer = engine.model.tokenizer
        monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", _no_second_tokenizer)
        tokens, finished = run(engine, tokenizer.encode("Hello world"), max_tokens=3)
        assert finished.finish_reason == "length" and len(tokens) == 3, finished
        assert engine.state is EngineState.READY and engine.model.tokenizer is tokenizer
        assert engine.stats.loads == 1


def test_a_serving_host_freezes_its_start_up_objects(tiny_model_dir, monkeypatch):
    """What a Gunicorn worker or follower rank does (app/worker.py, orchard/group.py)."""
    monkeypatch.setattr(EngineHost, "freeze_start_up", True)
    try:
        with on_demand_engine(tiny_model_dir) as engine:
            tokenizer = engine.model.tokenizer
            with gevent.Timeout(30):  # the host thread freezes the text sides right after opening them
                while any(o is tokenizer for o in gc.get_objects()):
                    gevent.sleep(0.05)
            assert gc.get_freeze_count() > 4 * len(gc.get_objects())  # a collection walks a fraction
            tokens, finished = run(engine, tokenizer.encode("Hello world"), max_tokens=3)  # loads on demand
            assert finished.finish_reason == "length" and engine.state is EngineState.READY
    finally:
        gc.unfreeze()  # this test process runs many hosts; only a serving process keeps them frozen


def test_the_loop_gap_benchmark_reads_every_case(tiny_model_dir, tmp_path):
    from bench import loop_gaps

    out = tmp_path / "gaps.json"
    assert loop_gaps.main(["--model", str(tiny_model_dir), "--rounds", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["readings"]) == {"whole load", "weights alone", "collect, nothing frozen",
                                       "collect, start-up frozen"}
    assert all(len(v) == 1 and min(v[0]) >= 0 for v in result["readings"].values())  # (worst gap, own time) ms
    # frozen start-up objects are out of the collection's walk
    assert result["objects"]["collect, start-up frozen"] * 4 < result["objects"]["collect, nothing frozen"]
    assert gc.get_freeze_count() == 0  # it left this process as it found it
