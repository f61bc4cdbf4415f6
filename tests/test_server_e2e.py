"""The real thing: Gunicorn (gevent worker) on the embedded model, driven by the openai client."""
from __future__ import annotations

import concurrent.futures as cf
import time

import openai
import pytest
import requests

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_models_list_names_the_embedded_model(client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]


def test_capital_of_france_mentions_paris(client):
    reply = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                           temperature=0, max_tokens=24)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 24 and reply.usage.prompt_tokens > 5


def test_streaming_with_usage_equals_the_plain_answer(client):
    plain = client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                           temperature=0, max_tokens=16)
    chunks = list(client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                                 temperature=0, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_bad_input_raises_the_right_openai_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=-5)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, n=9)
    assert info.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=9000)
    assert info.value.status_code == 400


def test_eight_concurrent_requests_are_batched_and_equal_their_solo_answers(server, client):
    questions = ["What is the capital of France?", "Name a fruit.", "What is 2+2?", "Say hello.",
                 "What color is the sky?", "Name a planet.", "What is water made of?", "Who wrote Hamlet?"]

    def ask(q):
        reply = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=12,
                                               messages=[{"role": "user", "content": q}])
        return reply.choices[0].message.content

    solo = [ask(q) for q in questions]
    before = requests.get(server.base_url + "/v1/system/status").json()["batch"]["max_seen"]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    status = requests.get(server.base_url + "/v1/system/status").json()
    assert together == solo
    assert status["batch"]["max_seen"] >= 8, (before, status["batch"])


def test_health_answers_fast_while_eight_streams_run(server, client):
    def stream_one(i):
        stream = client.chat.completions.create(model="smollm2-135m-instruct", max_tokens=40, stream=True,
                                                temperature=0.7, seed=i, extra_body={"ignore_eos": True},
                                                messages=[{"role": "user", "content": f"Tell a story {i}"}])
        return sum(1 for _ in stream)

    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(stream_one, i) for i in range(8)]
        time.sleep(1.0)
        latencies = []
        while not all(f.done() for f in futures) and len(latencies) < 20:
            start = time.perf_counter()
            assert requests.get(server.base_url + "/health", timeout=5).status_code == 200
            latencies.append(time.perf_counter() - start)
            time.sleep(0.1)
        assert all(f.result() > 1 for f in futures)
    assert latencies and max(latencies) < 0.1, latencies


def test_a_reply_cut_by_a_stop_string_still_seeds_the_prefix_cache(server, client):
    """A stop string ends the request in the web layer (the engine is told to abort); what the
    engine computed still serves the conversation's next turn."""
    messages = [{"role": "system", "content": "Orchard stop-string prefix test: answer in words."},
                {"role": "user", "content": "Name three colours."}]
    first = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, temperature=0,
                                           max_tokens=200, stop=[" "], extra_body={"ignore_eos": True})
    assert first.choices[0].finish_reason == "stop" and first.usage.completion_tokens < 200
    follow_up = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "And one more?"}]
    second = client.chat.completions.create(model="smollm2-135m-instruct", messages=follow_up,
                                            temperature=0, max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens


def test_a_repeated_conversation_is_served_from_the_prefix_cache(server, client):
    messages = [{"role": "system", "content": "You are the terse assistant of the Orchard prefix cache test."},
                {"role": "user", "content": "Name one fruit."}]
    first, second = (client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                                    temperature=0, max_tokens=8) for _ in range(2))
    assert second.choices[0].message.content == first.choices[0].message.content
    assert first.usage.prompt_tokens_details.cached_tokens < 16  # at most the template's opening
    assert second.usage.prompt_tokens_details.cached_tokens == second.usage.prompt_tokens - 1
    # The next turn extends the first: the earlier turn (and the reply) come from the cache.
    follow_up = messages + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "And a vegetable?"}]
    third = client.chat.completions.create(model="smollm2-135m-instruct", messages=follow_up,
                                           temperature=0, max_tokens=4)
    assert third.usage.prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens - 1
    status = requests.get(server.base_url + "/v1/system/status", timeout=5).json()
    assert status["prefix_cache"]["hits"] >= 2 and status["prefix_cache"]["bytes"] > 0
    assert status["tokens"]["prompt_cached"] >= second.usage.prompt_tokens_details.cached_tokens
    metrics = requests.get(server.base_url + "/metrics", timeout=5).text
    cached_total = next(float(line.split()[1]) for line in metrics.splitlines()
                        if line.startswith("orchard:prompt_tokens_cached_total "))
    assert cached_total >= second.usage.prompt_tokens_details.cached_tokens + \
        third.usage.prompt_tokens_details.cached_tokens
