"""The engine in-process on a tiny random Qwen2: batching, abort, seeds, fault isolation."""
from __future__ import annotations

import gevent
import pytest

from config import load_settings
from config.settings import SettingsError
from engine.messages import AddRequest
from engine.sampling import SamplingParams
from tests.engine_harness import encoded_prompts, run, run_many, running_engine

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with running_engine(MODEL=tiny_model_dir, MAX_CONCURRENT_REQUESTS=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts(engine):
    return encoded_prompts(engine)


def test_batched_greedy_output_equals_one_at_a_time(engine, prompts):
    alone = [run(engine, p, 12, sampling=GREEDY, ignore_eos=True)[0] for p in prompts]
    before = engine.stats.max_batch_seen
    together = [tokens for tokens, _ in run_many(engine, prompts, 12, sampling=GREEDY, ignore_eos=True)]
    assert together == alone
    assert engine.stats.max_batch_seen == 8 > before or before == 8  # all eight decoded in one step
    assert (engine.running, engine.waiting) == (0, 0)


def test_length_finish_and_exact_counts(engine, prompts):
    tokens, finished = run(engine, prompts[0], 5, sampling=GREEDY, ignore_eos=True)
    assert (finished.finish_reason, len(tokens), finished.completion_tokens) == ("length", 5, 5)
    assert finished.prompt_tokens == len(prompts[0])


def test_seeded_sampling_is_reproducible_inside_a_batch(engine, prompts):
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = run(engine, prompts[1], 10, sampling=seeded, ignore_eos=True)[0]
    mixed = run_many(engine, [prompts[1], prompts[2], prompts[3]], 10, sampling=seeded, ignore_eos=True)
    assert mixed[0][0] == alone
    other = run(engine, prompts[1], 10, sampling=SamplingParams(temperature=1.0, seed=99), ignore_eos=True)[0]
    assert other != alone


def test_abort_removes_a_running_sequence(engine, prompts):
    stream = engine.submit(AddRequest("to-abort", prompts[0], 500, GREEDY, ignore_eos=True))
    stream.next_batch(timeout=30)  # it is running
    engine.abort("to-abort")
    with gevent.Timeout(30):
        while stream.finished is None:
            stream.next_batch(timeout=5)
    assert stream.finished.finish_reason == "abort"
    assert stream.finished.completion_tokens < 500
    assert (engine.running, engine.waiting) == (0, 0)


def test_a_token_id_outside_the_vocabulary_fails_alone(engine, prompts):
    """The embedding lookup does not bounds-check: such an id must be refused, not read."""
    vocab = engine.model.model.args.vocab_size
    streams = run_many(engine, [prompts[0], prompts[1] + [vocab], [-1] + prompts[2]], 4,
                       sampling=GREEDY, ignore_eos=True)
    (good, good_end), (_, past_end), (_, negative) = streams
    assert (good_end.finish_reason, len(good)) == ("length", 4)
    for bad in (past_end, negative):
        assert bad.finish_reason == "error" and "vocabulary" in bad.error
    assert (engine.running, engine.waiting) == (0, 0)


def test_a_failing_step_fails_only_its_requests_and_the_engine_serves_on(engine, prompts, monkeypatch):
    generator = engine._generator
    real_step = generator.step
    calls = {"n": 0}

    def broken_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected fault")
        return real_step()

    monkeypatch.setattr(generator, "step", broken_step)
    _, finished = run(engine, prompts[0], 20, sampling=GREEDY, ignore_eos=True)
    assert finished.finish_reason == "error" and "injected fault" in finished.error
    tokens, finished = run(engine, prompts[0], 4, sampling=GREEDY, ignore_eos=True)
    assert (finished.finish_reason, len(tokens)) == ("length", 4)
    assert engine.stats.requests_failed >= 1


@pytest.mark.parametrize("core, wait", [("slots", 0), ("mlx-lm", 8)])
def test_admission_wait_auto_follows_the_batching_core(tiny_model_dir, prompts, core, wait):
    """ADMISSION_WAIT_STEPS=auto: the slot batcher admits at once (a joining row rides the next
    decode step); mlx-lm's BatchGenerator gathers newcomers (each admission is a pass of its own)."""
    with running_engine(MODEL=tiny_model_dir, DECODE_BATCH=core) as engine:
        assert engine.decode_core == core and engine._scheduler.max_wait_steps == wait
        tokens, finished = run(engine, prompts[0], 3, sampling=GREEDY, ignore_eos=True)
        assert (finished.finish_reason, len(tokens)) == ("length", 3)


@pytest.mark.parametrize("raw", ["-1", "1001", "soon"])
def test_admission_wait_refuses_what_is_not_auto_or_a_step_count(raw):
    with pytest.raises(SettingsError, match="ADMISSION_WAIT_STEPS"):
        load_settings({"ADMISSION_WAIT_STEPS": raw}, dotenv=False)


def test_a_newcomer_waits_for_company_while_a_batch_runs(tiny_model_dir, prompts):
    """ADMISSION_WAIT_STEPS: with free slots, a lone newcomer is held over engine steps (so
    newcomers join together), then admitted; with nothing running it is admitted at once."""
    with running_engine(MODEL=tiny_model_dir, MAX_CONCURRENT_REQUESTS=16, ADMISSION_WAIT_STEPS=40) as engine:
        scheduler = engine._scheduler
        long_runs = [gevent.spawn(run, engine, p, 400, sampling=GREEDY, ignore_eos=True) for p in prompts]
        with gevent.Timeout(60):
            while engine.running < len(prompts):
                gevent.sleep(0.005)
        held_over_a_step = False
        newcomer = gevent.spawn(run, engine, prompts[0], 4, sampling=GREEDY, ignore_eos=True)
        with gevent.Timeout(60):
            while not newcomer.dead:
                waiting = list(scheduler.waiting)
                if waiting and waiting[0].queued_at_step < scheduler.steps:
                    held_over_a_step = True  # still waiting after a step although slots were free
                gevent.sleep(0.001)
        assert held_over_a_step and newcomer.value[1].finish_reason == "length"
        gevent.joinall(long_runs, raise_error=True)
        started = scheduler.steps
        assert run(engine, prompts[1], 2, sampling=GREEDY, ignore_eos=True)[1].finish_reason == "length"
        assert scheduler.steps - started <= 6  # idle engine: its own few steps, not a 40-step wait


def test_requests_queued_behind_a_dying_loop_still_get_their_end(tiny_model_dir):
    """The loop dies while requests wait in its inbox (and one more arrives after): none of
    them may wait forever for an end marker."""
    from engine.engine import EngineState

    with running_engine(MODEL=tiny_model_dir) as engine:
        engine.inject_fault("loop")  # raised by the loop when it reads this message
        queued = [engine.submit(AddRequest(f"behind-{i}", [5, 6, 7], 4, sampling=GREEDY)) for i in range(3)]
        with gevent.Timeout(30):
            while engine.state is not EngineState.FAILED:
                gevent.sleep(0.01)
            late = engine.submit(AddRequest("after-death", [5, 6, 7], 4, sampling=GREEDY))
            for stream in queued + [late]:
                while stream.finished is None:
                    stream.next_batch(timeout=1)
        assert all(s.finished.finish_reason == "error" and "loop died" in s.finished.error
                   for s in queued + [late])
