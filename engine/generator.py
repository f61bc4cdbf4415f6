"""The one module that drives mlx-lm's BatchGenerator (pinned: its API changed within 0.32.x).

Runs on the engine thread only: every call here touches MLX.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache

from engine.logprobs import top_logprobs
from engine.messages import AddRequest, TokenLogprob
from engine.prefix_cache import PrefixCache, _trimmed
from engine.sampling import SamplerFactory


@dataclass(frozen=True)
class StepToken:
    uid: int
    token: int
    finish_reason: Optional[str]  # None, 'stop' or 'length'
    logprob: Optional[TokenLogprob] = None  # only for rows that asked for logprobs


class Generator:
    """Continuous batching over one model: insert, remove, step."""

    def __init__(self, model, eos_token_ids: Iterable[int], *, max_batch: int,
                 prefill_batch_size: int, prefill_step_size: int, prefix_cache_bytes: int = 0,
                 grammar_tokenizer=None, stream=None):
        self._model = model
        self._prefill_step = prefill_step_size
        self._grammar_tokenizer = grammar_tokenizer  # llguidance's view of the vocabulary, or None
        self._logprobs: dict[int, int] = {}  # uid -> top-k of rows that asked for logprobs
        self.prefill_tokens_saved = 0  # prompt tokens not recomputed thanks to shared prefills
        self._eos = tuple(sorted(set(eos_token_ids)))
        # Its own stream, except in a distributed group: there every op with a collective in it
        # (this batch's, the prompt scorer's, the host's plan) must run on one stream, in one
        # order on every rank; two streams would interleave their collectives on the sockets.
        self._stream = stream or mx.new_stream(mx.default_device())
        self._batch = BatchGenerator(
            model,
            stop_tokens=[[t] for t in self._eos],
            completion_batch_size=max_batch,
            prefill_batch_size=min(prefill_batch_size, max_batch),
            prefill_step_size=prefill_step_size,
            stream=self._stream,
        )
        self._samplers = SamplerFactory()
        self._stops: dict[bool, StopSequences] = {}
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._scopes: dict[int, str] = {}  # uid -> prefix-cache scope of sequences that have one
        self._vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)

    def insert(self, request: AddRequest) -> tuple[int, int]:
        """Queue a sequence; returns (uid, prompt tokens served from the prefix cache)."""
        return self.insert_many([request])[0]

    def insert_many(self, requests: list[AddRequest]) -> list:
        """Queue sequences admitted together; one (uid, cached) or an exception per request.

        Requests with the same prompt and cache scope (the `n` choices of one API request, or
        identical calls) share one prefill: the prompt is computed once and each row starts
        from a copy of its KV state, so n choices cost one prompt's compute, not n."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.cache_scope, tuple(request.prompt_tokens)), []).append(i)
        out: list = [None] * len(requests)
        for members in groups.values():
            try:
                self._check_prompt(requests[members[0]].prompt_tokens)
                shared = self._shared_prefill(requests[members[0]]) if len(members) > 1 else None
                if shared is not None:
                    self.prefill_tokens_saved += (len(members) - 1) * (len(requests[members[0]].prompt_tokens) - 1)
                for i in members:
                    out[i] = self._insert_one(requests[i], shared)
            except Exception as exc:  # a bad request fails alone
                for i in members:
                    out[i] = out[i] or exc
        return out

    def _check_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if self._vocab_size and not (min(prompt) >= 0 and max(prompt) < self._vocab_size):
            # The embedding lookup does not check bounds: an outside id would read stray memory.
            raise ValueError(f"a prompt token id is outside the model's vocabulary (0..{self._vocab_size - 1})")

    def _shared_prefill(self, request: AddRequest):
        """KV state of all but the last prompt token, computed once (prefix cache first)."""
        from mlx_lm.models.cache import make_prompt_cache

        prompt = request.prompt_tokens
        if len(prompt) < 2:
            return None
        layers, cached = self.prefix_cache.lookup(prompt, request.cache_scope)
        cache = make_prompt_cache(self._model)
        if layers:  # own arrays: the forward pass below writes into the cache
            for mine, theirs in zip(cache, layers):
                mine.keys = theirs.keys[..., :cached, :]
                mine.values = theirs.values[..., :cached, :]
                mine.offset = cached
        rest = prompt[cached:-1]
        with mx.stream(self._stream):
            for start in range(0, len(rest), self._prefill_step):
                self._model(mx.array(rest[start:start + self._prefill_step])[None], cache=cache)
                mx.eval([c.state for c in cache])
        return cache, cached

    def _insert_one(self, request: AddRequest, shared) -> tuple[int, int]:
        params = request.sampling
        prompt = request.prompt_tokens
        if shared is not None:
            cache, cached = shared
            start = len(prompt) - 1
            layers = [_trimmed(layer, start) for layer in cache]
        else:
            layers, cached = self.prefix_cache.lookup(prompt, request.cache_scope)
            start = cached
        processors = self._samplers.logits_processors(params, request.max_tokens)
        if request.grammar is not None:  # last: no bias or penalty can re-allow a masked token
            processors = processors + [self._grammar(request.grammar)]
        (uid,) = self._batch.insert(
            [prompt[start:]],
            caches=[layers] if layers else None,
            all_tokens=[prompt[:start]],
            max_tokens=[request.max_tokens],
            samplers=[self._samplers.sampler(params)],
            logits_processors=[processors],
            # A grammar ends with EOS: its row never ignores it.
            stop_sequences=[self._stop_sequences(request.ignore_eos and request.grammar is None)],
        )
        if request.cache_scope:
            self._scopes[uid] = request.cache_scope
        if request.logprobs is not None:
            self._logprobs[uid] = request.logprobs
        return uid, cached

    def _grammar(self, grammar: str):
        from engine.grammar import make_processor

        if self._grammar_tokenizer is None:
            raise ValueError("this model's tokenizer does not support grammar-constrained output")
        return make_processor(grammar, self._grammar_tokenizer, self._eos, self._vocab_size)

    def remove(self, uid: int, keep_prefix: bool = False) -> None:
        """Take a sequence out of the batch. `keep_prefix`: it ended well, only not by the model
        (a stop string, a client that left), so its KV state joins the prefix cache like a
        finished one's: an agent's next call, or a retry, starts from it."""
        scope = self._scopes.pop(uid, "")
        self._logprobs.pop(uid, None)
        keep = keep_prefix and self.prefix_cache.capacity > 0
        left = self._batch.remove([uid], return_prompt_caches=keep)
        if uid in left:
            layers, tokens = left[uid]
            self._keep([(tokens, layers, scope)])

    def step(self) -> list[StepToken]:
        """One engine step: prefill some prompts and/or decode one token for every running row."""
        _, responses = self._batch.next()
        logprobs = self._token_logprobs(responses) if self._logprobs else {}
        out = [StepToken(r.uid, r.token, r.finish_reason, logprobs.get(r.uid)) for r in responses]
        finished = [r for r in responses if r.finish_reason is not None]
        for r in finished:
            self._logprobs.pop(r.uid, None)
        scopes = [self._scopes.pop(r.uid, "") for r in finished]
        if finished and self.prefix_cache.capacity > 0:
            self._keep_prefixes(finished, scopes)
        return out

    def _token_logprobs(self, responses) -> dict[int, TokenLogprob]:
        """The sampled token's logprob and the top k, for the rows that asked."""
        rows = [r for r in responses if r.uid in self._logprobs]
        if not rows:
            return {}
        values = top_logprobs(mx.stack([r.logprobs for r in rows]), [r.token for r in rows],
                              [self._logprobs[r.uid] for r in rows])
        return {r.uid: value for r, value in zip(rows, values)}

    def keep_prefix(self, tokens: list[int], layers: list, scope: str = "") -> None:
        """Offer KV state computed outside the batch (a scored prompt) to the prefix cache."""
        if self.prefix_cache.capacity > 0:
            self._keep([(tokens, layers, scope)])

    def limit_prefix_cache(self, limit: int) -> None:
        """Shrink the prefix cache to what the KV budget leaves free (engine's decision)."""
        self.prefix_cache.trim_to(limit)

    def _keep_prefixes(self, finished, scopes: list[str]) -> None:
        self._keep([(r.all_tokens, r.prompt_cache, scope) for r, scope in zip(finished, scopes)])

    def _keep(self, sequences: list[tuple[list[int], list, str]]) -> None:
        """Store (tokens, per-layer caches, scope) of sequences that left the batch."""
        kept = [(tokens, layers, scope) for tokens, layers, scope in sequences
                if layers and all(type(c) is KVCache and c.keys is not None for c in layers)]
        # Own copies, not views of the batch's arrays: scheduled now, without waiting for them,
        # so a finishing row does not stall the step already queued on the device.
        mx.async_eval([(c.keys, c.values) for _, layers, _ in kept for c in layers])
        for tokens, layers, scope in kept:
            length = min(layers[0].offset, len(tokens))
            self.prefix_cache.store(tokens[:length], layers, sum(c.nbytes for c in layers), scope)

    @property
    def phase_seconds(self) -> tuple[float, float]:
        """(prefill, decode) seconds spent inside mlx-lm's batch steps since start."""
        counters = self._batch._counters
        return counters.prompt_time, counters.decode_time

    @property
    def kv_cache_bytes(self) -> int:
        return self._batch.prompt_cache_nbytes

    def _stop_sequences(self, ignore_eos: bool) -> StopSequences:
        """One shared object per kind: the model's EOS tokens end a row, or (ignore_eos) nothing does."""
        if ignore_eos not in self._stops:
            self._stops[ignore_eos] = StopSequences(None if ignore_eos else [[t] for t in self._eos] or None)
        return self._stops[ignore_eos]
