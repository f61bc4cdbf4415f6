"""/v1/completions through a real Gunicorn server on the tiny random Qwen2 and the openai client:
text and token prompts, several prompts x n, echo, prompt logprobs (checked against a direct
forward pass in this process), stop, seeds; every behaviour streamed and not."""
from __future__ import annotations

import math

import openai
import pytest

MODEL = "tiny"
BOTH = [False, True]


@pytest.fixture(scope="module")
def server(tiny_server_factory):
    return tiny_server_factory()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def direct(tiny_model_dir):
    """The same weights loaded in this process, for a plain forward pass."""
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model_dir))
    return model, tokenizer


def complete(client, stream: bool, **kwargs) -> dict:
    """The text_completion body, from a plain call or a folded stream."""
    if not stream:
        return client.completions.create(model=MODEL, **kwargs).model_dump()
    chunks = [c.model_dump() for c in client.completions.create(model=MODEL, stream=True,
                                                                stream_options={"include_usage": True}, **kwargs)]
    assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["choices"] == []
    choices: dict[int, dict] = {}
    for chunk in chunks[:-1]:
        for c in chunk["choices"]:
            state = choices.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
            assert state["finish_reason"] is None, "nothing follows a choice's finish_reason"
            state["text"] += c["text"]
            state["finish_reason"] = c["finish_reason"]
            if c["logprobs"]:
                lp = state["logprobs"] = state["logprobs"] or {k: [] for k in c["logprobs"]}
                for key, values in c["logprobs"].items():
                    lp[key] += values
    return {"choices": [dict(index=i, **choices[i]) for i in sorted(choices)], "usage": chunks[-1]["usage"]}


@pytest.mark.parametrize("stream", BOTH)
def test_a_text_prompt_and_its_token_ids_give_the_same_answer(client, direct, stream):
    by_text = complete(client, stream, prompt="The capital of France is", max_tokens=6, temperature=0,
                       extra_body={"ignore_eos": True})
    ids = direct[1].encode("The capital of France is")
    by_ids = complete(client, not stream, prompt=ids, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    assert by_text["choices"][0]["text"] == by_ids["choices"][0]["text"] != ""
    assert by_text["usage"]["prompt_tokens"] == len(ids) and by_text["usage"]["completion_tokens"] == 6
    assert by_text["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", BOTH)
def test_several_prompts_times_n_come_back_in_order(client, stream):
    reply = complete(client, stream, prompt=["One two", "Three four five"], n=2, max_tokens=4, temperature=0,
                     extra_body={"ignore_eos": True})
    texts = [c["text"] for c in reply["choices"]]
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2, 3]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: a prompt's choices agree
    for prompt, text in (("One two", texts[0]), ("Three four five", texts[2])):
        alone = complete(client, False, prompt=prompt, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
        assert alone["choices"][0]["text"] == text


@pytest.mark.parametrize("stream", BOTH)
def test_echo_with_logprobs_scores_the_prompt_like_a_direct_forward_pass(client, direct, stream):
    import mlx.core as mx

    model, tokenizer = direct
    prompt = "Orchard scores every prompt token"
    ids = tokenizer.encode(prompt)
    reply = complete(client, stream, prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    choice = reply["choices"][0]
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and "".join(lp["tokens"]) == prompt
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    expected = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    for i in range(1, len(ids)):
        assert math.isclose(lp["token_logprobs"][i], expected[i - 1, ids[i]].item(), abs_tol=1e-4)
        # the legacy shape keys alternatives by their text, so tokens with the same text share a key
        best = sorted(expected[i - 1].tolist(), reverse=True)[:3]
        assert 1 <= len(lp["top_logprobs"][i]) <= 3
        assert all(any(abs(v - b) < 1e-4 for b in best) for v in lp["top_logprobs"][i].values())


@pytest.mark.parametrize("stream", BOTH)
def test_echo_then_generate_puts_the_prompt_first(client, stream):
    plain = complete(client, False, prompt="Hello there", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    echoed = complete(client, stream, prompt="Hello there", max_tokens=5, temperature=0, echo=True, logprobs=1,
                      extra_body={"ignore_eos": True})
    choice = echoed["choices"][0]
    assert choice["text"] == "Hello there" + plain["choices"][0]["text"]
    assert len(choice["logprobs"]["token_logprobs"]) == echoed["usage"]["prompt_tokens"] + 5


@pytest.mark.parametrize("stream", BOTH)
def test_seeded_sampling_repeats_and_stop_ends_the_text(client, stream):
    kwargs = dict(prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=42, extra_body={"ignore_eos": True})
    first, again = complete(client, stream, **kwargs), complete(client, not stream, **kwargs)
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    text = first["choices"][0]["text"]
    if len(text) > 3:
        stop = text[2:4]
        cut = complete(client, stream, stop=[stop], **kwargs)
        assert cut["choices"][0]["text"] == text[:text.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("kwargs, param", [
    (dict(prompt="x", suffix="y"), "suffix"),
    (dict(prompt="x", best_of=3), None),
    (dict(prompt="x", max_tokens=0), None),
    (dict(prompt=[10**6]), "prompt"),
    (dict(prompt="x", logprobs=6), "logprobs"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="x", max_tokens=2000), "prompt"),
])
def test_bad_completions_get_the_openai_envelope(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, **kwargs)
    if param:
        assert (info.value.body["param"] or "").startswith(param)
