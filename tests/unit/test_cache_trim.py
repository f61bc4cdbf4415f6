"""MLX's buffer cache is emptied under its new limit at start (engine/memory.py), not trimmed
inside the first request's first allocation (issue 14, goal 3: 180-200 ms on CUDA)."""
import mlx.core as mx
import pytest

from engine import memory


@pytest.fixture
def restored_limits():
    before = mx.set_cache_limit(1 << 40)
    yield
    mx.set_cache_limit(before)
    mx.clear_cache()


def test_the_warm_ups_cache_is_gone_before_anything_else_runs(restored_limits):
    held = mx.ones((64 << 20,), dtype=mx.uint8)
    mx.eval(held)
    del held
    assert mx.get_cache_memory() >= 64 << 20
    memory.empty_cache_under(8 << 20)
    assert mx.get_cache_memory() == 0
    assert mx.set_cache_limit(1 << 40) == 8 << 20  # the limit the server runs under


class _Allocator:
    """An allocator that trims only on allocation (as MLX's CUDA one): what emptying at start is for."""

    def __init__(self, cached: int):
        self.cached, self.limit, self.calls = cached, 1 << 60, []

    def set_cache_limit(self, limit):
        self.calls.append("limit")
        self.limit, old = limit, self.limit
        return old

    def clear_cache(self):
        self.calls.append("clear")
        self.cached = 0


def test_setting_the_limit_alone_would_leave_the_surplus_to_the_first_request(monkeypatch):
    fake = _Allocator(70 << 30)
    for name in ("set_cache_limit", "clear_cache"):
        monkeypatch.setattr(mx, name, getattr(fake, name))
    memory.empty_cache_under(2 << 30)
    assert fake.calls == ["limit", "clear"] and fake.cached == 0 and fake.limit == 2 << 30
