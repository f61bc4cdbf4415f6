"""A load on demand reads the weights alone: the tokenizer the text side built is kept.

Building a fast tokenizer holds the GIL for its whole length (about 0.1 s for SmolLM2's on
this CPU), and a load on demand runs on the engine thread while the event loop serves, so a
second build would stall every open stream. These tests make any second build fail loudly."""
from __future__ import annotations

import gevent
import mlx.core as mx
import mlx_lm.utils
import pytest
from mlx.utils import tree_flatten

from config import load_settings
from config.models_file import ModelEntry
from engine.engine import EngineState
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


def test_an_engine_loading_on_demand_keeps_its_tokenizer_and_answers(tiny_model_dir, monkeypatch):
    from engine.factory import build_host

    settings = load_settings({"MODEL": str(tiny_model_dir)}, dotenv=False)
    host = build_host(settings, [ModelEntry(id="tiny", source=str(tiny_model_dir))])  # not pinned: on demand
    engine = host.engines[0]
    host.start()
    try:
        with gevent.Timeout(60):
            while engine.state is not EngineState.UNLOADED:
                assert engine.state is not EngineState.FAILED, engine.error
                gevent.sleep(0.02)
        tokenizer = engine.model.tokenizer
        monkeypatch.setattr(mlx_lm.utils, "load_tokenizer", _no_second_tokenizer)
        tokens, finished = run(engine, tokenizer.encode("Hello world"), max_tokens=3)
        assert finished.finish_reason == "length" and len(tokens) == 3, finished
        assert engine.state is EngineState.READY and engine.model.tokenizer is tokenizer
        assert engine.stats.loads == 1
    finally:
        host.shutdown()
