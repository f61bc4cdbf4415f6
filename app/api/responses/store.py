"""Stored responses, for GET /v1/responses/{id} and previous_response_id, kept in memory.

A client sees only its own responses (its scope: the API key's id, or its address when keys
are off); anyone else's id reads as unknown. The bounds are the server's memory, so they hold
for the store as a whole, not per client: at most `max_count` responses and `max_bytes` of
JSON (least recently used go first), each for `ttl_s` after it was stored.

Each response keeps the whole conversation that led to it, so that previous_response_id still
works when earlier responses of the chain were evicted. A chain's messages are the same dict
objects in every entry (never mutated), so the byte count, which counts them per entry, errs
on the safe side.

One gevent worker serves every request and nothing here yields: no lock is needed.
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

MIB = 1024 * 1024


@dataclass(frozen=True)
class StoredResponse:
    scope: str
    response: dict  # the response object, as GET returns it
    conversation: list[dict]  # chat messages up to and including its output
    size: int  # bytes of both as JSON
    expires: float


class ResponseStore:
    def __init__(self, max_count: int = 1000, max_bytes: int = 64 * MIB, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.max_count, self.max_bytes, self.ttl_s = max_count, max_bytes, ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()  # least recently used first
        self._by_age: OrderedDict[str, float] = OrderedDict()  # stored first first: the TTL order
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, scope: str, response: dict, conversation: list[dict]) -> bool:
        """Keep a response (replacing one with its id); False if it alone exceeds max_bytes."""
        size = len(json.dumps([response, conversation], ensure_ascii=False, separators=(",", ":")).encode())
        self._remove(response["id"])
        if size > self.max_bytes or self.max_count < 1:
            return False
        self._expire()
        while self._entries and (len(self._entries) >= self.max_count or self.bytes + size > self.max_bytes):
            self._remove(next(iter(self._entries)))
        expires = self._clock() + self.ttl_s
        self._entries[response["id"]] = StoredResponse(scope, response, conversation, size, expires)
        self._by_age[response["id"]] = expires
        self.bytes += size
        return True

    def get(self, scope: str, response_id: str) -> Optional[StoredResponse]:
        self._expire()
        entry = self._entries.get(response_id)
        if entry is None or entry.scope != scope:
            return None
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, scope: str, response_id: str) -> bool:
        if self.get(scope, response_id) is None:
            return False
        self._remove(response_id)
        return True

    def _expire(self) -> None:
        """The TTL is the same for all, so the oldest stored expire first."""
        now = self._clock()
        while self._by_age and next(iter(self._by_age.values())) <= now:
            self._remove(next(iter(self._by_age)))

    def _remove(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self.bytes -= entry.size
            del self._by_age[response_id]
