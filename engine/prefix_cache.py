"""A byte-bounded prefix cache: KV state left by finished sequences, reused by new prompts.

A finished sequence leaves its per-layer KV cache (prompt + generated tokens) here. A new
prompt that shares a prefix with an entry starts from that state and prefills only the rest:
a repeated system prompt, a chat's earlier turns, an agent's growing transcript.

Lookups go by chained hashes of fixed-size token blocks, then the chosen entry is checked
token by token, so a lookup costs about one dict probe per block, not a scan of entries.
Entries are evicted least recently used first, to stay within a byte limit the engine sets
whenever sequences join or finish, from its own state. Only plain `KVCache` layers (trimmable) are cached.

Engine thread only. Every decision depends on token ids and call order alone (Python hashes
of int tuples are the same in every process), so all ranks of a group decide alike.
"""
from __future__ import annotations

import collections
import zlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

BLOCK = 16  # tokens per hashed block; shorter shared prefixes are not worth a lookup


def block_hashes(tokens: Sequence[int], scope: str = "") -> list[int]:
    """Chained hash of every whole block: hashes[k] identifies tokens[: (k + 1) * BLOCK] within
    `scope` (entries of one scope never match prompts of another)."""
    hashes, h = [], zlib.crc32(scope.encode())  # str hash() differs per process; crc32 does not
    for start in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[start:start + BLOCK])))
        hashes.append(h)
    return hashes


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(eq=False)
class Entry:
    tokens: np.ndarray
    layers: list  # one mlx-lm KVCache per layer, holding exactly len(tokens) positions
    nbytes: int
    hashes: list[int]


@dataclass
class PrefixCacheStats:
    hits: int = 0
    misses: int = 0
    hit_tokens: int = 0
    stored: int = 0
    evicted: int = 0


@dataclass
class PrefixCache:
    capacity: int  # bytes; the engine may lower the live limit below this with trim_to()
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)

    def __post_init__(self):
        self._lru: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self._by_block: dict[int, dict[int, Entry]] = {}  # chain hash -> entries through it
        self._by_last_block: dict[int, dict[int, Entry]] = {}  # deepest whole block -> entries
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, prompt: Sequence[int], scope: str = "") -> tuple[Optional[list], int]:
        """(layers to start from, tokens they cover), or (None, 0) on a miss.

        At least the last prompt token is always left to compute: it yields the first logits.
        """
        entry = self._deepest_match(block_hashes(prompt, scope))
        if entry is None:
            self.stats.misses += 1
            return None, 0
        usable = min(common_prefix(entry.tokens, np.asarray(prompt)), len(prompt) - 1)
        if usable < BLOCK:
            self.stats.misses += 1
            return None, 0
        self._lru.move_to_end(id(entry))
        self.stats.hits += 1
        self.stats.hit_tokens += usable
        return [_trimmed(layer, usable) for layer in entry.layers], usable

    def store(self, tokens: Sequence[int], layers: list, nbytes: int, scope: str = "") -> None:
        """Keep a finished sequence's state; entries that are prefixes of it become redundant."""
        if self.capacity <= 0 or len(tokens) < BLOCK or nbytes > self.capacity:
            return
        hashes = block_hashes(tokens, scope)
        entry = Entry(np.asarray(tokens), layers, nbytes, hashes)
        for h in hashes:
            for old in list(self._by_last_block.get(h, {}).values()):
                if len(old.tokens) <= len(tokens) and common_prefix(old.tokens, entry.tokens) == len(old.tokens):
                    self._remove(old)
        self._lru[id(entry)] = entry
        for h in hashes:
            self._by_block.setdefault(h, {})[id(entry)] = entry
        self._by_last_block.setdefault(hashes[-1], {})[id(entry)] = entry
        self.nbytes += nbytes
        self.stats.stored += 1
        self.trim_to(self.capacity)

    def trim_to(self, limit: int) -> None:
        """Evict least recently used entries until at most min(limit, capacity) bytes remain."""
        limit = min(limit, self.capacity)
        while self._lru and self.nbytes > limit:
            self._remove(next(iter(self._lru.values())))
            self.stats.evicted += 1

    def clear(self) -> None:
        self.trim_to(0)

    def _deepest_match(self, hashes: list[int]) -> Optional[Entry]:
        found = None
        for h in hashes:
            through = self._by_block.get(h)
            if not through:
                break
            found = through
        if not found:
            return None
        return max(found.values(), key=lambda e: len(e.tokens))

    def _remove(self, entry: Entry) -> None:
        key = id(entry)
        if self._lru.pop(key, None) is None:
            return
        for h in entry.hashes:
            bucket = self._by_block.get(h)
            if bucket is not None:
                bucket.pop(key, None)
                if not bucket:
                    del self._by_block[h]
        last = self._by_last_block.get(entry.hashes[-1])
        if last is not None:
            last.pop(key, None)
            if not last:
                del self._by_last_block[entry.hashes[-1]]
        self.nbytes -= entry.nbytes


def _trimmed(layer, length: int):
    """A cache object over the same (immutable, shared) arrays that covers `length` positions.

    mlx-lm copies these into the batch's own arrays when the sequence joins a batch, so the
    entry itself is never written to."""
    view = layer.__class__()
    view.keys, view.values, view.offset = layer.keys, layer.values, length
    return view
