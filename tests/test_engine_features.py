"""Engine features the API issues need, in-process on the tiny random Qwen2: logprobs against a
direct computation, grammar rows mixed with plain / seeded / logprob rows in one batch, and the
shared prefill of identical prompts (`n` choices)."""
from __future__ import annotations

import json

import gevent
import mlx.core as mx
import pytest

from engine.messages import AddRequest, TokenDelta
from engine.sampling import SamplingParams
from tests.engine_harness import encoded_prompts, run, run_detailed, running_engine

GREEDY = SamplingParams(temperature=0.0)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}}, "required": ["n", "ok"],
          "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with running_engine(MODEL=tiny_model_dir, MAX_CONCURRENT_REQUESTS=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def prompts(engine):
    return encoded_prompts(engine)


def _direct_logprobs(engine, prompt: list[int], generated: list[int]) -> mx.array:
    """log-softmax of the model's logits at each generated position, by one plain forward pass.
    Runs on this thread while the engine idles: the test's only MLX call besides the engine's."""
    tokens = mx.array(prompt + generated)[None]
    logits = engine.model.model(tokens)[0, len(prompt) - 1: len(prompt) - 1 + len(generated)]
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def test_logprobs_equal_a_direct_forward_pass(engine, prompts):
    tokens, logprobs, _ = run_detailed(engine, prompts[1], 8, sampling=GREEDY, ignore_eos=True, logprobs=5)
    direct = _direct_logprobs(engine, prompts[1], tokens)
    mx.eval(direct)
    for step, (token, entry) in enumerate(zip(tokens, logprobs)):
        row = direct[step]
        assert abs(entry.logprob - row[token].item()) < 1e-4
        expected_top = sorted(range(row.shape[0]), key=lambda i: -row[i].item())[:5]
        assert [i for i, _ in entry.top] == expected_top
        assert all(abs(v - row[i].item()) < 1e-4 for i, v in entry.top)
        assert entry.top[0][0] == token  # greedy picks the most likely token
        assert [v for _, v in entry.top] == sorted((v for _, v in entry.top), reverse=True)


def test_logprobs_zero_alternatives_gives_only_the_sampled_token(engine, prompts):
    tokens, logprobs, _ = run_detailed(engine, prompts[2], 4, sampling=GREEDY, ignore_eos=True, logprobs=0)
    assert len(logprobs) == len(tokens) == 4 and all(e.top == () and e.logprob <= 0 for e in logprobs)


def _grammar():
    from app.generation.grammars import json_schema_grammar

    return json_schema_grammar(SCHEMA, True)


def _text(engine, tokens):
    return engine.model.tokenizer.decode(tokens)


def test_a_mixed_batch_never_kills_the_engine_and_plain_rows_are_unchanged(engine, prompts):
    """Grammar rows, logprob rows, seeded rows and plain rows in one batch (mlx-lm #1472 killed
    mlx_lm.server's generation thread on exactly this mix)."""
    plain_alone = [run(engine, p, 10, sampling=GREEDY, ignore_eos=True)[0] for p in prompts[:3]]
    seeded = SamplingParams(temperature=1.0, seed=77)
    seeded_alone = run(engine, prompts[3], 10, sampling=seeded, ignore_eos=True)[0]
    jobs = [gevent.spawn(run, engine, p, 10, sampling=GREEDY, ignore_eos=True) for p in prompts[:3]]
    jobs.append(gevent.spawn(run, engine, prompts[3], 10, sampling=seeded, ignore_eos=True))
    jobs += [gevent.spawn(run_detailed, engine, p, 40, sampling=SamplingParams(temperature=1.0, seed=i),
                          grammar=_grammar()) for i, p in enumerate(prompts[4:6])]
    jobs += [gevent.spawn(run_detailed, engine, p, 6, sampling=GREEDY, ignore_eos=True, logprobs=2)
             for p in prompts[6:8]]
    gevent.joinall(jobs, raise_error=True)
    assert [j.value[0] for j in jobs[:3]] == plain_alone
    assert jobs[3].value[0] == seeded_alone
    for job in jobs[4:6]:
        tokens, _, finished = job.value
        assert finished.finish_reason == "stop", finished
        answer = json.loads(_text(engine, tokens))
        assert set(answer) == {"n", "ok"} and 0 <= answer["n"] <= 99 and isinstance(answer["ok"], bool)
    assert all(len(j.value[1]) == 6 for j in jobs[6:8])
    assert (engine.running, engine.waiting) == (0, 0)
    assert run(engine, prompts[0], 10, sampling=GREEDY, ignore_eos=True)[0] == plain_alone[0]  # still serving


def test_grammar_output_is_valid_at_temperature_one_every_time(engine, prompts):
    results = [gevent.spawn(run, engine, prompts[i % 8], 40, sampling=SamplingParams(temperature=1.0),
                            grammar=_grammar()) for i in range(8)]
    gevent.joinall(results, raise_error=True)
    for job in results:
        tokens, finished = job.value
        assert finished.finish_reason == "stop"
        assert set(json.loads(_text(engine, tokens))) == {"n", "ok"}


def _collect(stream) -> list[int]:
    tokens: list[int] = []
    while stream.finished is None:
        for message in stream.next_batch(timeout=60):
            if isinstance(message, TokenDelta):
                tokens.extend(message.token_ids)
    return tokens


def test_identical_prompts_share_one_prefill_and_match_solo_output(engine, prompts):
    prompt = prompts[4] * 3  # long enough to matter, short enough for the tiny model
    alone = run(engine, prompt, 8, sampling=GREEDY, ignore_eos=True)[0]
    saved = engine._generator.prefill_tokens_saved
    streams = engine.submit_group([AddRequest(f"same-{i}", prompt, 8, GREEDY, ignore_eos=True) for i in range(4)])
    together = [_collect(stream) for stream in streams]
    assert together == [alone] * 4
    assert engine._generator.prefill_tokens_saved - saved == 3 * (len(prompt) - 1)
    seeded = [gevent.spawn(run, engine, prompt, 8, sampling=SamplingParams(temperature=1.0, seed=s),
                           ignore_eos=True) for s in (1, 2)]
    gevent.joinall(seeded, raise_error=True)
    assert seeded[0].value[0] == run(engine, prompt, 8, sampling=SamplingParams(temperature=1.0, seed=1),
                                     ignore_eos=True)[0]


def test_a_bad_grammar_fails_its_request_alone(engine, prompts):
    jobs = [gevent.spawn(run, engine, prompts[0], 5, sampling=GREEDY, ignore_eos=True),
            gevent.spawn(run, engine, prompts[1], 5, sampling=GREEDY, grammar="{not a grammar")]
    gevent.joinall(jobs, raise_error=True)
    assert jobs[0].value[1].finish_reason == "length"
    assert jobs[1].value[1].finish_reason == "error"


def _messages(stream) -> list:
    out = []
    while stream.finished is None:
        out += stream.next_batch(timeout=60)
    return out


def test_prompt_logprobs_are_computed_in_chunks_and_equal_a_direct_forward_pass(engine, prompts):
    from engine.messages import PromptLogprobs
    from engine.prompt_scorer import CHUNK

    prompt = (prompts[4] * 60)[:CHUNK * 2 + 37]  # three chunks
    neighbour = engine.submit(AddRequest("beside-scoring", prompts[0], 30, GREEDY, ignore_eos=True))
    messages = _messages(engine.submit(AddRequest("score-only", prompt, 0, GREEDY, prompt_logprobs=3)))
    (scored,) = [m for m in messages if isinstance(m, PromptLogprobs)]
    assert messages[-1].finish_reason == "length" and messages[-1].completion_tokens == 0
    entries = scored.entries
    assert entries[0] is None and len(entries) == len(prompt)
    direct = _direct_logprobs(engine, prompt[:1], prompt[1:])
    mx.eval(direct)
    for i in range(1, len(prompt)):
        row = direct[i - 1]
        assert abs(entries[i].logprob - row[prompt[i]].item()) < 1e-4
        assert [t for t, _ in entries[i].top] == sorted(range(row.shape[0]), key=lambda t: -row[t].item())[:3]
    assert _collect(neighbour) == run(engine, prompts[0], 30, sampling=GREEDY, ignore_eos=True)[0]


def test_a_scored_prompt_then_generates_as_it_would_without_scoring(engine, prompts):
    plain = run(engine, prompts[5], 6, sampling=GREEDY, ignore_eos=True)[0]
    messages = _messages(engine.submit(AddRequest("score-then-go", prompts[5], 6, GREEDY, ignore_eos=True,
                                                  prompt_logprobs=0)))
    tokens = [t for m in messages if isinstance(m, TokenDelta) for t in m.token_ids]
    assert tokens == plain


def test_a_grammar_row_ends_at_its_grammar_even_with_ignore_eos(engine, prompts):
    """ignore_eos would make a finished grammar's row sample past its end; the engine ends it."""
    jobs = [gevent.spawn(run, engine, prompts[0], 12, sampling=GREEDY, ignore_eos=True),
            gevent.spawn(run, engine, prompts[1], 60, sampling=SamplingParams(temperature=1.0, seed=3),
                         grammar=_grammar(), ignore_eos=True)]
    gevent.joinall(jobs, raise_error=True)
    plain, constrained = jobs[0].value, jobs[1].value
    assert plain[1].finish_reason == "length" and len(plain[0]) == 12
    assert constrained[1].finish_reason == "stop"
    assert set(json.loads(_text(engine, constrained[0]))) == {"n", "ok"}
