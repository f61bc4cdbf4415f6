"""A synthetic generator: emits tokens without a model (LOAD_FORMAT=synthetic).

Used only to benchmark the HTTP path (routes, SSE, detokenization, the thread
hand-off) in isolation: each step 'decodes' one token for every running
sequence after STEP_S of GIL-free waiting, as a real model step would.
"""
from __future__ import annotations

from gevent import monkey

from engine.generator import StepToken
from engine.messages import AddRequest

_sleep = monkey.get_original("time", "sleep")  # the engine thread must never touch gevent
STEP_S = 0.001


class SyntheticGenerator:
    def __init__(self, token_ids: list[int], max_batch: int):
        self._tokens = token_ids
        self._rows: dict[int, list[int]] = {}  # uid -> [produced, max_tokens]
        self._next_uid = 0

    def insert(self, request: AddRequest) -> tuple[int, int]:
        uid, self._next_uid = self._next_uid, self._next_uid + 1
        self._rows[uid] = [0, request.max_tokens]
        return uid, 0

    def insert_many(self, requests: list[AddRequest]) -> list:
        return [self.insert(r) for r in requests]

    def remove(self, uid: int, keep_prefix: bool = False) -> None:  # no prefix cache here
        self._rows.pop(uid, None)

    def step(self) -> list[StepToken]:
        _sleep(STEP_S)
        out = []
        for uid, row in list(self._rows.items()):
            token = self._tokens[row[0] % len(self._tokens)]
            row[0] += 1
            done = row[0] >= row[1]
            out.append(StepToken(uid, token, "length" if done else None))
            if done:
                self.remove(uid)
        return out

    @property
    def kv_cache_bytes(self) -> int:
        return 0

    prefix_cache = None
    phase_seconds = (0.0, 0.0)

    def limit_prefix_cache(self, limit: int) -> None:
        pass


def text_tokens(tokenizer) -> list[int]:
    """Ordinary word tokens, so the synthetic stream detokenizes to readable text."""
    ids = tokenizer.encode(" the quick brown fox jumps over the lazy dog and runs far away",
                           add_special_tokens=False)
    return ids or [0]
