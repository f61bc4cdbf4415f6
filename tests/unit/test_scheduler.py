"""Admission decisions: slots, KV budget, and gathering newcomers into groups (engine steps, no clock)."""
from __future__ import annotations

from engine.messages import AddRequest
from engine.scheduler import KV_STEP, Scheduler


def request(i: int, prompt: int = 10, max_tokens: int = 10) -> AddRequest:
    return AddRequest(f"r{i}", [1] * prompt, max_tokens)


def start_all(scheduler: Scheduler) -> list:
    admitted = scheduler.admissions()
    for sequence in admitted:
        scheduler.start(sequence, uid=int(sequence.request_id[1:]))
    return admitted


def test_an_idle_engine_admits_at_once_and_slots_cap_the_batch():
    scheduler = Scheduler(max_running=2, group_size=8, max_wait_steps=8)
    for i in range(3):
        scheduler.add(request(i))
    assert [s.request_id for s in start_all(scheduler)] == ["r0", "r1"]
    assert len(scheduler.waiting) == 1


def test_newcomers_wait_for_a_group_or_for_max_wait_steps():
    scheduler = Scheduler(max_running=64, group_size=4, max_wait_steps=3)
    for i in range(16):
        scheduler.add(request(i))
    assert len(start_all(scheduler)) == 16  # idle: all at once
    scheduler.add(request(100))
    scheduler.tick()
    scheduler.tick()
    assert start_all(scheduler) == []  # one newcomer, 16 running: wait for a group of 4
    scheduler.tick()
    assert [s.request_id for s in start_all(scheduler)] == ["r100"]  # waited 3 steps: in
    for i in range(200, 204):
        scheduler.add(request(i))
    assert len(start_all(scheduler)) == 4  # a full group joins at once


def test_small_batches_never_wait_and_zero_turns_grouping_off():
    scheduler = Scheduler(max_running=64, group_size=8, max_wait_steps=8)
    scheduler.add(request(0))
    start_all(scheduler)
    scheduler.add(request(1))  # 1 running: a quarter of it rounds to a group of one
    assert len(start_all(scheduler)) == 1
    off = Scheduler(max_running=64, group_size=8, max_wait_steps=0)
    for i in range(20):
        off.add(request(i))
    start_all(off)
    off.add(request(99))
    assert len(start_all(off)) == 1


def test_the_kv_budget_holds_work_until_it_fits():
    scheduler = Scheduler(max_running=8, kv_bytes_per_token=1, kv_budget=2 * KV_STEP)
    for i in range(3):
        scheduler.add(request(i))
    assert len(start_all(scheduler)) == 2
    scheduler.finish(0)
    assert [s.request_id for s in start_all(scheduler)] == ["r2"]
