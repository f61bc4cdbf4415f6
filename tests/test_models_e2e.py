"""Several models in one real server, from an operator's models file (issue 13): the embedded
SmolLM2 (pinned, with aliases), a tiny random Qwen2 loaded on demand, a second SmolLM2 that
unloads when idle, an embedding model, and a remote entry whose upstream is a second Orchard on
loopback; an alias that tries the tiny model first and the remote one when it is full.

Everything through the official openai client, streamed and not."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import time

import numpy as np
import openai
import pytest
import requests

from tests.conftest import assert_never_blocked
from tests.server import ServerProcess

BOTH = [False, True]
UPSTREAM_KEY = "sk-upstream-secret-7d1c"


@pytest.fixture(scope="module")
def upstream(orchard_home, tmp_path_factory):
    """The 'remote' model: a second Orchard with its own key."""
    log = tmp_path_factory.mktemp("upstream") / "server.log"
    server = ServerProcess({"MODEL": "embedded", "MODEL_ID": "big-model", "ORCHARD_HOME": orchard_home,
                            "API_KEYS": UPSTREAM_KEY}, log).start()
    yield server
    server.stop()


def write_models_file(path, entries: list[str], aliases: str = "") -> str:
    path.write_text("models:\n" + "".join(f"  - {e}\n" for e in entries) + aliases)
    return str(path)


@pytest.fixture(scope="module")
def server(orchard_home, tiny_model_dir, upstream, tmp_path_factory):
    folder = tmp_path_factory.mktemp("models-file")
    models = write_models_file(folder / "models.yaml", [
        '{id: smol, source: embedded, aliases: [default, "gpt-*"], pinned: true}',
        f'{{id: tiny, source: "{tiny_model_dir}", max_concurrent: 1}}',
        '{id: smol-idle, source: embedded, idle_unload_s: 2}',
        f'{{id: embed, source: "{tiny_model_dir}", kind: embedding, pooling: mean}}',
        f'{{id: big, remote: {{base_url: "{upstream.base_url}/v1", api_key_env: UPSTREAM_KEY, model: big-model}}}}',
    ], "aliases:\n  smart: [tiny, big]\n")
    log = folder / "server.log"
    server = ServerProcess({"MODELS_FILE": models, "ORCHARD_HOME": orchard_home, "UPSTREAM_KEY": UPSTREAM_KEY,
                            "REQUEST_QUEUE_SIZE": "0"}, log).start()
    yield server
    assert_never_blocked(server)
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, model: str, stream: bool, **kwargs) -> tuple[str, str]:
    """(text, model field) of one chat completion, plain or folded from its stream."""
    args = dict(model=model, messages=[{"role": "user", "content": "Say hi"}], max_tokens=6, temperature=0)
    args.update(kwargs)
    if not stream:
        answer = client.chat.completions.create(**args)
        return answer.choices[0].message.content, answer.model
    chunks = list(client.chat.completions.create(stream=True, **args))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[0].model


def listing(server) -> dict:
    return {m["id"]: m for m in requests.get(server.base_url + "/v1/models", timeout=10).json()["data"]}


def wait_for_state(server, model: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while (row := listing(server)[model])["state"] != state and time.monotonic() < deadline:
        time.sleep(0.2)
    return row


def test_models_lists_every_configured_model_with_its_state_and_size(server):
    models = listing(server)
    assert set(models) == {"smol", "tiny", "smol-idle", "embed", "big"}
    assert models["smol"]["state"] == "loaded" and models["smol"]["size_bytes"] > 100 << 20
    assert models["smol"]["aliases"] == ["default", "gpt-*"] and models["smol"]["pinned"] is True
    assert models["embed"]["kind"] == "embedding"
    assert models["big"]["state"] == "remote"
    assert UPSTREAM_KEY not in requests.get(server.base_url + "/v1/models", timeout=10).text
    status = requests.get(server.base_url + "/v1/system/status", timeout=10).text
    assert UPSTREAM_KEY not in status and '"big"' in status


@pytest.mark.parametrize("stream", BOTH)
def test_chat_by_id_and_by_alias_reaches_the_same_model(client, stream):
    by_id, model = chat(client, "smol", stream)
    assert model == "smol" and by_id
    assert chat(client, "default", stream) == (by_id, "smol")  # greedy: the same words
    assert chat(client, "gpt-4o-mini", stream) == (by_id, "smol")  # a glob alias


@pytest.mark.parametrize("stream", BOTH)
@pytest.mark.parametrize("name", ["nope", "/etc/passwd", "../smol", "embedded", "HuggingFaceTB/SmolLM2-135M"])
def test_unknown_and_path_like_names_are_404s(client, tiny_model_dir, name, stream):
    for candidate in (name, str(tiny_model_dir)):
        with pytest.raises(openai.NotFoundError) as caught:
            chat(client, candidate, stream)
        assert caught.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("stream", BOTH)
def test_a_model_loads_on_demand_and_answers(server, client, stream):
    text, model = chat(client, "tiny", stream, max_tokens=4)
    assert model == "tiny" and isinstance(text, str)
    assert listing(server)["tiny"]["state"] == "loaded"


def test_an_idle_model_unloads_and_returns_its_memory(server, client):
    before = requests.get(server.base_url + "/v1/system/status", timeout=10).json()
    chat(client, "smol-idle", False, max_tokens=2)
    loaded = requests.get(server.base_url + "/v1/system/status", timeout=10).json()
    row = next(m for m in loaded["models"] if m["id"] == "smol-idle")
    assert row["state"] == "loaded" and row["loads"] == 1
    assert wait_for_state(server, "smol-idle", "unloaded", timeout=20)["state"] == "unloaded"
    after = requests.get(server.base_url + "/v1/system/status", timeout=10).json()
    grew = loaded["memory"]["mlx_active_bytes"] - before["memory"]["mlx_active_bytes"]
    returned = loaded["memory"]["mlx_active_bytes"] - after["memory"]["mlx_active_bytes"]
    weights = row["weight_bytes"]
    assert grew > 0.8 * weights and returned > 0.8 * weights, (before["memory"], loaded["memory"], after["memory"])
    assert next(m for m in after["models"] if m["id"] == "smol-idle")["unloads"] == 1
    # and it loads again on the next request
    assert chat(client, "smol-idle", True, max_tokens=2)[1] == "smol-idle"


def test_two_models_streaming_at_once_both_progress(client):
    """Each model with work gets a turn per engine loop: neither waits for the other to finish."""
    chat(client, "tiny", False, max_tokens=1)  # loaded
    arrivals: dict[str, list[float]] = {"smol": [], "tiny": []}

    def run(model: str):
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count"}],
                                                    max_tokens=40, temperature=0, stream=True,
                                                    extra_body={"ignore_eos": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals[model].append(time.monotonic())

    with cf.ThreadPoolExecutor(2) as pool:
        list(pool.map(run, ["smol", "tiny"]))
    smol, tiny = arrivals["smol"], arrivals["tiny"]
    assert len(smol) > 20 and len(tiny) > 20
    # interleaved: the tiny model's stream did not wait for the big one's to end, nor the reverse
    assert tiny[0] < smol[-1] and smol[0] < tiny[-1]


def test_batched_greedy_output_equals_one_at_a_time_per_model(client):
    prompts = [f"Tell me about {w}" for w in ("apples", "rivers", "stars", "bread")]

    def one(prompt: str) -> str:
        return client.completions.create(model="smol", prompt=prompt, max_tokens=8, temperature=0).choices[0].text

    alone = [one(p) for p in prompts]
    with cf.ThreadPoolExecutor(4) as pool:
        together = list(pool.map(one, prompts))
    assert together == alone


@pytest.mark.parametrize("stream", BOTH)
def test_remote_model_answers_through_orchard(server, upstream, client, stream):
    text, model = chat(client, "big", stream)
    local_text, _ = chat(client, "smol", stream)
    assert model == "big" and text == local_text  # the upstream serves the same weights, greedy
    log = upstream.full_log()
    assert "/v1/chat/completions" in log
    assert UPSTREAM_KEY not in server.full_log()


def remote_and_local(ask) -> tuple:
    """(remote answer, local answer) of the same greedy request to `big` and `smol`."""
    return ask("big"), ask("smol")


@pytest.mark.parametrize("stream", BOTH)
def test_remote_completions_through_orchard(client, stream):
    def ask(model: str) -> tuple[str, str]:
        args = dict(model=model, prompt="The capital of France is", max_tokens=6, temperature=0)
        if not stream:
            answer = client.completions.create(**args)
            return answer.choices[0].text, answer.model
        chunks = list(client.completions.create(stream=True, **args))
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[0].model

    (remote, model), (local, _) = remote_and_local(ask)
    assert model == "big" and remote == local


@pytest.mark.parametrize("stream", BOTH)
def test_remote_responses_through_orchard(client, stream):
    def ask(model: str) -> tuple[str, str]:
        args = dict(model=model, input="Say hi", max_output_tokens=6, temperature=0)
        if not stream:
            answer = client.responses.create(**args)
            return answer.output_text, answer.model
        events = list(client.responses.create(stream=True, **args))
        assert [e.sequence_number for e in events] == list(range(len(events)))
        done = events[-1].response
        return done.output_text, done.model

    (remote, model), (local, _) = remote_and_local(ask)
    assert model == "big" and remote == local


@pytest.mark.parametrize("stream", BOTH)
def test_remote_anthropic_messages_through_orchard(server, stream):
    import anthropic

    client = anthropic.Anthropic(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)

    def ask(model: str) -> tuple[str, str]:
        args = dict(model=model, max_tokens=6, extra_body={"temperature": 0}, messages=[{"role": "user", "content": "Say hi"}])
        if not stream:
            answer = client.messages.create(**args)
        else:
            with client.messages.stream(**args) as events:
                answer = events.get_final_message()
        return "".join(b.text for b in answer.content if b.type == "text"), answer.model

    (remote, model), (local, _) = remote_and_local(ask)
    assert model == "big" and remote == local


def test_count_tokens_of_a_remote_model_is_a_clear_400_in_anthropics_envelope(server):
    answer = requests.post(server.base_url + "/v1/messages/count_tokens", timeout=10,
                           json={"model": "big", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 400
    assert answer.json()["type"] == "error" and answer.json()["error"]["type"] == "invalid_request_error"


def test_an_alias_falls_back_to_the_next_target_when_the_first_is_full(server, client):
    """smart -> [tiny, big]; tiny runs one request at a time and queues none (REQUEST_QUEUE_SIZE=0)."""
    chat(client, "tiny", False, max_tokens=1)  # loaded
    busy = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go on"}],
                                          max_tokens=400, stream=True, extra_body={"ignore_eos": True})
    next(iter(busy))  # the tiny model's one slot is taken now
    try:
        text, model = chat(client, "smart", False)
        assert model == "big" and text
    finally:
        busy.close()
    # once free, the alias uses its first target again
    deadline = time.monotonic() + 10
    while requests.get(server.base_url + "/v1/system/status", timeout=5).json()["models"][1]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert chat(client, "smart", True, max_tokens=2)[1] == "tiny"


def embed_vectors(answer) -> list[np.ndarray]:
    """The vectors; base64 ones decoded (the client leaves them as text when asked for them by name)."""
    return [np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") if isinstance(d.embedding, str)
            else np.asarray(d.embedding, dtype=np.float32) for d in answer.data]


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_in_every_input_form(server, client, encoding):
    texts = ["apples are red", "the sky", "a much longer sentence about rivers and stars and bread"]
    answer = client.embeddings.create(model="embed", input=texts, encoding_format=encoding)
    vectors = embed_vectors(answer)
    assert [d.index for d in answer.data] == [0, 1, 2] and answer.model == "embed"
    assert all(abs(np.linalg.norm(v) - 1) < 1e-4 for v in vectors)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens > 3
    single = embed_vectors(client.embeddings.create(model="embed", input=texts[1], encoding_format=encoding))[0]
    assert np.abs(single - vectors[1]).max() < 1e-5  # one at a time == in a batch
    ids = [[5, 6, 7], [8, 9]]
    by_ids = embed_vectors(client.embeddings.create(model="embed", input=ids, encoding_format=encoding))
    assert len(by_ids) == 2 and by_ids[0].shape == vectors[0].shape
    flat = embed_vectors(client.embeddings.create(model="embed", input=ids[0], encoding_format=encoding))[0]
    assert np.abs(flat - by_ids[0]).max() < 1e-5


def test_embeddings_raw_base64_is_little_endian_float32(server):
    body = requests.post(server.base_url + "/v1/embeddings", json={"model": "embed", "input": "hello",
                                                                   "encoding_format": "base64"}, timeout=30).json()
    floats = requests.post(server.base_url + "/v1/embeddings", json={"model": "embed", "input": "hello"},
                           timeout=30).json()
    decoded = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(decoded - np.asarray(floats["data"][0]["embedding"], dtype=np.float32)).max() < 1e-6


def test_embeddings_of_concurrent_requests_equal_one_at_a_time(client):
    texts = [f"sentence number {i} about orchards" for i in range(12)]
    alone = [embed_vectors(client.embeddings.create(model="embed", input=t))[0] for t in texts]
    with cf.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda t: embed_vectors(client.embeddings.create(model="embed", input=t))[0], texts))
    assert max(np.abs(a - b).max() for a, b in zip(alone, together)) < 1e-5


def test_embeddings_dimensions_truncate_and_renormalize(client):
    full = embed_vectors(client.embeddings.create(model="embed", input="apples"))[0]
    short = embed_vectors(client.embeddings.create(model="embed", input="apples", dimensions=16))[0]
    assert short.shape == (16,) and abs(np.linalg.norm(short) - 1) < 1e-4
    assert np.abs(short - full[:16] / np.linalg.norm(full[:16])).max() < 1e-5
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="embed", input="apples", dimensions=full.shape[0] + 1)
    assert caught.value.body["param"] == "dimensions"


@pytest.mark.parametrize("stream", BOTH)
def test_a_model_of_the_wrong_kind_is_a_400(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model="smol", input="hi")
    assert caught.value.body["code"] == "wrong_model_kind"
    with pytest.raises(openai.BadRequestError) as caught:
        chat(client, "embed", stream)
    assert caught.value.body["code"] == "wrong_model_kind"


@pytest.fixture(scope="module")
def upstream_down(orchard_home, tmp_path_factory):
    """A server whose remote entry points at a port nobody listens on."""
    from tests.server import free_port

    folder = tmp_path_factory.mktemp("models-down")
    models = write_models_file(folder / "models.yaml", [
        '{id: smol, source: embedded, pinned: true}',
        f'{{id: gone, remote: {{base_url: "http://127.0.0.1:{free_port()}/v1", model: whatever}}}}',
    ])
    server = ServerProcess({"MODELS_FILE": models, "ORCHARD_HOME": orchard_home}, folder / "server.log").start()
    yield server
    server.stop()


@pytest.mark.parametrize("stream", BOTH)
def test_an_unreachable_upstream_is_a_502_and_the_server_stays_up(upstream_down, stream):
    client = upstream_down.client()
    with pytest.raises(openai.APIStatusError) as caught:
        chat(client, "gone", stream)
    assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_unavailable"
    assert chat(client, "smol", stream)[1] == "smol"


@pytest.fixture(scope="module")
def tight(orchard_home, tiny_model_dir, tmp_path_factory):
    """A budget that holds the tiny model and one SmolLM2 (~520 MB) but not two."""
    folder = tmp_path_factory.mktemp("models-tight")
    models = write_models_file(folder / "models.yaml", [
        f'{{id: tiny, source: "{tiny_model_dir}", pinned: true}}',
        '{id: smol-a, source: embedded}',
        '{id: smol-b, source: embedded}',
    ])
    server = ServerProcess({"MODELS_FILE": models, "ORCHARD_HOME": orchard_home, "MEMORY_BUDGET": "700MiB",
                            "QUEUE_TIMEOUT": "4"}, folder / "server.log").start()
    yield server
    assert_never_blocked(server)
    server.stop()


def test_loading_evicts_the_least_recently_used_idle_model_and_never_cuts_a_stream(tight):
    client = tight.client()
    assert chat(client, "smol-a", False, max_tokens=2)[1] == "smol-a"
    assert listing(tight)["smol-a"]["state"] == "loaded"
    with cf.ThreadPoolExecutor(1) as pool:
        # a long stream on the pinned model runs while smol-b's load evicts smol-a
        streaming = pool.submit(lambda: [c for c in client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Go"}], max_tokens=300, stream=True,
            extra_body={"ignore_eos": True})])
        time.sleep(0.5)
        assert chat(client, "smol-b", True, max_tokens=2)[1] == "smol-b"
        chunks = streaming.result()
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]  # the stream ran to its end
    models = listing(tight)
    assert models["smol-a"]["state"] == "unloaded" and models["smol-b"]["state"] == "loaded"
    assert models["tiny"]["state"] == "loaded"
    assert "evicting idle model smol-a to load smol-b" in tight.full_log()
    # The worker froze its start-up objects, so the collections around each load and unload
    # are short (engine/host.py); the fixture's teardown checks that the loop never blocked.
    assert "start-up objects frozen" in tight.full_log()


def test_a_load_that_would_cut_a_running_stream_waits_then_503s_and_the_stream_ends_whole(tight):
    """smol-b holds the room and streams: smol-a cannot load without cutting it, so its request
    waits up to QUEUE_TIMEOUT, then gets a 503 with Retry-After; the stream runs to its end."""
    client = tight.client()
    assert chat(client, "smol-b", False, max_tokens=1)[1] == "smol-b"  # loaded (it may be already)
    with cf.ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: [c for c in client.chat.completions.create(
            model="smol-b", messages=[{"role": "user", "content": "Go on"}], max_tokens=120, stream=True,
            extra_body={"ignore_eos": True})])
        time.sleep(1.0)
        started = time.monotonic()
        answer = requests.post(tight.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "smol-a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        waited = time.monotonic() - started
        chunks = streaming.result()
    assert answer.status_code == 503 and answer.headers.get("Retry-After"), answer.text
    assert 3 < waited < 20, waited  # it waited for room, boundedly
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert listing(tight)["smol-a"]["state"] == "unloaded"


def test_metrics_are_per_model(server):
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    assert 'orchard:model_state{model="smol",state="loaded"} 1.0' in text
    assert 'orchard:model_state{model="big",state="remote"} 1.0' in text
    assert 'orchard:model_size_bytes{model="smol"}' in text
    assert UPSTREAM_KEY not in text


def test_the_access_log_names_the_model_that_answered(server, client):
    chat(client, "default", False, max_tokens=2)  # an alias: the log names the model it reached
    completions = [e for e in server.access_entries() if e["message"] == "completion"]
    assert completions and completions[-1]["model"] == "smol"
    assert {"smol", "tiny"} <= {e["model"] for e in completions}
