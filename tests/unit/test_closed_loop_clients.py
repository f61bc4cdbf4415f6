"""bench.closed_loop's simulated clients: each end brings the next request lag + k % spread steps later."""
from __future__ import annotations

from bench.closed_loop import _Loop


def test_each_end_brings_one_request_after_its_lag():
    prompts = [[i] for i in range(6)]
    loop = _Loop(prompts, streams=2, lag=2, spread=1)
    assert loop.first(2) == [[0], [1]]
    assert loop.after_step(0, ended=2) == []  # due at step 2
    assert loop.after_step(1, ended=0) == []
    assert loop.after_step(2, ended=0) == [[2], [3]]
    assert loop.done == 2 and loop.sent == 4


def test_spread_staggers_the_arrivals_and_no_prompt_is_sent_twice():
    prompts = [[i] for i in range(8)]
    loop = _Loop(prompts, streams=3, lag=1, spread=3)
    loop.first(3)
    arrivals = {}
    for step in range(10):
        ended = 3 if step == 0 else 0
        for p in loop.after_step(step, ended):
            arrivals[p[0]] = step
    assert arrivals == {3: 1, 4: 2, 5: 3}  # lags 1, 2, 3: the three ends' next requests spread over steps
    assert loop.sent == 6


def test_never_sends_more_than_the_prompts():
    loop = _Loop([[0], [1], [2]], streams=2, lag=0, spread=1)
    loop.first(2)
    assert loop.after_step(0, ended=2) == [[2]]
    assert loop.after_step(1, ended=1) == []
    assert loop.done == 3 and loop.sent == 3
