"""engine/slot_attention.py: decode attention over a slot group's left-padded cache without a
mask. On every machine: the route (no mask built, each row's padding applied by the attention
call, answers unchanged, models it cannot serve refused). On CUDA: the kernel against MLX's
masked attention, and the batcher's answers with it."""
from __future__ import annotations

import random

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.base import scaled_dot_product_attention  # noqa: F401  (a module that has it...)

from engine import slot_attention
from engine.generator import Generator
from engine.random_model import write_random_model
from tests.engine_harness import counted_model
from tests.test_slot_batcher import arrivals, play

cuda = pytest.mark.skipif(not slot_attention.available(), reason="the kernel is CUDA's")


def reference(q, k, v, scale, padding):
    """softmax over each row's own columns, spelled out in float32 on the CPU (zeros for a row
    with no columns)."""
    with mx.stream(mx.cpu):
        q, k, v = (x.astype(mx.float32) for x in (q, k, v))
        repeat = q.shape[1] // k.shape[1]
        k, v = mx.repeat(k, repeat, axis=1), mx.repeat(v, repeat, axis=1)
        valid = (padding[:, None] <= mx.arange(k.shape[2])[None])[:, None, None, :]
        scores = mx.where(valid, (q @ k.swapaxes(-1, -2)) * scale, -mx.inf)
        weights = mx.where(valid, mx.softmax(scores, axis=-1, precise=True), 0.0)
        out = weights @ v
        mx.eval(out)
        return out


def random_inputs(b, h, h_kv, width, d, dtype, capacity=None, seed=0):
    mx.random.seed(seed)
    q = mx.random.normal((b, h, 1, d)).astype(dtype)
    capacity = capacity or width
    keys = mx.random.normal((b, h_kv, capacity, d)).astype(dtype)
    values = mx.random.normal((b, h_kv, capacity, d)).astype(dtype)
    rnd = random.Random(seed)
    padding = mx.array([rnd.randrange(width) for _ in range(b)], dtype=mx.int32)
    # A cache hands attention a view of its first `width` columns.
    return q, keys[..., :width, :], values[..., :width, :], padding


def close(got, want) -> float:
    """The largest difference, after checking every value is finite."""
    got = got.astype(mx.float32)
    assert mx.all(mx.isfinite(got)).item()
    return mx.max(mx.abs(got - want)).item()


def test_masked_attention_reads_only_each_rows_own_columns():
    q, k, v, padding = random_inputs(5, 4, 2, 37, 16, mx.float32)
    got = slot_attention.masked_attention(q, k, v, 0.25, padding)
    assert close(got, reference(q, k, v, 0.25, padding)) < 1e-5


@pytest.fixture
def routed_here(monkeypatch):
    """The route installed with MLX's masked attention standing in for the kernel (counted),
    and mlx-lm's function given back afterwards."""
    calls = []

    def attention(q, k, v, scale, padding):
        calls.append(q.shape)
        return slot_attention.masked_attention(q, k, v, scale, padding)

    monkeypatch.setattr(slot_attention, "available", lambda: True)
    monkeypatch.setattr(slot_attention, "decode_attention", attention)
    import mlx_lm.models.qwen2 as qwen2

    monkeypatch.setattr(qwen2, "scaled_dot_product_attention", qwen2.scaled_dot_product_attention)
    return calls


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """Heads of 64, as the kernel takes (and as Qwen2.5's)."""
    return counted_model(write_random_model(tmp_path_factory.mktemp("tiny-h64"), "tiny-h64"))


def generator(model, **kw) -> Generator:
    options = dict(max_batch=8, prefill_batch_size=4, prefill_step_size=32, decode_batch="slots")
    return Generator(model, [0], **{**options, **kw})


@pytest.mark.parametrize("seed", [0, 3])
def test_routed_decode_steps_build_no_mask_and_change_no_answer(model, routed_here, seed):
    schedule = arrivals(seed)
    fused = generator(model)
    assert fused.fused_attention
    got = play(fused, schedule)
    assert routed_here, "the decode steps never reached the routed attention"
    assert all(shape[2] == 1 for shape in routed_here)
    routed_here.clear()
    plain = generator(model, decode_attention="mask")
    assert not plain.fused_attention
    assert play(plain, schedule) == got
    assert not routed_here  # caches that build their mask keep mlx-lm's path


def test_without_a_kernel_nothing_is_routed(model):
    if slot_attention.available():
        pytest.skip("this machine has the kernel")
    assert not generator(model).fused_attention


def test_a_head_size_the_kernel_cannot_split_is_refused(tiny_model_dir, monkeypatch):
    """The tiny model's heads are 16 wide: the route would only ever take its masked fallback."""
    monkeypatch.setattr(slot_attention, "available", lambda: True)
    assert not generator(counted_model(tiny_model_dir)).fused_attention


class DirectAttention(nn.Module):
    """A model whose attention calls MLX directly (mx.fast.scaled_dot_product_attention): it
    would get no mask from a fused cache, so it must never be routed."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)


def test_a_model_calling_mlx_attention_directly_is_refused(monkeypatch):
    monkeypatch.setattr(slot_attention, "available", lambda: True)
    assert not slot_attention.install(DirectAttention())


def test_a_fused_cache_still_builds_masks_for_prefill():
    cache = slot_attention.SlotKVCache([1, 0])
    cache.fused = True
    assert cache.make_mask(1) is None
    assert cache.make_mask(3) is not None


@cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 2, 1, 64), (8, 14, 2, 300, 64), (33, 8, 8, 513, 128), (4, 28, 4, 2000, 128)])
def test_the_kernel_matches_attention_over_each_rows_columns(shape, dtype):
    b, h, h_kv, width, d = shape
    q, k, v, padding = random_inputs(b, h, h_kv, width, d, dtype, capacity=width + 256, seed=width)
    padding[0] = width  # a row with no columns (an idle slot): zeros, no NaN
    got = slot_attention.decode_attention(q, k, v, d ** -0.5, padding)
    want = reference(q, k, v, d ** -0.5, padding)
    assert close(got, want) < (1e-4 if dtype == mx.float32 else 2e-2)


@cuda
def test_the_batcher_answers_the_same_with_the_kernel(model):
    schedule = arrivals(5)
    fused = generator(model)
    assert fused.fused_attention
    assert play(fused, schedule) == play(generator(model, decode_attention="mask"), schedule)
