"""Orchard's own continuous-batching core: a prompt queue, chunked prefill, and decode rows
that live in fixed slots of a batch KV cache (one per width class).

Why not mlx-lm's BatchGenerator (it is still used for models whose caches are not plain
KV caches, see `supports`): in a server, rows join and leave all the time, and there each
of its joins and leaves costs more than a decode step's worth of work:
- a joining group runs its first token as a forward pass of its own, then the whole batch's
  KV cache is copied to take it in (`extend`);
- a leaving row copies the whole cache again (`filter`), with a host sync per layer (it
  reads the left padding back), which drains the pipelined step;
- every step normalizes the logits over the vocabulary (a full pass, costly on the CPU) and
  splits them into one array per row, even when every row is greedy and nobody asked for
  log-probabilities.
Here a row owns a slot until it ends (engine/decode_slots.py): joining rows are written into
free slots and ride the next decode step with everyone else (their input there is the first
token their prompt's last prefill pass sampled, or, for architectures `output_head` does not
know, their prompt's last token), a leaving row just frees its slot, and the cache is
compacted only when more than half of it is idle or the shared left padding has grown by a
KV block. Each row's length is tracked on the host, so no decision reads anything back from
the device: the only host sync per step is reading the previous step's tokens (the step
itself is pipelined one ahead).

Rows of very different lengths do not share a cache: every slot of a batch cache spans the
longest row's columns, so a 4k-token row joining eight 100-token rows made all nine attend
over 4k columns (each step 6x slower on the CPU) and first allocated and zeroed 1.7 GB for
them (4 s on the CPU, the whole "freeze" of the long-prompt benchmark). Rows join the
decode group of their width class (under 2,048 tokens, then up to 4x more per class), and each
step runs one forward pass per group that has rows: an extra pass only while rows of very
different lengths decode at once.

Every decision (where a row goes, when to compact) is made from this object's own state,
never a clock, so every rank of a distributed group makes the same ones.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch, StopSequences
from mlx_lm.models.cache import KVCache, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

from engine.decode_slots import DecodeGroup, FirstToken, Response, Row, sample
from engine.prompt_batch import PromptBatch, output_head

_SHORT_ROWS = 2048  # rows below this many tokens decode together; each class above spans 4x more


def width_class(tokens: int) -> int:
    """0 below _SHORT_ROWS tokens, then 1, 2... for each 4x beyond it."""
    n, limit = 0, _SHORT_ROWS
    while tokens >= limit:
        n, limit = n + 1, limit * 4
    return n


def narrower_class_floors(tokens: int) -> list[int]:
    """The first row length of each class from 1 up to, not including, the class of `tokens`."""
    return [_SHORT_ROWS * 4 ** (c - 1) for c in range(1, width_class(tokens))]


def supports(model) -> bool:
    """Slots need plain KV caches (a sliding window or a recurrent state cannot move like that)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


@dataclass
class _Counters:
    prompt_time: float = 0.0  # measured only: no decision reads these
    decode_time: float = 0.0
    prompt_tokens: int = 0


class SlotBatcher:
    """insert / next / remove / extract_cache, as mlx-lm's BatchGenerator, over decode slots."""

    def __init__(self, model, *, stop_tokens, completion_batch_size: int, prefill_batch_size: int,
                 prefill_step_size: int, stream=None, prefill_bucket: int = 1, fused_attention: bool = False):
        self.model = model
        self.fused_attention = fused_attention  # decode groups skip the padding mask (engine/slot_attention.py)
        self.prefill_bucket = prefill_bucket  # prefill passes pad to multiples of it (GPU: see PromptBatch)
        self.completion_batch_size = completion_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self._stream = stream or mx.new_stream(mx.default_device())
        self._default_stops = StopSequences(stop_tokens or None)
        self._uids = 0
        self._counters = _Counters()
        # A row's first token is sampled in its prompt's last prefill pass where the model allows
        # (one step sooner to every first token); else its prompt's last token is kept for a
        # decode step, as mlx-lm does.
        self._head = output_head(model)
        # Prefill: mlx-lm's prompt batch (chunking, right padding, merged prefix-cache states).
        self._unprocessed_sequences: deque = deque()  # (uid, segments, max_tokens, cache, tokens, sampler, processors, stop)
        self._prompt_batch = self._empty_prompt_batch()
        self._currently_processing: list = []  # [segments, done, total] per prompt-batch row
        self._options: dict[int, tuple] = {}  # uid -> (max_tokens, stop, wants_logprobs) until it decodes
        self._joining: list[tuple[PromptProcessingBatch, list]] = []  # prefilled groups and their inputs
        self._first: dict[int, FirstToken] = {}  # uid -> first token, until the row is handed over
        # Decode: one group of slots per width class that has rows (engine/decode_slots.py).
        self._groups: dict[int, DecodeGroup] = {}

    # ---- queue ------------------------------------------------------------
    def insert(self, prompts, max_tokens=None, caches=None, all_tokens=None, samplers=None,
               logits_processors=None, stop_sequences=None, wants_logprobs=None) -> list[int]:
        n = len(prompts)
        uids = list(range(self._uids, self._uids + n))
        for i, (uid, prompt) in enumerate(zip(uids, prompts)):
            if not prompt:
                raise ValueError(f"Sequence {uid} has an empty prompt.")
            limit = max_tokens[i] if max_tokens else 128
            if limit <= 0:
                raise ValueError(f"Sequence {uid}'s max_tokens must be > 0.")
            if self._head is not None or len(prompt) == 1:
                segments = [list(prompt)]  # one token left over joins as it is (see _hand_over_prefilled)
            else:
                segments = [prompt[:-1], prompt[-1:]]
            cache = (caches[i] if caches and caches[i] else None) or make_prompt_cache(self.model)
            sampler = (samplers[i] if samplers else None) or greedy_sampler
            processors = tuple(logits_processors[i]) if logits_processors and logits_processors[i] else ()
            stop = (stop_sequences[i] if stop_sequences else None) or self._default_stops
            tokens = list(all_tokens[i]) if all_tokens else []
            self._unprocessed_sequences.append((uid, segments, limit, cache, tokens, sampler, processors, stop))
            self._options[uid] = (limit, stop, bool(wants_logprobs and wants_logprobs[i]))
        self._uids += n
        return uids

    def remove(self, uids, return_prompt_caches: bool = False) -> dict:
        caches = self.extract_cache(uids) if return_prompt_caches else {}
        uids = set(uids)
        self._unprocessed_sequences = deque(s for s in self._unprocessed_sequences if s[0] not in uids)
        drop = [i for i, uid in enumerate(self._prompt_batch.uids) if uid in uids]
        if drop:
            keep = [i for i in range(len(self._prompt_batch.uids)) if i not in drop]
            self._prompt_batch.filter(keep)
            self._currently_processing = [self._currently_processing[i] for i in keep]
        for group, last in self._joining:
            for i, uid in enumerate(group.uids):
                if uid in uids:
                    last[i] = None  # prefilled, not yet in a slot: it never joins
        for uid in uids:
            self._options.pop(uid, None)
            self._first.pop(uid, None)
            for group in self._groups.values():
                group.drop(uid)
        return caches

    def extract_cache(self, uids) -> dict:
        """uid -> (per-layer KV state, its tokens), wherever the sequence is now."""
        out = {}
        wanted = set(uids)
        for seq in self._unprocessed_sequences:
            if seq[0] in wanted:
                out[seq[0]] = (seq[3], seq[4])
        for i, uid in enumerate(self._prompt_batch.uids):
            if uid in wanted:
                out[uid] = (self._prompt_batch.extract_cache(i), self._prompt_batch.tokens[i])
        for group, last in self._joining:
            for i, uid in enumerate(group.uids):
                if uid in wanted and last[i] is not None:
                    out[uid] = (group.extract_cache(i), group.tokens[i])
        for group in self._groups.values():
            for uid in wanted:
                if uid in group:
                    out[uid] = group.state_of(uid)
        return out

    @property
    def prompt_cache_nbytes(self) -> int:
        total = sum(c.nbytes for seq in self._unprocessed_sequences for c in seq[3])
        total += sum(c.nbytes for c in self._prompt_batch.prompt_cache)
        total += sum(c.nbytes for group, _ in self._joining for c in group.prompt_cache)
        return total + sum(group.nbytes for group in self._groups.values())

    def prompts_next_step(self) -> int:
        """Prompts the next call will prefill a chunk of (the prefill budget's divisor)."""
        free = max(0, self.prefill_batch_size - len(self._prompt_batch))
        return len(self._prompt_batch) + min(len(self._unprocessed_sequences), free, self._decode_room())

    @property
    def first_token_in_prefill(self) -> bool:
        """A prompt's last prefill pass samples its first token (the whole prompt is prefilled)."""
        return self._head is not None

    def prompt_done(self, uid: int) -> bool:
        """The sequence's prompt is all in its KV state (it joins the next decode step, or decodes)."""
        if any(uid in group for group in self._groups.values()):
            return True
        return any(u == uid and t is not None for group, last in self._joining for u, t in zip(group.uids, last))

    @property
    def decoding(self) -> bool:
        """Rows decode (or join the next decode step): someone waits for each step."""
        return any(len(group) for group in self._groups.values()) or any(
            t is not None for _, last in self._joining for t in last)

    @property
    def busy(self) -> bool:
        return bool(self._unprocessed_sequences or self._prompt_batch.uids or self._joining
                    or any(len(group) for group in self._groups.values()))

    # ---- one step -----------------------------------------------------------
    def next(self):
        """One call: launch a decode step for every slot (joining rows included), hand out the
        previous step's tokens, then prefill one chunk. Returns ([], responses) like mlx-lm.

        When no row was decoding, rows whose first token this step's prefill pass sampled join
        at once and their first tokens are read back now: the read-back then waits for nothing
        but that pass, so a request on an idle engine gets its first token at the end of its
        last prefill step, not one decode step later."""
        with mx.stream(self._stream):
            self._take_queued()
            idle = not self.decoding
            responses = self._decode()
            self._prefill()
            if idle and any(isinstance(t, FirstToken) for _, last in self._joining for t in last):
                responses += self._decode()
        return [], responses

    def _decode(self) -> list[Response]:
        """Every group with rows launches its step, then hands out its previous one (in class
        order: the same on every rank)."""
        tic = time.perf_counter()
        self._join_prefilled()
        order = sorted(self._groups)
        busy = any(self._groups[w].active for w in order)
        finished = [self._groups[w].begin() for w in order]  # every step queued before any read-back
        out: list[Response] = []
        for width, step in zip(order, finished):
            out += self._groups[width].end(step)
        for width in [w for w, group in self._groups.items() if not group.active]:
            del self._groups[width]  # it handed out its last step and holds no cache
        if busy:
            self._counters.decode_time += time.perf_counter() - tic
        return out

    def _decode_room(self) -> int:
        return self.completion_batch_size - sum(len(group) for group in self._groups.values()) - sum(
            sum(1 for t in last if t is not None) for _, last in self._joining)

    def _join_prefilled(self) -> None:
        """Rows whose prompt (all but its last token) is in a KV state take slots in the group
        of their width class."""
        for batch, last in self._joining:
            keep = [i for i, t in enumerate(last) if t is not None]
            if not keep:
                continue
            if len(keep) < len(batch.uids):
                batch.filter(keep)
                last = [last[i] for i in keep]
            rows = []
            for k, uid in enumerate(batch.uids):
                limit, stop, wants = self._options.pop(uid)
                rows.append(Row(uid, batch.tokens[k], batch.samplers[k], batch.logits_processors[k], stop, limit,
                                wants))
            # One class for the whole prefilled batch: its rows share its columns already.
            width = width_class(max(len(t) for t in batch.tokens) + 1)
            group = self._groups.get(width)
            if group is None:
                group = self._groups[width] = DecodeGroup(self.model, fused=self.fused_attention)
            group.join(batch, last, rows)
        self._joining = []

    def _take_queued(self) -> None:
        """Take queued prompts into the prompt batch. Those that came complete (one token left:
        a whole prefix-cache hit, a follower of a shared prefill) join this step's decode."""
        n = min(self.prefill_batch_size - len(self._prompt_batch), self._decode_room() - len(self._prompt_batch),
                len(self._unprocessed_sequences))
        if n > 0:
            self._prompt_batch.extend(self._take(n))
        self._hand_over_prefilled()

    def _prefill(self) -> None:
        """Prefill one chunk of each prompt in the prompt batch, and hand the prompts whose KV
        state is complete to the slots: they join the very next decode step."""
        prompts, finishing = [], []
        share = self.prefill_step_size
        if self.prefill_bucket > 1:  # chunk boundaries on the bucket: contexts stay on it too
            share = max(self.prefill_bucket, share - share % self.prefill_bucket)
        for i, seq in enumerate(self._currently_processing):
            segments = seq[0]
            take = min(len(segments[0]), share)
            prompts.append(segments[0][:take])
            segments[0] = segments[0][take:]
            if not segments[0]:
                segments.pop(0)
            if not segments and self._head is not None:
                finishing.append(i)  # this pass ends its prompt: its first token comes from it
            seq[1] += take
        if prompts:
            tic = time.perf_counter()
            self._prompt_batch.prefill_step_size = share
            logits = self._prompt_batch.prompt(prompts, finishing)
            if finishing:
                self._sample_first(logits, finishing)
            self._counters.prompt_tokens += sum(len(p) for p in prompts)
            self._counters.prompt_time += time.perf_counter() - tic
            # Those this pass completed join the next step, not the one after: a step sooner
            # to each request's first token (a whole decode step: 100-150 ms on the CPU).
            self._hand_over_prefilled()

    def _sample_first(self, logits: mx.array, finishing: list[int]) -> None:
        """The first token of each row the pass just completed, from its last position's logits,
        with the row's logits processors and sampler (as its decode steps will use them)."""
        batch = self._prompt_batch
        rows = []
        for k, i in enumerate(finishing):
            row_logits = logits[k:k + 1]
            processors = batch.logits_processors[i]
            if processors:
                context = mx.array(batch.tokens[i])  # the whole prompt: what its first decode step would see
                for processor in processors:
                    row_logits = processor(context, row_logits)
            rows.append(row_logits)
        logits = rows[0] if len(rows) == 1 else mx.concatenate(rows, axis=0)
        samplers = [batch.samplers[i] or greedy_sampler for i in finishing]
        wants = [self._options[batch.uids[i]][2] for i in finishing]
        needs = any(wants) or any(s is not greedy_sampler for s in samplers)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if needs else None
        tokens = sample(logits, logprobs, samplers)
        mx.async_eval(tokens, *(() if logprobs is None else (logprobs,)))
        for k, i in enumerate(finishing):
            self._first[batch.uids[i]] = FirstToken(tokens, k, logprobs[k] if wants[k] else None)

    def _hand_over_prefilled(self) -> None:
        """Prompt-batch rows whose prompt is in their KV state (their first token sampled) or
        has only its last token left (their first decode input) move to the joining list,
        split off the prompt batch."""
        done = [i for i, seq in enumerate(self._currently_processing)
                if not seq[0] or (len(seq[0]) == 1 and len(seq[0][0]) == 1)]
        if not done:
            return
        uids = self._prompt_batch.uids
        last = [self._first.pop(uids[i]) if not self._currently_processing[i][0]
                else self._currently_processing[i][0][0][0] for i in done]
        if len(done) == len(self._prompt_batch):  # the whole batch: no split copy
            group = self._prompt_batch
            self._prompt_batch = self._empty_prompt_batch()
            self._currently_processing = []
        else:
            group = self._prompt_batch.split(done)
            self._currently_processing = [s for i, s in enumerate(self._currently_processing) if i not in done]
        self._joining.append((group, last))

    def _empty_prompt_batch(self) -> PromptBatch:
        batch = PromptBatch.empty(self.model, greedy_sampler, prefill_step_size=self.prefill_step_size)
        batch.bucket, batch.head = self.prefill_bucket, self._head
        return batch

    def _take(self, n: int) -> PromptProcessingBatch:
        taken = [self._unprocessed_sequences.popleft() for _ in range(n)]
        for seq in taken:
            self._currently_processing.append([seq[1], 0, sum(len(s) for s in seq[1])])
        batch = PromptBatch(
            model=self.model, uids=[s[0] for s in taken], caches=[s[3] for s in taken],
            tokens=[s[4] for s in taken], prefill_step_size=self.prefill_step_size,
            samplers=[s[5] for s in taken], fallback_sampler=greedy_sampler,
            logits_processors=[s[6] for s in taken], stop_sequences=[s[7] for s in taken],
            max_tokens=[s[2] for s in taken])
        batch.bucket, batch.head = self.prefill_bucket, self._head
        return batch
