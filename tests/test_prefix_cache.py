"""The prefix cache: the data structure alone, then inside the engine on a tiny random Qwen2."""
from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from engine.prefix_cache import BLOCK, PrefixCache, block_hashes
from engine.sampling import SamplingParams
from tests.engine_harness import run, run_many, running_engine

GREEDY = SamplingParams(temperature=0.0)


def layers_for(tokens, n_layers=2):
    """Per-layer caches whose key at position i holds token i, so trims are checkable."""
    out = []
    for _ in range(n_layers):
        cache = KVCache()
        data = mx.array(tokens, dtype=mx.float32).reshape(1, 1, len(tokens), 1)
        cache.keys, cache.values, cache.offset = data, data, len(tokens)
        out.append(cache)
    return out


def store(cache, tokens, nbytes=100):
    cache.store(tokens, layers_for(tokens), nbytes)


def test_a_shared_prefix_hits_and_leaves_at_least_one_token_to_compute():
    cache = PrefixCache(capacity=10_000)
    first = list(range(40))
    store(cache, first)
    layers, cached = cache.lookup(first)  # the same prompt: all but its last token
    assert cached == 39 and [c.offset for c in layers] == [39, 39]
    assert layers[0].keys_and_values()[0].reshape(-1).tolist() == list(range(39))
    layers, cached = cache.lookup(list(range(35)) + [999, 998])  # diverges at 35
    assert cached == 35
    assert cache.stats.hits == 2 and cache.stats.hit_tokens == 74


def test_short_or_unrelated_prompts_miss():
    cache = PrefixCache(capacity=10_000)
    store(cache, list(range(40)))
    assert cache.lookup(list(range(BLOCK - 1)) + [5000]) == (None, 0)  # shares less than a block
    assert cache.lookup([7] * 40) == (None, 0)
    assert cache.stats.misses == 2


def test_a_longer_sequence_replaces_its_prefixes_and_identical_ones():
    cache = PrefixCache(capacity=10_000)
    turn1 = list(range(40))
    store(cache, turn1)
    store(cache, turn1)  # identical: replaced, not doubled
    assert len(cache) == 1 and cache.nbytes == 100
    store(cache, turn1 + list(range(100, 120)))  # the next chat turn extends it
    assert len(cache) == 1
    layers, cached = cache.lookup(turn1 + [5])
    assert cached == 40 and layers[0].offset == 40
    store(cache, list(range(20)) + [77] * 30)  # a sibling that only shares a prefix: both stay
    assert len(cache) == 2 and cache.nbytes == 200


def test_bytes_stay_bounded_and_the_least_recently_used_goes_first():
    cache = PrefixCache(capacity=250)
    a, b, c = ([i] * 32 for i in (1, 2, 3))
    store(cache, a)
    store(cache, b)
    cache.lookup(a)  # a is now more recent than b
    store(cache, c)  # 300 > 250: evict b
    assert cache.lookup(b) == (None, 0)
    assert cache.lookup(a)[1] == 31 and cache.lookup(c)[1] == 31
    cache.trim_to(100)  # the engine lowers the limit when running rows need the memory
    assert len(cache) == 1 and cache.nbytes == 100 and cache.stats.evicted == 2
    store(cache, [4] * 32, nbytes=1000)  # larger than the whole cache: not kept
    assert len(cache) == 1


def test_zero_capacity_keeps_nothing():
    cache = PrefixCache(capacity=0)
    store(cache, list(range(40)))
    assert len(cache) == 0 and cache.lookup(list(range(40))) == (None, 0)


def test_block_hashes_are_chained_and_deterministic():
    tokens = list(range(50))
    hashes = block_hashes(tokens)
    assert len(hashes) == 50 // BLOCK
    assert hashes == block_hashes(tokens[:48] + [1, 2])  # only whole blocks count
    assert block_hashes([0] + tokens[1:])[0] == hashes[0]
    assert block_hashes([1] + tokens[1:])[1] != hashes[1]  # a change early changes every later hash


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with running_engine(MODEL=tiny_model_dir, MAX_CONCURRENT_REQUESTS=8) as engine:
        yield engine


def test_engine_reuses_a_prompt_and_output_is_unchanged(engine):
    system = list(range(100, 140))  # a shared 40-token "system prompt"
    prompts = [system + [200 + i, 300 + i, 400 + i] for i in range(4)]
    first = run(engine, prompts[0], 8, sampling=GREEDY, ignore_eos=True)
    assert first[1].cached_tokens == 0
    again = run(engine, prompts[0], 8, sampling=GREEDY, ignore_eos=True)
    assert again[0] == first[0]
    assert again[1].cached_tokens == len(prompts[0]) - 1 and again[1].prompt_tokens == len(prompts[0])
    # Siblings share the system prompt; hits and misses mix in one batch and match a cold run.
    unrelated = list(range(450, 480))  # every id stays inside the tiny vocabulary (512)
    together = run_many(engine, prompts[1:] + [unrelated], 8, sampling=GREEDY, ignore_eos=True)
    assert all(f.cached_tokens >= 32 for _, f in together[:3]) and together[3][1].cached_tokens == 0
    cold = []
    for prompt in prompts[1:]:
        engine._generator.prefix_cache.clear()  # the engine is idle between runs
        cold.append(run(engine, prompt, 8, sampling=GREEDY, ignore_eos=True))
    assert [t for t, _ in cold] == [t for t, _ in together[:3]]
    assert all(f.cached_tokens == 0 for _, f in cold)
    snapshot = engine.prefix_cache()
    assert snapshot["enabled"] and snapshot["entries"] >= 1 and snapshot["hits"] >= 4
    assert engine.stats.cached_prompt_tokens >= len(prompts[0]) - 1 + 3 * 32


def test_engine_keeps_the_prefix_cache_inside_the_kv_budget(tiny_model_dir):
    with running_engine(MODEL=tiny_model_dir, KV_CACHE_BUDGET="128KiB") as engine:
        for i in range(12):
            run(engine, [i] * 40 + list(range(60)), 8, sampling=GREEDY, ignore_eos=True)
        snapshot = engine.prefix_cache()
        assert 0 < snapshot["bytes"] <= 128 << 10 and snapshot["evicted"] > 0  # 27 KiB an entry


def test_prefix_cache_off(tiny_model_dir):
    with running_engine(MODEL=tiny_model_dir, PREFIX_CACHE_BYTES=0) as engine:
        prompt = list(range(100, 150))
        runs = [run(engine, prompt, 6, sampling=GREEDY, ignore_eos=True) for _ in range(2)]
        assert runs[0][0] == runs[1][0] and runs[1][1].cached_tokens == 0
        assert engine.prefix_cache() == {"enabled": False, "entries": 0, "bytes": 0, "hits": 0, "misses": 2,
                                         "hit_tokens": 0, "evicted": 0}


def test_unit_scopes_never_share():
    cache = PrefixCache(capacity=10_000)
    tokens = list(range(40))
    cache.store(tokens, layers_for(tokens), 100, scope="key-a")
    assert cache.lookup(tokens, scope="key-b") == (None, 0)
    assert cache.lookup(tokens) == (None, 0)
    assert cache.lookup(tokens, scope="key-a")[1] == 39


def test_api_keys_each_get_their_own_prefix_cache(tiny_server_factory):
    """With API keys on, a tenant's cached prompts (visible in usage.cached_tokens and TTFT)
    never serve another tenant, so neither can probe what the other asked."""
    server = tiny_server_factory(API_KEYS="tenant-a,tenant-b")
    messages = [{"role": "user", "content": "The capital of France is Paris. " * 6}]

    def cached(key: str) -> tuple[int, int]:
        reply = server.client(api_key=key).chat.completions.create(model="tiny", messages=messages,
                                                                   max_tokens=3, temperature=0)
        return reply.usage.prompt_tokens_details.cached_tokens, reply.usage.prompt_tokens

    assert cached("tenant-a")[0] == 0
    hit, prompt_tokens = cached("tenant-a")
    assert prompt_tokens > 32 and hit == prompt_tokens - 1
    assert cached("tenant-b")[0] == 0  # the same prompt, another key: computed afresh
    assert cached("tenant-b")[0] == prompt_tokens - 1


def test_an_aborted_sequence_leaves_its_state_for_the_next_prompt(engine):
    """A stop string or a departed client ends a request by abort, not by the model: what it
    computed (prompt and answer so far) still seeds the prefix cache."""
    from engine.messages import AddRequest, TokenDelta

    prompt = list(range(250, 300))  # ids inside the tiny vocabulary (512)
    stream = engine.submit(AddRequest("aborted-1", prompt, 200, sampling=GREEDY, ignore_eos=True))
    generated = []
    while len(generated) < 20:
        for message in stream.next_batch(timeout=60):
            if isinstance(message, TokenDelta):
                generated.extend(message.token_ids)
    engine.abort("aborted-1")
    while stream.finished is None:
        stream.next_batch(timeout=60)
    assert stream.finished.finish_reason == "abort"
    # The next turn repeats the prompt and the part of the answer it saw, then goes on.
    follow_up = prompt + generated[:16] + [480, 481, 482]
    tokens, finished = run(engine, follow_up, 4, sampling=GREEDY, ignore_eos=True)
    assert finished.cached_tokens == len(prompt) + 16
    engine._generator.prefix_cache.clear()  # the engine is idle: the same prompt computed afresh
    cold, cold_finished = run(engine, follow_up, 4, sampling=GREEDY, ignore_eos=True)
    assert cold_finished.cached_tokens == 0 and tokens == cold

