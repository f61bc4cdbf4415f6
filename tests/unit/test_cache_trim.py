"""MLX's buffer cache is brought under a lowered limit at once (engine/memory.py), not inside
the first request's first allocation (issue 14, goal 3: 180-200 ms on CUDA)."""
import mlx.core as mx
import pytest

from engine import memory


@pytest.fixture
def restored_limits():
    before = mx.set_cache_limit(1 << 40)
    yield
    mx.set_cache_limit(before)
    mx.clear_cache()


def _fill_cache(mib: int) -> None:
    big = mx.ones((mib << 20,), dtype=mx.uint8)
    mx.eval(big)
    del big  # freed into the cache, not to the system


def test_a_lowered_limit_is_met_before_anything_else_runs(restored_limits):
    _fill_cache(64)
    assert mx.get_cache_memory() >= 64 << 20
    limit = 8 << 20
    mx.set_cache_limit(limit)
    memory.trim_cache(limit)
    assert mx.get_cache_memory() <= limit


def test_a_cache_within_the_limit_is_left_alone(restored_limits):
    _fill_cache(4)
    held = mx.get_cache_memory()
    memory.trim_cache(held + (1 << 20))
    assert mx.get_cache_memory() == held  # buffers the next request can reuse stay


class _Allocator:
    """An allocator that trims only on allocation (as MLX's CUDA one): what trim_cache is for."""

    def __init__(self, cached: int, trims_on_alloc: bool):
        self.cached, self.trims_on_alloc, self.calls = cached, trims_on_alloc, []

    def get_cache_memory(self):
        return self.cached

    def eval(self, *arrays):
        self.calls.append("alloc")
        if self.trims_on_alloc:
            self.cached = min(self.cached, 10)

    def clear_cache(self):
        self.calls.append("clear")
        self.cached = 0


@pytest.mark.parametrize("trims_on_alloc, calls", [(True, ["alloc"]), (False, ["alloc", "clear"])])
def test_the_surplus_goes_by_one_allocation_or_else_by_emptying(monkeypatch, trims_on_alloc, calls):
    fake = _Allocator(1000, trims_on_alloc)
    for name in ("get_cache_memory", "eval", "clear_cache"):
        monkeypatch.setattr(mx, name, getattr(fake, name))
    memory.trim_cache(10)
    assert fake.calls == calls and fake.cached <= 10
