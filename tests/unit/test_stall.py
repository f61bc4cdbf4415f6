"""When the worker's watchdog calls the engine stalled: silence while there is work, except
while a model's weights load on demand (a big one takes longer than ENGINE_STALL_TIMEOUT)."""
import time
from types import SimpleNamespace

from app.state import LOAD_STALL_S, Orchard
from engine.engine import EngineState

STALL_S = 7  # ENGINE_STALL_TIMEOUT


def orchard_with(*engines, beat_age: float, distributed: bool = False) -> Orchard:
    orchard = Orchard.__new__(Orchard)
    for engine in engines:
        engine.stats = SimpleNamespace(last_beat=time.monotonic() - beat_age)
    orchard.engine = engines[0]
    orchard.settings = SimpleNamespace(engine_stall_timeout=STALL_S)
    orchard.catalog = SimpleNamespace(engines=list(engines), distributed=distributed)
    return orchard


def engine(state=EngineState.READY, running=0, waiting=0, model=object()):
    return SimpleNamespace(state=state, running=running, waiting=waiting, model=model)


def test_silence_with_work_is_a_stall():
    assert orchard_with(engine(running=1), beat_age=STALL_S + 1).stalled()
    assert not orchard_with(engine(running=1), beat_age=STALL_S - 1).stalled()


def test_silence_without_work_is_not_unless_the_group_should_beat():
    assert not orchard_with(engine(), beat_age=STALL_S + 1).stalled()
    assert orchard_with(engine(), beat_age=STALL_S + 1, distributed=True).stalled()


def test_a_model_loading_on_demand_gets_the_longer_limit():
    busy, loading = engine(running=1), engine(state=EngineState.LOADING, waiting=1)
    assert not orchard_with(busy, loading, beat_age=STALL_S + 60).stalled()
    assert orchard_with(busy, loading, beat_age=LOAD_STALL_S + 1).stalled()
