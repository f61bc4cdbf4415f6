"""The decode side of Orchard's batching core: rows that decode together, each in a fixed slot
of one batch KV cache (a `BatchKVCache` per layer whose batch index is the slot).

Joining rows are written into free slots and ride the next decode step with everyone else
(their input there is the first token sampled in their prompt's last prefill pass, handed out
with that step, or their prompt's last token); a leaving row just frees its slot; the
cache is compacted only when more than half of it is idle or the shared left padding has
grown by a KV block. Each row's length is kept on the host, so no decision reads anything
back from the device: the one host sync per step reads the previous step's tokens, while
the step just launched runs. See engine/batcher.py for why, and for the groups these form.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import mlx.core as mx
from mlx_lm.generate import PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache, KVCache, TokenBuffer
from mlx_lm.sample_utils import greedy_sampler

from engine.slot_attention import SlotKVCache

_KV_BLOCK = BatchKVCache.step  # columns the cache grows by; shared left padding past it is trimmed


@dataclass
class Response:
    uid: int
    token: int
    logprobs: Optional[mx.array]  # the row's log-probabilities over the vocabulary, when asked for
    finish_reason: Optional[str]
    prompt_cache: Optional[List[Any]]  # a finished row's KV state, per layer (lazy copies)
    all_tokens: Optional[List[int]]  # the tokens that state holds


@dataclass
class FirstToken:
    """A row's first token, sampled from its prompt's last prefill pass and still on the device:
    the row joins a decode group with it as its input, and it is read back (and handed out)
    with that group's next step, one step sooner than a prompt whose last token still had to
    go through a decode step."""
    tokens: mx.array  # the pass's samples, one per row it completed
    index: int  # this row's
    logprobs: Optional[mx.array]  # its log-probabilities over the vocabulary, when needed


def sample(logits: mx.array, logprobs: Optional[mx.array], samplers: list) -> mx.array:
    """One token per row: greedy rows (and idle ones, sampler None) take the argmax; each other
    sampler draws for its own rows (a seeded row's sampler is its own, so its draws do not
    depend on its neighbours)."""
    groups: dict[int, tuple] = {}
    for i, sampler in enumerate(samplers):
        if sampler is not None and sampler is not greedy_sampler:
            groups.setdefault(id(sampler), (sampler, []))[1].append(i)
    if len(groups) == 1:
        sampler, idx = next(iter(groups.values()))
        if len(idx) == len(samplers):
            return sampler(logprobs)  # one sampler for the whole batch: one call
    sampled = mx.argmax(logits, axis=-1)
    for sampler, idx in groups.values():
        picks = slice(idx[0], idx[0] + 1) if len(idx) == 1 else mx.array(idx)
        sampled[picks] = sampler(logprobs[picks]).astype(sampled.dtype)
    return sampled


class Row:
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
        self.priming = True  # its first decode input is its prompt's last token (not a first token)
        self.live = True


class DecodeGroup:
    """Rows decoding together, one forward pass per step."""

    def __init__(self, model, fused: bool = False):
        self.model = model
        self.fused = fused  # attention reads each slot's left padding: no mask (engine/slot_attention.py)
        self._cache: list[SlotKVCache] = []
        self._slots: list[Optional[Row]] = []  # occupant of each slot
        self._lengths: list[int] = []  # tokens in each slot's KV state (host copy: no read-backs)
        self._width = 0  # columns written so far (every slot's state ends there, left-padded)
        self._by_uid: dict[int, int] = {}  # decoding uid -> slot
        self._inputs: Optional[mx.array] = None  # next step's input per slot (the last step's samples)
        self._prompt_last: list[int] = []  # each slot's prompt's last token (its first decode input)
        self._pending = None  # (tokens, logprobs, owners) of the step in flight
        self._firsts: list[tuple[Row, FirstToken]] = []  # joined with a first token: handed out next

    def __len__(self) -> int:
        return len(self._by_uid)

    def __contains__(self, uid: int) -> bool:
        return uid in self._by_uid

    @property
    def active(self) -> bool:
        """Rows decode, or a step is still in flight."""
        return bool(self._by_uid) or self._pending is not None or bool(self._firsts)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._cache)

    def begin(self):
        """Launch this group's next step (if a row decodes); returns the previous step, still to
        be handed out with `end` (every group launches before any reads its tokens back)."""
        finished, self._pending = self._pending, None
        if self._by_uid:
            self.launch()
        return finished

    def end(self, finished) -> list[Response]:
        """Hand out the previous step's tokens and the first tokens of rows that joined this step,
        then compact (or drop the cache if nobody decodes)."""
        firsts, self._firsts = self._firsts, []
        out = self.emit(finished, firsts) if finished is not None or firsts else []
        if not self._by_uid and self._pending is None:
            self.reset()  # nobody decodes: give the cache back
        else:
            self.compact()
        return out

    def state_of(self, uid: int):
        """(per-layer KV state, tokens) of a decoding row."""
        slot = self._by_uid[uid]
        row = self._slots[slot]
        return self.slot_state(slot, len(row.tokens)), list(row.tokens)

    def drop(self, uid: int) -> None:
        """The row leaves its slot (ended, or removed): the step in flight's token is not handed to it."""
        slot = self._by_uid.pop(uid, None)
        if slot is not None:
            self._slots[slot].live = False
            self._slots[slot] = None

    def launch(self) -> None:
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
        samplers = [None] * len(rows)
        for i, r in live:
            samplers[i] = r.sampler
        sampled = sample(logits, logprobs, samplers)
        self._lengths = [n + 1 for n in self._lengths]  # every slot wrote one column, idle ones too
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

    def emit(self, step, firsts=()) -> list[Response]:
        """The previous step's tokens, to the rows that were in their slots when it launched, and
        the first tokens of the rows that joined with one."""
        sampled, logprobs, owners = step if step is not None else (None, None, [])
        arrays = [] if sampled is None else [sampled]
        if firsts:
            dtype = mx.uint32 if sampled is None else sampled.dtype
            arrays += [f.tokens[f.index:f.index + 1].astype(dtype) for _, f in firsts]
        # The one host sync of a step (this step is already queued; the first tokens came from
        # the prefill pass queued before it).
        tokens = (arrays[0] if len(arrays) == 1 else mx.concatenate(arrays)).tolist()
        rows = list(owners) + [row for row, _ in firsts]
        out = []
        for slot, (row, token) in enumerate(zip(rows, tokens)):
            if row is None or not row.live:
                continue
            row.generated += 1
            finish = None
            if row.generated >= row.max_tokens:
                finish = "length"
            if row.matcher.advance(token):
                finish = "stop"
            row.tokens.append(token)  # it was the input of the step launched just now
            if slot >= len(owners):
                first = firsts[slot - len(owners)][1]
                row_logprobs = first.logprobs if row.wants_logprobs else None
            else:
                row_logprobs = logprobs[slot] if logprobs is not None and row.wants_logprobs else None
            if finish is None:
                out.append(Response(row.uid, token, row_logprobs, None, None, None))
                continue
            state = self.slot_state(self._by_uid[row.uid], len(row.tokens))
            out.append(Response(row.uid, token, row_logprobs, finish, state, row.tokens))
            self.free(row)
        return out

    def free(self, row: Row) -> None:
        self.drop(row.uid)

    def slot_state(self, slot: int, length: int) -> list[KVCache]:
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

    def join(self, group: PromptProcessingBatch, last: list[int], rows: list) -> None:
        """Prefilled rows (their KV state in `group`, all but each prompt's last token) take
        free slots, or new ones; `rows` are their `Row`s."""
        g = group.prompt_cache[0]._idx if group.prompt_cache else 0  # the group's columns
        lengths = [len(t) for t in group.tokens]
        free = [i for i, r in enumerate(self._slots) if r is None]
        slots = free[:len(group.uids)]
        grow = len(group.uids) - len(slots)
        if grow:
            slots += list(range(len(self._slots), len(self._slots) + grow))
        if not self._cache:
            self._cache = [self._new_cache(len(self._slots) + grow) for _ in group.prompt_cache]
        if grow or g > self._width:
            self._reshape(grow, max(0, g - self._width))
        if g:
            lo = self._width - g
            run = slots == list(range(slots[0], slots[0] + len(slots)))  # consecutive: a plain slice
            index = slice(slots[0], slots[0] + len(slots)) if run else mx.array(slots)
            for mine, theirs in zip(self._cache, group.prompt_cache):
                self._allocate(mine, theirs)
                mine.keys[index, :, lo:self._width] = theirs.keys[..., :g, :]
                mine.values[index, :, lo:self._width] = theirs.values[..., :g, :]
        # A new array, not an update in place: the old one is also the step in flight's result.
        joined = [0] * len(self._slots)
        new = [0] * len(self._slots)
        firsts = [(slot, token) for slot, token in zip(slots, last) if isinstance(token, FirstToken)]
        for slot, token in zip(slots, last):
            if not isinstance(token, FirstToken):
                joined[slot], new[slot] = 1, token
        dtype = mx.uint32 if self._inputs is None else self._inputs.dtype
        inputs = mx.zeros((len(self._slots),), dtype=dtype) if self._inputs is None else self._inputs
        if any(joined):
            inputs = mx.where(mx.array(joined, dtype=mx.bool_), mx.array(new, dtype=dtype), inputs)
        if firsts:  # still on the device: placed by a scatter, not read back
            at = mx.array([slot for slot, _ in firsts])
            values = mx.concatenate([f.tokens[f.index:f.index + 1] for _, f in firsts]).astype(dtype)
            placed = mx.zeros((len(self._slots),), dtype=dtype).at[at].add(values)
            mask = [0] * len(self._slots)
            for slot, _ in firsts:
                mask[slot] = 1
            inputs = mx.where(mx.array(mask, dtype=mx.bool_), placed, inputs)
        self._inputs = inputs
        for k, slot in enumerate(slots):
            row = rows[k]
            self._slots[slot] = row
            self._lengths[slot] = lengths[k]
            self._by_uid[row.uid] = slot
            if isinstance(last[k], FirstToken):
                row.priming = False  # its whole prompt is in its KV state; its input is its first token
                self._prompt_last[slot] = 0
                self._firsts.append((row, last[k]))
            else:
                self._prompt_last[slot] = last[k]
        self._sync_offsets()

    def _new_cache(self, rows: int) -> SlotKVCache:
        cache = SlotKVCache([0] * rows)
        cache.fused = self.fused
        return cache

    def _reshape(self, more_rows: int, shift: int) -> None:
        """More slots (rows joined a full batch) and/or every state `shift` columns further right
        (a row longer than all of them joined): one new array per layer with a KV block of
        room past the width, and one copy into it. (Padding, concatenating and growing on the
        next step as separate ops copied every slot three times: seconds on the CPU for a
        4k-token row joining eight short ones.)"""
        self._slots += [None] * more_rows
        self._lengths += [0] * more_rows
        self._prompt_last += [0] * more_rows
        if self._inputs is not None and more_rows:
            self._inputs = mx.concatenate([self._inputs, mx.zeros((more_rows,), dtype=self._inputs.dtype)])
        width = self._width + shift
        size = -(-(width + 1) // _KV_BLOCK) * _KV_BLOCK
        rows = len(self._slots)
        for c in self._cache:
            if c.keys is None:
                continue
            old_rows = c.keys.shape[0]
            if not shift and c.keys.shape[2] >= size:
                size_now = c.keys.shape[2]
            else:
                size_now = size
            keys = mx.zeros((rows, c.keys.shape[1], size_now, c.keys.shape[3]), dtype=c.keys.dtype)
            values = mx.zeros((rows, c.values.shape[1], size_now, c.values.shape[3]), dtype=c.values.dtype)
            keys[:old_rows, :, shift:width] = c.keys[..., :self._width, :]
            values[:old_rows, :, shift:width] = c.values[..., :self._width, :]
            c.keys, c.values = keys, values
        self._width = width

    def _allocate(self, mine: BatchKVCache, theirs: BatchKVCache) -> None:
        """A layer that holds nothing yet (every row so far had a one-token prompt) gets its arrays."""
        if mine.keys is not None:
            return
        _, h, _, dk = theirs.keys.shape
        size = max(_KV_BLOCK, -(-(self._width + 1) // _KV_BLOCK) * _KV_BLOCK)
        mine.keys = mx.zeros((len(self._slots), h, size, dk), dtype=theirs.keys.dtype)
        mine.values = mx.zeros((len(self._slots), h, size, theirs.values.shape[3]), dtype=theirs.values.dtype)

    def compact(self) -> None:
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
        padding = mx.array([self._width - n for n in self._lengths], dtype=mx.int32)
        for c in self._cache:
            c.offset, c.left_padding, c._idx = lengths, padding, self._width

    def reset(self) -> None:
        self._cache, self._slots, self._lengths, self._prompt_last = [], [], [], []
        self._width, self._inputs, self._firsts = 0, None, []

