"""Orchard's own continuous-batching core: a prompt queue, chunked prefill, and decode rows
that live in fixed slots of one batch KV cache.

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
Here a row owns a slot until it ends: joining rows are written into free slots and ride the
next decode step with everyone else (their prompt's last token is their input there), a
leaving row just frees its slot, and the cache is compacted only when more than half of it
is idle or the shared left padding has grown by a KV block. Each row's length is tracked on
the host, so no decision reads anything back from the device: the only host sync per step
is reading the previous step's tokens (the step itself is pipelined one ahead).

Every decision (where a row goes, when to compact) is made from this object's own state,
never a clock, so every rank of a distributed group makes the same ones.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch, StopSequences
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler

_KV_BLOCK = BatchKVCache.step  # columns the cache grows by; shared left padding past it is trimmed


class _PromptBatch(PromptProcessingBatch):
    """mlx-lm's prompt batch, with each pass's length padded up to a multiple of `bucket`.

    On a GPU every new (rows, length, context) shape of a prefill pass builds its attention
    kernel the first time (50-140 ms against 7-15 ms warm on an H100; docs/benchmarks.md),
    and in a server prompt lengths never repeat, so unpadded nearly every pass is a new shape.
    Padded, chunks and contexts stay on a few multiples of the bucket, which the start-up
    warm-up compiles. The padding goes in as right padding: the junk positions come after
    each row's real tokens (causal attention never sees them) and mlx-lm's finalize rolls
    them to the left, where the left padding masks them from then on."""

    bucket = 1

    def prompt(self, tokens):
        if self.bucket > 1 and tokens:
            longest = max(len(t) for t in tokens)
            target = -(-longest // self.bucket) * self.bucket
            if target != longest or any(len(t) != longest for t in tokens):
                return self._padded(tokens, target)
        return super().prompt(tokens)

    def _padded(self, tokens, target: int):
        for kept, new in zip(self.tokens, tokens):
            kept += new
        lengths = [len(t) for t in tokens]
        padding = [target - n for n in lengths]
        for c in self.prompt_cache:
            c.prepare(lengths=lengths, right_padding=padding)
        self.model(mx.array([t + [0] * (target - len(t)) for t in tokens]), cache=self.prompt_cache)
        mx.eval([c.state for c in self.prompt_cache])
        for c in self.prompt_cache:
            c.finalize()
        mx.eval([c.state for c in self.prompt_cache])


def supports(model) -> bool:
    """Slots need plain KV caches (a sliding window or a recurrent state cannot move like that)."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


@dataclass
class Response:
    uid: int
    token: int
    logprobs: Optional[mx.array]  # the row's log-probabilities over the vocabulary, when asked for
    finish_reason: Optional[str]
    prompt_cache: Optional[List[Any]]  # a finished row's KV state, per layer (lazy copies)
    all_tokens: Optional[List[int]]  # the tokens that state holds


@dataclass
class _Counters:
    prompt_time: float = 0.0  # measured only: no decision reads these
    decode_time: float = 0.0
    prompt_tokens: int = 0


class _Row:
    __slots__ = ("uid", "tokens", "sampler", "processors", "context", "matcher", "max_tokens", "generated",
                 "wants_logprobs", "priming", "live")

    def __init__(self, uid, tokens, sampler, processors, stop, max_tokens, wants_logprobs):
        self.uid = uid
        self.tokens = tokens  # the tokens in this row's KV state (prompt, then what it generated)
        self.sampler = sampler
        self.processors = processors
        self.context = TokenBuffer(tokens) if processors else None  # what the processors see
        self.matcher = stop.matcher()
        self.max_tokens = max_tokens
        self.generated = 0
        self.wants_logprobs = wants_logprobs
        self.priming = True  # its first decode input is its prompt's last token (not a sample)
        self.live = True


class SlotBatcher:
    """insert / next / remove / extract_cache, as mlx-lm's BatchGenerator, over decode slots."""

    def __init__(self, model, *, stop_tokens, completion_batch_size: int, prefill_batch_size: int,
                 prefill_step_size: int, stream=None, prefill_bucket: int = 1):
        self.model = model
        self.prefill_bucket = prefill_bucket  # prefill passes pad to multiples of it (GPU: see _PromptBatch)
        self.completion_batch_size = completion_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self._stream = stream or mx.new_stream(mx.default_device())
        self._default_stops = StopSequences(stop_tokens or None)
        self._uids = 0
        self._counters = _Counters()
        # Prefill: mlx-lm's prompt batch (chunking, right padding, merged prefix-cache states).
        self._unprocessed_sequences: deque = deque()  # (uid, segments, max_tokens, cache, tokens, sampler, processors, stop)
        self._prompt_batch = self._empty_prompt_batch()
        self._currently_processing: list = []  # [segments, done, total] per prompt-batch row
        self._options: dict[int, tuple] = {}  # uid -> (max_tokens, stop, wants_logprobs) until it decodes
        self._joining: list[tuple[PromptProcessingBatch, list]] = []  # prefilled groups and their last tokens
        # Decode: one BatchKVCache per layer whose batch index is the slot.
        self._cache: list[BatchKVCache] = []
        self._slots: list[Optional[_Row]] = []  # occupant of each slot
        self._lengths: list[int] = []  # tokens in each slot's KV state (host copy: no read-backs)
        self._width = 0  # columns written so far (every slot's state ends there, left-padded)
        self._by_uid: dict[int, int] = {}  # decoding uid -> slot
        self._inputs: Optional[mx.array] = None  # next step's input per slot (the last step's samples)
        self._prompt_last: list[int] = []  # each slot's prompt's last token (its first decode input)
        self._pending = None  # (tokens, logprobs, owners) of the step in flight

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
            segments = [prompt[:-1], prompt[-1:]] if len(prompt) > 1 else [prompt]
            segments = [s for s in segments if s]
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
            slot = self._by_uid.pop(uid, None)
            if slot is not None:
                self._slots[slot].live = False
                self._slots[slot] = None
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
        for uid in wanted & self._by_uid.keys():
            slot = self._by_uid[uid]
            row = self._slots[slot]
            out[uid] = (self._slot_state(slot, len(row.tokens)), list(row.tokens))
        return out

    @property
    def prompt_cache_nbytes(self) -> int:
        total = sum(c.nbytes for seq in self._unprocessed_sequences for c in seq[3])
        total += sum(c.nbytes for c in self._prompt_batch.prompt_cache)
        total += sum(c.nbytes for group, _ in self._joining for c in group.prompt_cache)
        return total + sum(c.nbytes for c in self._cache)

    def prompts_next_step(self) -> int:
        """Prompts the next call will prefill a chunk of (the prefill budget's divisor)."""
        free = max(0, self.prefill_batch_size - len(self._prompt_batch))
        return len(self._prompt_batch) + min(len(self._unprocessed_sequences), free, self._decode_room())

    @property
    def busy(self) -> bool:
        return bool(self._unprocessed_sequences or self._prompt_batch.uids or self._joining or self._by_uid)

    # ---- one step -----------------------------------------------------------
    def next(self):
        """One call: launch a decode step for every slot (joining rows included), hand out the
        previous step's tokens, then prefill one chunk. Returns ([], responses) like mlx-lm."""
        with mx.stream(self._stream):
            responses = self._decode()
            self._prefill()
        return [], responses

    def _decode(self) -> list[Response]:
        tic = time.perf_counter()
        self._join_prefilled()
        finished_step = self._pending
        self._pending = None
        if self._by_uid:
            self._launch()
        out = self._emit(finished_step) if finished_step is not None else []
        if not self._by_uid and self._pending is None:
            self._reset()  # nobody decodes: give the cache back
        else:
            self._compact()
        if finished_step is not None or self._pending is not None:
            self._counters.decode_time += time.perf_counter() - tic
        return out

    def _launch(self) -> None:
        """Queue the forward pass of every slot on its input, and the sampling."""
        rows = self._slots
        logits = self.model(self._inputs[:, None], cache=self._cache)[:, -1, :]
        live = [(i, r) for i, r in enumerate(rows) if r is not None]
        with_processors = [(i, r) for i, r in live if r.processors]
        if with_processors:
            processed = []
            for i, r in with_processors:
                context = r.context.update_and_fetch(self._inputs[i:i + 1])
                row_logits = logits[i:i + 1]
                for processor in r.processors:
                    row_logits = processor(context, row_logits)
                processed.append(row_logits)
            logits[mx.array([i for i, _ in with_processors])] = mx.concatenate(processed, axis=0)
        # Normalized only when a row samples from it or asked for log-probabilities: argmax
        # does not need it, and over the vocabulary it is a full pass of the batch's logits.
        needs = any(r.wants_logprobs or r.sampler is not greedy_sampler for _, r in live)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True) if needs else None
        sampled = self._sample(logits, logprobs, live)
        for i in range(len(rows)):
            self._lengths[i] += 1
        for i, r in live:
            if r.priming:  # its input was its prompt's last token: known now, and in its KV state
                r.tokens.append(self._prompt_last[i])
        self._width += 1
        owners = list(rows)
        for _, r in live:
            r.priming = False
        self._inputs = sampled
        mx.async_eval(sampled, *(() if logprobs is None else (logprobs,)))
        self._pending = (sampled, logprobs, owners)

    def _sample(self, logits, logprobs, live) -> mx.array:
        """Greedy rows take the argmax; each other sampler draws for its own rows (a seeded
        row's sampler is its own, so its draws do not depend on its neighbours)."""
        groups: dict[int, tuple] = {}
        for i, r in live:
            if r.sampler is not greedy_sampler:
                groups.setdefault(id(r.sampler), (r.sampler, []))[1].append(i)
        if len(groups) == 1 and len(live) == len(self._slots):
            sampler, idx = next(iter(groups.values()))
            if len(idx) == len(self._slots):
                return sampler(logprobs)  # one sampler for the whole batch: one call
        sampled = mx.argmax(logits, axis=-1)
        for sampler, idx in groups.values():
            picks = slice(idx[0], idx[0] + 1) if len(idx) == 1 else mx.array(idx)
            sampled[picks] = sampler(logprobs[picks]).astype(sampled.dtype)
        return sampled

    def _emit(self, step) -> list[Response]:
        """The previous step's tokens, to the rows that were in their slots when it launched."""
        sampled, logprobs, owners = step
        tokens = sampled.tolist()  # the one host sync of a step (this step is already queued)
        out = []
        for slot, (row, token) in enumerate(zip(owners, tokens)):
            if row is None or not row.live:
                continue
            row.generated += 1
            finish = None
            if row.generated >= row.max_tokens:
                finish = "length"
            if row.matcher.advance(token):
                finish = "stop"
            row.tokens.append(token)  # it was the input of the step launched just now
            row_logprobs = logprobs[slot] if logprobs is not None and row.wants_logprobs else None
            if finish is None:
                out.append(Response(row.uid, token, row_logprobs, None, None, None))
                continue
            state = self._slot_state(self._by_uid[row.uid], len(row.tokens))
            out.append(Response(row.uid, token, row_logprobs, finish, state, row.tokens))
            self._free(row)
        return out

    def _free(self, row: _Row) -> None:
        slot = self._by_uid.pop(row.uid)
        row.live = False
        self._slots[slot] = None

    # ---- slots ------------------------------------------------------------
    def _slot_state(self, slot: int, length: int) -> list[KVCache]:
        """A row's KV state as plain per-layer caches: lazy copies of its slot's last `length` columns."""
        layers = []
        start = self._width - self._lengths[slot]
        for c in self._cache:
            kv = KVCache()
            kv.keys = mx.contiguous(c.keys[slot:slot + 1, :, start:start + length])
            kv.values = mx.contiguous(c.values[slot:slot + 1, :, start:start + length])
            kv.offset = length
            layers.append(kv)
        return layers

    def _decode_room(self) -> int:
        return self.completion_batch_size - len(self._by_uid) - sum(
            sum(1 for t in last if t is not None) for _, last in self._joining)

    def _join_prefilled(self) -> None:
        """Rows whose prompt (all but its last token) is in a KV state take free slots."""
        for group, last in self._joining:
            keep = [i for i, t in enumerate(last) if t is not None]
            if not keep:
                continue
            if len(keep) < len(group.uids):
                group.filter(keep)
                last = [last[i] for i in keep]
            self._join(group, last)
        self._joining = []

    def _join(self, group: PromptProcessingBatch, last: list[int]) -> None:
        g = group.prompt_cache[0]._idx if group.prompt_cache else 0  # the group's columns
        lengths = [len(t) for t in group.tokens]
        if g > self._width:
            self._widen(g - self._width)
        free = [i for i, r in enumerate(self._slots) if r is None]
        slots = free[:len(group.uids)]
        grow = len(group.uids) - len(slots)
        if grow:
            slots += list(range(len(self._slots), len(self._slots) + grow))
            self._grow(grow, group)
        if g:
            index = mx.array(slots)
            lo = self._width - g
            for mine, theirs in zip(self._cache, group.prompt_cache):
                self._allocate(mine, theirs)
                mine.keys[index, :, lo:self._width] = theirs.keys[..., :g, :]
                mine.values[index, :, lo:self._width] = theirs.values[..., :g, :]
        # A new array, not an update in place: the old one is also the step in flight's result.
        joined = [0] * len(self._slots)
        for slot, token in zip(slots, last):
            joined[slot] = 1
        new = [0] * len(self._slots)
        for slot, token in zip(slots, last):
            new[slot] = token
        if self._inputs is None:
            self._inputs = mx.array(new, dtype=mx.uint32)
        else:
            self._inputs = mx.where(mx.array(joined, dtype=mx.bool_), mx.array(new, dtype=self._inputs.dtype),
                                    self._inputs)
        for k, slot in enumerate(slots):
            uid = group.uids[k]
            limit, stop, wants = self._options.pop(uid)
            row = _Row(uid, group.tokens[k], group.samplers[k], group.logits_processors[k], stop, limit, wants)
            self._slots[slot] = row
            self._lengths[slot] = lengths[k]
            self._by_uid[uid] = slot
            self._prompt_last[slot] = last[k]
        self._sync_offsets()

    def _grow(self, n: int, group: PromptProcessingBatch) -> None:
        """n more slots at the end (rows joined a full batch): one copy of the cache."""
        self._slots += [None] * n
        self._lengths += [0] * n
        self._prompt_last += [0] * n
        if self._inputs is not None:
            self._inputs = mx.concatenate([self._inputs, mx.zeros((n,), dtype=self._inputs.dtype)])
        if not self._cache:
            self._cache = [BatchKVCache([0] * len(self._slots)) for _ in group.prompt_cache]
            return
        for mine in self._cache:
            if mine.keys is not None:
                b, h, size, dk = mine.keys.shape
                mine.keys = mx.concatenate([mine.keys, mx.zeros((n, h, size, dk), dtype=mine.keys.dtype)])
                mine.values = mx.concatenate(
                    [mine.values, mx.zeros((n, h, size, mine.values.shape[3]), dtype=mine.values.dtype)])

    def _allocate(self, mine: BatchKVCache, theirs: BatchKVCache) -> None:
        """A layer that holds nothing yet (every row so far had a one-token prompt) gets its arrays."""
        if mine.keys is not None:
            return
        _, h, _, dk = theirs.keys.shape
        size = max(_KV_BLOCK, -(-self._width // _KV_BLOCK) * _KV_BLOCK)
        mine.keys = mx.zeros((len(self._slots), h, size, dk), dtype=theirs.keys.dtype)
        mine.values = mx.zeros((len(self._slots), h, size, theirs.values.shape[3]), dtype=theirs.values.dtype)

    def _widen(self, n: int) -> None:
        """A row longer than every slot joins: shift every slot's state n columns right."""
        for c in self._cache:
            if c.keys is not None:
                pad = [(0, 0), (0, 0), (n, 0), (0, 0)]
                c.keys = mx.pad(c.keys[..., :self._width, :], pad)
                c.values = mx.pad(c.values[..., :self._width, :], pad)
        self._width += n

    def _compact(self) -> None:
        """Drop idle slots when more than half are idle; drop columns no live row reaches back to."""
        live = [i for i, r in enumerate(self._slots) if r is not None]
        if not live:
            return
        idle = len(self._slots) - len(live)
        trim = self._width - max(self._lengths[i] for i in live)
        if idle <= len(live) and trim < _KV_BLOCK:
            return
        keep = mx.array(live) if idle > len(live) else None
        for c in self._cache:
            if c.keys is None:
                continue
            k, v = c.keys[..., trim:self._width, :], c.values[..., trim:self._width, :]
            if keep is not None:
                k, v = k[keep], v[keep]
            c.keys, c.values = k, v
        self._width -= trim
        self._lengths = [min(n, self._width) for n in self._lengths]  # idle slots' stale rows
        if keep is not None:
            self._slots = [self._slots[i] for i in live]
            self._lengths = [self._lengths[i] for i in live]
            self._prompt_last = [self._prompt_last[i] for i in live]
            self._by_uid = {r.uid: n for n, r in enumerate(self._slots)}
            if self._inputs is not None:
                self._inputs = self._inputs[keep]
            if self._pending is not None:
                sampled, logprobs, owners = self._pending
                self._pending = (sampled[keep], None if logprobs is None else logprobs[keep], [owners[i] for i in live])
        self._sync_offsets()

    def _sync_offsets(self) -> None:
        """Each layer's per-slot position and left padding, from the host's lengths."""
        lengths = mx.array(self._lengths)
        padding = mx.array([self._width - n for n in self._lengths])
        for c in self._cache:
            c.offset, c.left_padding, c._idx = lengths, padding, self._width

    def _reset(self) -> None:
        self._cache, self._slots, self._lengths, self._prompt_last = [], [], [], []
        self._width, self._inputs = 0, None

    # ---- prefill ------------------------------------------------------------
    def _prefill(self) -> None:
        """Take queued prompts into the prompt batch, hand finished ones to the slots (next
        call), and prefill one chunk of the rest."""
        n = min(self.prefill_batch_size - len(self._prompt_batch), self._decode_room() - len(self._prompt_batch),
                len(self._unprocessed_sequences))
        if n > 0:
            self._prompt_batch.extend(self._take(n))
        done = [i for i, seq in enumerate(self._currently_processing)
                if len(seq[0]) == 1 and len(seq[0][0]) == 1]
        if done:
            last = [self._currently_processing[i][0][0][0] for i in done]
            if len(done) == len(self._prompt_batch):  # the whole batch: no split copy
                group = self._prompt_batch
                self._prompt_batch = self._empty_prompt_batch()
                self._currently_processing = []
            else:
                group = self._prompt_batch.split(done)
                self._currently_processing = [s for i, s in enumerate(self._currently_processing) if i not in done]
            self._joining.append((group, last))
        prompts = []
        share = self.prefill_step_size
        if self.prefill_bucket > 1:  # chunk boundaries on the bucket: contexts stay on it too
            share = max(self.prefill_bucket, share - share % self.prefill_bucket)
        for seq in self._currently_processing:
            segments = seq[0]
            take = min(len(segments[0]), share)
            prompts.append(segments[0][:take])
            segments[0] = segments[0][take:]
            if not segments[0]:
                segments.pop(0)
            seq[1] += take
        if prompts:
            tic = time.perf_counter()
            self._prompt_batch.prefill_step_size = self.prefill_step_size
            self._prompt_batch.prompt(prompts)
            self._counters.prompt_tokens += sum(len(p) for p in prompts)
            self._counters.prompt_time += time.perf_counter() - tic

    def _empty_prompt_batch(self) -> _PromptBatch:
        batch = _PromptBatch.empty(self.model, greedy_sampler, prefill_step_size=self.prefill_step_size)
        batch.bucket = self.prefill_bucket
        return batch

    def _take(self, n: int) -> PromptProcessingBatch:
        taken = [self._unprocessed_sequences.popleft() for _ in range(n)]
        for seq in taken:
            self._currently_processing.append([seq[1], 0, sum(len(s) for s in seq[1])])
        batch = _PromptBatch(
            model=self.model, uids=[s[0] for s in taken], caches=[s[3] for s in taken],
            tokens=[s[4] for s in taken], prefill_step_size=self.prefill_step_size,
            samplers=[s[5] for s in taken], fallback_sampler=greedy_sampler,
            logits_processors=[s[6] for s in taken], stop_sequences=[s[7] for s in taken],
            max_tokens=[s[2] for s in taken])
        batch.bucket = self.prefill_bucket
        return batch
