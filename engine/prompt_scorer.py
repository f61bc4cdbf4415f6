"""Prompt log-probabilities (`/v1/completions` with `echo` and `logprobs`), computed on the engine
thread a chunk at a time, so memory stays bounded and the running batch keeps stepping.

A request that asks for them waits here before it joins the scheduler: each engine loop
iteration runs one chunk of the oldest job through the model on the job's own KV cache and
keeps, for every position, the log-probability of the next prompt token and the k most likely
tokens. When a job is done its KV state goes to the prefix cache (so its prefill is not paid
twice) and the request moves on. Decisions depend on the queue order alone.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Optional

import mlx.core as mx

from engine.logprobs import top_logprobs
from engine.messages import AddRequest, TokenLogprob

CHUNK = 128  # positions per step: a chunk holds CHUNK x vocabulary floats of log-probabilities


@dataclass
class ScoringJob:
    request: AddRequest
    cache: list
    done: int = 0  # prompt positions run through the model
    entries: list = field(default_factory=lambda: [None])  # the first token has no logprob


class PromptScorer:
    def __init__(self, model):
        self._model = model
        self._jobs: collections.deque[ScoringJob] = collections.deque()

    def __len__(self) -> int:
        return len(self._jobs)

    @property
    def head(self) -> AddRequest:
        """The request the next step works on."""
        return self._jobs[0].request

    def add(self, request: AddRequest) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self._jobs.append(ScoringJob(request, make_prompt_cache(self._model)))

    def remove(self, request_id: str) -> Optional[AddRequest]:
        for job in self._jobs:
            if job.request.request_id == request_id:
                self._jobs.remove(job)
                return job.request
        return None

    def drain(self) -> list[AddRequest]:
        requests = [job.request for job in self._jobs]
        self._jobs.clear()
        return requests

    def step(self) -> Optional[tuple[ScoringJob, bool]]:
        """One chunk of the oldest job: (job, finished), or None when idle."""
        if not self._jobs:
            return None
        job = self._jobs[0]
        prompt = job.request.prompt_tokens
        end = min(job.done + CHUNK, len(prompt))
        logits = self._model(mx.array(prompt[job.done:end])[None], cache=job.cache)[0].astype(mx.float32)
        targets = prompt[job.done + 1:end + 1]  # position j predicts token j + 1
        job.entries += _score(logits[:len(targets)], targets, job.request.prompt_logprobs or 0)
        job.done = end
        if job.done < len(prompt):
            return job, False
        self._jobs.popleft()
        return job, True


def _score(logits: mx.array, targets: list[int], k: int) -> list[TokenLogprob]:
    if not targets:
        return []
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return top_logprobs(logprobs, targets, [k] * len(targets))
