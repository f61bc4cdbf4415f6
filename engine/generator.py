"""Continuous batching over one model, as the engine sees it: insert, remove, step.

Underneath is Orchard's slot batcher (engine/batcher.py) for models whose caches are plain
KV caches (Qwen2.5, Llama, SmolLM2...), or mlx-lm's BatchGenerator (pinned: its API changed
within 0.32.x) for the rest, or when DECODE_BATCH=mlx-lm asks for it. Both take the same
calls. Runs on the engine thread only: every call here touches MLX.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Optional

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, StopSequences
from mlx_lm.models.cache import KVCache

from engine.logprobs import top_logprobs
from engine.memory import CACHE_CAP
from engine.messages import AddRequest, TokenLogprob
from engine.prefix_cache import PrefixCache, _trimmed
from engine.sampling import SamplerFactory, SamplingParams


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
                 grammar_tokenizer=None, stream=None, decode_batch: str = "slots",
                 prefill_chunk: Optional[int] = None, prefill_bucket: int = 1, decode_attention: str = "auto",
                 cpu_math: str = "mlx"):
        from engine import batcher, cpu_math as fast_cpu_math, slot_attention

        self._model = model
        self._prefill_budget = prefill_step_size  # prompt tokens per step, all prompts together
        self._prefill_chunk = prefill_chunk or prefill_step_size  # the most one prompt advances per step
        self._prefill_bucket = prefill_bucket
        self._grammar_tokenizer = grammar_tokenizer  # llguidance's view of the vocabulary, or None
        self._logprobs: dict[int, int] = {}  # uid -> top-k of rows that asked for logprobs
        self.prefill_tokens_saved = 0  # prompt tokens not recomputed thanks to shared prefills
        self._eos = tuple(sorted(set(eos_token_ids)))
        # Its own stream, except in a distributed group: there every op with a collective in it
        # (this batch's, the prompt scorer's) must run on one stream (the host's), in one order
        # on every rank; two streams would interleave their collectives (on the ring's sockets).
        self._stream = stream or mx.new_stream(mx.default_device())
        self.slots = decode_batch == "slots" and batcher.supports(model)
        options = dict(stop_tokens=[[t] for t in self._eos], completion_batch_size=max_batch,
                       prefill_batch_size=min(prefill_batch_size, max_batch), prefill_step_size=prefill_step_size,
                       stream=self._stream)
        # On CUDA the slot groups' decode attention skips the padding mask (engine/slot_attention.py).
        self.fused_attention = self.slots and decode_attention == "auto" and slot_attention.install(model)
        # On an x86 CPU, SwiGLU's and attention's exp go through MLX's vectorized power (engine/cpu_math.py).
        self.cpu_math = fast_cpu_math.wanted(cpu_math) and fast_cpu_math.install(model)
        if self.slots:
            self._batch = batcher.SlotBatcher(model, prefill_bucket=prefill_bucket,
                                              fused_attention=self.fused_attention, **options)
        else:
            self._batch = BatchGenerator(model, **options)
        self._samplers = SamplerFactory()
        self._stops: dict[bool, StopSequences] = {}
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self._scopes: dict[int, str] = {}  # uid -> prefix-cache scope of sequences that have one
        self._vocab_size = getattr(getattr(model, "args", None), "vocab_size", None)
        # Shared prefills: a group's first request (the leader) prefills in the batch like any
        # prompt; the others wait, under their own uids, for its KV state.
        self._followers: dict[int, list[tuple[int, AddRequest, dict]]] = {}  # leader's uid -> waiting
        self._follower_uids = itertools.count(1 << 40)  # apart from the batch's own uids
        self._alias: dict[int, int] = {}  # batch uid -> follower's uid, once it joined the batch
        self._batch_uid: dict[int, int] = {}  # follower's uid -> batch uid

    def insert(self, request: AddRequest) -> tuple[int, int]:
        """Queue a sequence; returns (uid, prompt tokens served from the prefix cache)."""
        return self.insert_many([request])[0]

    def insert_many(self, requests: list[AddRequest]) -> list:
        """Queue sequences admitted together; one (uid, cached) or an exception per request.

        Requests with the same prompt and cache scope (the `n` choices of one API request, or
        identical calls) share one prefill: the first prefills in the batch, chunk by chunk
        beside the others' decoding, and the rest start from a copy of its KV state once its
        prompt is done, so n choices cost one prompt's compute, not n."""
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault((request.cache_scope, tuple(request.prompt_tokens)), []).append(i)
        out: list = [None] * len(requests)
        for members in groups.values():
            try:
                prompt = requests[members[0]].prompt_tokens
                self._check_prompt(prompt)
                rows = [self._row(requests[i]) for i in members]  # a bad grammar fails here, not later
                if len(prompt) < 2:
                    for i, row in zip(members, rows):
                        out[i] = self._insert_one(requests[i], row)
                    continue
                out[members[0]] = leader = self._insert_one(requests[members[0]], rows[0])
                waiting = [(next(self._follower_uids), requests[i], row) for i, row in zip(members[1:], rows[1:])]
                if waiting:
                    self._followers[leader[0]] = waiting
                    self.prefill_tokens_saved += len(waiting) * (len(prompt) - 1)
                for i, (uid, _, _) in zip(members[1:], waiting):
                    out[i] = (uid, leader[1])
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

    def _row(self, request: AddRequest) -> dict:
        """The batch's per-row arguments: sampler, logits processors, stop sequences."""
        params = request.sampling
        processors = self._samplers.logits_processors(params, request.max_tokens)
        if request.grammar is not None:  # last: no bias or penalty can re-allow a masked token
            processors = processors + [self._grammar(request.grammar)]
        # A grammar ends with EOS: its row never ignores it.
        stop = self._stop_sequences(request.ignore_eos and request.grammar is None)
        return dict(samplers=[self._samplers.sampler(params)], logits_processors=[processors],
                    stop_sequences=[stop], max_tokens=[request.max_tokens])

    def _insert_one(self, request: AddRequest, row: dict, shared: Optional[list] = None) -> tuple[int, int]:
        """Queue one row; `shared`: the KV layers of a leader that computed this prompt already."""
        prompt = request.prompt_tokens
        if shared is not None:
            cached = start = len(prompt) - 1
            layers = [_trimmed(layer, start) for layer in shared]
        else:
            layers, cached = self.prefix_cache.lookup(prompt, request.cache_scope)
            if self.slots and self._prefill_bucket > 1 and cached % self._prefill_bucket:
                # The rest of the prompt then prefills from a bucket boundary (see engine/batcher.py).
                cached -= cached % self._prefill_bucket
                layers = [_trimmed(layer, cached) for layer in layers] if cached else None
            start = cached
        if self.slots:  # it computes log-probabilities only when a row needs them
            row = dict(row, wants_logprobs=[request.logprobs is not None])
        (uid,) = self._batch.insert([prompt[start:]], caches=[layers] if layers else None,
                                    all_tokens=[prompt[:start]], **row)
        if request.cache_scope:
            self._scopes[uid] = request.cache_scope
        if request.logprobs is not None:
            self._logprobs[uid] = request.logprobs
        return uid, cached

    def _release_followers(self, responses) -> None:
        """Leaders whose prompt is done hand their KV state on. With slots that is as soon as
        the leader's last prompt chunk is queued: its followers then join one step after it,
        where waiting for its first token to come back cost them three steps (the first wave
        of a burst of repeated prompts, or the `n` choices, on the CPU: about a second)."""
        if self.slots:
            for leader in [uid for uid in self._followers if self._batch.prompt_done(uid)]:
                self._hand_on(leader, self._batch.extract_cache([leader])[leader][0])
        for r in responses:
            if r.uid in self._followers:
                finished = r.finish_reason is not None
                self._hand_on(r.uid, r.prompt_cache if finished else self._batch.extract_cache([r.uid])[r.uid][0])

    def _hand_on(self, leader: int, layers) -> None:
        for uid, request, row in self._followers.pop(leader):
            self._join(uid, self._insert_one(request, row, layers)[0])

    def _promote(self, waiting: list) -> None:
        """The leader left before its prompt was done: the first follower prefills instead."""
        (uid, request, row), rest = waiting[0], waiting[1:]
        batch_uid = self._insert_one(request, row)[0]
        self._join(uid, batch_uid)
        if rest:
            self._followers[batch_uid] = rest

    def _join(self, uid: int, batch_uid: int) -> None:
        self._alias[batch_uid], self._batch_uid[uid] = uid, batch_uid
        for per_uid in (self._scopes, self._logprobs):
            if batch_uid in per_uid:
                per_uid[uid] = per_uid.pop(batch_uid)

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
        if self._drop_follower(uid):
            return
        batch_uid = self._batch_uid.pop(uid, uid)
        self._alias.pop(batch_uid, None)
        keep = keep_prefix and self.prefix_cache.capacity > 0
        left = self._batch.remove([batch_uid], return_prompt_caches=keep)
        waiting = self._followers.pop(batch_uid, None)
        if waiting:
            self._promote(waiting)
        if batch_uid in left:
            layers, tokens = left[batch_uid]
            self._keep([(tokens, layers, scope)])

    def _drop_follower(self, uid: int) -> bool:
        """A follower still waiting for its leader leaves the queue; True if it was one."""
        for leader, waiting in self._followers.items():
            rest = [w for w in waiting if w[0] != uid]
            if len(rest) < len(waiting):
                if rest:
                    self._followers[leader] = rest
                else:
                    del self._followers[leader]
                return True
        return False

    def step(self) -> list[StepToken]:
        """One engine step: decode one token for every running row, and prefill at most the
        prompt-token budget (PREFILL_STEP_SIZE), shared among the prompts being prefilled:
        a long prompt advances one chunk per step, so the decoding rows never wait for all of it."""
        self._batch.prefill_step_size = self._chunk()
        _, responses = self._batch.next()
        if self._followers:
            self._release_followers(responses)
        uids = [self._alias.get(r.uid, r.uid) for r in responses]
        logprobs = self._token_logprobs(responses, uids) if self._logprobs else {}
        out = [StepToken(uid, r.token, r.finish_reason, logprobs.get(uid)) for uid, r in zip(uids, responses)]
        finished = [(uid, r) for uid, r in zip(uids, responses) if r.finish_reason is not None]
        for uid, r in finished:
            self._logprobs.pop(uid, None)
            self._batch_uid.pop(self._alias.pop(r.uid, None), None)
        scopes = [self._scopes.pop(uid, "") for uid, _ in finished]
        if finished and self.prefix_cache.capacity > 0:
            self._keep_prefixes([r for _, r in finished], scopes)
        return out

    def _chunk(self) -> int:
        """Each prompt's share of this step's budget: the prompts the batch will prefill this step
        (those in its prompt batch and those that join it now) split PREFILL_STEP_SIZE, and none
        advances more than PREFILL_CHUNK_SIZE; while no row decodes (unbucketed), each takes a whole chunk."""
        batch = self._batch
        if self.slots:
            prompts = batch.prompts_next_step()
        else:
            joining = min(len(batch._unprocessed_sequences), max(0, batch.prefill_batch_size - len(batch._prompt_batch)))
            prompts = len(batch._prompt_batch) + joining
        if self.slots and self._prefill_bucket == 1 and not batch.decoding:
            # Nobody decodes, so nobody waits on this step: every prompt advances a whole chunk
            # (a burst of new requests on an idle server is prefilled in one pass, not spread
            # over many small ones with every request's first token at the end). Unbucketed
            # prefill only (the CPU): a GPU's budget already covers a burst (4096 tokens a step),
            # and bigger passes there would be shapes the warm-up does not build (a warm-up that
            # built them too ran an H100 out of memory: docs/benchmarks.md, stop 18).
            return self._prefill_chunk
        return min(self._prefill_chunk, max(16, self._prefill_budget // max(1, prompts)))

    def _token_logprobs(self, responses, uids: list[int]) -> dict[int, TokenLogprob]:
        """The sampled token's logprob and the top k, for the rows that asked."""
        rows = [(uid, r) for uid, r in zip(uids, responses) if uid in self._logprobs]
        if not rows:
            return {}
        values = top_logprobs(mx.stack([r.logprobs for _, r in rows]), [r.token for _, r in rows],
                              [self._logprobs[uid] for uid, _ in rows])
        return {uid: value for (uid, _), value in zip(rows, values)}

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

    def warm_up(self, prompt_tokens: int, rows: int, context: int, prompt_batches: bool = True) -> int:
        """Run the shapes this server will use once, before it says ready: with bucketed prefill
        (GPU), every prompt-batch size with every bucketed chunk length it can take; decode
        steps at batch sizes 1, 2, 4... up to `rows`; one prompt at the first length of each
        narrower decode width class; last, one synthetic prompt of `prompt_tokens` (prefilled in
        the configured chunks: a long prompt's attention sizes). Without `prompt_batches` the
        prompt-batch shapes are left to the first requests that form them (WARMUP_SHAPES=lean).
        Nothing it leaves stays: the prefix cache is emptied. Returns the steps it took."""
        vocab = max(self._vocab_size or 512, 8)
        greedy = SamplingParams(temperature=0.0)
        serial = itertools.count()  # every synthetic prompt distinct: nothing is shared or cached

        def wave(n: int, length: int, max_tokens: int) -> list[AddRequest]:
            requests = []
            for _ in range(n):
                k = next(serial)
                prompt = [(k * 7919 + i * 104729) % (vocab - 2) + 1 for i in range(length)]
                requests.append(AddRequest(f"warm-up-{k}", prompt, max_tokens, greedy, ignore_eos=True))
            return requests

        long = max(2, min(prompt_tokens, context - 4))
        waves = []
        bucket = self._prefill_bucket if self.slots else 1
        if bucket > 1 and prompt_batches:
            # A prompt of `length` tokens prefills them all when its first token comes from its
            # last pass; else its last token decodes, so it takes one more.
            extra = 0 if self._batch.first_token_in_prefill else 1
            for n in range(1, self._batch.prefill_batch_size + 1):
                share = min(self._prefill_chunk, max(16, self._prefill_budget // n))
                for length in range(bucket, max(bucket, share - share % bucket) + 1, bucket):
                    if length < context - 4:
                        waves.append(wave(n, length + extra, 1))
        size = 1
        while size <= rows:
            waves.append(wave(size, 16, 3))
            size *= 2
        if self.slots:
            # A row decodes in the group of its width class (engine/batcher.py), and the long
            # prompt fills only its own: each narrower class a long request can land in gets a
            # row too (8192 tokens land in class 2; a 6k-token request in class 1).
            from engine.batcher import narrower_class_floors

            waves += [wave(1, floor, 2) for floor in narrower_class_floors(long + 1)]
        # The long prompt last. Run first, every fresh H100 server's first long request still
        # paid 30-50 ms in its second prefill step and 15-25 ms in its last (stop 21's trace),
        # whether the buffer cache was emptied or not and even with the whole warm-up run twice;
        # run last, those steps cost what a later request's do. Whatever that step rebuilt, the
        # many shapes warmed after the long prompt had pushed it out (MLX's caches of built
        # kernels are bounded).
        waves.append(wave(1, long, 2))
        steps = 0
        # Every shape warmed allocates buffers of its own sizes, and until the host sets its limits
        # nothing caps MLX's buffer cache: after this warm-up it held 69-72 GB on an H100 (stop 21).
        # Where that is the machine's own memory (a Mac's unified memory, the CPU's RAM) it is
        # capped as it will be while serving. Not on CUDA: there it is device memory, emptied at
        # start (engine/memory.py), and each free a cap forces synchronizes the device.
        on_host = mx.default_device().type == mx.cpu or mx.metal.is_available()
        previous = mx.set_cache_limit(CACHE_CAP) if on_host else None
        try:
            for requests in waves:
                self.insert_many(requests)
                while self.busy:
                    self.step()
                    steps += 1
        finally:
            if previous is not None:
                mx.set_cache_limit(previous)
        self.prefix_cache.clear()
        self.prefix_cache.stats = type(self.prefix_cache.stats)()
        self.prefill_tokens_saved = 0
        return steps

    @property
    def decode_groups(self) -> int:
        """Forward passes a decode step takes now: one per width class with rows (slots)."""
        return len(self._batch._groups) if self.slots else 1

    @property
    def busy(self) -> bool:
        """Any sequence queued, prefilling, decoding or waiting for a shared prefill."""
        batch = self._batch
        if self._followers:
            return True
        if self.slots:
            return batch.busy
        return bool(batch._generation_batch.uids or batch._prompt_batch.uids or batch._unprocessed_sequences)

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
