"""Run an Engine in-process for tests: greenlets submit, the native engine thread computes."""
from __future__ import annotations

import contextlib
import itertools

import gevent

from config import load_settings

from engine.engine import Engine, EngineState
from engine.messages import AddRequest, Finished, TokenDelta

_ids = itertools.count()


@contextlib.contextmanager
def running_engine(**settings):
    """A started, loaded engine built from these settings (env-style names); shut down after."""
    from engine.factory import build_engine

    engine = build_engine(load_settings({k: str(v) for k, v in settings.items()}, dotenv=False))
    engine.start()
    try:
        wait_ready(engine)
        yield engine
    finally:
        engine.shutdown()


def counted_model(model_dir):
    """mlx-lm's load of `model_dir`, whose forward passes record their (rows, positions) in
    `model.fed`: what a test of the batching core asserts about the passes it ran. Counted at
    the inner model, which every pass goes through (a prompt's last prefill pass calls it
    directly, to project only its last position: engine/batcher.py)."""
    from mlx_lm import load

    model, _ = load(str(model_dir))
    fed: list[tuple[int, int]] = []
    inner = model.model
    forward = type(inner).__call__

    class Counted(type(inner)):
        def __call__(self, inputs, *args, **kwargs):
            fed.append(tuple(inputs.shape))
            return forward(self, inputs, *args, **kwargs)

    inner.__class__ = Counted
    model.fed = fed
    return model


def wait_ready(engine: Engine, timeout: float = 120) -> None:
    with gevent.Timeout(timeout):
        while engine.state is EngineState.LOADING:
            gevent.sleep(0.05)
    assert engine.state is EngineState.READY, engine.error


PROMPT_TEXTS = ["Hello world", "The capital of France", "Orchard serves", "A quick brown fox",
                "What is the capital of Germany?", "0123456789", "jumps over the lazy dog", "Paris is"]


def encoded_prompts(engine: Engine) -> list[list[int]]:
    """Eight short prompts in the served model's tokens (engine tests share them)."""
    return [engine.model.tokenizer.encode(t, add_special_tokens=False) for t in PROMPT_TEXTS]


def run(engine: Engine, prompt: list[int], max_tokens: int, **kwargs) -> tuple[list[int], Finished]:
    """Submit one request and collect its tokens until its Finished marker."""
    request = AddRequest(f"r{next(_ids)}", prompt, max_tokens, **kwargs)
    stream = engine.submit(request)
    tokens: list[int] = []
    while stream.finished is None:
        for message in stream.next_batch(timeout=60):
            if isinstance(message, TokenDelta):
                tokens.extend(message.token_ids)
    return tokens, stream.finished


def run_detailed(engine: Engine, prompt: list[int], max_tokens: int, **kwargs):
    """(tokens, per-token TokenLogprob list or None, Finished) of one request."""
    request = AddRequest(f"r{next(_ids)}", prompt, max_tokens, **kwargs)
    stream = engine.submit(request)
    tokens: list[int] = []
    logprobs: list = []
    while stream.finished is None:
        for message in stream.next_batch(timeout=60):
            if isinstance(message, TokenDelta):
                tokens.extend(message.token_ids)
                logprobs.extend(message.logprobs or [])
    return tokens, (logprobs if kwargs.get("logprobs") is not None else None), stream.finished


def run_many(engine: Engine, prompts: list[list[int]], max_tokens: int, **kwargs):
    jobs = [gevent.spawn(run, engine, p, max_tokens, **kwargs) for p in prompts]
    gevent.joinall(jobs, raise_error=True)
    return [job.value for job in jobs]


@contextlib.contextmanager
def running_app(settings):
    """The Flask app in-process (test client, real engine thread), once /health says ready."""
    from app import create_app

    app = create_app(settings)
    client = app.test_client()
    try:
        with gevent.Timeout(120):
            while client.get("/health").status_code != 200:
                gevent.sleep(0.05)
        yield app
    finally:
        app.extensions["orchard"].engine.shutdown()
