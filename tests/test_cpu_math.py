"""engine/cpu_math.py: SwiGLU and attention with exp through MLX's vectorized power (x86 CPUs).
Each piece equals MLX's / mlx-lm's own to float32 rounding, for every mask form mlx-lm hands
attention; installing it routes a model's modules (sinks and quantized caches keep the
original) and leaves the batcher's greedy answers unchanged."""
from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import activations, base

from engine import cpu_math
from engine.generator import Generator
from tests.engine_harness import counted_model
from tests.test_slot_batcher import arrivals, play


@pytest.fixture(autouse=True)
def on_the_cpu():
    """These are MLX CPU backend functions: on a GPU machine too, they are checked there."""
    with mx.stream(mx.cpu):
        yield


def test_exp_equals_mlx_exp_to_float32_rounding():
    x = mx.concatenate([mx.linspace(-87.0, 88.0, 100_001), mx.array([0.0, -1e-8, 1e-8])])
    want, got = mx.exp(x), cpu_math.exp(x)
    relative = mx.abs(got - want) / want
    assert relative.max().item() < 4e-7  # a few ulps
    assert cpu_math.exp(mx.array([-mx.inf])).item() == 0.0  # a masked score contributes nothing


def test_swiglu_equals_mlx_lms():
    mx.random.seed(1)
    gate, x = mx.random.normal((3, 7, 96)) * 6, mx.random.normal((3, 7, 96))
    assert mx.abs(cpu_math.swiglu(gate, x) - activations.swiglu(gate, x)).max().item() < 1e-5
    gate = mx.array([-200.0, -90.0, 0.0, 90.0])  # far tails stay finite
    assert mx.all(mx.isfinite(cpu_math.swiglu(gate, mx.ones(4)))).item()


def inputs(b=3, h=6, h_kv=2, length=1, columns=19, d=16, dtype=mx.float32, seed=0):
    mx.random.seed(seed)
    return (mx.random.normal((b, h, length, d)).astype(dtype), mx.random.normal((b, h_kv, columns, d)).astype(dtype),
            mx.random.normal((b, h_kv, columns, d)).astype(dtype))


def mlx_attention(q, k, v, mask):
    return base.scaled_dot_product_attention(q, k, v, cache=None, scale=0.3, mask=mask)


def masks(b, h, length, columns):
    """Every form mlx-lm passes: none, "causal", a boolean (B, 1, L, K) padding mask, per-head
    boolean, an additive float mask, a plain (L, K) one."""
    padding = mx.array([0, 4, 11][:b])
    valid = (padding[:, None] <= mx.arange(columns)[None])[:, None, None, :]
    causal = mx.arange(columns - length, columns)[:, None] >= mx.arange(columns)[None]
    rows = valid & causal[None, None]
    yield "none", None
    yield "causal", "causal"
    yield "padding", rows
    yield "per head", mx.broadcast_to(rows, (b, h, length, columns))
    yield "additive", mx.where(rows, 0.0, -1e9).astype(mx.float32)
    yield "2-d", causal


@pytest.mark.parametrize("length", [1, 5])
def test_attention_equals_mlx_for_every_mask_form(length):
    q, k, v = inputs(length=length)
    for name, mask in masks(3, 6, length, 19):
        got, want = cpu_math.attention(q, k, v, 0.3, mask), mlx_attention(q, k, v, mask)
        assert got.shape == want.shape, name
        assert mx.abs(got - want).max().item() < 1e-5, name


def test_attention_in_bfloat16_stays_within_bfloat16s_rounding():
    q, k, v = inputs(length=3, dtype=mx.bfloat16)
    got = cpu_math.attention(q, k, v, 0.3, "causal")
    want = mlx_attention(q.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), "causal")
    assert got.dtype == mx.bfloat16
    assert mx.abs(got.astype(mx.float32) - want).max().item() < 0.05


def test_sinks_and_quantized_caches_keep_the_original():
    calls = []

    def original(q, k, v, cache, scale, mask, sinks=None):
        calls.append((cache, sinks))
        return q

    route = cpu_math._route(original)
    q, k, v = inputs()
    route(q, k, v, cache=None, scale=0.3, mask=None, sinks=mx.zeros(6))
    route(q, k, v, cache=type("Quantized", (), {"bits": 4})(), scale=0.3, mask=None)
    assert len(calls) == 2
    assert route(q, k, v, cache=None, scale=0.3, mask=None).shape == q.shape and len(calls) == 2


def test_wanted_only_where_asked_and_on_an_x86_cpu(monkeypatch):
    assert not cpu_math.wanted("mlx")
    monkeypatch.setattr(cpu_math.platform, "machine", lambda: "arm64")
    assert not cpu_math.wanted("auto")  # an ARM build has vector exp
    monkeypatch.setattr(cpu_math.platform, "machine", lambda: "x86_64")
    assert cpu_math.wanted("auto") == (mx.default_device().type == mx.cpu)


@pytest.fixture
def restored(monkeypatch):
    """Whatever install changes in the model modules is given back after the test."""
    import mlx_lm.models.qwen2 as qwen2

    for name in ("swiglu", "scaled_dot_product_attention"):
        monkeypatch.setattr(qwen2, name, getattr(qwen2, name))
    return qwen2


def test_install_routes_the_models_modules_once_and_keeps_greedy_answers(tiny_model_dir, restored):
    model = counted_model(tiny_model_dir)
    options = dict(max_batch=8, prefill_batch_size=4, prefill_step_size=32, decode_batch="slots")
    schedule = arrivals(5)
    plain = Generator(model, [0], **options)
    assert not plain.cpu_math  # the Generator's own default is MLX's math
    want = play(plain, schedule)
    x = mx.array([[3, 9, 27, 81, 243, 5, 7]])
    logits = model(x)
    fast = Generator(model, [0], cpu_math="auto", **options)
    assert fast.cpu_math == cpu_math.wanted("auto")
    if not fast.cpu_math:
        pytest.skip("not an x86 CPU: nothing is installed")
    assert restored.swiglu is cpu_math.swiglu
    route = restored.scaled_dot_product_attention
    assert cpu_math.install(model) and restored.scaled_dot_product_attention is route  # idempotent
    assert mx.abs(model(x) - logits).max().item() < 1e-4
    assert play(fast, schedule) == want
