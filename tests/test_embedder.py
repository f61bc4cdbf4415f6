"""The embedder on real MLX models: batched vectors equal one-at-a-time vectors and a direct
forward pass pooled by hand in numpy, for every pooling, with and without normalization.
These tests call the model on their own thread: no engine runs here."""
from __future__ import annotations

import itertools

import mlx.core as mx
import numpy as np
import pytest

from engine.embedder import Embedder

TOLERANCE = 1e-5
LENGTHS = [5, 1, 23, 7, 60, 2, 31, 7]  # unsorted, with a tie, so order and padding both matter
CASES = list(itertools.product(["last", "mean", "cls"], [True, False]))


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from mlx_lm.utils import load

    return load(str(tiny_model_dir))[0]


def _inputs(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def _direct(model, ids: list[int], pooling: str, normalize: bool) -> np.ndarray:
    """The base model on one unpadded input, pooled in numpy."""
    hidden = np.array(model.model(mx.array(ids)[None])[0].astype(mx.float32))
    vector = {"last": hidden[-1], "cls": hidden[0], "mean": hidden.mean(axis=0)}[pooling]
    return vector / np.linalg.norm(vector) if normalize else vector


def _assert_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == np.float32 and a.shape == e.shape
        assert np.max(np.abs(a - e)) < TOLERANCE, np.max(np.abs(a - e))


@pytest.mark.parametrize("pooling, normalize", CASES)
def test_batch_equals_one_at_a_time_and_a_direct_pass(tiny, pooling, normalize):
    embedder = Embedder(tiny, pooling=pooling, normalize=normalize)
    inputs = _inputs(LENGTHS, 512)
    batched = embedder.embed(inputs)
    _assert_close(batched, [embedder.embed([ids])[0] for ids in inputs])
    _assert_close(batched, [_direct(tiny, ids, pooling, normalize) for ids in inputs])
    norms = [np.linalg.norm(v) for v in batched]
    assert all(abs(n - 1) < 1e-5 for n in norms) == normalize


def test_batches_split_by_padded_tokens(tiny):
    embedder = Embedder(tiny, pooling="mean", max_batch_tokens=64)
    seen = []
    run_batch = embedder._embed_batch
    embedder._embed_batch = lambda batch: seen.append([len(ids) for ids in batch]) or run_batch(batch)
    inputs = _inputs(LENGTHS + [3] * 20, 512, seed=1)
    vectors = embedder.embed(inputs)
    assert sorted(n for batch in seen for n in batch) == sorted(map(len, inputs))  # each input once
    assert all(len(b) * max(b) <= 64 for b in seen if len(b) > 1) and len(seen) > 2
    _assert_close(vectors, Embedder(tiny, pooling="mean").embed(inputs))  # one batch of all


def test_an_input_longer_than_a_batch_runs_alone(tiny):
    embedder = Embedder(tiny, pooling="last", max_batch_tokens=32)
    inputs = _inputs([4, 700, 9], 512, seed=2)
    vectors = embedder.embed(inputs)
    _assert_close(vectors, [_direct(tiny, ids, "last", True) for ids in inputs])


def test_no_inputs_no_vectors(tiny):
    assert Embedder(tiny).embed([]) == []


def test_an_empty_input_is_refused(tiny):
    with pytest.raises(ValueError, match="at least one token"):
        Embedder(tiny).embed([[1, 2], []])


def test_dimensions_is_the_hidden_size(tiny):
    embedder = Embedder(tiny)
    assert embedder.dimensions == 64 and embedder.embed([[5, 6]])[0].shape == (64,)


def test_bad_settings_and_models_fail_clearly(tiny):
    import mlx.nn as nn

    with pytest.raises(ValueError, match="pooling"):
        Embedder(tiny, pooling="max")
    with pytest.raises(ValueError, match="max_batch_tokens"):
        Embedder(tiny, max_batch_tokens=0)
    with pytest.raises(TypeError, match="no base module"):
        Embedder(nn.Linear(4, 4))


def test_embedded_smollm2_batch_equals_one_at_a_time_and_direct(embedded_model_dir):
    from mlx_lm.utils import load

    model = load(str(embedded_model_dir))[0]
    embedder = Embedder(model, pooling="mean", normalize=True)
    inputs = _inputs([12, 3, 40, 1], 49152, seed=3)
    batched = embedder.embed(inputs)
    _assert_close(batched, [embedder.embed([ids])[0] for ids in inputs])
    _assert_close(batched, [_direct(model, ids, "mean", True) for ids in inputs])
