"""engine/batcher.py: rows keep a KV slot, joining rows ride the next decode step, leaving rows
free their slot; output equals mlx-lm's BatchGenerator and one-at-a-time (greedy), for
staggered arrivals, one-token prompts, prefix-cache hits, seeded sampling and logprobs."""
from __future__ import annotations

import random

import mlx.core as mx
import pytest

from engine.generator import Generator
from engine.messages import AddRequest
from engine.sampling import SamplingParams
from tests.engine_harness import counted_model

GREEDY = SamplingParams(temperature=0.0)


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return counted_model(tiny_model_dir)


def generator(model, kind: str, **kw) -> Generator:
    options = dict(max_batch=8, prefill_batch_size=4, prefill_step_size=32, decode_batch=kind)
    return Generator(model, [0], **{**options, **kw})


def arrivals(seed: int, n: int = 14) -> dict[int, list]:
    """Requests arriving at random steps: prompt lengths 1-70, 1-20 tokens each."""
    rnd = random.Random(seed)
    out: dict[int, list] = {}
    for k in range(n):
        prompt = [rnd.randint(3, 500) for _ in range(rnd.randint(1, 70))]
        out.setdefault(rnd.randint(0, 40), []).append((f"r{k}", prompt, rnd.randint(1, 20)))
    return out


def play(gen: Generator, schedule: dict[int, list], params=GREEDY, **request_kw) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    ids: dict[int, str] = {}
    for step in range(500):
        for rid, prompt, max_tokens in schedule.get(step, []):
            ((uid, _),) = gen.insert_many([AddRequest(rid, prompt, max_tokens, params, ignore_eos=True, **request_kw)])
            ids[uid], out[rid] = rid, []
        for t in gen.step():
            if t.uid in ids:  # rows inserted before the schedule are not ours to record
                out[ids[t.uid]].append(t.token)
        if step > max(schedule) and not gen.busy:
            return out
    raise AssertionError("the batch never drained")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_staggered_arrivals_match_mlx_lm_and_one_at_a_time(model, seed):
    schedule = arrivals(seed)
    slots = play(generator(model, "slots"), schedule)
    reference = play(generator(model, "mlx-lm"), schedule)
    assert slots == reference
    for rid, prompt, max_tokens in [r for rs in schedule.values() for r in rs]:
        assert len(slots[rid]) == max_tokens
        assert play(generator(model, "slots"), {0: [(rid, prompt, max_tokens)]})[rid] == slots[rid]


def test_the_slot_batcher_is_used_for_plain_kv_caches(model):
    assert generator(model, "slots").slots and not generator(model, "mlx-lm").slots


def test_a_joining_row_rides_the_next_decode_step_instead_of_a_pass_of_its_own(model):
    for kind, solo_passes in (("slots", 0), ("mlx-lm", 1)):
        gen = generator(model, kind)
        for i in range(4):
            gen.insert(AddRequest(f"d{i}", [5 + i, 6, 7], 60, GREEDY, ignore_eos=True))
        for _ in range(4):
            gen.step()
        model.fed.clear()
        gen.insert(AddRequest("new", [9, 8, 7, 6, 5], 60, GREEDY, ignore_eos=True))
        for _ in range(4):
            gen.step()
        decode = [shape for shape in model.fed if shape[1] == 1]
        assert sum(1 for rows, _ in decode if rows == 1) == solo_passes, (kind, model.fed)
        assert (5, 1) in decode  # the new row decodes with the four others


def test_leaving_rows_free_slots_that_newcomers_take_and_idle_halves_are_compacted(model):
    gen = generator(model, "slots")
    for i in range(6):
        gen.insert(AddRequest(f"a{i}", [5 + i, 6, 7], 3 if i < 3 else 40, GREEDY, ignore_eos=True))
    for _ in range(8):
        gen.step()
    batch = gen._batch._groups[0]
    assert len(batch._slots) == 6 and sum(r is None for r in batch._slots) == 3  # three left, nothing moved
    for i in range(2):
        gen.insert(AddRequest(f"b{i}", [7 + i, 6], 40, GREEDY, ignore_eos=True))
    for _ in range(4):
        gen.step()
    assert len(batch._slots) == 6 and sum(r is None for r in batch._slots) == 1  # they took free slots
    for _ in range(60):
        gen.step()
    assert not gen.busy and batch._slots == [] and batch._cache == []  # an empty batch holds no KV
    assert gen._batch._groups == {}


def test_prefix_cache_hits_and_shared_prefills_match_the_reference(model):
    prompt = [(i * 11) % 500 + 3 for i in range(90)]
    schedule = {0: [("first", prompt, 6)], 12: [("again", prompt + [42, 43], 6)],
                14: [("n0", prompt[:50], 5), ("n1", prompt[:50], 5)]}
    for kind in ("slots", "mlx-lm"):
        gen = generator(model, kind, prefix_cache_bytes=1 << 30)
        out = play(gen, schedule)
        if kind == "slots":
            slots, hits = out, gen.prefix_cache.stats.hits
        else:
            assert out == slots
    assert hits >= 1
    assert play(generator(model, "slots"), {0: [("again", prompt + [42, 43], 6)]})["again"] == slots["again"]


def test_seeded_sampling_does_not_depend_on_the_neighbours(model):
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=1234)
    alone = play(generator(model, "slots"), {0: [("s", [5, 6, 7], 12)]}, params=seeded)["s"]
    gen = generator(model, "slots")
    for i in range(3):
        gen.insert(AddRequest(f"g{i}", [9 + i, 6], 30, GREEDY, ignore_eos=True))
    gen.step()
    beside = play(gen, {0: [("s", [5, 6, 7], 12)]}, params=seeded)["s"]
    assert beside == alone
    reference = play(generator(model, "mlx-lm"), {0: [("s", [5, 6, 7], 12)]}, params=seeded)["s"]
    assert alone == reference


def test_logprobs_equal_mlx_lm_and_only_rows_that_asked_get_them(model):
    def run(kind):
        gen = generator(model, kind)
        gen.insert(AddRequest("plain", [5, 6, 7], 6, GREEDY, ignore_eos=True))
        uid, _ = gen.insert(AddRequest("lp", [8, 6, 7, 9], 6, GREEDY, ignore_eos=True, logprobs=3))
        got = {}
        while gen.busy:
            for t in gen.step():
                got.setdefault(t.uid, []).append(t.logprob)
        return got, uid

    (slots, uid), (reference, ref_uid) = run("slots"), run("mlx-lm")
    assert all(lp is None for k, lps in slots.items() if k != uid for lp in lps)
    assert len(slots[uid]) == len(reference[ref_uid]) == 6
    for mine, theirs in zip(slots[uid], reference[ref_uid]):
        assert abs(mine.logprob - theirs.logprob) < 1e-4
        assert [t for t, _ in mine.top] == [t for t, _ in theirs.top]


def test_a_long_row_joining_shorter_ones_widens_the_batch_and_stays_exact(model):
    long_prompt = [(i * 7) % 500 + 3 for i in range(200)]
    schedule = {0: [("short", [5, 6, 7], 30)], 3: [("long", long_prompt, 8)], 30: [("late", [9, 9], 5)]}
    slots = play(generator(model, "slots"), schedule)
    assert slots == play(generator(model, "mlx-lm"), schedule)
    assert slots["long"] == play(generator(model, "slots"), {0: [("long", long_prompt, 8)]})["long"]
    mx.clear_cache()


def test_warm_up_runs_a_long_prompt_and_every_batch_size_then_leaves_nothing_behind(model):
    gen = generator(model, "slots", prefix_cache_bytes=1 << 30)
    model.fed.clear()
    steps = gen.warm_up(100, 8, context=1024)
    assert steps > 0 and not gen.busy
    assert {1, 2, 4, 8} <= {rows for rows, positions in model.fed if positions == 1}
    assert sum(rows * positions for rows, positions in model.fed if rows == 1 and positions > 1) >= 99
    # the long prompt runs last: nothing warmed after it pushes its kernels out
    prefill = [(rows, positions) for rows, positions in model.fed if positions > 1]
    tail = len(prefill) - next(i for i, (rows, _) in enumerate(reversed(prefill)) if rows != 1)
    assert sum(positions for _, positions in prefill[tail:]) >= 99
    assert len(gen.prefix_cache) == 0 and gen.prefix_cache.stats.hits == 0 and gen.prefix_cache.stats.stored == 0
    schedule = arrivals(5, n=6)
    assert play(gen, schedule) == play(generator(model, "slots"), schedule)


def test_bucketed_prefill_pads_every_pass_to_the_bucket_and_stays_exact(model):
    """The GPU's bucketed prefill: every prompt pass is a multiple of the bucket long (rows x
    positions), prefix-cache hits are cut to a bucket boundary, and the output is unchanged."""
    prompt = [(i * 13) % 500 + 3 for i in range(150)]
    schedule = {0: [("a", prompt, 5), ("b", prompt[:37], 5)], 2: [("c", [4, 5, 6], 5)],
                20: [("again", prompt + [7, 8], 5)]}
    plain = play(generator(model, "slots", prefix_cache_bytes=1 << 30), schedule)
    gen = generator(model, "slots", prefix_cache_bytes=1 << 30, prefill_bucket=16, prefill_step_size=64)
    model.fed.clear()
    bucketed = play(gen, schedule)
    assert bucketed == plain
    prefill = [positions for _, positions in model.fed if positions > 1]
    assert prefill and all(n % 16 == 0 for n in prefill)
    assert gen.prefix_cache.stats.hits >= 1


def test_a_long_prompts_last_chunk_pads_to_a_whole_chunk(model):
    """Once a prompt's context holds a chunk, its last, partial chunk pads to a whole one: the
    (chunk, context) shapes are then those of the warm-up's long prompt. Output unchanged."""
    prompt = [(i * 17) % 500 + 3 for i in range(150)]  # 149 prefilled: 64 + 64 + 21
    plain = play(generator(model, "slots"), {0: [("long", prompt, 4)]})
    model.fed.clear()
    gen = generator(model, "slots", prefill_bucket=16, prefill_step_size=64)
    assert play(gen, {0: [("long", prompt, 4)]}) == plain
    assert [shape for shape in model.fed if shape[1] > 1] == [(1, 64)] * 3


def test_bucketed_warm_up_covers_every_prompt_batch_size_and_chunk(model):
    gen = generator(model, "slots", prefill_bucket=16, prefill_step_size=64, prefill_chunk=32)
    model.fed.clear()
    gen.warm_up(40, 4, context=1024)
    shapes = {(rows, positions) for rows, positions in model.fed if positions > 1}
    for rows in range(1, 5):  # prefill_batch_size 4; each size's share of 64 tokens, at most 32
        for length in range(16, min(32, max(16, 64 // rows)) + 1, 16):
            assert (rows, length) in shapes, (rows, length, sorted(shapes))


def test_a_lean_warm_up_leaves_prompt_batch_shapes_to_traffic_and_still_warms_the_rest(model):
    """WARMUP_SHAPES=lean: no prompt batch of 2+ prompts and no bucket length but the waves'
    own is prefilled; every decode batch size and the long prompt's chunks still run."""
    full = generator(model, "slots", prefill_bucket=16, prefill_step_size=64, prefill_chunk=32)
    model.fed.clear()
    full_steps = full.warm_up(40, 4, context=1024)
    full_shapes = {shape for shape in model.fed if shape[1] > 1}
    lean = generator(model, "slots", prefill_bucket=16, prefill_step_size=64, prefill_chunk=32)
    model.fed.clear()
    lean_steps = lean.warm_up(40, 4, context=1024, prompt_batches=False)
    lean_shapes = {shape for shape in model.fed if shape[1] > 1}
    decode = {rows for rows, positions in model.fed if positions == 1}
    assert lean_steps < full_steps and lean_shapes < full_shapes
    assert (3, 16) in full_shapes and (3, 16) not in lean_shapes  # a 3-prompt batch: left to traffic
    assert {1, 2, 4} <= decode  # every decode batch size up to the rows
    assert (1, 32) in lean_shapes  # the long prompt (40 tokens) in 32-token chunks
    assert not lean.busy and len(lean.prefix_cache) == 0


def test_rows_of_very_different_lengths_decode_in_separate_groups(model, monkeypatch):
    """A long row does not widen the short rows' cache: it decodes in a group of its own (one
    more forward pass per step while both have rows), and the output is unchanged."""
    import engine.batcher

    monkeypatch.setattr(engine.batcher, "_SHORT_ROWS", 64)
    long_prompt = [(i * 7) % 500 + 3 for i in range(300)]
    schedule = {0: [(f"s{i}", [5 + i, 6, 7], 30) for i in range(4)], 4: [("long", long_prompt, 8)]}
    gen = generator(model, "slots")
    model.fed.clear()
    out = play(gen, schedule)
    decode = [rows for rows, positions in model.fed if positions == 1]
    assert out == play(generator(model, "mlx-lm"), schedule)
    assert out["long"] == play(generator(model, "slots"), {0: [("long", long_prompt, 8)]})["long"]
    assert 1 in decode and 4 in decode and 5 not in decode  # never one batch of all five
    gen.step()  # the last step in flight is handed out: no group is left
    assert gen._batch._groups == {}
    assert engine.batcher.width_class(63) == 0 and engine.batcher.width_class(64) == 1
    assert engine.batcher.width_class(255) == 1 and engine.batcher.width_class(256) == 2


def test_logits_are_normalized_only_for_a_batch_that_needs_them(model):
    """Greedy rows that asked for no logprobs take the argmax of the raw logits: the step in
    flight carries no log-probabilities; one row that asks (or samples) brings them back."""
    gen = generator(model, "slots")
    gen.insert(AddRequest("g", [5, 6, 7], 30, GREEDY, ignore_eos=True))
    for _ in range(4):  # prefill, join, decode
        gen.step()
    group = gen._batch._groups[0]
    assert group._pending is not None and group._pending[1] is None
    gen.insert(AddRequest("lp", [8, 6, 7], 30, GREEDY, ignore_eos=True, logprobs=2))
    for _ in range(4):
        gen.step()
    assert len(group) == 2 and group._pending[1] is not None


def test_the_prompt_batch_filters_without_reading_back_and_as_mlx_lm_does(model):
    """Rows of different lengths (one resuming a prefix-cache state) prefill two chunks, then
    two are split off: the kept and the split rows' caches equal mlx-lm's own filter's, whose
    trim of the shared padding reads each layer's padding back from the device."""
    from mlx_lm.generate import PromptProcessingBatch
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from engine.prompt_batch import PromptBatch

    prompts = [[7] * 5, list(range(3, 43)), list(range(50, 67)), [9, 8, 7]]
    prefix = list(range(100, 112))

    def batch(kind):
        caches = [make_prompt_cache(model) for _ in prompts]
        model(mx.array([prefix]), cache=caches[2])  # row 2 resumes a 12-token prefix
        tokens = [[], [], list(prefix), []]
        return kind(model=model, uids=list(range(4)), caches=caches, tokens=tokens, prefill_step_size=64,
                    samplers=[greedy_sampler] * 4, fallback_sampler=greedy_sampler, logits_processors=[()] * 4,
                    stop_sequences=[None] * 4, max_tokens=[4] * 4)

    ours, theirs = batch(PromptBatch), batch(PromptProcessingBatch)
    for chunk in (slice(0, 16), slice(16, 32)):
        part = [p[chunk] or p[-1:] for p in prompts]  # every row advances (short ones repeat a token)
        ours.prompt(part)
        theirs.prompt(part)
    split_ours, split_theirs = ours.split([1, 3]), theirs.split([1, 3])
    for mine, reference in ((ours, theirs), (split_ours, split_theirs)):
        assert mine.uids == reference.uids and mine.tokens == reference.tokens
        for a, b in zip(mine.prompt_cache, reference.prompt_cache):
            assert a._idx == b._idx and a.keys.shape[2] >= a._idx
            assert a.offset.tolist() == b.offset.tolist() and a.left_padding.tolist() == b.left_padding.tolist()
            assert mx.array_equal(a.keys[..., :a._idx, :], b.keys[..., :b._idx, :]).item()
            assert mx.array_equal(a.values[..., :a._idx, :], b.values[..., :b._idx, :]).item()
    for row in range(len(ours.uids)):  # one row's state, as a follower's copy is made
        for a, b in zip(ours.extract_cache(row), theirs.extract_cache(row)):
            assert a.offset == b.offset and mx.array_equal(a.keys, b.keys).item()
            assert mx.array_equal(a.values, b.values).item()


def test_a_prompts_first_token_comes_from_its_last_prefill_pass(model, monkeypatch):
    """Where the model's forward pass is inner model then projection, a prompt is prefilled
    whole and its first token sampled from its last pass, so it is handed out one step sooner
    than when the prompt's last token waits for a decode step (mlx-lm's way, kept for other
    architectures). Tokens, seeded draws, logprobs and penalties are the same either way."""
    from engine import batcher

    def first_steps_and_output(plain_head: bool, params: SamplingParams, **kw):
        if not plain_head:
            monkeypatch.setattr(batcher, "output_head", lambda m: None)
        gen = generator(model, "slots")
        monkeypatch.undo()
        assert gen._batch.first_token_in_prefill is plain_head
        for i in range(3):
            gen.insert(AddRequest(f"d{i}", [9 + i, 6, 7], 30, GREEDY, ignore_eos=True))
        for _ in range(3):
            gen.step()
        uid, _ = gen.insert(AddRequest("new", [4, 8, 15, 16, 23, 42], 8, params, ignore_eos=True, **kw))
        first, out = None, []
        for step in range(40):
            for t in gen.step():
                if t.uid == uid:
                    first = step if first is None else first
                    out.append((t.token, None if t.logprob is None else t.logprob.logprob))
        return first, out

    for params, kw in ((GREEDY, {}), (SamplingParams(temperature=0.8, seed=7, repetition_penalty=1.3), {}),
                       (GREEDY, {"logprobs": 2})):
        sooner, tokens = first_steps_and_output(True, params, **kw)
        later, reference = first_steps_and_output(False, params, **kw)
        assert (sooner, later) == (1, 2)  # prefill pass, then handed out with the next step
        assert [t for t, _ in tokens] == [t for t, _ in reference] and len(tokens) == 8
        for (_, mine), (_, theirs) in zip(tokens, reference):  # a prefill pass's kernels, not a decode step's
            assert (mine is None and theirs is None) or abs(mine - theirs) < 1e-3


def test_a_first_token_that_ends_the_row_frees_its_slot(model):
    """max_tokens 1: the row ends with the token its prefill pass sampled."""
    gen = generator(model, "slots")
    uid, _ = gen.insert(AddRequest("one", [5, 6, 7, 8], 1, GREEDY, ignore_eos=True))
    got = [t for _ in range(4) for t in gen.step()]
    assert [(t.uid, t.finish_reason) for t in got] == [(uid, "length")]
    assert got[0].token == play(generator(model, "mlx-lm"), {0: [("one", [5, 6, 7, 8], 1)]})["one"][0]
    assert not gen.busy


def test_on_an_idle_engine_a_first_token_comes_back_in_its_prefill_step(model):
    """Nobody decodes, so nobody waits on a read-back: the first token is read at the end of the
    prompt's last prefill step. Beside decoding rows it comes with the next step instead."""
    gen = generator(model, "slots")
    uid, _ = gen.insert(AddRequest("alone", [5, 6, 7, 8, 9], 3, GREEDY, ignore_eos=True))
    steps = [[t.token for t in gen.step() if t.uid == uid] for _ in range(4)]
    assert [len(s) for s in steps] == [1, 1, 1, 0]
    assert sum(steps, []) == play(generator(model, "mlx-lm"), {0: [("alone", [5, 6, 7, 8, 9], 3)]})["alone"]


def test_warm_up_decodes_in_every_width_class_a_long_request_can_land_in(model, monkeypatch):
    """Its long prompt fills one width class; each narrower class gets a row of its own, so a
    long request shorter than the warm-up's does not decode in a group nothing has run yet."""
    from engine import batcher

    monkeypatch.setattr(batcher, "_SHORT_ROWS", 32)  # classes: under 32, 32-127, 128-511
    gen = generator(model, "slots")
    seen: set[int] = set()
    join = gen._batch._join_prefilled

    def spy():
        join()
        seen.update(width for width, group in gen._batch._groups.items() if len(group))

    gen._batch._join_prefilled = spy
    assert batcher.narrower_class_floors(301) == [32]
    gen.warm_up(300, 4, context=1024)
    assert seen == {0, 1, 2} and not gen.busy


def test_the_warm_up_keeps_mlx_buffer_cache_capped_and_restores_the_limit(model, monkeypatch):
    """Each warmed shape frees buffers of its own sizes: uncapped, the cache grew to ~70 GB on an
    H100 before the host set its limits. On the CPU (and a Mac's unified memory) that is the
    machine's own memory, so the warm-up caps it there."""
    import engine.generator

    cap = 1 << 20
    monkeypatch.setattr(engine.generator, "CACHE_CAP", cap)
    before = mx.set_cache_limit(1 << 40)
    try:
        gen = generator(model, "slots")
        seen = []
        step = gen.step

        def spy():
            out = step()
            seen.append(mx.get_cache_memory())
            return out

        gen.step = spy
        gen.warm_up(200, 8, context=1024)
        assert seen and max(seen) <= cap
        assert mx.set_cache_limit(1 << 40) == 1 << 40  # the limit it found is back
    finally:
        mx.set_cache_limit(before)
        mx.clear_cache()
