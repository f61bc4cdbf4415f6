"""Long prompts share each step with decoding rows under a prompt-token budget (PREFILL_STEP_SIZE):
no step feeds the model more prompt tokens than the budget, a shared prefill (the `n` choices)
advances chunk by chunk like any prompt, and its followers still match solo greedy output."""
from __future__ import annotations

import pytest

from engine.generator import Generator
from engine.messages import AddRequest
from engine.sampling import SamplingParams
from tests.engine_harness import counted_model

GREEDY = SamplingParams(temperature=0.0)
BUDGET = 64
LONG = [(i * 7) % 500 + 3 for i in range(300)]  # the tiny model's vocabulary is 512


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return counted_model(tiny_model_dir)


def generator(model, budget=BUDGET) -> Generator:
    return Generator(model, [0], max_batch=16, prefill_batch_size=8, prefill_step_size=budget)


def request(rid: str, prompt: list[int], max_tokens: int) -> AddRequest:
    return AddRequest(rid, prompt, max_tokens, GREEDY, ignore_eos=True)


def drain(gen: Generator, uids: set[int], steps: int = 200) -> dict[int, list[int]]:
    out = {uid: [] for uid in uids}
    for _ in range(steps):
        for t in gen.step():
            out.setdefault(t.uid, []).append(t.token)
        if not gen.busy:
            break
    return out


@pytest.mark.parametrize("copies", [1, 3, 10])
def test_no_step_prefills_more_than_the_budget_and_decoding_rows_get_a_token_every_step(model, copies):
    gen = generator(model)
    for i in range(4):
        gen.insert(request(f"d{i}", [5 + i, 6, 7], 400))
    for _ in range(3):
        gen.step()
    distinct = [request(f"L{j}", [j + 1] + LONG, 4) for j in range(copies)]  # several long prompts at once
    model.fed.clear()
    assert all(not isinstance(r, Exception) for r in gen.insert_many(distinct))
    assert model.fed == []  # admission itself computes nothing
    for _ in range(40):
        model.fed.clear()
        tokens = gen.step()
        assert sum(r * n for r, n in model.fed if n > 1) <= max(BUDGET, 16 * min(copies, 8))
        assert {t.uid for t in tokens} >= {0, 1, 2, 3}  # the decoding rows never skip a step


def test_a_shared_prefill_goes_one_chunk_per_step_and_matches_solo_output(model):
    solo_gen = generator(model)
    (solo,) = solo_gen.insert_many([request("solo", LONG, 6)])
    expected = drain(solo_gen, {solo[0]})[solo[0]]

    gen = generator(model)
    model.fed.clear()
    results = gen.insert_many([request(f"n{i}", LONG, 6) for i in range(3)])
    assert model.fed == [] and gen.prefill_tokens_saved == 2 * (len(LONG) - 1)
    out = drain(gen, {uid for uid, _ in results})
    assert max(n for _, n in model.fed) <= BUDGET
    assert [out[uid] for uid, _ in results] == [expected] * 3


def test_followers_survive_their_leader_leaving_before_its_prompt_is_done(model):
    solo_gen = generator(model)
    (solo,) = solo_gen.insert_many([request("solo", LONG, 5)])
    expected = drain(solo_gen, {solo[0]})[solo[0]]

    gen = generator(model)
    results = gen.insert_many([request(f"n{i}", LONG, 5) for i in range(3)])
    gen.step()  # the leader's first chunk
    gen.remove(results[0][0])
    gen.remove(results[2][0])  # a follower still waiting leaves too
    out = drain(gen, {results[1][0]})
    assert out[results[1][0]] == expected
    assert results[0][0] not in out and results[2][0] not in out


@pytest.mark.parametrize("raw, cpu, budget", [("auto", True, 512), ("auto", False, 4096), ("64", True, 64),
                                              ("2048", False, 2048)])
def test_the_budget_setting_is_auto_per_device_or_a_number(raw, cpu, budget):
    from config import load_settings

    assert load_settings({"PREFILL_STEP_SIZE": raw}, dotenv=False).prefill_tokens(cpu) == budget


@pytest.mark.parametrize("raw", ["8", "big", "-1", "70000"])
def test_a_bad_budget_setting_is_refused_at_start(raw):
    from config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="PREFILL_STEP_SIZE"):
        load_settings({"PREFILL_STEP_SIZE": raw}, dotenv=False)


@pytest.mark.parametrize("raw,cpu,tokens", [("auto", True, 0), ("auto", False, 8192), ("0", False, 0), ("300", True, 300)])
def test_the_warm_up_setting_is_auto_per_device_or_a_number(raw, cpu, tokens):
    from config import load_settings

    assert load_settings({"WARMUP_TOKENS": raw}, dotenv=False).warmup(cpu) == tokens


@pytest.mark.parametrize("raw", ["big", "-1", "2000000"])
def test_a_bad_warm_up_setting_is_refused_at_start(raw):
    from config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="WARMUP_TOKENS"):
        load_settings({"WARMUP_TOKENS": raw}, dotenv=False)


@pytest.mark.parametrize("raw", ["all", "lean"])
def test_the_warm_up_shapes_setting_takes_all_or_lean(raw):
    from config import load_settings

    assert load_settings({"WARMUP_SHAPES": raw}, dotenv=False).warmup_shapes == raw
    assert load_settings({}, dotenv=False).warmup_shapes == "all"


def test_a_bad_warm_up_shapes_setting_is_refused_at_start():
    from config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="WARMUP_SHAPES"):
        load_settings({"WARMUP_SHAPES": "some"}, dotenv=False)


@pytest.mark.parametrize("shapes,prompt_batches", [("all", True), ("lean", False)])
def test_the_server_factory_warms_up_with_the_shapes_setting(shapes, prompt_batches):
    """The engine the server builds hands WARMUP_SHAPES to the generator's warm-up."""
    from types import SimpleNamespace

    from config import load_settings
    from engine.factory import model_engine

    settings = load_settings({"WARMUP_TOKENS": "64", "WARMUP_SHAPES": shapes}, dotenv=False)
    engine = model_engine(settings, "embedded", "m", 4, pinned=True)
    calls = []

    class Recorder:
        def warm_up(self, tokens, rows, context, prompt_batches=True):
            calls.append((tokens, rows, context, prompt_batches))
            return 1

    engine._warm_up(Recorder(), SimpleNamespace(model_id="m", context_length=1024), 4)
    assert calls == [(64, 4, 1024, prompt_batches)]


@pytest.mark.parametrize("raw,cpu,chunk", [("auto", True, 128), ("auto", False, 512), ("256", False, 256)])
def test_the_chunk_setting_is_auto_per_device_or_a_number(raw, cpu, chunk):
    from config import load_settings

    assert load_settings({"PREFILL_CHUNK_SIZE": raw}, dotenv=False).prefill_chunk(cpu) == chunk


def test_one_prompt_never_advances_more_than_its_chunk_while_short_ones_share_the_budget(model):
    gen = Generator(model, [0], max_batch=16, prefill_batch_size=8, prefill_step_size=256, prefill_chunk=48)
    gen.insert(request("long", LONG, 2))
    model.fed.clear()
    gen.step()
    assert max(n for _, n in model.fed) == 48  # alone, the long prompt still takes one chunk
    gen = Generator(model, [0], max_batch=16, prefill_batch_size=8, prefill_step_size=256, prefill_chunk=48)
    gen.insert_many([request(f"s{i}", [3 + i] * 30, 2) for i in range(8)])
    model.fed.clear()
    gen.step()
    assert sum(r * n for r, n in model.fed if n > 1) == 8 * 30  # eight whole short prompts in one step


def test_with_no_row_decoding_each_prompt_of_a_burst_advances_a_whole_chunk(model):
    """Nobody waits on an idle engine's step, so a burst of new prompts is prefilled a whole
    chunk each (here: in one pass) instead of splitting the budget; once rows decode, the budget
    is split again. Output equals each prompt alone."""
    gen = Generator(model, [0], max_batch=16, prefill_batch_size=8, prefill_step_size=BUDGET, prefill_chunk=48)
    burst = [request(f"b{j}", [j + 3] + LONG[:40], 3) for j in range(6)]  # 41 tokens to prefill each
    model.fed.clear()
    uids = [uid for uid, _ in gen.insert_many(burst)]
    first = gen.step()  # an idle engine: the first tokens come back in this step
    assert [shape for shape in model.fed if shape[1] > 1] == [(6, 41)]  # one pass, over the budget of 64
    out = drain(gen, set(uids))
    for t in reversed(first):
        out[t.uid].insert(0, t.token)
    for uid, r in zip(uids, burst):
        alone = generator(model)
        (solo, _), = alone.insert_many([r])
        assert drain(alone, {solo})[solo] == out[uid]
    gen.insert(request("d", [5, 6, 7], 50))
    for _ in range(3):
        gen.step()  # "d" decodes now
    model.fed.clear()
    gen.insert_many([request(f"c{j}", [j + 9] + LONG[:40], 3) for j in range(6)])
    gen.step()
    assert sum(r * n for r, n in model.fed if n > 1) <= max(BUDGET, 16 * 6)  # the budget is split again


def test_bucketed_prefill_keeps_splitting_the_budget_when_idle(model):
    """On a GPU (bucketed passes) the rule above does not apply: bigger passes would be shapes
    the warm-up does not build."""
    gen = Generator(model, [0], max_batch=16, prefill_batch_size=8, prefill_step_size=BUDGET, prefill_chunk=48,
                    prefill_bucket=16)
    model.fed.clear()
    gen.insert_many([request(f"g{j}", [j + 3] + LONG[:40], 3) for j in range(6)])
    gen.step()
    assert [shape for shape in model.fed if shape[1] > 1] == [(6, 16)]  # 64 // 6 -> 16 each, on the bucket


def test_followers_get_their_first_token_two_steps_after_an_idle_engines_leader(model):
    """With slots the leader's KV state is handed on as soon as its last prompt chunk is queued
    (not when its first token comes back): the `n` choices join the next step and their first
    tokens come back the step after (step 2; until stop 19, step 3). On an idle engine the
    leader's own first token comes back in its prefill step (step 0). Their answers still
    equal a solo run's."""
    prompt = LONG[:40]
    solo_gen = generator(model)
    (solo,) = solo_gen.insert_many([request("solo", prompt, 4)])
    expected = drain(solo_gen, {solo[0]})[solo[0]]

    gen = generator(model)
    results = gen.insert_many([request(f"n{i}", prompt, 4) for i in range(3)])
    first: dict[int, int] = {}
    out: dict[int, list[int]] = {}
    for step in range(40):
        for t in gen.step():
            first.setdefault(t.uid, step)
            out.setdefault(t.uid, []).append(t.token)
        if not gen.busy:
            break
    assert sorted(first[uid] for uid, _ in results) == [0, 2, 2]
    assert [out[uid] for uid, _ in results] == [expected] * 3
